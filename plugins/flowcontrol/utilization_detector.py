"""`utilization-detector`: pool saturation from scraped queue depth and KV-cache use."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.flowcontrol.interfaces import SaturationDetector
from llmepp.framework.plugin import PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.request.types import InferenceRequest
from llmepp.units import parse_duration


class UtilizationDetectorParams(PluginParams):
    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    # Go duration string ("200ms"); a number is seconds.
    metrics_staleness_threshold: str | int | float = "200ms"
    headroom: float = 0.0

    def __post_init__(self) -> None:
        if self.queue_depth_threshold <= 0:
            raise ValueError(f"queueDepthThreshold must be > 0, got {self.queue_depth_threshold}")
        if not 0.0 < self.kv_cache_util_threshold <= 1.0:
            raise ValueError(f"kvCacheUtilThreshold must be in (0, 1], got {self.kv_cache_util_threshold}")
        if self.headroom < 0:
            raise ValueError(f"headroom must be >= 0, got {self.headroom}")
        try:
            staleness = parse_duration(self.metrics_staleness_threshold)
        except ValueError as e:
            raise ValueError(f"metricsStalenessThreshold: {e}") from None
        if not staleness > 0:  # 0: every endpoint stale, the pool saturated for ever
            raise ValueError(f"metricsStalenessThreshold must be > 0, got {self.metrics_staleness_threshold!r}")


class UtilizationDetector(SaturationDetector, Filter):
    """Saturation from each endpoint's waiting queue and KV-cache utilisation (the default detector).

    score(e)   = max(q(e) / queueDepthThreshold, kv(e) / kvCacheUtilThreshold)
                 = 1.0 when e's metrics are older than metricsStalenessThreshold or never scraped
    saturation = mean over endpoints of score(e); an empty pool reads 1.0 (fail closed: a pod
                 we cannot see is treated as full).

    As a scheduling filter it keeps endpoints with fresh metrics and
        q ≤ queueDepthThreshold·(1+headroom)  and  kv ≤ min(1, kvCacheUtilThreshold·(1+headroom)),
    failing open (all endpoints) when none qualify.

    Parameters: `queueDepthThreshold` (5), `kvCacheUtilThreshold` (0.8),
    `metricsStalenessThreshold` ("200ms"), `headroom` (0.0, filter only).
    """

    type = "utilization-detector"
    Params = UtilizationDetectorParams
    # Inputs change once per scrape (≥ 50 ms); the dispatcher may reuse a value for 1 ms.
    max_cache_age = 0.001

    def __init__(self, name: str, params: UtilizationDetectorParams | None = None) -> None:
        super().__init__(name, params)
        p: UtilizationDetectorParams = self.params
        self.queue_depth_threshold = p.queue_depth_threshold
        self.kv_cache_util_threshold = p.kv_cache_util_threshold
        self.staleness = parse_duration(p.metrics_staleness_threshold)
        self.headroom = p.headroom
        self.stale_endpoints = 0
        # The filter has no `now` argument; tests may swap the clock.
        self.clock: Callable[[], float] = time.monotonic

    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        n = len(endpoints)
        if n == 0:
            self.stale_endpoints = 0
            return 1.0
        inv_q = 1.0 / self.queue_depth_threshold
        inv_kv = 1.0 / self.kv_cache_util_threshold
        oldest = now - self.staleness
        total = 0.0
        stale = 0
        for ep in endpoints:
            m = ep.metrics
            t = m.update_time
            if t == 0.0 or t < oldest:
                stale += 1
                continue
            q = m.waiting_queue_size * inv_q
            kv = m.kv_cache_usage_percent * inv_kv
            total += q if q > kv else kv
        self.stale_endpoints = stale
        return (total + stale) / n

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        scale = 1.0 + self.headroom
        max_q = self.queue_depth_threshold * scale
        max_kv = min(1.0, self.kv_cache_util_threshold * scale)
        oldest = self.clock() - self.staleness
        kept = [
            ep
            for ep in endpoints
            if ep.metrics.update_time != 0.0
            and ep.metrics.update_time >= oldest
            and ep.metrics.waiting_queue_size <= max_q
            and ep.metrics.kv_cache_usage_percent <= max_kv
        ]
        return kept if kept else endpoints
