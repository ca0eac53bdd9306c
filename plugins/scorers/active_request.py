"""`active-request-scorer`: prefer endpoints with fewer requests in flight from this EPP."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import IN_FLIGHT_LOAD
from llmepp.framework.plugin import PluginContext, PluginParams, reference_default
from llmepp.framework.scheduling import Scorer
from llmepp.plugins.producers.inflight_load import request_counts
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)


class ActiveRequestScorer(Scorer):
    """Scores in-flight request counts (router-local, no scrape lag):

        count(e) ≤ idleThreshold  → 1.0
        otherwise                 → (maxCount − count(e)) / maxCount · maxBusyScore

    maxCount = the largest count among the candidates. Counts come from the
    inflight-load-producer (auto-created; `inFlightLoadProducerName` picks an instance), or the
    director's `endpoint.inflight` when that producer's data is absent.

    Why: reacts to the very next request (scraped queues lag by an interval); with
    `maxBusyScore` < 1 it opens a gap so any idle endpoint beats every busy one.

    Parameters: `idleThreshold` (0; negative means 0), `maxBusyScore` (1.0; outside [0, 1] means 1.0),
    `inFlightLoadProducerName`, `requestTimeout` (deprecated, accepted and ignored: the
    producer tracks each request's lifetime).
    """

    type = "active-request-scorer"
    consumes = frozenset({IN_FLIGHT_LOAD})

    class Params(PluginParams):
        idle_threshold: int = 0
        max_busy_score: float = 1.0
        in_flight_load_producer_name: str = ""
        request_timeout: str = ""

        def __post_init__(self) -> None:
            if self.idle_threshold < 0:
                self.idle_threshold = reference_default(
                    "active-request-scorer", "idleThreshold", self.idle_threshold, 0, "negative"
                )
            if not 0.0 <= self.max_busy_score <= 1.0:
                self.max_busy_score = reference_default(
                    "active-request-scorer", "maxBusyScore", self.max_busy_score, 1.0, "not within [0, 1]"
                )

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.idle = params.idle_threshold
        self.max_busy = params.max_busy_score
        self.key = ""
        if params.request_timeout:
            log.warning("plugin %s: requestTimeout is deprecated and ignored", self.name)

    def setup(self, ctx: PluginContext) -> None:
        self.key = ctx.producer_key(
            self, IN_FLIGHT_LOAD, self.params.in_flight_load_producer_name, "inFlightLoadProducerName"
        )

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        counts = request_counts(request, self.key, endpoints)
        top = max(counts, default=0)
        idle = self.idle
        if top <= idle:
            return [1.0] * len(counts)
        k = self.max_busy / top
        return [1.0 if c <= idle else (top - c) * k for c in counts]
