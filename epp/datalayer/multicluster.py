"""Multicluster mode ("cluster as endpoint"): a hub EPP whose endpoints are whole clusters.

One model runs in several clusters, each behind its own gateway with its own EPP. A hub EPP
(behind its own Envoy) lists the clusters' gateways as its endpoints and routes every request to
one cluster's gateway address; that cluster's EPP then picks the pod:

    client ─► hub Envoy ─► hub EPP (multicluster plugins)
                 │           ├─ reads the cluster list (multicluster-file-discovery)
                 │           └─ scrapes each peer EPP's /metrics (its pool averages)
                 └─► cluster gateway (x-gateway-destination-endpoint) ─► cluster EPP ─► pod

What a cluster endpoint carries (reference: llm-d-router `extractor/metrics/multicluster.go`,
`attribute/metrics` keys): its peer EPP's published pool gauges, `llm_d_epp_average_kv_cache_utilization`
and `llm_d_epp_average_queue_size` (as the reference), plus `llm_d_epp_ready_endpoints` and, when
published, `llm_d_epp_average_running_requests`, stored as the endpoint attributes
`POOL_KV_CACHE_UTILIZATION`, `POOL_QUEUE_SIZE`, `POOL_READY_ENDPOINTS`, `POOL_RUNNING_REQUESTS` (in
`endpoint.metrics.attributes`, replaced as a whole on every scrape). A cluster whose page cannot be
read (unreachable, bad status, malformed, a gauge missing) has no value for what could not be read:
unknown, which the multicluster scorers rank below every known cluster, never as idle.

Availability: a cluster whose EPP reports 0 ready endpoints is unavailable (`is_unavailable`): the
extractor, a screener, drops it from every request's candidates (unless no cluster is available:
then all stay, as if none was screened), and the change is counted and logged (`AvailabilityLog`;
a flapping cluster is not logged on every change).
An unknown ready count is not 0: such a cluster stays a candidate.

The per-endpoint fields generic plugins read (queue, running, KV, `update_time`: the saturation
detectors, the per-endpoint gauge) hold a cluster's pool averages while it is available and both
averages are known; otherwise they are empty with `update_time` 0 — no load to act on, which the
utilization detector counts as saturated (a cluster that cannot take work adds no headroom).
`pool_averages` is what a hub publishes as its own pool gauges (the clusters' averages, weighted
by their ready endpoints), so a hub can be a cluster of another hub.

This module holds what the framework needs to know about the mode (type strings, attribute keys,
the discovery labels), `check_wiring`, the start-up check that a config does not mix the modes, and
the availability and pool-average rules above.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics
from llmepp.framework.plugin import ConfigError, Plugin
from llmepp.observability.fast import Counter

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KV_METRIC",
    "DEFAULT_QUEUE_METRIC",
    "DEFAULT_READY_METRIC",
    "DEFAULT_RUNNING_METRIC",
    "DISCOVERY_TYPE",
    "EXTRACTOR_TYPE",
    "METRICS_ADDRESS_LABEL",
    "METRICS_PORT_LABEL",
    "METRICS_SOURCE_TYPES",
    "POOL_KV_CACHE_UTILIZATION",
    "POOL_QUEUE_SIZE",
    "POOL_READY_ENDPOINTS",
    "POOL_RUNNING_REQUESTS",
    "SOURCE_TYPE",
    "AvailabilityLog",
    "available",
    "check_wiring",
    "cluster_metrics",
    "is_hub",
    "is_unavailable",
    "pool_averages",
    "pool_value",
]

DISCOVERY_TYPE = "multicluster-file-discovery"
SOURCE_TYPE = "multicluster-metrics-data-source"
EXTRACTOR_TYPE = "multicluster-metrics-extractor"
QUEUE_SCORER_TYPE = "multicluster-queue-scorer"
KV_SCORER_TYPE = "multicluster-kv-cache-utilization-scorer"
PREFIX_SCORER_TYPE = "multicluster-prefix-cache-scorer"
PREFIX_PRODUCER_TYPE = "multicluster-approx-prefix-cache-producer"
SESSION_FILTER_TYPE = "multicluster-session-affinity-filter"
_CLUSTER_PLUGINS = frozenset(
    {SOURCE_TYPE, EXTRACTOR_TYPE, QUEUE_SCORER_TYPE, KV_SCORER_TYPE, PREFIX_SCORER_TYPE, PREFIX_PRODUCER_TYPE,
     SESSION_FILTER_TYPE}
)  # fmt: skip
# Scorers that read the pool averages: they need the source + extractor pair wired.
_POOL_SCORERS = (QUEUE_SCORER_TYPE, KV_SCORER_TYPE)

# Sources whose pages the metrics collector scrapes (one collector per EPP: the first one wired).
METRICS_SOURCE_TYPES = ("metrics-data-source", SOURCE_TYPE)

# Endpoint attribute keys (the reference's `llm-d.ai/multicluster-*` attributes).
POOL_KV_CACHE_UTILIZATION = "llm-d.ai/multicluster-kv-cache-utilization"
POOL_QUEUE_SIZE = "llm-d.ai/multicluster-queue-size"
# Not in the reference's extractor (ours): availability and the running average, for a hub's own gauges.
POOL_READY_ENDPOINTS = "llm-d.ai/multicluster-ready-endpoints"
POOL_RUNNING_REQUESTS = "llm-d.ai/multicluster-running-requests"
DEFAULT_KV_METRIC = "llm_d_epp_average_kv_cache_utilization"
DEFAULT_QUEUE_METRIC = "llm_d_epp_average_queue_size"
DEFAULT_READY_METRIC = "llm_d_epp_ready_endpoints"
DEFAULT_RUNNING_METRIC = "llm_d_epp_average_running_requests"

# Labels of a cluster entry naming where its peer EPP serves /metrics, when not at the gateway.
METRICS_ADDRESS_LABEL = "metricsAddress"
METRICS_PORT_LABEL = "metricsPort"


def pool_value(endpoint: Endpoint, key: str) -> float | None:
    """A cluster endpoint's pool average `key` from its last scrape; None when unknown."""
    return endpoint.metrics.attributes.get(key)


