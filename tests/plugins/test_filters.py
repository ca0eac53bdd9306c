"""Filters of the plugin catalogue: label selector (+ deprecated aliases), utilization, load balance,
endpoint attribute, prefix-cache affinity, session affinity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import endpoint, request
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.datalayer.endpoint import Endpoint, InFlight
from llmepp.framework.datakeys import IN_FLIGHT_LOAD, PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo, scoped
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, registry
from llmepp.framework.scheduling import Filter, ProfileResult, SchedulingResult
from llmepp.plugins.filters.prefix_cache_affinity import _min_sticky_blocks
from llmepp.plugins.filters.session import decode_token, encode_token
from llmepp.request.types import ResponseInfo


def make(type_: str, params: dict[str, Any] | None = None, *others: Plugin, name: str = "") -> Any:
    plugin = registry.build(type_, name or type_, params)
    ctx = PluginContext({p.name: p for p in (plugin, *others)}, None, None, None)
    plugin.setup(ctx)
    return plugin


def names(eps: Any) -> list[str]:
    return [ep.name for ep in eps]


# -- label-selector-filter ----------------------------------------------------------------------
def labelled() -> list[Endpoint]:
    return [
        endpoint(0, labels={"role": "decode", "hw": "H100"}),
        endpoint(1, labels={"role": "prefill", "hw": "H100"}),
        endpoint(2, labels={"role": "decode", "hw": "A100"}),
        endpoint(3, labels={}),
    ]


def test_label_selector_match_labels_and_expressions() -> None:
    eps = labelled()
    f = make("label-selector-filter", {"matchLabels": {"role": "decode", "hw": "H100"}})
    assert names(f.filter(request(), eps)) == ["pod-0"]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "hw", "operator": "In", "values": ["A100"]}]})
    assert names(f.filter(request(), eps)) == ["pod-2"]
    # NotIn keeps endpoints without the label (Kubernetes semantics).
    f = make(
        "label-selector-filter", {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["prefill"]}]}
    )
    assert names(f.filter(request(), eps)) == ["pod-0", "pod-2", "pod-3"]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "hw", "operator": "Exists"}]})
    assert names(f.filter(request(), eps)) == ["pod-0", "pod-1", "pod-2"]
    f = make(
        "label-selector-filter",
        {"matchLabels": {"role": "decode"}, "matchExpressions": [{"key": "hw", "operator": "DoesNotExist"}]},
    )
    assert names(f.filter(request(), eps)) == []


def test_label_selector_empty_keeps_all_and_no_candidates() -> None:
    f = make("label-selector-filter")
    eps = labelled()
    assert names(f.filter(request(), eps)) == names(eps)
    assert f.filter(request(), []) == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"matchExpressions": [{"key": "a", "operator": "Has"}]}, "operator must be one of"),
        ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "values must be non-empty"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "values must be empty"),
    ],
)
def test_label_selector_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        registry.build("label-selector-filter", "sel", params)
    assert "plugin 'sel' (type label-selector-filter)" in str(err.value)


def test_deprecated_aliases() -> None:
    eps = labelled()
    alias = make("by-label-selector", {"matchLabels": {"hw": "H100"}})
    assert alias.type == "label-selector-filter"  # built by the deprecated name
    assert names(alias.filter(request(), eps)) == ["pod-0", "pod-1"]
    by_label = make("by-label", {"label": "role", "validValues": ["decode"]})
    assert names(by_label.filter(request(), eps)) == ["pod-0", "pod-2"]
    by_label = make("by-label", {"label": "role", "validValues": ["prefill"], "allowsNoLabel": True})
    assert names(by_label.filter(request(), eps)) == ["pod-1", "pod-3"]
    with pytest.raises(ConfigError, match="label is required"):
        registry.build("by-label", "b", {"validValues": ["x"]})


# -- utilization-filter ----------------------------------------------------------------------
def test_utilization_filter_drops_when_any_metric_exceeds() -> None:
    f = make(
        "utilization-filter",
        {
            "conditions": [
                {"metric": "kv-cache-utilization", "maxValue": 0.9},
                {"metric": "waiting-queue", "maxValue": 4},
            ]
        },
    )
    eps = [endpoint(0, kv=0.5, queue=4), endpoint(1, kv=0.95), endpoint(2, queue=5), endpoint(3, kv=0.9)]
    assert names(f.filter(request(), eps)) == ["pod-0", "pod-3"]  # equal to the cap is kept
    assert f.filter(request(), []) == []


def test_utilization_filter_missing_metrics_count_as_zero_and_fallback() -> None:
    cond = {"conditions": [{"metric": "running-requests", "maxValue": 2}]}
    eps = [endpoint(0, running=3), endpoint(1, scraped=False)]
    assert names(make("utilization-filter", cond).filter(request(), eps)) == ["pod-1"]
    busy = [endpoint(0, running=3), endpoint(1, running=9)]
    assert make("utilization-filter", cond).filter(request(), busy) == []
    assert names(make("utilization-filter", {**cond, "fallbackOnEmpty": True}).filter(request(), busy)) == [
        "pod-0",
        "pod-1",
    ]


def test_utilization_filter_active_requests_reads_the_inflight_producer() -> None:
    producer = registry.build("inflight-load-producer", "ifl", None)
    f = make("utilization-filter", {"conditions": [{"metric": "active-requests", "maxValue": 1}]}, producer)
    assert f.consumes == {IN_FLIGHT_LOAD}
    eps = [endpoint(0), endpoint(1)]
    producer.loads[eps[0]] = InFlight(requests=2, tokens=10)  # type: ignore[attr-defined]
    req = request()
    producer.produce(req, eps)  # type: ignore[attr-defined]
    assert names(f.filter(req, eps)) == ["pod-1"]
    # Without producer data (not run): the director's endpoint.inflight.
    eps[1].inflight.requests = 5
    assert names(f.filter(request(), eps)) == ["pod-0"]
    # A filter without active-requests needs no in-flight producer.
    assert make("utilization-filter", {"conditions": [{"metric": "waiting-queue", "maxValue": 1}]}).consumes == set()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "conditions must list"),
        ({"conditions": [{"metric": "gpu", "maxValue": 1}]}, "metric 'gpu' must be one of"),
        ({"conditions": [{"metric": "waiting-queue"}]}, "maxValue"),
    ],
)
def test_utilization_filter_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        registry.build("utilization-filter", "u", params)
    assert "type utilization-filter" in str(err.value)


# -- load-balance-filter ---------------------------------------------------------------------
def balanced(counts: list[int], params: dict[str, Any] | None = None) -> list[str]:
    producer = registry.build("inflight-load-producer", "ifl", None)
    f = make("load-balance-filter", params, producer)
    eps = [endpoint(i) for i in range(len(counts))]
    for ep, n in zip(eps, counts):
        producer.loads[ep] = InFlight(requests=n)  # type: ignore[attr-defined]
    req = request()
    producer.produce(req, eps)  # type: ignore[attr-defined]
    return names(f.filter(req, eps))


def test_load_balance_filter_drops_only_endpoints_over_both_thresholds() -> None:
    # Defaults abs 16, rel 1.25: with lo = 100 the cap is max(116, 125) = 125.
    assert balanced([100, 125, 126, 140]) == ["pod-0", "pod-1"]
    assert balanced([100, 110, 125]) == ["pod-0", "pod-1", "pod-2"]  # nobody over the cap: all kept
    # Low counts: the absolute threshold governs (lo = 2: cap max(18, 2.5) = 18).
    assert balanced([2, 18, 19]) == ["pod-0", "pod-1"]
    assert balanced([0, 16, 17]) == ["pod-0", "pod-1"]
    assert balanced([5, 40], {"absThreshold": 0, "relThreshold": 1.0}) == ["pod-0"]
    assert balanced([7]) == ["pod-0"]


def test_load_balance_filter_reads_the_director_counts_without_producer_data() -> None:
    f = make("load-balance-filter", None, registry.build("inflight-load-producer", "ifl", None))
    assert f.consumes == {IN_FLIGHT_LOAD}
    eps = [endpoint(0), endpoint(1)]
    eps[0].inflight.requests = 30
    assert names(f.filter(request(), eps)) == ["pod-1"]
    assert f.filter(request(), []) == []


@given(st.lists(st.integers(0, 500), min_size=1, max_size=12), st.integers(0, 64), st.floats(1.0, 3.0))
@settings(max_examples=200, deadline=None)
def test_load_balance_filter_keeps_the_least_loaded_and_drops_exactly_the_overloaded(
    counts: list[int], abs_threshold: int, rel: float
) -> None:
    kept = balanced(counts, {"absThreshold": abs_threshold, "relThreshold": rel})
    lo = min(counts)
    assert f"pod-{counts.index(lo)}" in kept
    overloaded = [f"pod-{i}" for i, n in enumerate(counts) if n - lo > abs_threshold and n > rel * lo]
    assert sorted(kept + overloaded) == sorted(f"pod-{i}" for i in range(len(counts)))


def test_load_balance_filter_leaves_requests_with_a_long_cached_prefix_alone() -> None:
    prefix = registry.build("approx-prefix-cache-producer", "approx", None)
    inflight = registry.build("inflight-load-producer", "ifl", None)
    f = make("load-balance-filter", {"maxMatchedTokens": 128}, prefix, inflight)
    assert f.consumes == {IN_FLIGHT_LOAD, PREFIX_CACHE_MATCH_INFO}
    eps = [endpoint(0), endpoint(1)]
    eps[0].inflight.requests = 40
    # 64-token blocks: 2 matched blocks (128 tokens) may still be moved, 3 may not.
    assert names(f.filter(with_hits(eps, {0: 2}), eps)) == ["pod-1"]
    assert names(f.filter(with_hits(eps, {0: 3, 1: 1}), eps)) == ["pod-0", "pod-1"]
    # Only the candidates' matches count: a longer one on an endpoint filtered out earlier does not.
    other = [*eps, endpoint(2)]
    assert names(f.filter(with_hits(other, {2: 9, 0: 1}), eps)) == ["pod-1"]
    assert names(f.filter(request(), eps)) == ["pod-1"]  # no match data: balanced as any request
    # A prefix held in a lower tier: the blocks held count (3 x 64 tokens), not the tier-weighted score (2).
    tiered = with_hits(eps, {0: 2})
    tiered.data[scoped(PREFIX_CACHE_MATCH_INFO, "approx")].cached = {eps[0]: 3}
    assert names(f.filter(tiered, eps)) == ["pod-0", "pod-1"]
    assert make("load-balance-filter", None, inflight).consumes == {IN_FLIGHT_LOAD}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"absThreshold": -1}, "absThreshold must be >= 0"),
        ({"relThreshold": 0.9}, "relThreshold must be >= 1"),
        ({"maxMatchedTokens": -1}, "maxMatchedTokens must be >= 0"),
    ],
)
def test_load_balance_filter_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        registry.build("load-balance-filter", "b", params)
    assert "type load-balance-filter" in str(err.value)


# -- endpoint-attribute-filter -----------------------------------------------------------------
def attr_filter(algorithm: dict[str, Any], **extra: Any) -> Any:
    return make("endpoint-attribute-filter", {"attribute": "waiting-queue", "algorithm": algorithm, **extra})


def test_attribute_filter_threshold_operators() -> None:
    eps = [endpoint(i, queue=q) for i, q in enumerate([0, 5, 10])]
    expected = {
        "LessThan": ["pod-0"],
        "LessThanOrEqual": ["pod-0", "pod-1"],
        "GreaterThan": ["pod-2"],
        "GreaterThanOrEqual": ["pod-1", "pod-2"],
        "Equal": ["pod-1"],
        "NotEqual": ["pod-0", "pod-2"],
    }
    for op, kept in expected.items():
        f = attr_filter({"type": "threshold", "threshold": {"operator": op, "value": 5}})
        assert names(f.filter(request(), eps)) == kept, op


def test_attribute_filter_on_missing_and_fallback() -> None:
    eps = [endpoint(0, queue=9), endpoint(1, scraped=False)]  # never scraped: attribute missing
    algo = {"type": "threshold", "threshold": {"operator": "LessThan", "value": 5}}
    assert names(attr_filter(algo).filter(request(), eps)) == ["pod-1"]
    assert names(attr_filter(algo, onMissing="Fail").filter(request(), eps)) == []
    assert names(attr_filter(algo, onMissing="Fail", fallbackOnEmpty=True).filter(request(), eps)) == ["pod-0", "pod-1"]
    assert attr_filter(algo).filter(request(), []) == []


def test_attribute_filter_empty_on_missing_means_pass() -> None:
    # The reference reads `onMissing: ""` as its default, Pass (only other values are rejected).
    eps = [endpoint(0, queue=9), endpoint(1, scraped=False)]
    algo = {"type": "threshold", "threshold": {"operator": "LessThan", "value": 5}}
    assert names(attr_filter(algo, onMissing="").filter(request(), eps)) == ["pod-1"]


def test_attribute_filter_range_topk_percentile() -> None:
    eps = [endpoint(i, queue=q) for i, q in enumerate([4, 1, 7, 3, 1])]
    assert names(attr_filter({"type": "range", "range": {"min": 2, "max": 5}}).filter(request(), eps)) == [
        "pod-0",
        "pod-3",
    ]
    low2 = attr_filter({"type": "topK", "topK": {"k": 2, "higherIsBetter": False}})
    assert names(low2.filter(request(), eps)) == ["pod-1", "pod-4"]  # ties: earlier candidates first
    high1 = attr_filter({"type": "topK", "topK": {"k": 1}})
    assert names(high1.filter(request(), eps)) == ["pod-2"]
    assert len(attr_filter({"type": "topK", "topK": {"k": 50}}).filter(request(), eps)) == 5
    # sorted 1,1,3,4,7; P50 → position ceil(2.5)=3 → cutoff 3.
    p50_low = attr_filter({"type": "percentile", "percentile": {"percentile": 50, "higherIsBetter": False}})
    assert names(p50_low.filter(request(), eps)) == ["pod-1", "pod-3", "pod-4"]
    p50_high = attr_filter({"type": "percentile", "percentile": {"percentile": 50}})
    assert names(p50_high.filter(request(), eps)) == ["pod-0", "pod-2", "pod-3"]


def test_attribute_filter_producer_supplied_values() -> None:
    class Gpu(Plugin):
        type = "gpu-util-test"
        produces = frozenset({"gpu-util"})

    gpu = Gpu("dcgm")
    f = make(
        "endpoint-attribute-filter",
        {"attribute": "gpu-util", "producer": "dcgm", "onMissing": "Fail",
         "algorithm": {"type": "threshold", "threshold": {"operator": "LessThan", "value": 0.5}}},
        gpu,
    )  # fmt: skip
    assert f.consumes == {"gpu-util"}
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    req = request()
    req.data[scoped("gpu-util", "dcgm")] = {eps[0]: 0.2, eps[1]: 0.7}
    assert names(f.filter(req, eps)) == ["pod-0"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"algorithm": {"type": "threshold", "threshold": {"operator": "LessThan", "value": 1}}},
            "attribute is required",
        ),
        ({"attribute": "waiting-queue"}, "algorithm is required"),
        ({"attribute": "waiting-queue", "algorithm": {"type": "sort"}}, "algorithm.type must be one of"),
        ({"attribute": "waiting-queue", "algorithm": {"type": "threshold"}}, "algorithm.threshold is required"),
        (
            {
                "attribute": "waiting-queue",
                "algorithm": {"type": "threshold", "threshold": {"operator": "Less", "value": 1}},
            },
            "operator must be one of",
        ),
        (
            {"attribute": "waiting-queue", "onMissing": "Keep", "algorithm": {"type": "topK", "topK": {"k": 1}}},
            "onMissing",
        ),
        ({"attribute": "waiting-queue", "algorithm": {"type": "topK", "topK": {"k": 0}}}, "k must be > 0"),
        (
            {"attribute": "waiting-queue", "algorithm": {"type": "range", "range": {"min": 2, "max": 1}}},
            "min must be <=",
        ),
    ],
)
def test_attribute_filter_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        registry.build("endpoint-attribute-filter", "eaf", params)
    assert "plugin 'eaf' (type endpoint-attribute-filter)" in str(err.value)


# -- prefix-cache-affinity-filter ---------------------------------------------------------------
def affinity(params: dict[str, Any] | None = None) -> tuple[Any, Any]:
    prefix = registry.build("approx-prefix-cache-producer", "approx", None)
    inflight = registry.build("inflight-load-producer", "ifl", None)
    return make("prefix-cache-affinity-filter", params, prefix, inflight), inflight


def with_hits(eps: list[Endpoint], hits: dict[int, int], total: int = 10) -> Any:
    req = request()
    req.data[scoped(PREFIX_CACHE_MATCH_INFO, "approx")] = PrefixMatchInfo(
        block_size=64, total_blocks=total, hits={eps[i]: m for i, m in hits.items()}, hashes=list(range(total))
    )
    return req


def test_prefix_affinity_keeps_sticky_endpoints() -> None:
    f, _ = affinity()
    eps = [endpoint(i) for i in range(4)]
    req = with_hits(eps, {0: 10, 1: 8, 2: 7})
    assert names(f.filter(req, eps)) == ["pod-0", "pod-1"]  # 0.8 is sticky (≥), 0.7 is not


def test_prefix_affinity_no_sticky_no_data_single_candidate_keep_all() -> None:
    f, _ = affinity()
    eps = [endpoint(i) for i in range(3)]
    assert names(f.filter(with_hits(eps, {0: 2}), eps)) == names(eps)
    assert names(f.filter(request(), eps)) == names(eps)  # no PrefixCacheMatchInfo
    assert names(f.filter(with_hits(eps, {0: 10}), eps[:1])) == ["pod-0"]
    assert f.filter(request(), []) == []


def test_prefix_affinity_ttft_gate_breaks_stickiness() -> None:
    f, inflight = affinity({"maxTTFTPenaltyMs": 1000, "peakPrefillThroughput": 10000})
    eps = [endpoint(i) for i in range(3)]
    req = with_hits(eps, {0: 10})
    inflight.produce(req, eps)
    # sticky pod-0 has 10000 tokens → 1000 ms; best non-sticky 0 ms → penalty 1000, not > 1000.
    inflight.loads[eps[0]] = InFlight(requests=1, tokens=10000)
    assert names(f.filter(req, eps)) == ["pod-0"]
    inflight.loads[eps[0]].tokens = 10001
    assert names(f.filter(req, eps)) == names(eps)
    # The gate compares best sticky to best non-sticky: loaded non-sticky endpoints restore it.
    inflight.loads[eps[1]] = InFlight(requests=1, tokens=5000)
    inflight.loads[eps[2]] = InFlight(requests=1, tokens=5000)
    assert names(f.filter(req, eps)) == ["pod-0"]


def test_prefix_affinity_gate_off_and_exploration() -> None:
    f, _ = affinity({"maxTTFTPenaltyMs": 0})
    assert f.consumes == {PREFIX_CACHE_MATCH_INFO}
    eps = [endpoint(i) for i in range(3)]
    eps[0].inflight.tokens = 10**9
    assert names(f.filter(with_hits(eps, {0: 10}), eps)) == ["pod-0"]
    explore, _ = affinity({"explorationProbability": 1.0})
    assert names(explore.filter(with_hits(eps, {0: 10}), eps)) == names(eps)


def test_prefix_affinity_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="ttftSource must be 'prefillThroughput' or 'latencyPredictor'") as err:
        registry.build("prefix-cache-affinity-filter", "pcaf", {"ttftSource": "oracle"})
    assert "plugin 'pcaf' (type prefix-cache-affinity-filter)" in str(err.value)
    for params, message in [
        ({"affinityThreshold": 1.5}, "affinityThreshold"),
        ({"explorationProbability": -0.1}, "explorationProbability"),
        ({"maxTTFTPenaltyMs": -1}, "maxTTFTPenaltyMs"),
        ({"peakPrefillThroughput": 0}, "peakPrefillThroughput"),
        ({"ttftSource": "magic"}, "ttftSource"),
    ]:
        with pytest.raises(ConfigError, match=message):
            registry.build("prefix-cache-affinity-filter", "pcaf", params)
    # Both spellings of the in-flight source are accepted, and the latency predictor (test_latency_plugins.py).
    for source in ("prefillThroughput", "inflight", "latencyPredictor"):
        registry.build("prefix-cache-affinity-filter", "pcaf", {"ttftSource": source})


def test_prefix_affinity_zero_peak_throughput_is_only_an_error_when_the_gate_reads_it() -> None:
    # As the reference: peakPrefillThroughput must be > 0 only when the TTFT gate estimates from it (ttftSource
    # prefillThroughput with maxTTFTPenaltyMs > 0); a negative value is always an error.
    for params in ({"peakPrefillThroughput": 0, "maxTTFTPenaltyMs": 0},
                   {"peakPrefillThroughput": 0, "ttftSource": "latencyPredictor"}):  # fmt: skip
        registry.build("prefix-cache-affinity-filter", "pcaf", params)
    f, _ = affinity({"peakPrefillThroughput": 0, "maxTTFTPenaltyMs": 0})
    eps = [endpoint(i) for i in range(3)]
    assert names(f.filter(with_hits(eps, {0: 10}), eps)) == ["pod-0"]
    with pytest.raises(ConfigError, match="peakPrefillThroughput must be >= 0"):
        registry.build("prefix-cache-affinity-filter", "pcaf", {"peakPrefillThroughput": -1, "maxTTFTPenaltyMs": 0})


def calibration(tmp_path: Path, **over: Any) -> str:
    rec = {"schema_version": 1, "status": "OK", "fingerprint": "fp-1", "chunk_tokens": 8192, "valid_samples": 12,
           "median_ttft_seconds": 0.5, "peak_prefill_tokens_per_second": 20000.0, **over}  # fmt: skip
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(rec))
    return str(path)


def test_prefix_affinity_calibration_record(tmp_path: Path) -> None:
    build = registry.build
    f = build("prefix-cache-affinity-filter", "p",
              {"prefillCalibrationFile": calibration(tmp_path), "prefillCalibrationFingerprint": "fp-1"})  # fmt: skip
    assert f.peak == 20000.0  # type: ignore[attr-defined]
    # An explicit value wins over the record.
    f = build("prefix-cache-affinity-filter", "p",
              {"prefillCalibrationFile": calibration(tmp_path), "prefillCalibrationFingerprint": "fp-1",
               "peakPrefillThroughput": 15928})  # fmt: skip
    assert f.peak == 15928.0  # type: ignore[attr-defined]
    # A record for another deployment is not applied; required turns that into an error.
    f = build("prefix-cache-affinity-filter", "p",
              {"prefillCalibrationFile": calibration(tmp_path), "prefillCalibrationFingerprint": "fp-2"})  # fmt: skip
    assert f.peak == 15928.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="different deployment"):
        build("prefix-cache-affinity-filter", "p",
              {"prefillCalibrationFile": calibration(tmp_path, valid_samples=12), "prefillCalibrationRequired": True,
               "prefillCalibrationFingerprint": "fp-2"})  # fmt: skip
    with pytest.raises(ConfigError, match="valid_samples"):
        build("prefix-cache-affinity-filter", "p",
              {"prefillCalibrationFile": calibration(tmp_path, valid_samples=3), "prefillCalibrationRequired": True,
               "prefillCalibrationFingerprint": "fp-1"})  # fmt: skip


# -- session-affinity-filter --------------------------------------------------------------------
def result_for(ep: Endpoint, profile: str = "default", **others: Endpoint) -> SchedulingResult:
    profiles: dict[str, ProfileResult | None] = {profile: ProfileResult(targets=[ep])}
    profiles.update({name: ProfileResult(targets=[e]) for name, e in others.items()})
    return SchedulingResult(primary_profile=profile, profiles=profiles)


def test_session_token_round_trip_helpers() -> None:
    ep = endpoint(7)
    assert decode_token(encode_token(ep)) == ("default", "pod-7")
    assert decode_token("not base64!") is None
    assert decode_token("bm8tc2xhc2g=") is None  # "no-slash"


def test_session_filter_pins_to_token_endpoint_else_passes_all() -> None:
    f: Filter = make("session-affinity-filter")
    eps = [endpoint(i) for i in range(3)]
    assert names(f.filter(request(), eps)) == names(eps)
    req = request()
    req.headers["x-session-token"] = encode_token(eps[1])
    assert names(f.filter(req, eps)) == ["pod-1"]
    # The session endpoint is gone: no preference.
    assert names(f.filter(req, [eps[0], eps[2]])) == ["pod-0", "pod-2"]
    req.headers["x-session-token"] = "garbage"
    assert names(f.filter(req, eps)) == names(eps)
    assert f.filter(req, []) == []


def test_session_filter_writes_token_for_its_profile() -> None:
    decode: Any = make("session-affinity-filter")
    prefill: Any = make(
        "session-affinity-filter",
        {"profileName": "prefill", "encodedEndpointHeaderConfig": {"header": "X-Session-Token-Prefill"}},
        name="session-prefill",
    )
    d, p = endpoint(1), endpoint(2)
    req = request()
    result = result_for(d, prefill=p)
    decode.pre_request(req, result)
    prefill.pre_request(req, result)
    info = ResponseInfo(status=200)
    assert decode.response_headers(req, info, {}) == {"x-session-token": encode_token(d)}
    assert prefill.response_headers(req, info, {}) == {"x-session-token-prefill": encode_token(p)}
    # Not scheduled (no pre_request): no header.
    assert decode.response_headers(request(), info, {}) is None


def test_session_filter_deprecated_header_name() -> None:
    f: Any = make("session-affinity-filter", {"headerName": "x-my-token"})
    eps = [endpoint(0), endpoint(1)]
    req = request()
    req.headers["x-my-token"] = encode_token(eps[0])
    assert names(f.filter(req, eps)) == ["pod-0"]
    with pytest.raises(ConfigError, match="disagree"):
        registry.build(
            "session-affinity-filter", "s", {"headerName": "a", "encodedEndpointHeaderConfig": {"header": "b"}}
        )


def test_session_id_strategy_binds_and_follows() -> None:
    f: Any = make("session-affinity-filter", {"strategy": "session_id"})
    eps = [endpoint(i) for i in range(3)]

    def req_for(sid: str) -> Any:
        r = request()
        r.headers["x-session-id"] = sid
        return r

    r = req_for("s1")
    assert names(f.filter(r, eps)) == names(eps)  # unbound: no preference
    f.pre_request(r, result_for(eps[2]))
    r = req_for("s1")
    assert names(f.filter(r, eps)) == ["pod-2"]
    f.pre_request(r, result_for(eps[2]))
    assert f.response_headers(r, ResponseInfo(status=200), {}) is None  # nothing written back
    # Bound endpoint not a candidate: passes all, then the binding follows the request.
    r = req_for("s1")
    assert names(f.filter(r, eps[:2])) == ["pod-0", "pod-1"]
    f.pre_request(r, result_for(eps[0]))
    assert names(f.filter(req_for("s1"), eps)) == ["pod-0"]
    # Another session is independent; no session id → no preference and no binding.
    assert names(f.filter(req_for("s2"), eps)) == names(eps)
    anon = request()
    f.pre_request(anon, result_for(eps[1]))
    assert set(f.bindings) == {"s1"}


def test_session_id_bindings_expire() -> None:
    cfg = {"evictionTtlSeconds": 5, "evictionSweepSeconds": 1}
    f: Any = make("session-affinity-filter", {"strategy": "session_id", "sessionIdConfig": cfg})
    ep = endpoint(0)
    r = request()
    r.headers["x-session-id"] = "s"
    f.pre_request(r, result_for(ep))
    last = f.bindings["s"].last_seen
    f.sweep(last + 4)
    assert "s" in f.bindings
    f.sweep(last + 6)
    assert "s" not in f.bindings


def test_session_id_sources_priority_and_attribute() -> None:
    producer = registry.build("session-id-producer", "sid", {"cookieName": "sess"})
    f: Any = make(
        "session-affinity-filter",
        {"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "x-conv"}, {"attribute": "SessionID"}]}},
        producer,
    )
    assert f.consumes == {"SessionID"}  # the loader auto-creates session-id-producer for it
    eps = [endpoint(0), endpoint(1)]
    r = request()
    r.headers["cookie"] = "a=1; sess=abc"
    producer.produce(r, eps)  # type: ignore[attr-defined]
    assert f.session_id(r) == "abc"
    r.headers["x-conv"] = "conv-9"
    assert f.session_id(r) == "conv-9"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"strategy": "cookie"}, "strategy must be"),
        ({"strategy": "session_id", "sessionIdConfig": {"sources": [{}]}}, "exactly one of header or attribute"),
        ({"sessionIdConfig": {"sources": [{"header": "a", "attribute": "b"}]}}, "exactly one of header or attribute"),
        ({"sessionIdConfig": {"evictionTtlSeconds": -1}}, "evictionTtlSeconds"),
    ],
)
def test_session_affinity_validation(params: dict[str, Any], message: str) -> None:
    for type_ in ("session-affinity-filter", "session-affinity-scorer"):
        with pytest.raises(ConfigError, match=message) as err:
            registry.build(type_, "sa", params)
        assert f"plugin 'sa' (type {type_})" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.001, max_value=1.0), st.integers(1, 5000))
def test_prefix_affinity_integer_boundary_matches_the_ratio(threshold: float, total: int) -> None:
    m = _min_sticky_blocks(threshold, total)
    assert m / total >= threshold and (m - 1) / total < threshold


def test_prefix_affinity_boundary_at_point_seven() -> None:
    f, _ = affinity({"affinityThreshold": 0.7})
    eps = [endpoint(i) for i in range(3)]
    assert names(f.filter(with_hits(eps, {0: 7, 1: 6}), eps)) == ["pod-0"]  # 7/10 ≥ 0.7 exactly


# -- header-based-testing-filter ------------------------------------------------------------------
def test_header_selection_keeps_the_named_endpoints_in_header_order() -> None:
    f = make("header-based-testing-filter")
    eps = [endpoint(i) for i in range(4)]  # addresses 10.0.0.1 .. 10.0.0.4, port 8000
    req = request()
    assert names(f.filter(req, eps)) == names(eps)  # no header: everyone
    req.headers["test-epp-endpoint-selection"] = "10.0.0.3, 10.0.0.1:8000,10.0.0.3"
    assert names(f.filter(req, eps)) == ["pod-2", "pod-0"]
    req.headers["test-epp-endpoint-selection"] = "10.0.0.1:9999,10.9.9.9"
    assert list(f.filter(req, eps)) == []  # nothing named is a candidate
