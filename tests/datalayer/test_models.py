"""Model lists: the /v1/models decoder (property-based too) and ModelsPoller against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from helpers import until
from hypothesis import given
from hypothesis import strategies as st

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec, ModelData
from llmepp.datalayer.models import ModelsPageError, ModelsPoller, parse_models_page
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.models_source import ModelsDataExtractor, ModelsDataSource

from .fakes import bound_socket

VLLM_PAGE = {
    "object": "list",
    "data": [
        {"id": "llama", "object": "model", "created": 1700000000, "owned_by": "vllm", "root": "/models/llama",
         "parent": None, "max_model_len": 8192, "permission": [{"id": "p", "allow_view": True}]},
        {"id": "legal", "object": "model", "created": 1700000001, "owned_by": "vllm", "root": "/adapters/legal",
         "parent": "llama", "max_model_len": 8192},
    ],
}  # fmt: skip


def test_a_vllm_page_decodes_with_adapters_and_their_parents() -> None:
    assert parse_models_page(json.dumps(VLLM_PAGE).encode()) == (
        ModelData("llama", "model", 1700000000, "vllm", None, "/models/llama", 8192),
        ModelData("legal", "model", 1700000001, "vllm", "llama", "/adapters/legal", 8192),
    )


@pytest.mark.parametrize(("extra", "root", "length"), [
    ({"root": 7, "max_model_len": "8192"}, None, None),
    ({"root": "", "max_model_len": -1}, None, None),
    ({"max_model_len": True}, None, None),
    ({"max_model_len": 4096.0}, None, None),
    ({"root": "r", "max_model_len": 4096}, "r", 4096),
])  # fmt: skip
def test_odd_root_or_context_length_values_are_dropped_not_the_list(
    extra: dict[str, object], root: str | None, length: int | None
) -> None:
    (model,) = parse_models_page(json.dumps({"data": [{"id": "m", **extra}]}).encode())
    assert (model.id, model.root, model.max_model_len) == ("m", root, length)


def test_minimal_entries_take_defaults() -> None:
    assert parse_models_page(b'{"data": [{"id": "m"}]}') == (ModelData("m"),)
    assert parse_models_page(b'{"object": "list", "data": []}') == ()
    # null is the default, as Go's encoding/json reads it (servers built on pydantic Optional fields send it)
    assert parse_models_page(b'{"data": [{"id": "m", "object": null, "created": null, "owned_by": null}]}') == (
        ModelData("m"),
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>gateway</html>", "not a model list: JSON is malformed"),
        (b'{"object": "list"}', "missing required field `data`"),
        (b'{"data": {"id": "m"}}', "Expected `array`, got `object` - at `$.data`"),
        (b'{"data": [{"object": "model"}]}', "missing required field `id` - at `$.data[0]`"),
        (b'{"data": [{"id": 7}]}', "Expected `str`, got `int` - at `$.data[0].id`"),
        (b'{"data": [{"id": "a"}, {"id": ""}]}', "empty id at `$.data[1].id`"),
        (b'{"data": [{"id": "\xff"}]}', "not a model list: 'utf-8' codec can't decode byte 0xff"),
    ],
)
def test_pages_that_are_not_model_lists_are_errors_that_say_why(body: bytes, message: str) -> None:
    with pytest.raises(ModelsPageError) as e:
        parse_models_page(body)
    assert message in str(e.value)


_entry = st.builds(
    ModelData,
    id=st.text(min_size=1, max_size=20),
    object=st.sampled_from(["model"]),
    created=st.integers(min_value=0, max_value=2**40),
    owned_by=st.text(max_size=10),
    parent=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
)


@given(st.lists(_entry, max_size=8))
def test_any_encoded_model_list_decodes_to_itself(models: list[ModelData]) -> None:
    data = [dataclasses.asdict(m) for m in models]
    page = {"object": "list", "data": data}
    assert parse_models_page(json.dumps(page).encode()) == tuple(models)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash_the_decoder(body: bytes) -> None:
    try:
        result = parse_models_page(body)
    except ModelsPageError:
        return
    assert all(isinstance(m, ModelData) and m.id for m in result)


# -- the poller against real HTTP servers ----------------------------------------------------------
class ModelsServer:
    """A model server's /v1/models whose answer the test switches: a page, a status, or garbage."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.body = json.dumps(VLLM_PAGE).encode()
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> ModelsServer:
        app = web.Application()
        app.router.add_get("/v1/models", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = bound_socket(self.host)
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status, body=self.body, content_type="application/json")


