"""Multicluster mode through the config loader and the director: the reference's example config loads,
the cluster scorers rank clusters on their EPPs' pool averages (unknown below known, never idle),
prefix affinity and session tokens work per cluster, a cluster with no ready endpoints gets nothing
(unless no cluster has any), and configs mixing the modes fail at start-up naming the field."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import cast

import pytest
from helpers import request

from llmepp.config.loader import Components, build, load_config, rebuild_scheduling
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointMetrics, EndpointSpec
from llmepp.datalayer.multicluster import POOL_KV_CACHE_UTILIZATION, POOL_QUEUE_SIZE, POOL_READY_ENDPOINTS
from llmepp.director import Director, RoutingDecision
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.multicluster import MulticlusterMetricsDataSource, MulticlusterMetricsExtractor
from llmepp.plugins.discovery.multicluster import MulticlusterFileDiscovery
from llmepp.plugins.filters.session import encode_token
from llmepp.plugins.scorers.kv_cache_utilization import KVCacheUtilizationScorer
from llmepp.plugins.scorers.multicluster import MulticlusterKVCacheUtilizationScorer, MulticlusterQueueScorer
from llmepp.plugins.scorers.queue import QueueScorer
from llmepp.request.parsers import headers_request
from llmepp.request.types import ResponseInfo

# The reference's wiring example (llm-d-router pkg/epp/framework/plugins/README.md, "Multi-cluster
# variants"), as written there: llm-d.ai/v1, discovery.endpoints.pluginRef, no schedulingProfiles.
REFERENCE_EXAMPLE = """\
apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
plugins:
  - type: multicluster-file-discovery
    name: discovery
    parameters:
      path: /etc/epp/clusters.yaml
  - type: multicluster-metrics-data-source
    name: metrics-source
    parameters:
      scheme: https
      caCertPath: {ca}
  - type: multicluster-metrics-extractor
    name: metrics-extractor
  - type: multicluster-session-affinity-filter
    name: session-affinity
  - type: multicluster-kv-cache-utilization-scorer
    name: kv-cache
  - type: multicluster-queue-scorer
    name: queue
  - type: max-score-picker
  - type: single-profile-handler
dataLayer:
  discovery:
    endpoints:
      pluginRef: discovery
  sources:
    - pluginRef: metrics-source
      extractors:
        - pluginRef: metrics-extractor
"""

# Every multicluster type, in this repo's (and the older reference's) spelling, with weights.
HUB = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: multicluster-file-discovery
  parameters: {path: /nonexistent/clusters.yaml, watchFile: true}
- type: multicluster-metrics-data-source
  parameters: {scheme: http, interval: 200ms}
- type: multicluster-metrics-extractor
- type: multicluster-queue-scorer
- type: multicluster-kv-cache-utilization-scorer
- type: multicluster-approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 16384}
- type: multicluster-prefix-cache-scorer
- type: multicluster-session-affinity-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: multicluster-session-affinity-filter}
  - {pluginRef: multicluster-queue-scorer, weight: 2}
  - {pluginRef: multicluster-kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: multicluster-prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
dataLayer:
  discovery: {pluginRef: multicluster-file-discovery}
  sources:
  - pluginRef: multicluster-metrics-data-source
    extractors: [{pluginRef: multicluster-metrics-extractor}]
"""


def cluster(i: int, *, queue: float | None = 0.0, kv: float | None = 0.0) -> Endpoint:
    ep = Endpoint(EndpointSpec(name=f"cluster-{i}", address=f"10.9.0.{i + 1}", port=80))
    set_load(ep, queue=queue, kv=kv)
    return ep


def set_load(ep: Endpoint, *, queue: float | None, kv: float | None, ready: float | None = None) -> None:
    """What multicluster-metrics-extractor leaves on a cluster after a scrape (None: not on the page)."""
    pairs = ((POOL_QUEUE_SIZE, queue), (POOL_KV_CACHE_UTILIZATION, kv), (POOL_READY_ENDPOINTS, ready))
    attrs = {k: v for k, v in pairs if v is not None}
    ep.metrics = EndpointMetrics(update_time=time.monotonic(), attributes=attrs) if attrs else NO_METRICS


def hub(n: int = 2, text: str = HUB) -> tuple[Director, Datastore, Components]:
    ds = Datastore()
    for i in range(n):
        ds.upsert(cluster(i).spec)
    for ep in ds.endpoints:
        set_load(ep, queue=0.0, kv=0.0)
    metrics = EppMetrics()
    components = build(load_config(text), datastore=ds, metrics=metrics)
    return Director(ds, components.pipeline, metrics), ds, components


