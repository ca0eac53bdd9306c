"""A plugin author's plugins failing or written their own way: the request still routes, start-up errors
name the plugin, and what the extension points need comes from `llmepp`. Each was a traceback or a 500."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import endpoint, request

import llmepp
from llmepp import (
    Admitter,
    ConfigError,
    DataProducer,
    DirectResponse,
    Endpoint,
    InferenceRequest,
    Picker,
    Plugin,
    PluginContext,
    PluginParams,
    PluginRegistry,
    PreRequest,
    RequestError,
    RequestHeaderProcessor,
    Responder,
    SchedulingResult,
    Scorer,
)
from llmepp.config.loader import Components, build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.director import Director, RoutingDecision
from llmepp.observability.metrics import EppMetrics
from llmepp.request.parsers import headers_request

HINT = "AuthorHint"


def registry_with(*classes: type[Any]) -> PluginRegistry:
    reg = PluginRegistry()
    reg.load_entry_points()
    for cls in classes:
        reg.register(cls)
    return reg


def director(config: str, reg: PluginRegistry) -> tuple[Director, Components]:
    """A director over three endpoints for `config` built from `reg`, and what the build made."""
    ds = Datastore()
    for i in range(3):
        ds.upsert(endpoint(i).spec)
    metrics = EppMetrics()
    c = build(load_config(config), datastore=ds, metrics=metrics, plugin_registry=reg)
    return Director(ds, c.pipeline, metrics), c


class BrokenModelsResponder(Responder):
    type = "author-models-responder"

    def respond(self, request: InferenceRequest) -> None:
        raise KeyError("models")


def test_a_broken_responder_is_skipped_on_bodyless_requests_too() -> None:
    """It was on the body path; GET /v1/models answered 500 on every request."""
    d, _ = director("plugins:\n- type: author-models-responder\n", registry_with(BrokenModelsResponder))
    decision = d.handle_bodyless(headers_request({":method": "GET", ":path": "/v1/models"}, request_id="r"), None)
    assert isinstance(decision, RoutingDecision) and decision.targets[0] in d.datastore.endpoints


class AwaitableProducer(DataProducer):
    """A plain def returning an awaitable (DataProducer.produce is declared `-> Awaitable[None] | None`)."""

    type = "author-awaitable-producer"
    produces = frozenset({HINT})

    async def _work(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        request.data[HINT] = {ep.name: 1.0 for ep in endpoints}

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Any:
        return self._work(request, endpoints)


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


class DecoratedAsyncProducer(DataProducer):
    """An async def behind an ordinary decorator: no coroutine function to inspect."""

    type = "author-decorated-producer"
    produces = frozenset({HINT})

    @_timed
    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        request.data[HINT] = {ep.name: 1.0 for ep in endpoints}


@pytest.mark.parametrize("producer", [AwaitableProducer, DecoratedAsyncProducer])
async def test_a_producer_returning_an_awaitable_is_awaited(producer: type[DataProducer]) -> None:
    """The coroutine was dropped, never awaited, and its data never made."""
    d, _ = director(f"plugins:\n- type: {producer.type}\n", registry_with(producer))
    req = request(b"x" * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert isinstance(await d.handle_request(req, None), RoutingDecision)
    assert HINT in req.data


class MapScorer(Scorer):
    """Ported from Go, where a scorer answers map[Endpoint]float64."""

    type = "author-map-scorer"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Any:
        return {ep: 1.0 for ep in endpoints}


class NoneScorer(Scorer):
    type = "author-none-scorer"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Any:
        return [None for _ in endpoints]


@pytest.mark.parametrize("scorer", [MapScorer, NoneScorer])
async def test_a_scorer_column_that_is_no_numbers_counts_as_zero_not_a_500(scorer: type[Scorer]) -> None:
    """As the Scorer docstring says of a wrong column; the range check outside the try made it a 500."""
    d, _ = director(f"plugins:\n- type: {scorer.type}\n- type: queue-scorer\n", registry_with(scorer))
    assert isinstance(await d.handle_request(request(b"x" * 40), None), RoutingDecision)


class TopKPicker(Picker):
    type = "author-topk-picker"

    class Params(PluginParams):  # its own, not derived from PickerParams
        k: int = 2

    def pick(self, endpoints: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        order = sorted(range(len(endpoints)), key=lambda i: -scores[i])
        return [endpoints[i] for i in order[: self.params.k]]


def test_a_picker_with_its_own_params_builds() -> None:
    """It was an AttributeError traceback (max_num_of_endpoints)."""
    picker = registry_with(TopKPicker).build("author-topk-picker", "p", {"k": 3})
    assert isinstance(picker, TopKPicker) and picker.params.k == 3 and picker.max_num_of_endpoints == 1


class NeedsBigPool(Scorer):
    type = "author-needs-pool-scorer"

    def setup(self, ctx: PluginContext) -> None:
        raise ConfigError("minEndpoints: 5 is more than the pool can hold")

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0] * len(endpoints)


def test_a_config_error_raised_in_setup_names_the_plugin() -> None:
    with pytest.raises(ConfigError) as err:
        build(load_config("plugins:\n- {type: author-needs-pool-scorer, name: mine}\n"),
              plugin_registry=registry_with(NeedsBigPool))  # fmt: skip
    assert (
        str(err.value)
        == "plugin 'mine' (type author-needs-pool-scorer): minEndpoints: 5 is more than the pool can hold"
    )


class ReadsAMissingFile(Scorer):
    type = "author-reads-file-scorer"

    def setup(self, ctx: PluginContext) -> None:
        Path("/nonexistent/model-table.json").read_text()

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0] * len(endpoints)


def test_an_os_error_in_setup_is_a_start_up_error_naming_the_plugin() -> None:
    """A file or socket a plugin's parameters name that the machine cannot give is an operator's problem: one
    line naming the plugin and the cause, not a traceback."""
    with pytest.raises(ConfigError) as err:
        build(load_config("plugins:\n- {type: author-reads-file-scorer, name: table}\n"),
              plugin_registry=registry_with(ReadsAMissingFile))  # fmt: skip
    message = str(err.value)
    assert message.startswith("plugin 'table' (type author-reads-file-scorer): ")
    assert "No such file or directory" in message and "/nonexistent/model-table.json" in message


def test_what_the_extension_points_document_is_exported() -> None:
    """Admitter says raise RequestError, Parser.parse BadRequest; the README's plugin section uses
    reference_default: `from llmepp import ...` failed for all three."""
    for name in ("RequestError", "BadRequest", "reference_default"):
        assert name in llmepp.__all__ and getattr(llmepp, name) is not None


class AsyncAdmitter(Admitter):
    type = "author-async-admitter"

    async def admit(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:  # type: ignore[override]
        raise RequestError("never admitted")


class AsyncScorerAndPreRequest(Scorer, PreRequest):
    type = "author-async-pre-request"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0] * len(endpoints)

    async def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:  # type: ignore[override]
        pass


@pytest.mark.parametrize(("cls", "hook"), [(AsyncAdmitter, "admit"), (AsyncScorerAndPreRequest, "pre_request")])
def test_an_async_def_where_the_epp_calls_synchronously_is_a_config_error(cls: type[Plugin], hook: str) -> None:
    """The coroutine was created and dropped: an async admitter admitted every request, an async
    pre_request never ran, silently."""
    with pytest.raises(ConfigError) as err:
        registry_with(cls).build(cls.type, "mine", None)
    assert str(err.value).startswith(f"plugin 'mine' (type {cls.type}): {hook} is an async def")


class AsyncProducer(DataProducer):
    type = "author-async-producer"

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        pass


def test_an_async_producer_is_fine() -> None:
    assert isinstance(registry_with(AsyncProducer).build(AsyncProducer.type, "p", None), AsyncProducer)


class TenantFromHeader(RequestHeaderProcessor):
    type = "author-tenant-header"

    def process_headers(self, request: InferenceRequest) -> None:
        request.data["tenant"] = request.headers.get("x-tenant", "")


class TenantModels(Responder):
    type = "author-tenant-models"

    def respond(self, request: InferenceRequest) -> DirectResponse | None:
        tenant = request.data.get("tenant")
        return DirectResponse(200, tenant.encode(), "text/plain") if tenant else None


def test_request_header_processors_run_on_bodyless_requests_too() -> None:
    """Their docstring says they run before anything else; on GET /v1/models a responder did not see what
    they set."""
    reg = registry_with(TenantFromHeader, TenantModels)
    d, _ = director("plugins:\n- type: author-tenant-header\n- type: author-tenant-models\n", reg)
    req = headers_request({":method": "GET", ":path": "/v1/models", "x-tenant": "a"}, request_id="r")
    answer = d.handle_bodyless(req, None)
    assert isinstance(answer, DirectResponse) and answer.body == b"a"


class StrictScorer(Scorer):
    type = "author-strict-scorer"

    class Params(PluginParams):
        window: int = 8

        def __post_init__(self) -> None:
            if self.window > 64:
                raise ConfigError(f"window: {self.window} is above 64")

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0] * len(endpoints)


def test_a_config_error_from_a_params_post_init_names_the_plugin() -> None:
    """msgspec turns only ValueError / TypeError into validation errors: a ConfigError escaped bare."""
    with pytest.raises(ConfigError) as err:
        registry_with(StrictScorer).build(StrictScorer.type, "mine", {"window": 100})
    assert str(err.value) == "plugin 'mine' (type author-strict-scorer): parameters: window: 100 is above 64"
