"""The catalogue through the config loader and the director: every type string with its
parameters, auto-created producers, the optimized-baseline profile, session round trips."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import cast

import pytest
from helpers import endpoint, request

from llmepp.config.loader import DEFAULT_PRODUCERS, Components, build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointMetrics
from llmepp.director import Director, RoutingDecision
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.filters.session import encode_token
from llmepp.request.types import ResponseInfo

BASELINE = Path(__file__).parents[2] / "benchmarks" / "configs" / "optimized-baseline.yaml"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"

# One instance of every catalogue plugin, with its parameters, as an operator would write them.
CATALOGUE = (
    HEADER
    + """
plugins:
- type: label-selector-filter
  parameters:
    matchLabels: {app: vllm}
    matchExpressions: [{key: role, operator: NotIn, values: [prefill]}]
- type: by-label-selector
  parameters: {matchLabels: {app: vllm}}
- type: by-label
  parameters: {label: app, validValues: [vllm], allowsNoLabel: false}
- type: utilization-filter
  parameters:
    conditions:
    - {metric: kv-cache-utilization, maxValue: 0.95}
    - {metric: active-requests, maxValue: 1000}
    fallbackOnEmpty: true
- type: load-balance-filter
  parameters: {absThreshold: 32, relThreshold: 1.5}
- type: endpoint-attribute-filter
  parameters:
    attribute: waiting-queue
    onMissing: Pass
    fallbackOnEmpty: true
    algorithm: {type: threshold, threshold: {operator: LessThan, value: 100}}
- type: prefix-cache-affinity-filter
  parameters:
    affinityThreshold: 0.8
    explorationProbability: 0.01
    maxTTFTPenaltyMs: 5000
    ttftSource: prefillThroughput
- type: session-affinity-filter
  parameters: {encodedEndpointHeaderConfig: {header: x-session-token}}
- type: queue-scorer
- type: running-requests-size-scorer
- type: load-aware-scorer
  parameters: {threshold: 64}
- type: active-request-scorer
  parameters: {idleThreshold: 1, maxBusyScore: 0.5, requestTimeout: 2m}
- type: token-load-scorer
  parameters: {queueThresholdTokens: 100000}
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
  parameters: {lruSize: 256}
- type: lora-affinity-scorer
- name: session-scorer
  type: session-affinity-scorer
  parameters: {strategy: session_id, sessionIdConfig: {sources: [{header: x-session-id}], evictionTtlSeconds: 60}}
- type: header-label-affinity-scorer
  parameters: {headerName: x-tenant, labelKey: tenant}
- type: context-length-aware
  parameters: {enableFiltering: true}
- type: endpoint-attribute-scorer
  parameters:
    attributeKey: kv-cache-utilization
    algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 0, max: 1}}}
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 2}
"""
)


def director(text: str, n: int = 4, labels: dict[str, str] | None = None) -> tuple[Director, Datastore, Components]:
    ds = Datastore()
    for i in range(n):
        ds.upsert(endpoint(i, labels=labels).spec)
    for i, ep in enumerate(ds.endpoints):
        ep.metrics = EndpointMetrics(waiting_queue_size=i % 3, kv_cache_usage_percent=0.1 * i, update_time=1.0)
    metrics = EppMetrics()
    components = build(load_config(text), datastore=ds, metrics=metrics)
    return Director(ds, components.pipeline, metrics), ds, components


async def test_every_catalogue_plugin_loads_and_schedules() -> None:
    d, _ds, c = director(CATALOGUE, labels={"app": "vllm", "tenant": "a"})
    types = {p.type for p in c.plugins.values()}
    # The deprecated alias builds a label-selector-filter (named after the alias, as no name is given).
    assert c.plugins["by-label-selector"].type == "label-selector-filter"
    for t in ("label-selector-filter", "by-label", "utilization-filter", "load-balance-filter",
              "endpoint-attribute-filter", "prefix-cache-affinity-filter", "session-affinity-filter",
              "running-requests-size-scorer", "load-aware-scorer", "active-request-scorer", "token-load-scorer",
              "no-hit-lru-scorer", "lora-affinity-scorer", "session-affinity-scorer", "header-label-affinity-scorer",
              "context-length-aware", "endpoint-attribute-scorer", "weighted-random-picker"):  # fmt: skip
        assert t in types, t
    # Consumers got their default producers.
    assert {"inflight-load-producer", "approx-prefix-cache-producer", "token-producer"} <= types
    assert c.plugins["load-aware-scorer"].threshold == 64  # type: ignore[attr-defined]
    req = request(b"a prompt " * 50)
    req.headers["x-session-id"] = "s1"
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert len(decision.targets) == 2
    extra = d.response_headers(req, ResponseInfo(status=200), {})
    assert extra is not None and extra["x-session-token"] == encode_token(decision.targets[0])
    d.response_complete(req, ResponseInfo(status=200), decision)
    ifl = c.plugins["inflight-load-producer"]
    assert all(load.requests == 0 and load.tokens == 0 for load in ifl.loads.values())  # type: ignore[attr-defined]


def test_default_producer_entries() -> None:
    assert DEFAULT_PRODUCERS["InFlightLoad"] == "inflight-load-producer"
    assert DEFAULT_PRODUCERS["SessionID"] == "session-id-producer"
    text = (
        HEADER
        + """