async def route(d: Director, prompt: bytes, headers: dict[str, str] | None = None) -> tuple[Endpoint, str]:
    """Schedule one request and finish it; (the cluster chosen, the session token answered)."""
    req = request(prompt)
    req.headers.update(headers or {})
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    extra = d.response_headers(req, ResponseInfo(status=200), {}) or {}
    d.response_complete(req, ResponseInfo(status=200), decision)
    await asyncio.sleep(0)  # the prefix index is updated just after the routing answer
    return decision.targets[0], extra.get("x-session-token", "")


# -- loading ---------------------------------------------------------------------------------------


def test_the_reference_example_loads_as_written(tmp_path: object) -> None:
    from helpers import write_cert_pair

    ca = tmp_path / "tls"  # type: ignore[operator]
    write_cert_pair(ca)
    components = build(load_config(REFERENCE_EXAMPLE.format(ca=ca / "tls.crt")), datastore=Datastore())
    types = {name: p.type for name, p in components.plugins.items()}
    for name, want in {
        "discovery": "multicluster-file-discovery",
        "metrics-source": "multicluster-metrics-data-source",
        "metrics-extractor": "multicluster-metrics-extractor",
        "session-affinity": "multicluster-session-affinity-filter",
        "kv-cache": "multicluster-kv-cache-utilization-scorer",
        "queue": "multicluster-queue-scorer",
    }.items():
        assert types[name] == want, name
    assert isinstance(components.discovery, MulticlusterFileDiscovery)
    # The pair it wires, and nothing else: no pod metrics source is injected next to it (the
    # reference's would scrape every gateway as a vLLM page and log the failures).
    [ds] = components.data_sources
    assert isinstance(ds.source, MulticlusterMetricsDataSource)
    assert [type(x) for x in ds.extractors] == [MulticlusterMetricsExtractor]
    assert "metrics-data-source" not in types.values() and "core-metrics-extractor" not in types.values()
    # Verified TLS by default (unlike the pod source): https, the peer's certificate checked.
    assert ds.source.scheme == "https" and ds.source.ssl_context is not None
    assert ds.source.ssl_context.check_hostname
    # No schedulingProfiles: one default profile with the filter, both scorers and the picker.
    [profile] = components.pipeline.scheduler.profiles.values()
    assert [f.name for f in profile.filters] == ["session-affinity"]
    assert sorted(ws.scorer.name for ws in profile.scorers) == ["kv-cache", "queue"]


def test_every_multicluster_type_loads_with_its_stock_parameters() -> None:
    _d, _ds, c = hub()
    assert {p.type for p in c.plugins.values()} >= {
        "multicluster-file-discovery", "multicluster-metrics-data-source", "multicluster-metrics-extractor",
        "multicluster-queue-scorer", "multicluster-kv-cache-utilization-scorer",
        "multicluster-approx-prefix-cache-producer", "multicluster-prefix-cache-scorer",
        "multicluster-session-affinity-filter",
    }  # fmt: skip
    # The prefix scorer reads the cluster producer (its only producer), with the stock parameters.
    assert c.plugins["multicluster-prefix-cache-scorer"].data_key == (  # type: ignore[attr-defined]
        "PrefixCacheMatchInfo/multicluster-approx-prefix-cache-producer"
    )
    assert c.plugins["multicluster-approx-prefix-cache-producer"].params.max_prefix_tokens_to_match == 16384
    source = c.plugins["multicluster-metrics-data-source"]
    assert isinstance(source, MulticlusterMetricsDataSource)
    assert source.ssl_context is None and source.ticks_per_poll(0.05) == 4


# -- scoring ---------------------------------------------------------------------------------------


def test_queue_scorer_min_max_over_known_clusters_unknown_scores_zero() -> None:
    s = MulticlusterQueueScorer("q")
    assert s.score(request(), [cluster(0, queue=2), cluster(1, queue=6), cluster(2, queue=10)]) == [1.0, 0.5, 0.0]
    assert s.score(request(), [cluster(0, queue=4), cluster(1, queue=4)]) == [1.0, 1.0]
    # Fractional averages are kept (a pod average of 0.5 is not 0).
    assert s.score(request(), [cluster(0, queue=0.5), cluster(1, queue=1.5)]) == [1.0, 0.0]
    # Unknown: 0, and left out of the normalisation — never read as an idle cluster.
    assert s.score(request(), [cluster(0, queue=2), cluster(1, queue=None), cluster(2, queue=10)]) == [1.0, 0.0, 0.0]
    assert s.score(request(), [cluster(0, queue=7), cluster(1, queue=None)]) == [1.0, 0.0]
    assert s.score(request(), [cluster(0, queue=None), cluster(1, queue=None)]) == [0.0, 0.0]


