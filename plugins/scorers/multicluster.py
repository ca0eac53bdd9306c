"""Multicluster scorers: a hub EPP's endpoints are clusters (llmepp.datalayer.multicluster).

Each is its stock scorer with the numbers taken from where a cluster has them; the formula, the
parameters and the per-request cost are the stock scorer's (reference: llm-d-router's multicluster
variants of queue-scorer, kv-cache-utilization-scorer and prefix-cache-scorer).
"""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.datalayer.multicluster import (
    KV_SCORER_TYPE,
    POOL_KV_CACHE_UTILIZATION,
    POOL_QUEUE_SIZE,
    PREFIX_SCORER_TYPE,
    QUEUE_SCORER_TYPE,
)
from llmepp.plugins.scorers.kv_cache_utilization import KVCacheUtilizationScorer
from llmepp.plugins.scorers.prefix_cache import PrefixCacheScorer
from llmepp.plugins.scorers.queue import QueueScorer


class MulticlusterQueueScorer(QueueScorer):
    """queue-scorer over clusters: q(c) = c's pool average queue (`llm_d_epp_average_queue_size` of its
    EPP, read by multicluster-metrics-extractor).

        score(c) = (maxQ − q(c)) / (maxQ − minQ) over the clusters whose q is known; 1.0 for each when
        equal; 0 for a cluster whose q is unknown (its EPP's page could not be read).

    Parameters: none. Needs a multicluster-metrics-data-source with a multicluster-metrics-extractor in
    `dataLayer.sources` (a start-up error otherwise).
    """

    type = QUEUE_SCORER_TYPE
    pod_only = ""

    def queue_sizes(self, endpoints: Sequence[Endpoint]) -> list[float | None]:
        return [ep.metrics.attributes.get(POOL_QUEUE_SIZE) for ep in endpoints]


class MulticlusterKVCacheUtilizationScorer(KVCacheUtilizationScorer):
    """kv-cache-utilization-scorer over clusters: score(c) = 1 − c's pool average KV-cache utilization
    (`llm_d_epp_average_kv_cache_utilization` of its EPP); 0 when unknown.

    Parameters: none. Needs the source + extractor pair, as multicluster-queue-scorer.
    """

    type = KV_SCORER_TYPE
    pod_only = ""

    def utilizations(self, endpoints: Sequence[Endpoint]) -> list[float | None]:
        return [ep.metrics.attributes.get(POOL_KV_CACHE_UTILIZATION) for ep in endpoints]


class MulticlusterPrefixCacheScorer(PrefixCacheScorer):
    """prefix-cache-scorer over clusters, unchanged: the prefix producer already keys its index on the
    endpoint, which here is a cluster, so a prompt's prefix leads back to the cluster that served it
    (where that cluster's EPP sends it to the pod holding it). Parameters, formula and producer
    resolution: prefix-cache-scorer's (with no producer configured, approx-prefix-cache-producer is
    created)."""

    type = PREFIX_SCORER_TYPE