plugins:
- type: session-affinity-scorer
  parameters: {strategy: session_id, sessionIdConfig: {sources: [{attribute: SessionID}]}}
- type: token-load-scorer
"""
    )
    c = build(load_config(text))
    assert {"session-id-producer", "inflight-load-producer", "token-producer"} <= set(c.plugins)


LA = "plugin 'load-aware-scorer' (type load-aware-scorer): parameters: "


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        # (threshold -3 means the default 128 there, as in the reference: test_reference_configs.py)
        ("{type: load-aware-scorer, parameters: {threshold: 1.5}}", LA + "Expected `int`, got `float`"),
        (
            "{type: utilization-filter, parameters: {conditions: [{metric: gpu, maxValue: 1}]}}",
            "type utilization-filter): parameters: conditions: metric 'gpu'",
        ),
        (
            "{name: w, type: weighted-random-picker, parameters: {maxNumOfEndpoints: [2]}}",
            "plugin 'w' (type weighted-random-picker): parameters: Expected `int`, got `array`",
        ),
        (
            "{type: no-hit-lru-scorer, parameters: {lruSize: x}}",
            "type no-hit-lru-scorer): parameters: Expected `int`, got `str` - at `parameters.lruSize`",
        ),
        (
            "{type: token-load-scorer, parameters: {queueThreshold: 1}}",
            "type token-load-scorer): parameters: Object contains unknown field `queueThreshold`",
        ),
        (
            "{type: active-request-scorer, parameters: {inFlightLoadProducerName: nope}}",
            "type active-request-scorer): inFlightLoadProducerName: no plugin named 'nope'",
        ),
        (
            "{type: prefix-cache-affinity-filter, parameters: {ttftSource: oracle}}",
            "ttftSource must be 'prefillThroughput' or 'latencyPredictor', got 'oracle'",
        ),
        (
            "{type: endpoint-attribute-scorer, parameters: "
            "{attributeKey: gpu, producer: dcgm, algorithm: {type: linear_lower_is_better}}}",
            "consumes gpu but no configured plugin produces it",
        ),
        (
            "{type: endpoint-attribute-filter, parameters: "
            "{attribute: gpu, algorithm: {type: range, range: {min: 0, max: 1}}}}",
            "attribute 'gpu' is not a built-in (waiting-queue, running-requests",
        ),
    ],
)
def test_config_errors_name_plugin_and_field(plugin: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(load_config(HEADER + f"plugins:\n- {plugin}\n"))
    assert expected in str(err.value)


async def test_optimized_baseline_loads_and_spreads_cold_requests() -> None:
    d, ds, c = director(BASELINE.read_text(), n=4)
    assert c.plugins["no-hit-lru-scorer"].key == "PrefixCacheMatchInfo/approx-prefix-cache-producer"  # type: ignore[attr-defined]
    for ep in ds.endpoints:  # equal load, so only the prefix and LRU scorers differ
        ep.metrics = EndpointMetrics(update_time=1.0)
    seen = []
    for i in range(4):  # four distinct (cold) prompts: the LRU sends each to a fresh endpoint
        req = request(bytes([65 + i]) * 2000)
        decision = await d.handle_request(req, None)
        assert isinstance(decision, RoutingDecision)
        seen.append(decision.targets[0].name)
        d.response_complete(req, ResponseInfo(status=200), decision)
        await asyncio.sleep(0)  # the prefix index is updated just after the routing answer
    assert sorted(seen) == ["pod-0", "pod-1", "pod-2", "pod-3"]
    # A warm repeat goes back to where the prefix is cached.
    req = request(b"B" * 2000)
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name == seen[1]


async def test_session_token_round_trip_through_the_director() -> None:
    text = (
        HEADER
        + """
