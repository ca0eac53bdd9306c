"""`utilization-filter`: drop endpoints over a load cap on any configured metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import IN_FLIGHT_LOAD
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.plugins.filters.common import set_consumes
from llmepp.plugins.producers.inflight_load import NO_LOAD, inflight_loads
from llmepp.request.types import InferenceRequest

ACTIVE_REQUESTS = "active-requests"
METRICS = (ACTIVE_REQUESTS, "running-requests", "waiting-queue", "kv-cache-utilization")

# request, endpoints → the endpoints within the cap (one specialised comprehension per metric).
# Never-scraped endpoints read 0 (their metrics are all zero): "a missing metric counts as 0".
Keep = Callable[[InferenceRequest, Sequence[Endpoint]], list[Endpoint]]


class UtilizationCondition(PluginParams):
    metric: str
    max_value: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"conditions: metric {self.metric!r} must be one of {', '.join(METRICS)}")


class UtilizationFilter(Filter):
    """Drops an endpoint when **any** condition's metric exceeds its `maxValue`.

    keep(e) = ∀ condition: value(metric, e) ≤ maxValue; with `fallbackOnEmpty` and nothing
    kept, every candidate is kept (fail open).

    Why: a hard ceiling (e.g. KV cache ≥ 90 %) keeps a saturated endpoint out of scoring
    altogether instead of merely scoring it low.

    Metrics: `active-requests` (requests in flight from this EPP, from the
    inflight-load-producer, auto-created when this metric is used), `running-requests`,
    `waiting-queue` (scraped counts), `kv-cache-utilization` (scraped, 0..1). A missing
    metric (never scraped) counts as 0.

    Parameters: `conditions` [{metric, maxValue}] (at least one), `fallbackOnEmpty` (false),
    `inFlightLoadProducerName` (which in-flight producer to read; default the only one).
    """

    type = "utilization-filter"

    class Params(PluginParams):
        conditions: list[UtilizationCondition] = []
        fallback_on_empty: bool = False
        in_flight_load_producer_name: str = ""

        def __post_init__(self) -> None:
            if not self.conditions:
                raise ValueError("conditions must list at least one {metric, maxValue}")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.fallback = params.fallback_on_empty
        self.uses_inflight = any(c.metric == ACTIVE_REQUESTS for c in params.conditions)
        set_consumes(self, {IN_FLIGHT_LOAD} if self.uses_inflight else ())
        # Until setup names the producer, active-requests reads the director's endpoint.inflight.
        self.inflight_key = ""
        self.conditions: list[Keep] = [self._keep(c.metric, c.max_value) for c in params.conditions]

    def setup(self, ctx: PluginContext) -> None:
        if self.uses_inflight:
            self.inflight_key = ctx.producer_key(
                self, IN_FLIGHT_LOAD, self.params.in_flight_load_producer_name, "inFlightLoadProducerName"
            )
        self.conditions = [self._keep(c.metric, c.max_value) for c in self.params.conditions]

    def _keep(self, metric: str, cap: float) -> Keep:
        if metric == ACTIVE_REQUESTS:
            key = self.inflight_key

            def active(req: InferenceRequest, eps: Sequence[Endpoint]) -> list[Endpoint]:
                loads = inflight_loads(req, key)
                if loads is None:
                    return [ep for ep in eps if ep.inflight.requests <= cap]
                get = loads.get
                return [ep for ep in eps if get(ep, NO_LOAD).requests <= cap]

            return active
        if metric == "running-requests":
            return lambda req, eps: [ep for ep in eps if ep.metrics.running_requests_size <= cap]
        if metric == "waiting-queue":
            return lambda req, eps: [ep for ep in eps if ep.metrics.waiting_queue_size <= cap]
        return lambda req, eps: [ep for ep in eps if ep.metrics.kv_cache_usage_percent <= cap]

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        kept: Sequence[Endpoint] = endpoints
        for keep in self.conditions:
            if not kept:
                break
            kept = keep(request, kept)
        if not kept and self.fallback:
            return endpoints
        return kept
