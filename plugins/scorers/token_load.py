"""`token-load-scorer`: prefer endpoints with fewer uncached prompt tokens in flight."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import IN_FLIGHT_LOAD
from llmepp.framework.plugin import PluginContext, PluginParams, reference_default
from llmepp.framework.scheduling import Scorer
from llmepp.plugins.producers.inflight_load import token_counts
from llmepp.request.types import InferenceRequest


class TokenLoadScorer(Scorer):
    """score(e) = 1 − min(1, inFlightTokens(e) / queueThresholdTokens)

    In-flight tokens are the inflight-load-producer's uncached prompt tokens (auto-created;
    `inFlightLoadProducerName` picks an instance), or the director's `endpoint.inflight` when
    that data is absent.

    Why: prefill cost grows with the tokens still to compute, not with the request count; a
    few long prompts can saturate an endpoint that request counts call idle.

    Parameters: `queueThresholdTokens` (4194304 = 128 requests × 32K tokens; ≤ 0 means the default),
    `inFlightLoadProducerName`.
    """

    type = "token-load-scorer"
    consumes = frozenset({IN_FLIGHT_LOAD})

    class Params(PluginParams):
        queue_threshold_tokens: int = 4194304
        in_flight_load_producer_name: str = ""

        def __post_init__(self) -> None:
            if self.queue_threshold_tokens <= 0:
                self.queue_threshold_tokens = reference_default(
                    "token-load-scorer", "queueThresholdTokens", self.queue_threshold_tokens, 4194304, "not > 0"
                )

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.threshold = params.queue_threshold_tokens
        self.inv = 1.0 / params.queue_threshold_tokens
        self.key = ""

    def setup(self, ctx: PluginContext) -> None:
        self.key = ctx.producer_key(
            self, IN_FLIGHT_LOAD, self.params.in_flight_load_producer_name, "inFlightLoadProducerName"
        )

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        t, inv = self.threshold, self.inv
        return [1.0 - t_ * inv if t_ < t else 0.0 for t_ in token_counts(request, self.key, endpoints)]