def is_unavailable(endpoint: Endpoint) -> bool:
    """Whether a cluster's EPP reported, on its last scrape, that it has no ready endpoints (an unknown
    count is not 0)."""
    return endpoint.metrics.attributes.get(POOL_READY_ENDPOINTS) == 0


def available(candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
    """The candidates without the unavailable clusters; all of them (the same sequence) when none or
    every one is unavailable (then the clusters' EPPs answer as an empty pool does, e.g. hold the
    request while they scale from zero, rather than the hub refusing it)."""
    for i, ep in enumerate(candidates):
        if is_unavailable(ep):
            kept = [*candidates[:i], *(c for c in candidates[i + 1 :] if not is_unavailable(c))]
            return kept if kept else candidates
    return candidates


def cluster_metrics(attributes: Mapping[str, float], now: float) -> EndpointMetrics:
    """A cluster's EndpointMetrics from the attributes read off its EPP's page at `now`: the pool
    averages also in the per-endpoint fields while the cluster is available and both averages are
    known; otherwise those fields are empty and `update_time` is 0 (no load to act on)."""
    queue = attributes.get(POOL_QUEUE_SIZE)
    kv = attributes.get(POOL_KV_CACHE_UTILIZATION)
    if queue is None or kv is None or attributes.get(POOL_READY_ENDPOINTS) == 0:
        return EndpointMetrics(attributes=attributes)
    running = attributes.get(POOL_RUNNING_REQUESTS, 0.0)
    return EndpointMetrics(
        waiting_queue_size=queue,
        running_requests_size=running,
        kv_cache_usage_percent=kv,
        update_time=now,
        attributes=attributes,
    )


def pool_averages(clusters: Sequence[Endpoint]) -> tuple[float, float, float, float]:
    """A hub's own pool gauges from its clusters' last scrapes: (ready endpoints, average KV-cache
    utilization, average queue size, average running requests).

    ready = the sum of the clusters' known ready counts (the pods behind the hub). Each average is
    over the clusters whose value is known and that are not unavailable, weighted by their ready
    counts when every one of them has one (the mean over all the pods behind the hub, which is what
    one EPP in front of all those pods would publish, so hubs chain: a hub above weighs this one by
    its pods too), else the plain mean over those clusters; 0 when there is none (as an empty pool).
    """
    ready = 0.0
    for ep in clusters:
        count = ep.metrics.attributes.get(POOL_READY_ENDPOINTS)
        if count is not None:
            ready += count
    kv, queue, running = (
        _weighted_mean(clusters, key) for key in (POOL_KV_CACHE_UTILIZATION, POOL_QUEUE_SIZE, POOL_RUNNING_REQUESTS)
    )
    return ready, kv, queue, running


def _weighted_mean(clusters: Sequence[Endpoint], key: str) -> float:
    values: list[float] = []
    weights: list[float] = []
    every_count_known = True
    for ep in clusters:
        attributes = ep.metrics.attributes
        value = attributes.get(key)
        count = attributes.get(POOL_READY_ENDPOINTS)
        if value is None or count == 0:
            continue
        values.append(value)
        if count is None:
            every_count_known = False
        else:
            weights.append(count)
    if not values:
        return 0.0
    total = sum(weights)
    # Each term scaled first (a weight's share, or 1/n): no v·w or running sum past the float range
    # (an inf or inf/inf = NaN gauge) however large a peer's finite values and counts are.
    if every_count_known and total > 0:
        return sum(v * (w / total) for v, w in zip(values, weights, strict=True))
    n = len(values)
    return sum(v / n for v in values)


class _LogBudget:
    """One cluster's availability log lines: a bucket of `LOG_BURST` lines refilled one per
    `LOG_REFILL` seconds, and the changes not logged since the last line."""

    __slots__ = ("at", "quiet", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = float(LOG_BURST)
        self.at = now
        self.quiet = 0

    def take(self, now: float) -> bool:
        self.tokens = min(float(LOG_BURST), self.tokens + (now - self.at) / LOG_REFILL)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


# A cluster's first LOG_BURST availability changes are logged; past that (flapping: its EPP's ready
# count going 0 / not 0 scrape after scrape) one line per LOG_REFILL seconds with the count of the rest.
LOG_BURST = 4
LOG_REFILL = 30.0


class AvailabilityLog:
    """Counts (`counter`, labelled `cluster`) every time a cluster becomes unavailable and logs its
    availability changes: WARNING when its EPP starts reporting 0 ready endpoints, INFO when it stops
    (a count again, or the page no longer readable: a candidate again either way). Fed every
    replacement of a cluster's metrics (it compares the old and the new metrics). A flapping cluster is
    not logged on every change: past LOG_BURST lines, one per LOG_REFILL seconds (its current state and
    how many changes went unlogged, at its next scrape once allowed), the rest at DEBUG. The per-cluster
    budget is dropped by `forget` when the cluster is removed."""

    __slots__ = ("_budgets", "_clock", "_quiet", "counter")

    def __init__(self, counter: Counter, clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter
        self._clock = clock
        self._budgets: dict[str, _LogBudget] = {}  # clusters whose availability changed
        self._quiet: set[str] = set()  # ... and, of those, the ones with changes not logged yet

    def metrics_replaced(self, endpoint: Endpoint, previous: EndpointMetrics) -> None:
        was = previous.attributes.get(POOL_READY_ENDPOINTS) == 0
        now = is_unavailable(endpoint)
        if was == now:
            if not self._quiet or endpoint.name not in self._quiet:  # the common case: two tests
                return
            pending = self._budgets[endpoint.name]
            if pending.take(self._clock()):
                self._announce(endpoint, now, pending)
            return
        name = endpoint.name
        if now:
            self.counter.labels(cluster=name).inc()
        t = self._clock()
        budget = self._budgets.get(name)
        if budget is None:
            budget = self._budgets[name] = _LogBudget(t)
        if budget.take(t):
            self._announce(endpoint, now, budget)
            return
        budget.quiet += 1
        self._quiet.add(name)
        log.debug(
            "cluster %s: %s (flapping; not logged)",
            name,
            "unavailable" if now else "available",
            extra={"endpoint": name},
        )

    def _announce(self, endpoint: Endpoint, unavailable: bool, budget: _LogBudget) -> None:
        name = endpoint.name
        more = ""
        if budget.quiet:
            more = f" ({budget.quiet} availability changes not logged before this: flapping)"
            budget.quiet = 0
            self._quiet.discard(name)
        if unavailable:
            log.warning(
                "cluster %s: its EPP reports no ready endpoints; it gets no requests until it has some "
                "(unless no cluster has any)%s",
                name,
                more,
                extra={"endpoint": name},
            )
            return
        count = endpoint.metrics.attributes.get(POOL_READY_ENDPOINTS)
        if count is None:
            log.info(
                "cluster %s: its ready endpoints are unknown now (not on its EPP's last page); a candidate again%s",
                name,
                more,
                extra={"endpoint": name},
            )
        else:
            log.info(
                "cluster %s: %g ready endpoints again; back in rotation%s", name, count, more, extra={"endpoint": name}
            )

    def forget(self, name: str) -> None:
        """Drop what is kept for cluster `name` (removed from the pool), its counter series too."""
        if self._budgets.pop(name, None) is not None:
            self.counter.remove(name)
        self._quiet.discard(name)

    def tracked(self) -> list[str]:
        """The clusters with per-cluster state (for tests: none once they are all removed)."""
        return sorted(self._budgets)


def is_hub(discovery: Plugin | None) -> bool:
    """Whether the EPP's endpoints are clusters (its discovery is multicluster-file-discovery)."""
    return discovery is not None and discovery.type == DISCOVERY_TYPE


def check_wiring(
    discovery: Plugin | None,
    sources: Sequence[tuple[Plugin, Sequence[Plugin]]],
    plugins: Mapping[str, Plugin],
) -> None:
    """Refuse a config that mixes pod mode and multicluster mode (ConfigError naming the field).

    `sources` are the data layer's (source, extractors) pairs, `dataLayer.sources` first and in
    order (so index i is `dataLayer.sources[i]`), then those the loader added itself.

    - A multicluster-metrics-data-source feeds one multicluster-metrics-extractor, and such an
      extractor hangs under no other source; at most one such source; in a hub, one listed in
      `plugins` but not wired in `dataLayer.sources` (nothing would scrape the clusters) is refused.
    - Multicluster plugins need multicluster-file-discovery as `dataLayer.discovery`.
    - With multicluster-file-discovery, plugins that declare `pod_only` (they read per-pod model-server
      state: its metrics, LoRA adapters, KV events, its GPU) are refused, naming who needs them and the
      multicluster variant where there is one; and the pool-average scorers need the source + extractor
      pair wired (the reference refuses such a config too: without it they would score nothing).
    """
    cluster_sources: list[int] = []
    for i, (source, extractors) in enumerate(sources):
        where = f"dataLayer.sources[{i}]"
        if source.type == SOURCE_TYPE:
            cluster_sources.append(i)
            if not extractors:
                raise ConfigError(
                    f"{where}.extractors: plugin {source.name!r} (type {SOURCE_TYPE}) needs a {EXTRACTOR_TYPE} "
                    "to read the peer EPPs' pool averages"
                )
            if len(extractors) > 1:
                # The collector reads every page through one mapping: a second one's metrics would be ignored.
                raise ConfigError(
                    f"{where}.extractors[1].pluginRef: plugin {extractors[1].name!r} (type {extractors[1].type}): "
                    f"a {SOURCE_TYPE} takes one extractor"
                )
            for j, extractor in enumerate(extractors):
                if extractor.type != EXTRACTOR_TYPE:
                    raise ConfigError(
                        f"{where}.extractors[{j}].pluginRef: plugin {extractor.name!r} (type {extractor.type}) "
                        f"cannot read a peer EPP's page; source {source.name!r} (type {SOURCE_TYPE}) takes "
                        f"a {EXTRACTOR_TYPE}"
                    )
            continue
        for j, extractor in enumerate(extractors):
            if extractor.type == EXTRACTOR_TYPE:
                raise ConfigError(
                    f"{where}.extractors[{j}].pluginRef: plugin {extractor.name!r} (type {EXTRACTOR_TYPE}) reads "
                    f"peer EPPs' pool averages; wire it under a {SOURCE_TYPE}, not under plugin {source.name!r} "
                    f"(type {source.type})"
                )
    if len(cluster_sources) > 1:
        raise ConfigError(
            f"dataLayer.sources[{cluster_sources[1]}]: a second {SOURCE_TYPE}; one source scrapes every cluster"
        )
    if not is_hub(discovery):
        for plugin in plugins.values():
            if plugin.type in _CLUSTER_PLUGINS:
                now = "Kubernetes discovery" if discovery is None else f"{discovery.name!r} (type {discovery.type})"
                raise ConfigError(
                    f"dataLayer.discovery.pluginRef: plugin {plugin.name!r} (type {plugin.type}) is for a hub EPP "
                    f"whose endpoints are clusters, which needs a {DISCOVERY_TYPE} plugin as the discovery "
                    f"(this config has {now})"
                )
        return
    assert discovery is not None
    for plugin in plugins.values():
        if plugin.pod_only:
            users = [p.name for p in plugins.values() if p is not plugin and p.consumes & plugin.produces]
            needed = f"needed by {', '.join(users)}; " if users else ""
            raise ConfigError(
                f"plugin {plugin.name!r} (type {plugin.type}): {needed}{plugin.pod_only}; this hub's endpoints "
                f"(from {discovery.name!r}, type {DISCOVERY_TYPE}) are clusters, not model servers"
            )
    wired = {id(p) for source, extractors in sources for p in (source, *extractors)}
    for plugin in plugins.values():
        if id(plugin) in wired:
            continue
        # Listed but not in dataLayer.sources: nothing would scrape the clusters (no load, no availability).
        if plugin.type == SOURCE_TYPE:
            raise ConfigError(
                f"dataLayer.sources: plugin {plugin.name!r} (type {SOURCE_TYPE}) is not wired, so no cluster's "
                f"EPP is scraped; add {{pluginRef: {plugin.name}, extractors: [{{pluginRef: <a {EXTRACTOR_TYPE}>}}]}}"
            )
        if plugin.type == EXTRACTOR_TYPE:
            raise ConfigError(
                f"dataLayer.sources: plugin {plugin.name!r} (type {EXTRACTOR_TYPE}) is not wired under a "
                f"{SOURCE_TYPE}, so nothing feeds it (add it to that source's extractors)"
            )
    if not cluster_sources:
        for plugin in plugins.values():
            if plugin.type in _POOL_SCORERS:
                raise ConfigError(
                    f"dataLayer.sources: plugin {plugin.name!r} (type {plugin.type}) scores clusters on their "
                    f"EPPs' pool averages; wire a {SOURCE_TYPE} with a {EXTRACTOR_TYPE} "
                    f"(sources: [{{pluginRef: <source>, extractors: [{{pluginRef: <extractor>}}]}}])"
                )