@pytest.fixture
async def model_servers() -> AsyncIterator[Callable[[str], asyncio.Future[ModelsServer]]]:
    started: list[ModelsServer] = []

    async def start(host: str) -> ModelsServer:
        s = await ModelsServer(host).start()
        started.append(s)
        return s

    yield start  # type: ignore[misc]
    for s in started:
        await s.stop()


def _errors(metrics: EppMetrics) -> tuple[float, float]:
    poll = metrics.registry.get_sample_value(
        "llm_d_epp_datalayer_poll_errors_total", {"source_type": "models-data-source"}
    )
    extract = metrics.registry.get_sample_value(
        "llm_d_epp_datalayer_extract_errors_total",
        {"source_type": "models-data-source", "extractor_type": "models-data-extractor"},
    )
    return poll or 0.0, extract or 0.0


@contextlib.asynccontextmanager
async def polling(interval: str, fetch_timeout: float) -> AsyncIterator[tuple[Datastore, EppMetrics]]:
    """A running ModelsPoller over a fresh datastore: endpoints upserted there are polled."""
    metrics, datastore = EppMetrics(), Datastore(pool_name="pool")
    source = ModelsDataSource("models-data-source", ModelsDataSource.Params(interval=interval))
    poller = ModelsPoller(
        datastore, metrics, source, ModelsDataExtractor("models-data-extractor"), timeout=fetch_timeout
    )
    await poller.start()
    try:
        yield datastore, metrics
    finally:
        await poller.aclose()


async def test_poller_keeps_each_endpoints_models_and_counts_failures(model_servers) -> None:  # type: ignore[no-untyped-def]
    a, b = await model_servers("127.0.0.70"), await model_servers("127.0.0.71")
    async with polling("50ms", 0.3) as (datastore, metrics):
        datastore.upsert(EndpointSpec(name="a", address=a.host, port=a.port))
        datastore.upsert(EndpointSpec(name="b", address=b.host, port=b.port))
        ep_a, ep_b = datastore.get("a"), datastore.get("b")
        assert ep_a is not None and ep_b is not None
        await until(lambda: ep_a.models is not None and ep_b.models is not None)
        assert [m.id for m in ep_a.models or ()] == ["llama", "legal"]

        # b unloads its adapter: the next poll shows it.
        b.body = json.dumps({"object": "list", "data": [VLLM_PAGE["data"][0]]}).encode()
        await until(lambda: [m.id for m in ep_b.models or ()] == ["llama"])

        # A page that is not a model list: counted, the last good list stays.
        a.body = b"<html>oops</html>"
        await until(lambda: _errors(metrics)[1] >= 1)
        assert [m.id for m in ep_a.models or ()] == ["llama", "legal"]
        # A failing fetch: counted likewise.
        a.status, a.body = 500, b"{}"
        await until(lambda: _errors(metrics)[0] >= 1)
        assert [m.id for m in ep_a.models or ()] == ["llama", "legal"]

        # A removed endpoint is no longer polled.
        datastore.delete("b")
        await asyncio.sleep(0.1)
        seen = b.requests
        await asyncio.sleep(0.2)
        assert b.requests == seen


async def test_a_server_slower_than_the_poll_interval_still_gets_its_list_read(model_servers) -> None:  # type: ignore[no-untyped-def]
    """The fetch timeout is not the poll interval: a tick skips a fetch still in flight, so a server that
    answers in 300 ms is read with a 100 ms interval (the reference's fetch timeout is 1 s whatever the interval)."""
    server = await model_servers("127.0.0.72")
    server.delay = 0.3
    async with polling("100ms", 1.0) as (datastore, metrics):
        datastore.upsert(EndpointSpec(name="a", address=server.host, port=server.port))
        ep = datastore.get("a")
        assert ep is not None
        await until(lambda: ep.models is not None, within=4.0, what="the model list of a server answering in 300 ms")
        assert _errors(metrics) == (0.0, 0.0)