def test_kv_scorer_is_one_minus_the_pool_average_unknown_scores_zero() -> None:
    s = MulticlusterKVCacheUtilizationScorer("kv")
    scores = s.score(request(), [cluster(0, kv=0.25), cluster(1, kv=None), cluster(2, kv=0.0)])
    assert scores == [0.75, 0.0, 1.0]


def test_the_stock_scorers_still_read_pod_metrics() -> None:
    pods = [Endpoint(EndpointSpec(name=f"p{i}", address=f"10.0.0.{i + 1}", port=8000)) for i in range(3)]
    for ep, (q, kv) in zip(pods, [(3, 0.5), (0, 0.1), (9, 0.9)]):
        ep.metrics = EndpointMetrics(waiting_queue_size=q, kv_cache_usage_percent=kv, update_time=1.0)
    assert QueueScorer("q").score(request(), pods) == pytest.approx([6 / 9, 1.0, 0.0])
    assert KVCacheUtilizationScorer("kv").score(request(), pods) == pytest.approx([0.5, 0.9, 0.1])
    assert QueueScorer("q").score(request(), []) == []
    # A pod never scraped is unknown load, as an unseen cluster: unscored, out of the range.
    pods[2].metrics = NO_METRICS
    assert QueueScorer("q").score(request(), pods) == pytest.approx([0.0, 1.0, 0.0])
    assert KVCacheUtilizationScorer("kv").score(request(), pods) == pytest.approx([0.5, 0.9, 0.0])


async def test_hub_routes_to_the_less_loaded_cluster_and_never_to_an_unseen_one() -> None:
    d, ds, _c = hub(3)
    a, b, c = ds.endpoints
    set_load(a, queue=8.0, kv=0.7)
    set_load(b, queue=1.0, kv=0.2)
    set_load(c, queue=None, kv=None)  # its EPP's page could not be read
    for i in range(5):
        target, _ = await route(d, f"prompt {i} ".encode() * 40)
        assert target is b
    set_load(b, queue=12.0, kv=0.9)  # b is now the busiest: a takes over, the unseen one still does not
    target, _ = await route(d, b"another prompt " * 40)
    assert target is a


async def test_a_prompt_prefix_and_a_session_stay_with_their_cluster() -> None:
    d, ds, _c = hub(2)
    first, token = await route(d, b"a long shared system prompt " * 60)
    assert token == encode_token(first)  # the session token names the cluster
    other = next(ep for ep in ds.endpoints if ep is not first)
    # The cluster that holds the prefix is somewhat fuller: prefix affinity (weight 3) outweighs it.
    set_load(first, queue=1.0, kv=0.3)
    set_load(other, queue=1.0, kv=0.0)
    for turn in range(3):
        target, _ = await route(d, b"a long shared system prompt " * 60 + f"turn {turn}".encode())
        assert target is first
    # A new prompt goes to the idle cluster; its session token then pins it there despite the load.
    cold, cold_token = await route(d, b"an unrelated prompt " * 60)
    assert cold is other
    set_load(other, queue=9.0, kv=0.9)
    target, _ = await route(d, b"yet another unrelated prompt " * 60, {"x-session-token": cold_token})
    assert target is other


async def test_a_cluster_with_no_ready_endpoints_gets_nothing_unless_none_has_any() -> None:
    d, ds, c = hub(3)
    assert c.plugins["multicluster-metrics-extractor"] in c.pipeline.screeners
    a, b, e = ds.endpoints
    prompt = b"a long shared system prompt " * 60
    first, token = await route(d, prompt)
    # The cluster holding the prefix and named by the session token loses its pods: its EPP's averages
    # read idle (0), the best load of all, and the prefix and the session point there — it gets nothing.
    set_load(first, queue=0.0, kv=0.0, ready=0)
    for other in (ep for ep in (a, b, e) if ep is not first):
        set_load(other, queue=5.0, kv=0.8, ready=2)
    for turn in range(4):
        target, _ = await route(d, prompt + f"turn {turn}".encode(), {"x-session-token": token})
        assert target is not first
    # An unknown count (its page could not be read, or lacks the gauge) is not 0: still a candidate.
    set_load(first, queue=0.0, kv=0.0, ready=None)
    target, _ = await route(d, prompt + b" again", {"x-session-token": token})
    assert target is first
    # No cluster has a ready endpoint: the hub routes as before (the cluster EPPs answer as an empty
    # pool does, e.g. hold the request while scaling from zero) rather than refusing everything itself.
    for ep in (a, b, e):
        set_load(ep, queue=0.0, kv=0.0, ready=0)
    target, _ = await route(d, b"an unrelated prompt " * 60)
    assert target in (a, b, e)


