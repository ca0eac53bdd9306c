"""probabilistic-admitter (its formula, who it sheds, through the director) and
always-disagg-multimodal-decider (media parts flagged by every parser)."""

from __future__ import annotations

import json
import random
import time

import pytest
from helpers import endpoint, request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointMetrics, EndpointSpec
from llmepp.director import Director
from llmepp.errors import REASON_SATURATED, Saturated
from llmepp.framework.plugin import registry
from llmepp.observability.metrics import EppMetrics
from llmepp.request.parsers import parse_request


def admitter(**params: float):  # type: ignore[no-untyped-def]
    built = registry.build("probabilistic-admitter", "admit", params)
    built._rng = random.Random(7)  # type: ignore[attr-defined]
    return built


def test_saturation_and_probability_follow_the_formula() -> None:
    a = admitter()
    pods = [endpoint(0, queue=1, kv=0.08), endpoint(1, queue=0, kv=0.24)]  # max(0.2, 0.1), max(0, 0.3)
    assert a.saturation(pods) == pytest.approx(0.25)
    assert a.reject_probability(pods) == pytest.approx(0.25**5 * 300)  # 0.29
    assert a.reject_probability([endpoint(0, queue=2)]) == pytest.approx(min(0.4**5 * 300, 1.0)) == 1.0
    assert a.reject_probability([endpoint(0)]) == 0.0 and a.reject_probability([]) == 0.0
    assert admitter(k=1, power=1).reject_probability([endpoint(0, queue=1)]) == pytest.approx(0.2)


def test_a_steep_curve_on_a_deep_queue_sheds_instead_of_overflowing() -> None:
    # sat 12 with power 300: sat^power is past the float range (the reference's math.Pow gives +Inf,
    # so P = 1); it must shed the request, not fail it with a 500.
    deep = [endpoint(0, queue=60)]
    assert admitter(power=300).reject_probability(deep) == 1.0
    assert admitter(power=300, k=0).reject_probability(deep) == 0.0  # k = 0: never sheds
    with pytest.raises(Saturated):
        admitter(power=300).admit(request(priority=-1), deep)


def test_only_sheddable_requests_are_shed_at_the_formula_rate() -> None:
    a = admitter()
    pods = [endpoint(0, queue=1)]  # sat 0.2: P = 0.096
    for priority in (0, 5):
        for _ in range(200):
            a.admit(request(priority=priority), [endpoint(0, queue=50, kv=1.0)])  # never shed
    shed = 0
    for _ in range(4000):
        try:
            a.admit(request(priority=-1), pods)
        except Saturated as e:
            assert (e.status, e.reason) == (429, REASON_SATURATED)
            shed += 1
    assert 0.08 < shed / 4000 < 0.115


def test_bad_parameters_are_config_errors() -> None:
    text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: probabilistic-admitter
  parameters: {queueDepthThreshold: 0}
"""
    with pytest.raises(Exception, match="queueDepthThreshold and kvCacheUtilThreshold must be > 0"):
        build(load_config(text))


async def test_the_director_sheds_a_sheddable_request_from_a_loaded_pool() -> None:
    config = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: probabilistic-admitter
- type: queue-scorer
"""
    datastore = Datastore()
    datastore.upsert(EndpointSpec(name="p", address="10.0.0.1", port=8000))
    # Freshly scraped at 50% KV: the legacy saturation rule lets it through (0.625 < 1), the admitter
    # sheds every sheddable request (sat 0.625: P = 1).
    datastore.endpoints[0].metrics = EndpointMetrics(kv_cache_usage_percent=0.5, update_time=time.monotonic())
    metrics = EppMetrics()
    components = build(load_config(config), datastore=datastore, metrics=metrics)
    director = Director(datastore, components.pipeline, metrics)
    await director.handle_request(request(priority=0), None)  # not sheddable: routed
    with pytest.raises(Saturated, match="shed by probabilistic-admitter"):
        await director.handle_request(request(priority=-1), None)


@pytest.mark.parametrize(
    ("path", "body", "media"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, False),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}, True),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, True),
        ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "data": ""}}]}]}, True),
        ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "text only"}]}, False),
    ],
)  # fmt: skip
def test_the_multimodal_decider_follows_media_parts(path: str, body: dict, media: bool) -> None:
    decider = registry.build("always-disagg-multimodal-decider", "mm", None)
    req = parse_request({":path": path}, json.dumps({"model": "m", **body}).encode(), request_id="r")
    assert req.multimodal is media
    assert decider.disaggregate(req, None) is media  # type: ignore[attr-defined]
