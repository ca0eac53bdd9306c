"""`inflight-load-producer`: per-endpoint requests and uncached prompt tokens this EPP has in flight."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmepp.datalayer.endpoint import Endpoint, InFlight
from llmepp.framework.datakeys import (
    IN_FLIGHT_LOAD,
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    prompt_tokens,
    scoped,
)
from llmepp.framework.plugin import Plugin, PluginContext, PluginParams
from llmepp.framework.requestcontrol import (
    DataProducer,
    FirstResponseChunkProcessor,
    PreRequest,
    ResponseCompleteProcessor,
)
from llmepp.framework.scheduling import SchedulingResult
from llmepp.request.types import InferenceRequest, ResponseInfo
from llmepp.units import go_round

log = logging.getLogger(__name__)

APPROX_PREFIX_PRODUCER = "approx-prefix-cache-producer"

# The value consumers read under the producer's data key: a live mapping Endpoint → InFlight
# (requests, tokens). Endpoints with nothing in flight are absent (read as zero).
InFlightLoads = Mapping[Endpoint, InFlight]
NO_LOAD = InFlight()


def inflight_loads(request: InferenceRequest, key: str) -> InFlightLoads | None:
    """The producer's loads for this request, or None when it has not run (callers then fall
    back to the director's own `endpoint.inflight`, which counts full prompts)."""
    loads: InFlightLoads | None = request.data.get(key)
    return loads


def request_counts(request: InferenceRequest, key: str, endpoints: Sequence[Endpoint]) -> list[int]:
    loads = inflight_loads(request, key)
    if loads is None:
        return [ep.inflight.requests for ep in endpoints]
    get = loads.get
    return [get(ep, NO_LOAD).requests for ep in endpoints]


def token_counts(request: InferenceRequest, key: str, endpoints: Sequence[Endpoint]) -> list[int]:
    loads = inflight_loads(request, key)
    if loads is None:
        return [ep.inflight.tokens for ep in endpoints]
    get = loads.get
    return [get(ep, NO_LOAD).tokens for ep in endpoints]


@dataclass(slots=True)
class _Charge:
    """What one request added to one endpoint's counters; zeroed as it is released, so a
    second release (headers then completion, or a repeated hook) changes nothing."""

    load: InFlight
    prompt_tokens: int
    output_tokens: int
    requests: int
    prefill: bool


