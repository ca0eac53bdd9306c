"""The example scorer: found by its type string through the entry point, typed parameters,
and the scoring formula, all through llm-epp's public API."""

from __future__ import annotations

import time

import pytest
from epp_plugin_example import KVHeadroomScorer

from llmepp import ConfigError, Endpoint, EndpointMetrics, EndpointSpec, InferenceRequest, RequestKind, registry
from llmepp.config.loader import build, load_config


def ep(kv: float | None, queue: int = 0) -> Endpoint:
    e = Endpoint(EndpointSpec(name=f"e{kv}-{queue}", address="10.0.0.1", port=8000))
    if kv is not None:  # None: never scraped
        e.metrics = EndpointMetrics(kv_cache_usage_percent=kv, waiting_queue_size=queue, update_time=time.monotonic())
    return e


REQUEST = InferenceRequest(request_id="r", path="/v1/completions", headers={}, kind=RequestKind.COMPLETIONS)


def test_registered_by_entry_point_under_its_type_string() -> None:
    assert registry.get("kv-headroom-scorer") is KVHeadroomScorer
    config = """
plugins:
- type: kv-headroom-scorer
  parameters: {reserveFraction: 0.2, queuePenalty: 0.5}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: kv-headroom-scorer, weight: 2}]
"""
    components = build(load_config(config))
    scorer = components.plugins["kv-headroom-scorer"]
    assert isinstance(scorer, KVHeadroomScorer) and scorer.reserve == 0.2 and scorer.penalty == 0.5


def test_formula() -> None:
    s = registry.build("kv-headroom-scorer", "s", {"reserveFraction": 0.2, "queuePenalty": 0.5})
    assert isinstance(s, KVHeadroomScorer)
    scores = s.score(REQUEST, [ep(0.0), ep(0.4), ep(0.8), ep(0.95), ep(0.4, queue=2), ep(None)])
    assert scores == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.25, 0.5])


def test_defaults_ignore_the_queue() -> None:
    s = registry.build("kv-headroom-scorer", "s", None)
    assert isinstance(s, KVHeadroomScorer)
    assert s.score(REQUEST, [ep(0.0, queue=50), ep(0.55)]) == pytest.approx([1.0, 0.35 / 0.9])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"reserveFraction": 1.0}, "reserveFraction"),
        ({"queuePenalty": -1}, "queuePenalty"),
        ({"unscrapedScore": 2}, "unscrapedScore"),
        ({"reserve_fraction": 0.1}, "unknown field"),
        ({"reserveFraction": "lots"}, "Expected `float`"),
    ],
)
def test_bad_parameters_are_config_errors(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        registry.build("kv-headroom-scorer", "s", params)
