"""Saturation detectors: formulas, staleness, empty pools, and their filter mode with headroom."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import pytest
from helpers import endpoint, request

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics
from llmepp.flowcontrol.interfaces import SaturationDetector
from llmepp.flowcontrol.saturation import ROLE_LABEL, StagedSaturation
from llmepp.framework.plugin import ConfigError

from .kit import plugin


def test_utilization_formula_is_the_mean_of_the_worse_ratio() -> None:
    det = plugin("utilization-detector")
    now = time.monotonic()
    eps = [endpoint(0, queue=2, kv=0.4), endpoint(1, queue=10, kv=0.0), endpoint(2, queue=0, kv=0.8)]
    # max(2/5, 0.4/0.8)=0.5; max(10/5, 0)=2.0; max(0, 0.8/0.8)=1.0 → mean 3.5/3
    assert det.saturation(eps, now) == pytest.approx(3.5 / 3)
    assert det.stale_endpoints == 0


def test_utilization_stale_and_never_scraped_count_as_saturated() -> None:
    det = plugin("utilization-detector", metricsStalenessThreshold="200ms")
    now = time.monotonic()
    fresh = endpoint(0)
    old = endpoint(1)
    old.metrics = EndpointMetrics(update_time=now - 0.25)
    never = endpoint(2, scraped=False)
    assert det.saturation([fresh, old, never], now) == pytest.approx(2 / 3)
    assert det.stale_endpoints == 2
    assert det.saturation([], now) == 1.0  # empty pool: nothing to send to


def test_utilization_custom_thresholds() -> None:
    det = plugin("utilization-detector", queueDepthThreshold=10, kvCacheUtilThreshold=0.5)
    assert det.saturation([endpoint(0, queue=5, kv=0.1)], time.monotonic()) == pytest.approx(0.5)
    assert det.saturation([endpoint(0, queue=1, kv=0.4)], time.monotonic()) == pytest.approx(0.8)


def test_utilization_filter_with_headroom() -> None:
    det = plugin("utilization-detector", headroom=0.2)  # q ≤ 6, kv ≤ min(1, 0.96)
    eps = [endpoint(0, queue=6, kv=0.96), endpoint(1, queue=7), endpoint(2, kv=0.97), endpoint(3, scraped=False)]
    assert [e.name for e in det.filter(request(), eps)] == ["pod-0"]
    strict = plugin("utilization-detector")  # q ≤ 5, kv ≤ 0.8
    assert [e.name for e in strict.filter(request(), [endpoint(0, queue=5, kv=0.8), endpoint(1, queue=6)])] == ["pod-0"]
    big = plugin("utilization-detector", headroom=1.0)  # kv cap is min(1, 1.6) = 1
    assert len(big.filter(request(), [endpoint(0, queue=10, kv=1.0)])) == 1


def test_utilization_filter_fails_open() -> None:
    det = plugin("utilization-detector")
    eps = [endpoint(0, queue=50), endpoint(1, scraped=False)]
    assert list(det.filter(request(), eps)) == eps


def test_concurrency_modes() -> None:
    a, b = endpoint(0), endpoint(1)
    a.inflight.requests, a.inflight.tokens = 30, 100_000
    b.inflight.requests, b.inflight.tokens = 10, 700_000
    now = time.monotonic()
    assert plugin("concurrency-detector").saturation([a, b], now) == pytest.approx(40 / 200)
    tokens = plugin("concurrency-detector", concurrencyMode="tokens")
    assert tokens.saturation([a, b], now) == pytest.approx(800_000 / 2_000_000)
    hybrid = plugin("concurrency-detector", concurrencyMode="hybrid", maxConcurrency=20, maxTokenConcurrency=1_000_000)
    # a: max(30/20, 0.1) = 1.5; b: max(10/20, 0.7) = 0.7 → mean 1.1
    assert hybrid.saturation([a, b], now) == pytest.approx(1.1)
    assert hybrid.saturation([], now) == 1.0


def test_concurrency_filter_with_headroom() -> None:
    a, b, c = endpoint(0), endpoint(1), endpoint(2)
    a.inflight.requests, b.inflight.requests, c.inflight.requests = 99, 100, 119
    assert [e.name for e in plugin("concurrency-detector").filter(request(), [a, b, c])] == ["pod-0"]
    roomy = plugin("concurrency-detector", headroom=0.2)  # under 120
    assert [e.name for e in roomy.filter(request(), [a, b, c])] == ["pod-0", "pod-1", "pod-2"]
    c.inflight.requests = 120
    assert [e.name for e in roomy.filter(request(), [a, b, c])] == ["pod-0", "pod-1"]
    b.inflight.tokens = 5_000_000
    hybrid = plugin("concurrency-detector", concurrencyMode="hybrid", headroom=0.2)
    assert [e.name for e in hybrid.filter(request(), [a, b, c])] == ["pod-0"]
    a.inflight.requests = 500
    assert len(hybrid.filter(request(), [a, b, c])) == 3  # nobody qualifies: fail open


@pytest.mark.parametrize(
    ("params", "at_limit"),
    [
        ({"headroom": 0.1}, {"requests": 110}),  # 100 · 1.1 = 110.00000000000001 as a float
        ({"maxConcurrency": 3, "headroom": 0.5}, {"requests": 4}),  # ⌊4.5⌋
        ({"concurrencyMode": "tokens", "maxTokenConcurrency": 100, "headroom": 0.1}, {"tokens": 110}),
    ],
)
def test_the_concurrency_filter_limit_is_an_integer_as_the_reference(params: dict, at_limit: dict) -> None:
    """The reference truncates capacity·(1+headroom) to an integer (int64). Before, the float limit kept an
    endpoint at the limit (110 < 110.00000000000001) or one above it (4 < 4.5)."""
    full, free = endpoint(0), endpoint(1)
    for field, value in at_limit.items():
        setattr(full.inflight, field, value)
    assert plugin("concurrency-detector", **params).filter(request(), [full, free]) == [free]


@pytest.mark.parametrize(
    ("type_name", "params", "message"),
    [
        ("utilization-detector", {"kvCacheUtilThreshold": 1.5}, "kvCacheUtilThreshold must be in (0, 1]"),
        ("utilization-detector", {"metricsStalenessThreshold": "soon"}, "metricsStalenessThreshold: invalid duration"),
        ("utilization-detector", {"metricsStalenessThreshold": "0s"}, "metricsStalenessThreshold must be > 0"),
        ("utilization-detector", {"headroom": -1}, "headroom must be >= 0"),
        ("concurrency-detector", {"concurrencyMode": "bytes"}, "concurrencyMode"),
        ("concurrency-detector", {"maxConcurrency": 0}, "maxConcurrency must be > 0"),
    ],
)
def test_detector_parameter_errors(type_name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        plugin(type_name, **params)
    assert message in str(err.value)


def test_detectors_usable_as_scheduling_filters_in_a_profile() -> None:
    from llmepp.config.loader import build, load_config
    from llmepp.plugins.flowcontrol.utilization_detector import UtilizationDetector

    c = build(
        load_config("""
plugins:
- type: utilization-detector
  parameters: {headroom: 0.5}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: utilization-detector}, {pluginRef: queue-scorer}]
""")
    )
    profile = c.pipeline.scheduler.profiles["default"]
    assert isinstance(profile.filters[0], UtilizationDetector) and profile.filters[0].headroom == 0.5
    # ... and the same instance is the legacy admission's detector (no explicit ref needed).
    assert c.pipeline.admission.detector is profile.filters[0]  # type: ignore[union-attr]


def test_a_nan_stage_reading_counts_as_full_in_a_pd_pool() -> None:
    class PerStage(SaturationDetector):
        type = "test-per-stage"

        def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
            return math.nan if endpoints[0].labels.get(ROLE_LABEL) == "prefill" else 0.2

    staged = StagedSaturation(PerStage("d"))
    pool = (endpoint(0, labels={ROLE_LABEL: "prefill"}), endpoint(1, labels={ROLE_LABEL: "decode"}))
    assert staged(pool, time.monotonic()) == 1.0
    assert staged.stages() == {"effective": 1.0, "prefill": 1.0, "decode": 0.2}
