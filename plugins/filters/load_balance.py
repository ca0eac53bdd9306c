"""`load-balance-filter`: drop endpoints that have drifted far above the least loaded one."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import IN_FLIGHT_LOAD, PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.plugins.filters.common import set_consumes
from llmepp.plugins.producers.inflight_load import request_counts
from llmepp.request.types import InferenceRequest


class LoadBalanceFilter(Filter):
    """The balance rule of the cache-aware routers (sglang, smg, vllm-router), on this EPP's own
    in-flight requests (this build's addition; the reference has no such filter):

        n(e)         = requests in flight from this EPP to e
        lo           = min n over the candidates
        overloaded e ⇔ n(e) − lo > absThreshold  and  n(e) > relThreshold · lo
        keep         = the candidates that are not overloaded (always at least the least loaded)
        applies only when the longest cached prefix among the candidates is ≤ maxMatchedTokens
        (when that is set), so a request with a long cached history is never moved for balance

    Why: prefix affinity pins each shared prefix (an app's system prompt) to the pods that served
    it first, and no load score can outweigh a large prefix score, so when a few prefixes carry
    most of the traffic their pods stay overloaded while others idle. Dropping the overloaded
    pods for a while lets the prompt be cached on a second pod; after that the prefix scores tie
    and the load scorers spread the prefix's requests. With one prefix carrying all traffic, the default profile
    without this filter sends every request to one pod, 26 s TTFT p90 at 9 req/s over 4 pods against 1.5 s with
    it at 32 / 1.5x (`python -m benchmarks.des.hot_prefix`), which is why the default profile has it at those
    values.
    Not lower: at 16 / 1.25x it moved returning turns of the multi-turn benchmark off their cached history and
    raised TTFT p90 (benchmarks/results/diagnostics/README.md).

    Parameters: `absThreshold` (16, ≥ 0) and `relThreshold` (1.25, ≥ 1): both must be exceeded;
    `maxMatchedTokens` (unset: every request; else the PrefixCacheMatchInfo producer's tokens),
    `inFlightLoadProducerName` (which in-flight producer to read; default the only one, the
    inflight-load-producer auto-created), `prefixMatchInfoProducerName` (with maxMatchedTokens).
    """

    type = "load-balance-filter"

    class Params(PluginParams):
        abs_threshold: int = 16
        rel_threshold: float = 1.25
        max_matched_tokens: int | None = None
        in_flight_load_producer_name: str = ""
        prefix_match_info_producer_name: str = ""

        def __post_init__(self) -> None:
            if self.abs_threshold < 0:
                raise ValueError("absThreshold must be >= 0")
            if not self.rel_threshold >= 1.0:
                raise ValueError("relThreshold must be >= 1")
            if self.max_matched_tokens is not None and self.max_matched_tokens < 0:
                raise ValueError("maxMatchedTokens must be >= 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.abs = params.abs_threshold
        self.rel = params.rel_threshold
        self.max_matched = params.max_matched_tokens
        set_consumes(self, {IN_FLIGHT_LOAD} if self.max_matched is None else {IN_FLIGHT_LOAD, PREFIX_CACHE_MATCH_INFO})
        self.key = ""
        self.prefix_key = ""

    def setup(self, ctx: PluginContext) -> None:
        p = self.params
        self.key = ctx.producer_key(self, IN_FLIGHT_LOAD, p.in_flight_load_producer_name, "inFlightLoadProducerName")
        if self.max_matched is not None:
            self.prefix_key = ctx.producer_key(
                self, PREFIX_CACHE_MATCH_INFO, p.prefix_match_info_producer_name, "prefixMatchInfoProducerName"
            )

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if len(endpoints) <= 1:
            return endpoints
        if self.max_matched is not None:
            info: PrefixMatchInfo | None = request.data.get(self.prefix_key)
            # The blocks each candidate holds in any tier (`hits` is tier-weighted: a prefix in cpu counts 0.8).
            if info is not None and max(map(info.cached_blocks, endpoints)) * info.block_size > self.max_matched:
                return endpoints
        counts = request_counts(request, self.key, endpoints)
        lo = min(counts)
        cap = max(lo + self.abs, self.rel * lo)  # above both bounds = overloaded
        if max(counts) <= cap:
            return endpoints
        return [ep for ep, n in zip(endpoints, counts) if n <= cap]