def test_bodyless_requests_skip_a_cluster_with_no_ready_endpoints() -> None:
    d, ds, _ = hub(3)
    empty, *others = ds.endpoints
    set_load(empty, queue=0.0, kv=0.0, ready=0)
    for ep in others:
        set_load(ep, queue=5.0, kv=0.8, ready=2)
    get = headers_request({":method": "GET", ":path": "/v1/models"}, request_id="b-1")
    # 60 picks of the 2 available: P(never the empty one | not screened) = (2/3)^60 ≈ 3e-11.
    seen = {cast(RoutingDecision, d.handle_bodyless(get, None)).targets[0] for _ in range(60)}
    assert seen == set(others)
    # No cluster has a ready endpoint: all stay candidates, as for a routed request.
    for ep in others:
        set_load(ep, queue=0.0, kv=0.0, ready=0)
    assert {cast(RoutingDecision, d.handle_bodyless(get, None)).targets[0] for _ in range(60)} == set(ds.endpoints)


# -- modes that must not mix ---------------------------------------------------------------------

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
DISCOVERY = "- {type: multicluster-file-discovery, name: clusters, parameters: {path: /x}}\n"
SOURCE = "- {type: multicluster-metrics-data-source, name: src}\n"
EXTRACTOR = "- {type: multicluster-metrics-extractor, name: ext}\n"
HUB_LAYER = "dataLayer:\n  discovery: {pluginRef: clusters}\n"
WIRED = HUB_LAYER + "  sources: [{pluginRef: src, extractors: [{pluginRef: ext}]}]\n"


