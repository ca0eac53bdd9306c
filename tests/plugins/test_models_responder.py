"""models-responder: the pool-wide /v1/models answer, candidate screening, and its wiring."""

from __future__ import annotations

import json

import pytest
from helpers import request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec, ModelData
from llmepp.director import Director, RoutingDecision
from llmepp.errors import NotFound, ServiceUnavailable
from llmepp.framework.requestcontrol import DirectResponse
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.models_source import ModelsDataExtractor, ModelsDataSource
from llmepp.plugins.responders.models import ModelsResponder
from llmepp.request.types import InferenceRequest, RequestKind

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: models-responder
- type: queue-scorer
"""

BASE = ModelData("llama", created=10, owned_by="vllm", root="/models/llama", max_model_len=8192)
LEGAL = ModelData("legal", created=20, owned_by="vllm", parent="llama", root="/adapters/legal", max_model_len=8192)


def pool(*models: tuple[ModelData, ...] | None) -> tuple[Datastore, list[Endpoint]]:
    ds = Datastore()
    for i, listed in enumerate(models):
        ds.upsert(EndpointSpec(name=f"pod-{i}", address=f"10.0.0.{i + 1}", port=8000))
        ep = ds.get(f"pod-{i}")
        assert ep is not None
        ep.models = listed
    return ds, list(ds.endpoints)


def responder(ds: Datastore) -> ModelsResponder:
    c = build(load_config(CONFIG), datastore=ds, metrics=EppMetrics())
    plugin = c.plugins["models-responder"]
    assert isinstance(plugin, ModelsResponder)
    return plugin


def get(path: str = "/v1/models", method: str = "GET") -> InferenceRequest:
    return InferenceRequest(
        request_id="r", path=path, headers={":method": method, ":path": path}, kind=RequestKind.BODYLESS
    )


# -- respond -------------------------------------------------------------------------------------------
def test_the_pool_list_is_the_union_of_every_pods_models_sorted_by_id() -> None:
    other = ModelData("llama", created=99, owned_by="other")  # a later pod's duplicate id
    ds, _ = pool((BASE, LEGAL), None, (other, ModelData("code", parent="llama")))
    answer = responder(ds).respond(get())
    assert isinstance(answer, DirectResponse) and answer.status == 200
    assert answer.content_type == "application/json"
    assert json.loads(answer.body) == {
        "object": "list",
        "data": [
            {"id": "code", "object": "model", "created": 0, "owned_by": "", "parent": "llama"},  # OpenAI's 4 always
            {
                "id": "legal",
                "object": "model",
                "created": 20,
                "owned_by": "vllm",
                "root": "/adapters/legal",
                "parent": "llama",
                "max_model_len": 8192,
            },
            {
                "id": "llama",
                "object": "model",
                "created": 10,
                "owned_by": "vllm",
                "root": "/models/llama",
                "max_model_len": 8192,
            },  # pod-0's entry
        ],
    }


@pytest.mark.parametrize("path", ["/v1/models/", "/v1/models"])
def test_a_trailing_slash_matches(path: str) -> None:
    ds, _ = pool((BASE,))
    assert responder(ds).respond(get(path)) is not None


@pytest.mark.parametrize(("path", "method"), [("/v1/models", "POST"), ("/v1/modelsx", "GET"), ("/health", "GET")])
def test_other_requests_are_left_to_routing(path: str, method: str) -> None:
    ds, _ = pool((BASE,))
    assert responder(ds).respond(get(path, method)) is None


def test_one_model_by_id_or_404() -> None:
    org = ModelData("meta/llama-3", created=5, owned_by="vllm")
    ds, _ = pool((BASE, LEGAL), (org,))
    r = responder(ds)
    answer = r.respond(get("/v1/models/legal"))
    assert answer is not None and json.loads(answer.body) == {
        "id": "legal",
        "object": "model",
        "created": 20,
        "owned_by": "vllm",
        "root": "/adapters/legal",
        "parent": "llama",
        "max_model_len": 8192,
    }
    slashed = r.respond(get("/v1/models/meta/llama-3"))  # ids with a slash, as served-model-names have
    assert slashed is not None and json.loads(slashed.body)["id"] == "meta/llama-3"
    encoded = r.respond(get("/v1/models/meta%2Fllama-3"))
    assert encoded is not None and json.loads(encoded.body)["id"] == "meta/llama-3"
    with pytest.raises(NotFound, match=r"The model `qwen` does not exist\."):
        r.respond(get("/v1/models/qwen"))


def test_before_any_list_is_fetched_the_answer_is_503_not_an_empty_list() -> None:
    ds, _ = pool(None, None)
    with pytest.raises(ServiceUnavailable, match="no model server's model list has been fetched yet"):
        responder(ds).respond(get())


# -- screen --------------------------------------------------------------------------------------------
def screened(model: str, *models: tuple[ModelData, ...] | None) -> list[str]:
    ds, eps = pool(*models)
    return [ep.name for ep in responder(ds).screen(request(model=model), eps)]


def test_an_adapter_goes_only_to_the_pods_that_list_it() -> None:
    assert screened("legal", (BASE,), (BASE, LEGAL), None) == ["pod-1"]


def test_a_base_model_goes_to_the_pods_listing_it_and_to_pods_not_yet_fetched() -> None:
    assert screened("llama", (BASE,), (ModelData("mistral"),), None) == ["pod-0", "pod-2"]
    assert screened("llama", (BASE,), (ModelData("mistral"),)) == ["pod-0"]


def test_a_model_nobody_lists_keeps_the_unfetched_pods_else_everyone() -> None:
    assert screened("qwen", (BASE,), None) == ["pod-1"]
    assert screened("qwen", (BASE,), (LEGAL,)) == ["pod-0", "pod-1"]


def test_a_request_without_a_model_is_not_screened() -> None:
    assert screened("", (BASE,), (LEGAL,)) == ["pod-0", "pod-1"]


def test_the_target_model_after_rewrite_is_what_is_screened() -> None:
    ds, eps = pool((BASE,), (BASE, LEGAL))
    req = request(model="gpt-4")
    req.target_model = "legal"
    assert [ep.name for ep in responder(ds).screen(req, eps)] == ["pod-1"]


# -- wiring --------------------------------------------------------------------------------------------
def test_the_models_source_and_extractor_are_added_for_it() -> None:
    c = build(load_config(CONFIG), datastore=Datastore(), metrics=EppMetrics())
    sources = {ds.source.type: [e.type for e in ds.extractors] for ds in c.data_sources}
    assert sources["models-data-source"] == ["models-data-extractor"]
    assert isinstance(c.plugins["models-data-source"], ModelsDataSource)
    assert isinstance(c.plugins["models-data-extractor"], ModelsDataExtractor)
    assert c.pipeline.responders == [c.plugins["models-responder"]]
    assert c.pipeline.screeners == [c.plugins["models-responder"]]


def test_a_declared_models_source_overrides_the_default() -> None:
    c = build(
        load_config(CONFIG + "- {type: models-data-source, name: mine, parameters: {path: /models, interval: 5s}}"),
        datastore=Datastore(),
        metrics=EppMetrics(),
    )
    [models] = [ds for ds in c.data_sources if ds.source.type == "models-data-source"]
    assert models.source.name == "mine" and isinstance(models.source, ModelsDataSource)
    assert models.source.path == "/models" and models.source.poll_interval == 5.0
    assert "models-data-source" not in c.plugins


async def test_the_director_answers_before_admission_and_routes_within_the_screened_pods() -> None:
    ds, _ = pool((BASE,), (BASE, LEGAL), (BASE,))
    metrics = EppMetrics()
    c = build(load_config(CONFIG), datastore=ds, metrics=metrics)
    d = Director(ds, c.pipeline, metrics)
    answer = d.handle_bodyless(get(), None)
    assert isinstance(answer, DirectResponse) and answer.status == 200
    for _ in range(20):
        decision = await d.handle_request(request(model="legal"), None)
        assert isinstance(decision, RoutingDecision) and decision.targets[0].name == "pod-1"
    # Without a responder the body-less request is routed to a pod.
    bare = build(load_config(CONFIG.replace("- type: models-responder\n", "")), datastore=ds, metrics=metrics)
    assert isinstance(Director(ds, bare.pipeline, metrics).handle_bodyless(get(), None), RoutingDecision)
