"""`prefill-backlog-scorer`: prefer the endpoint that would reach this request's first token soonest."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import IN_FLIGHT_LOAD, PrefixMatchInfo, prompt_tokens
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Scorer
from llmepp.plugins.producers.inflight_load import optional_prefix_key, token_counts, uncached_tokens
from llmepp.request.types import InferenceRequest


class PrefillBacklogScorer(Scorer):
    """Prefill work, in tokens, that stands between the request and its first token on each endpoint:

        cost(e)  = inFlightTokens(e) + uncached(e)
        score(e) = (max cost − cost(e)) / (max cost − min cost)        (1 for all when the costs are equal)

    inFlightTokens(e) is the uncached prompt tokens this EPP has dispatched to e whose first token has not
    come back (inflight-load-producer, auto-created); uncached(e) is this prompt's tokens e does not hold
    (the PrefixCacheMatchInfo producer's blocks, the whole prompt without one).

    Why: a prefix hit and a load gap are the same currency here: tokens a GPU must prefill. A weighted sum of
    a prefix score and a load score trades them at a fixed rate whatever the prompt; this cost moves a request
    off its warm endpoint exactly when the backlog there exceeds the recompute it would cost elsewhere (a
    conversation's second turn costs one question more on another endpoint holding its system prompt, its
    sixth the whole history), and sends work that is cold everywhere to the smallest backlog.

    Parameters: `inFlightLoadProducerName`, `prefixMatchInfoProducerName` (default: the one PrefixCacheMatchInfo
    producer if any; none means no cache discount).
    """

    type = "prefill-backlog-scorer"
    consumes = frozenset({IN_FLIGHT_LOAD})

    class Params(PluginParams):
        in_flight_load_producer_name: str = ""
        prefix_match_info_producer_name: str = ""

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.load_key = ""
        self.prefix_key = ""

    def setup(self, ctx: PluginContext) -> None:
        p = self.params
        self.load_key = ctx.producer_key(
            self, IN_FLIGHT_LOAD, p.in_flight_load_producer_name, "inFlightLoadProducerName"
        )
        self.prefix_key = optional_prefix_key(self, ctx, p.prefix_match_info_producer_name)

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        tokens = prompt_tokens(request)
        info: PrefixMatchInfo | None = request.data.get(self.prefix_key) if self.prefix_key else None
        costs = [
            backlog + uncached_tokens(ep, tokens, info)
            for ep, backlog in zip(endpoints, token_counts(request, self.load_key, endpoints), strict=True)
        ]
        low, high = min(costs, default=0), max(costs, default=0)
        if high == low:
            return [1.0] * len(costs)
        span = high - low  # a division, not a reciprocal's product: the cheapest endpoint scores exactly 1
        return [(high - c) / span for c in costs]