@pytest.mark.parametrize(
    ("plugins", "layer", "expected"),
    [
        (
            DISCOVERY + "- {type: multicluster-queue-scorer, name: queue}\n",
            HUB_LAYER,
            "dataLayer.sources: plugin 'queue' (type multicluster-queue-scorer) scores clusters on their EPPs' "
            "pool averages; wire a multicluster-metrics-data-source with a multicluster-metrics-extractor",
        ),
        (
            DISCOVERY + SOURCE + EXTRACTOR + "- {type: multicluster-kv-cache-utilization-scorer}\n",
            HUB_LAYER + "  sources: [{pluginRef: src}]\n",
            "dataLayer.sources[0].extractors: plugin 'src' (type multicluster-metrics-data-source) needs a "
            "multicluster-metrics-extractor",
        ),
        (
            DISCOVERY + SOURCE + "- {type: core-metrics-extractor, name: core}\n",
            HUB_LAYER + "  sources: [{pluginRef: src, extractors: [{pluginRef: core}]}]\n",
            "dataLayer.sources[0].extractors[0].pluginRef: plugin 'core' (type core-metrics-extractor) cannot "
            "read a peer EPP's page",
        ),
        (
            "- {type: file-discovery, name: pods, parameters: {path: /x}}\n- {type: metrics-data-source}\n" + EXTRACTOR,
            "dataLayer:\n  discovery: {pluginRef: pods}\n"
            "  sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: ext}]}]\n",
            "dataLayer.sources[0].extractors[0].pluginRef: plugin 'ext' (type multicluster-metrics-extractor) "
            "reads peer EPPs' pool averages; wire it under a multicluster-metrics-data-source",
        ),
        (
            "- {type: file-discovery, name: pods, parameters: {path: /x}}\n"
            "- {type: multicluster-prefix-cache-scorer, name: prefix}\n",
            "dataLayer:\n  discovery: {pluginRef: pods}\n",
            "dataLayer.discovery.pluginRef: plugin 'prefix' (type multicluster-prefix-cache-scorer) is for a hub "
            "EPP whose endpoints are clusters, which needs a multicluster-file-discovery plugin as the discovery "
            "(this config has 'pods' (type file-discovery))",
        ),
        (
            "- {type: multicluster-session-affinity-filter}\n",
            "",
            "(this config has Kubernetes discovery)",
        ),
        (
            DISCOVERY + SOURCE + EXTRACTOR + "- {type: queue-scorer}\n",
            WIRED,
            "plugin 'queue-scorer' (type queue-scorer): reads model-server metrics; use multicluster-queue-scorer; "
            "this hub's endpoints (from 'clusters', type multicluster-file-discovery) are clusters, not model servers",
        ),
        (
            DISCOVERY + "- {type: kv-cache-utilization-scorer}\n",
            HUB_LAYER,
            "use multicluster-kv-cache-utilization-scorer",
        ),
        (
            DISCOVERY + SOURCE + EXTRACTOR + "- {type: metrics-data-source, name: pods}\n",
            WIRED,
            "plugin 'pods' (type metrics-data-source): reads model-server metrics",
        ),
        (  # listed, not wired: nothing would scrape the clusters (no load, no availability), silently
            DISCOVERY + SOURCE + EXTRACTOR + "- {type: multicluster-prefix-cache-scorer}\n",
            HUB_LAYER,
            "dataLayer.sources: plugin 'src' (type multicluster-metrics-data-source) is not wired, so no cluster's "
            "EPP is scraped; add {pluginRef: src, extractors: [{pluginRef: <a multicluster-metrics-extractor>}]}",
        ),
        (
            DISCOVERY + EXTRACTOR + "- {type: multicluster-prefix-cache-scorer}\n",
            HUB_LAYER,
            "dataLayer.sources: plugin 'ext' (type multicluster-metrics-extractor) is not wired under a "
            "multicluster-metrics-data-source",
        ),
        (  # the collector reads a page through one extractor: the second one's metric names would be ignored
            DISCOVERY + SOURCE + EXTRACTOR + "- {type: multicluster-metrics-extractor, name: ext2}\n",
            HUB_LAYER + "  sources: [{pluginRef: src, extractors: [{pluginRef: ext}, {pluginRef: ext2}]}]\n",
            "dataLayer.sources[0].extractors[1].pluginRef: plugin 'ext2' (type multicluster-metrics-extractor): "
            "a multicluster-metrics-data-source takes one extractor",
        ),
        (
            DISCOVERY + SOURCE + EXTRACTOR + "- {type: multicluster-metrics-data-source, name: src2}\n",
            HUB_LAYER + "  sources:\n  - {pluginRef: src, extractors: [{pluginRef: ext}]}\n"
            "  - {pluginRef: src2, extractors: [{pluginRef: ext}]}\n",
            "dataLayer.sources[1]: a second multicluster-metrics-data-source",
        ),
        (
            DISCOVERY,
            "dataLayer:\n  discovery: {pluginRef: clusters, endpoints: {pluginRef: clusters}}\n",
            "dataLayer.discovery: give pluginRef or endpoints.pluginRef, not both",
        ),
        (
            DISCOVERY,
            "dataLayer:\n  discovery: {endpoints: {pluginRef: nope}}\n",
            "dataLayer.discovery.endpoints.pluginRef: no plugin named 'nope'",
        ),
        (
            DISCOVERY + "- {type: multicluster-metrics-extractor, parameters: {queueSizeMetric: '1bad'}}\n",
            HUB_LAYER,
            "plugin 'multicluster-metrics-extractor' (type multicluster-metrics-extractor): "
            "parameters.queueSizeMetric: metric spec '1bad'",
        ),
        (
            DISCOVERY + "- {type: multicluster-metrics-data-source, parameters: {scheme: ftp}}\n",
            HUB_LAYER,
            "(type multicluster-metrics-data-source): parameters.scheme: must be http or https, got 'ftp'",
        ),
    ],
)
def test_configs_mixing_the_modes_fail_naming_the_field(plugins: str, layer: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(load_config(HEADER + "plugins:\n" + plugins + layer))
    assert expected in str(err.value)


def test_a_reload_cannot_bring_pod_scorers_into_a_hub() -> None:
    _d, ds, running = hub()
    text = HUB.replace("- type: max-score-picker\n", "- type: max-score-picker\n- type: queue-scorer\n")
    with pytest.raises(ConfigError, match="type queue-scorer\\): reads model-server metrics"):
        rebuild_scheduling(running, load_config(text), datastore=ds)
    # A weight change is fine.
    new = rebuild_scheduling(running, load_config(HUB.replace("weight: 3", "weight: 4")), datastore=ds)
    assert new.plugins["multicluster-metrics-data-source"] is running.plugins["multicluster-metrics-data-source"]


def test_the_readme_hub_example_loads(tmp_path: Path) -> None:
    """README.md's multicluster example (as a user copies it) builds, with the detector it configures."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text[text.index("## Multicluster (clusters as endpoints)") :]
    example = re.search(r"```yaml\n(plugins:.*?)```", section, re.S)
    assert example is not None
    clusters = tmp_path / "clusters.yaml"
    clusters.write_text("endpoints:\n- {name: eu-1, address: 10.20.0.5, port: 80}\n")
    components = build(load_config(example.group(1).replace("/etc/epp/clusters.yaml", str(clusters))))
    assert components.plugins["utilization-detector"].type == "utilization-detector"
    assert "multicluster-metrics-extractor" in components.plugins
