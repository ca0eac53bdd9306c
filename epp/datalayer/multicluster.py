"""Multicluster mode ("cluster as endpoint"): a hub EPP whose endpoints are whole clusters.

One model runs in several clusters, each behind its own gateway with its own EPP. A hub EPP
(behind its own Envoy) lists the clusters' gateways as its endpoints and routes every request to
one cluster's gateway address; that cluster's EPP then picks the pod:

    client ─► hub Envoy ─► hub EPP (multicluster plugins)
                 │           ├─ reads the cluster list (multicluster-file-discovery)
                 │           └─ scrapes each peer EPP's /metrics (its pool averages)
                 └─► cluster gateway (x-gateway-destination-endpoint) ─► cluster EPP ─► pod

What a cluster endpoint carries (reference: llm-d-router `extractor/metrics/multicluster.go`,
`attribute/metrics` keys): its peer EPP's published pool averages, `llm_d_epp_average_kv_cache_utilization`
and `llm_d_epp_average_queue_size`, stored as the endpoint attributes `POOL_KV_CACHE_UTILIZATION`
and `POOL_QUEUE_SIZE` (in `endpoint.metrics.attributes`, replaced as a whole on every scrape). A
cluster whose page cannot be read (unreachable, bad status, malformed, a gauge missing) has no
value for what could not be read: unknown, which the multicluster scorers rank below every known
cluster, never as idle. The hub's own per-pod fields (queue, KV, running) stay empty for clusters.

This module holds what the framework needs to know about the mode (type strings, attribute keys,
the discovery labels) and `check_wiring`, the start-up check that a config does not mix the modes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import ConfigError, Plugin

__all__ = [
    "DEFAULT_KV_METRIC",
    "DEFAULT_QUEUE_METRIC",
    "DISCOVERY_TYPE",
    "EXTRACTOR_TYPE",
    "METRICS_ADDRESS_LABEL",
    "METRICS_PORT_LABEL",
    "METRICS_SOURCE_TYPES",
    "POOL_KV_CACHE_UTILIZATION",
    "POOL_QUEUE_SIZE",
    "SOURCE_TYPE",
    "check_wiring",
    "is_hub",
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

# Pod-mode plugins that read model-server metrics a cluster endpoint does not have → their variant.
_POD_ONLY = {
    "metrics-data-source": SOURCE_TYPE,
    "core-metrics-extractor": EXTRACTOR_TYPE,
    "queue-scorer": QUEUE_SCORER_TYPE,
    "kv-cache-utilization-scorer": KV_SCORER_TYPE,
}

# Endpoint attribute keys (the reference's `llm-d.ai/multicluster-*` attributes).
POOL_KV_CACHE_UTILIZATION = "llm-d.ai/multicluster-kv-cache-utilization"
POOL_QUEUE_SIZE = "llm-d.ai/multicluster-queue-size"
DEFAULT_KV_METRIC = "llm_d_epp_average_kv_cache_utilization"
DEFAULT_QUEUE_METRIC = "llm_d_epp_average_queue_size"

# Labels of a cluster entry naming where its peer EPP serves /metrics, when not at the gateway.
METRICS_ADDRESS_LABEL = "metricsAddress"
METRICS_PORT_LABEL = "metricsPort"


def pool_value(endpoint: Endpoint, key: str) -> float | None:
    """A cluster endpoint's pool average `key` from its last scrape; None when unknown."""
    return endpoint.metrics.attributes.get(key)


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

    - A multicluster-metrics-data-source feeds multicluster-metrics-extractors only, and such an
      extractor hangs under no other source; at most one such source.
    - Multicluster plugins need multicluster-file-discovery as `dataLayer.discovery`.
    - With multicluster-file-discovery, plugins that read model-server metrics (metrics-data-source,
      core-metrics-extractor, queue-scorer, kv-cache-utilization-scorer) are refused (their
      multicluster variant is named), and the pool-average scorers need the source + extractor pair
      wired (the reference refuses such a config too: without it they would score nothing).
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
        variant = _POD_ONLY.get(plugin.type)
        if variant is not None:
            raise ConfigError(
                f"plugin {plugin.name!r} (type {plugin.type}): reads model-server metrics, which the clusters "
                f"{discovery.name!r} (type {DISCOVERY_TYPE}) lists do not have; use {variant}"
            )
    if not cluster_sources:
        for plugin in plugins.values():
            if plugin.type in _POOL_SCORERS:
                raise ConfigError(
                    f"dataLayer.sources: plugin {plugin.name!r} (type {plugin.type}) scores clusters on their "
                    f"EPPs' pool averages; wire a {SOURCE_TYPE} with a {EXTRACTOR_TYPE} "
                    f"(sources: [{{pluginRef: <source>, extractors: [{{pluginRef: <extractor>}}]}}])"
                )