class InFlightLoadProducer(DataProducer, PreRequest, FirstResponseChunkProcessor, ResponseCompleteProcessor):
    """Tracks, per endpoint, the requests and tokens this producer instance has dispatched and
    not yet seen finish, and publishes them as InFlightLoad for `active-request-scorer`,
    `token-load-scorer`, `utilization-filter`, `prefix-cache-affinity-filter`.

    Why: scraped queue metrics lag by a scrape interval; the router's own counters react to
    the very next request, which is what keeps a burst from piling onto one endpoint.

    Accounting (reference semantics):
      * PreRequest: for the primary target of every profile that ran, requests += 1 and
        tokens += uncached prompt tokens (+ estimated output tokens when enabled).
      * uncached = (totalBlocks − matchedBlocks(e)) · blockSize + max(0, input − totalBlocks · blockSize),
        capped at the prompt size, using PrefixCacheMatchInfo of the prefix producer; the full
        prompt when there is no match info. input = TokenizedPrompt count (else prompt bytes/4).
      * estimated output = min(round(input · outputRatio), client max tokens (if > 0),
        maxEstimatedOutputTokens (if set)), only with addEstimatedOutputTokens.
      * Prompt tokens are released when prefill is done: at the first response body bytes
        (FirstResponseChunkProcessor), as the reference does at the first streamed chunk.
        The prefill profile's charge (a remote prefill) is released entirely at that point (the
        prefill worker is done). Everything else (requests, estimated output) is released exactly once at
        response completion, however the response ended.
      * Counters are per producer instance; a removed endpoint's counters are dropped.

    Parameters: `addEstimatedOutputTokens` (false), `outputRatio` (1.5, ≥ 0),
    `maxEstimatedOutputTokens` (unset = no cap, ≥ 0), `prefixMatchInfoProducerName` (default:
    the one PrefixCacheMatchInfo producer if any — it is optional: no discount without one),
    `syncCrossReplicaState` (accepted; this build has no cross-replica sync).
    Data: writes `InFlightLoad` (a live Endpoint → InFlight mapping); consumes TokenizedPrompt.
    Metrics: `llm_d_epp_inflight_requests` / `llm_d_epp_inflight_tokens` {endpoint_name, namespace,
    producer_name}, read from the counters at scrape time.
    """

    type = "inflight-load-producer"
    produces = frozenset({IN_FLIGHT_LOAD})
    consumes = frozenset({TOKENIZED_PROMPT})

    class Params(PluginParams):
        add_estimated_output_tokens: bool = False
        output_ratio: float = 1.5
        max_estimated_output_tokens: int | None = None
        prefix_match_info_producer_name: str = ""
        sync_cross_replica_state: bool = True

        def __post_init__(self) -> None:
            if self.output_ratio < 0:
                raise ValueError("outputRatio must be >= 0")
            if self.max_estimated_output_tokens is not None and self.max_estimated_output_tokens < 0:
                raise ValueError("maxEstimatedOutputTokens must be >= 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.add_output = params.add_estimated_output_tokens
        self.output_ratio = params.output_ratio
        self.max_output = params.max_estimated_output_tokens
        self.key = scoped(IN_FLIGHT_LOAD, self.name)
        self.loads: dict[Endpoint, InFlight] = {}
        self._prefix_key = ""
        # Where a request's charges are kept between PreRequest and completion.
        self._charges_key = f"{self.name}/charges"

    @property
    def view(self) -> InFlightLoads:
        """What consumers read as this producer's InFlightLoad (the live counters; a shared variant adds
        other replicas' counts). Consumers holding the producer itself (concurrency-detector) read this."""
        return self.loads

    def setup(self, ctx: PluginContext) -> None:
        self._prefix_key = _optional_prefix_key(self, ctx, self.params.prefix_match_info_producer_name)
        if ctx.metrics is not None:
            ctx.metrics.inflight.add(self.name, self.loads)
        if ctx.datastore is not None:
            ctx.datastore.add_listener(self)

    # -- DatastoreListener -----------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        pass

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.loads.pop(endpoint, None)

    # -- DataProducer ----------------------------------------------------------------------
    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        # The live mapping: readers see current counters without a per-request copy.
        request.data[self.key] = self.loads

    # -- PreRequest ------------------------------------------------------------------------
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        input_tokens = prompt_tokens(request)
        info: PrefixMatchInfo | None = request.data.get(self._prefix_key) if self._prefix_key else None
        output = self._estimated_output(request, input_tokens) if self.add_output else 0
        charges: list[_Charge] = []
        for name, res in result.profiles.items():
            if res is None or not res.targets:
                continue
            ep = res.targets[0]
            prompt = _uncached(ep, input_tokens, info)
            load = self.loads.get(ep)
            if load is None:
                load = InFlight()
                # Removed while this request was scheduled (candidates predate the async producers):
                # its removal was notified already, so an entry made now would never be dropped.
                if not ep.removed:
                    self.loads[ep] = load
            load.requests += 1
            load.tokens += prompt + output
            charges.append(_Charge(load, prompt, output, 1, name == result.prefill_profile))
        if charges:
            request.data[self._charges_key] = charges

    def _estimated_output(self, request: InferenceRequest, input_tokens: int) -> int:
        est = go_round(input_tokens * self.output_ratio)  # as the reference (a half rounds up)
        if request.max_tokens is not None and 0 < request.max_tokens < est:
            est = request.max_tokens
        if self.max_output is not None and self.max_output < est:
            est = self.max_output
        return est

    # -- response --------------------------------------------------------------------------
    def first_response_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None:
        # The first output bytes mean prefill is over: the prompt no longer loads the server
        # (and a prefill-only target is done entirely).
        charges: list[_Charge] | None = request.data.get(self._charges_key)
        for c in charges or ():
            _release(c, prompt=True, rest=c.prefill)

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, result: SchedulingResult) -> None:
        charges: list[_Charge] | None = request.data.pop(self._charges_key, None)
        for c in charges or ():
            _release(c, prompt=True, rest=True)


def _release(c: _Charge, *, prompt: bool, rest: bool) -> None:
    load = c.load
    if prompt and c.prompt_tokens:
        load.tokens = max(0, load.tokens - c.prompt_tokens)
        c.prompt_tokens = 0
    if rest:
        if c.output_tokens:
            load.tokens = max(0, load.tokens - c.output_tokens)
            c.output_tokens = 0
        if c.requests:
            load.requests = max(0, load.requests - c.requests)
            c.requests = 0


def _uncached(ep: Endpoint, input_tokens: int, info: PrefixMatchInfo | None) -> int:
    if info is None or info.block_size <= 0:
        return input_tokens
    indexed = info.total_blocks * info.block_size
    uncached = (info.total_blocks - info.cached_blocks(ep)) * info.block_size + max(0, input_tokens - indexed)
    # The trailing partial block is hashed, so `indexed` can exceed the prompt: cap it there.
    return max(0, min(uncached, input_tokens))


def _optional_prefix_key(plugin: Plugin, ctx: PluginContext, producer_name: str) -> str:
    """PrefixCacheMatchInfo is optional here: the named producer, else the only one, else the
    approximate one among several, else none (no cache discount)."""
    if producer_name:
        return ctx.producer_key(plugin, PREFIX_CACHE_MATCH_INFO, producer_name, "prefixMatchInfoProducerName")
    producers = [p for p in ctx.plugins_of(Plugin) if PREFIX_CACHE_MATCH_INFO in p.produces]
    if len(producers) > 1:
        approx = [p for p in producers if p.type == APPROX_PREFIX_PRODUCER]
        if len(approx) != 1:
            log.warning(
                "%s: several PrefixCacheMatchInfo producers and none chosen; prompt tokens are not "
                "discounted by cache hits (set prefixMatchInfoProducerName)",
                plugin.name,
            )
            return ""
        producers = approx
    return scoped(PREFIX_CACHE_MATCH_INFO, producers[0].name) if producers else ""