plugins:
- type: session-affinity-scorer
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: session-affinity-scorer, weight: 10}, {pluginRef: queue-scorer}]
"""
    )
    d, ds, _ = director(text, n=5)
    for ep in ds.endpoints:
        ep.metrics = EndpointMetrics(update_time=1.0)
    first = request()
    decision = await d.handle_request(first, None)
    assert isinstance(decision, RoutingDecision)
    pinned = decision.targets[0]
    headers = d.response_headers(first, ResponseInfo(status=200), {})
    assert headers == {"x-session-token": encode_token(pinned)}
    d.response_complete(first, ResponseInfo(status=200), decision)
    # Make the pinned endpoint the worst by queue: the session weight still wins.
    for ep in ds.endpoints:
        ep.metrics = EndpointMetrics(waiting_queue_size=9 if ep is pinned else 0, update_time=1.0)
    for _ in range(10):
        nxt = request()
        nxt.headers["x-session-token"] = headers["x-session-token"]
        decision = await d.handle_request(nxt, None)
        assert isinstance(decision, RoutingDecision)
        assert decision.targets[0] is pinned
        d.response_complete(nxt, ResponseInfo(status=200), decision)


async def test_session_filter_round_trip_and_departed_endpoint() -> None:
    text = HEADER + "plugins:\n- type: session-affinity-filter\n- type: random-picker\n"
    d, ds, _ = director(text, n=6)
    first = request()
    decision = await d.handle_request(first, None)
    assert isinstance(decision, RoutingDecision)
    token = d.response_headers(first, ResponseInfo(status=200), {})["x-session-token"]  # type: ignore[index]
    pinned = decision.targets[0]
    d.response_complete(first, ResponseInfo(status=200), decision)
    for _ in range(10):
        nxt = request()
        nxt.headers["x-session-token"] = token
        assert cast(RoutingDecision, await d.handle_request(nxt, None)).targets[0] is pinned
    ds.delete(pinned.name)
    spread: Counter[str] = Counter()
    for _ in range(30):
        nxt = request()
        nxt.headers["x-session-token"] = token
        spread[cast(RoutingDecision, await d.handle_request(nxt, None)).targets[0].name] += 1
    assert pinned.name not in spread and len(spread) > 1


async def test_active_request_scorer_balances_through_the_director() -> None:
    text = HEADER + "plugins:\n- type: active-request-scorer\n"
    d, _ds, c = director(text, n=3)
    decisions = [cast(RoutingDecision, await d.handle_request(request(), None)) for _ in range(6)]
    assert Counter(dec.targets[0].name for dec in decisions) == {"pod-0": 2, "pod-1": 2, "pod-2": 2}
    ifl = c.plugins["inflight-load-producer"]
    assert sum(load.requests for load in ifl.loads.values()) == 6  # type: ignore[attr-defined]


def test_per_profile_session_instances_need_distinct_headers() -> None:
    base = (
        HEADER
        + """
plugins:
- {name: decode-sa, type: session-affinity-filter}
- name: prefill-sa
  type: session-affinity-filter
  parameters: {profileName: prefill%s}
- type: queue-scorer
"""
    )
    with pytest.raises(ConfigError, match="'x-session-token' is also written by plugin") as err:
        build(load_config(base % ""))
    assert "(type session-affinity-filter): encodedEndpointHeaderConfig.header" in str(err.value)
    build(load_config(base % ", encodedEndpointHeaderConfig: {header: x-session-token-prefill}"))


CUSTOM_METRIC = (
    HEADER
    + """
plugins:
- type: metrics-data-source
- type: core-metrics-extractor
  parameters:
    engineConfigs:
    - name: vllm
      queuedRequestsSpec: vllm:num_requests_waiting
      customMetrics:
      - {attributeKey: custom.gold_queue, metricSpec: 'custom_queue_depth{tier=gold}'}
- type: endpoint-attribute-scorer
  parameters:
    attributeKey: custom.gold_queue
    algorithm: {type: linear_lower_is_better}
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: endpoint-attribute-scorer}]
"""
)


async def test_a_custom_metric_drives_the_attribute_scorer() -> None:
    d, ds, c = director(CUSTOM_METRIC, n=3)
    extractor = c.plugins["core-metrics-extractor"]
    for i, ep in enumerate(ds.endpoints):  # pod-1 reports the shortest gold queue; pod-2 never reports it
        page = b"vllm:num_requests_waiting 0\n" + (
            f'custom_queue_depth{{tier="gold"}} {5 - 4 * i}\n'.encode() if i < 2 else b""
        )
        metrics, _ = extractor.extract(ep, page, 1.0)  # type: ignore[attr-defined]
        assert metrics is not None
        ep.metrics = metrics
    assert [ep.metrics.attributes for ep in ds.endpoints] == [
        {"custom.gold_queue": 5.0},
        {"custom.gold_queue": 1.0},
        {},
    ]
    decision = await d.handle_request(request(b"hello"), None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name == "pod-1"
