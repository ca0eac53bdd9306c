"""`concurrency-detector`: pool saturation from the router's own in-flight counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from llmepp.datalayer.endpoint import Endpoint, InFlight
from llmepp.flowcontrol.interfaces import PendingLoad, SaturationDetector
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.plugins.producers.inflight_load import NO_LOAD, InFlightLoadProducer
from llmepp.request.types import InferenceRequest


class ConcurrencyDetectorParams(PluginParams):
    concurrency_mode: Literal["requests", "tokens", "hybrid"] = "requests"
    max_concurrency: int = 100
    max_token_concurrency: int = 1_000_000
    headroom: float = 0.0
    # The inflight-load-producer whose counts to read; "" = the director's `endpoint.inflight`.
    in_flight_load_producer_name: str = ""

    def __post_init__(self) -> None:
        if self.max_concurrency <= 0:
            raise ValueError(f"maxConcurrency must be > 0, got {self.max_concurrency}")
        if self.max_token_concurrency <= 0:
            raise ValueError(f"maxTokenConcurrency must be > 0, got {self.max_token_concurrency}")
        if self.headroom < 0:
            raise ValueError(f"headroom must be >= 0, got {self.headroom}")


class ConcurrencyDetector(SaturationDetector, Filter):
    """Saturation from requests / prompt tokens this EPP has in flight on each endpoint.

    Uses `endpoint.inflight` (requests, tokens), kept by the director: it needs no scraping,
    so it reacts within one request, and it never goes stale. With `inFlightLoadProducerName`, that
    inflight-load-producer's counts instead (the reference's InFlightLoad): they charge the prefill
    profile's pick too, until its prefill is done, where the director charges the request's target
    (with P/D, the decode pod) alone; their tokens are the uncached prompt tokens plus estimated output.
    It also counts `pending` (P requests, P_tokens prompt-token estimates): what flow control has dispatched and the
    director has not yet charged to an endpoint (async producers still running for them).
    They are on no endpoint yet, so they are spread over the pool:

        requests: saturation = (Σ inflight.requests + P) / (N · maxConcurrency)
        tokens:   saturation = (Σ inflight.tokens + P_tokens) / (N · maxTokenConcurrency)
        hybrid:   saturation = (Σ over endpoints of max(requests/maxConcurrency, tokens/maxTokenConcurrency)
                                + max(P/maxConcurrency, P_tokens/maxTokenConcurrency)) / N
        empty pool → 1.0

    P_tokens is bytes/4 of each prompt (`InferenceRequest.estimated_prompt_tokens`), what the
    director charges when no token producer ran. With prefill/decode stages each stage's
    reading counts every pending request (it may load either). Outside flow control (legacy
    admission) nothing is pending.

    As a scheduling filter it keeps endpoints still under capacity·(1+headroom), truncated to an
    integer as the reference does (requests < ⌊maxConcurrency·(1+headroom)⌋ and/or tokens
    < ⌊maxTokenConcurrency·(1+headroom)⌋ per mode), failing open when none qualify. Pending requests
    play no part there: they have no endpoint.

    Parameters: `concurrencyMode` (requests | tokens | hybrid, default requests),
    `maxConcurrency` (100), `maxTokenConcurrency` (1000000), `headroom` (0, filter only),
    `inFlightLoadProducerName` ("": the director's counts).
    """

    type = "concurrency-detector"
    Params = ConcurrencyDetectorParams
    # Reads in-flight counts: never cached, re-read after every dispatch.
    counts_inflight = True

    def __init__(self, name: str, params: ConcurrencyDetectorParams | None = None) -> None:
        super().__init__(name, params)
        p: ConcurrencyDetectorParams = self.params
        self.mode = p.concurrency_mode
        self.max_requests = p.max_concurrency
        self.max_tokens = p.max_token_concurrency
        self.headroom = p.headroom
        self.stale_endpoints = 0
        self.pending: PendingLoad = PendingLoad()  # kept by the flow controller
        self._loads: Mapping[Endpoint, InFlight] | None = None  # the named producer's live counts

    def setup(self, ctx: PluginContext) -> None:
        name = self.params.in_flight_load_producer_name
        if name:
            producer = ctx.plugin(name, InFlightLoadProducer, referrer=self, field="inFlightLoadProducerName")
            # Its consumer view (a redis-inflight-load-producer's adds the other replicas' counts), as the scorers
            # read it through the request's data.
            self._loads = producer.view

    def wiring(self, ctx: PluginContext) -> object:
        return self.params.in_flight_load_producer_name

    def _inflight(self, endpoints: Sequence[Endpoint]) -> list[InFlight]:
        loads = self._loads
        if loads is None:
            return [ep.inflight for ep in endpoints]
        return [loads.get(ep, NO_LOAD) for ep in endpoints]

    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        n = len(endpoints)
        if n == 0:
            return 1.0
        pending = self.pending
        inflight = self._inflight(endpoints)
        if self.mode == "requests":
            return (sum(f.requests for f in inflight) + pending.requests) / (n * self.max_requests)
        if self.mode == "tokens":
            return (sum(f.tokens for f in inflight) + pending.tokens) / (n * self.max_tokens)
        inv_r = 1.0 / self.max_requests
        inv_t = 1.0 / self.max_tokens
        r = pending.requests * inv_r
        t = pending.tokens * inv_t
        total = r if r > t else t
        for f in inflight:
            r = f.requests * inv_r
            t = f.tokens * inv_t
            total += r if r > t else t
        return total / n

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        # Integer limits, as the reference's int64(): 100 · 1.1 is 110.00000000000001, and 3 · 1.5 is 4 in flight.
        scale = 1.0 + self.headroom
        cap_r = int(self.max_requests * scale)
        cap_t = int(self.max_tokens * scale)
        pairs = zip(endpoints, self._inflight(endpoints))
        if self.mode == "requests":
            kept = [ep for ep, f in pairs if f.requests < cap_r]
        elif self.mode == "tokens":
            kept = [ep for ep, f in pairs if f.tokens < cap_t]
        else:
            kept = [ep for ep, f in pairs if f.requests < cap_r and f.tokens < cap_t]
        return kept if kept else endpoints
