"""`kv-headroom-scorer`: prefer endpoints with KV-cache room to spare, discounted by their queue."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp import Endpoint, InferenceRequest, PluginParams, Scorer


class KVHeadroomScorer(Scorer):
    """Scores the KV cache an endpoint can still give to a new request.

    Why: vLLM preempts (evicts and later recomputes) running requests when its KV cache runs
    out, which costs far more than a slightly longer queue elsewhere. Treating the last
    `reserveFraction` of the cache as already gone makes an almost-full endpoint score 0, not
    "a little less than an empty one" as the built-in kv-cache-utilization-scorer does.

        kv  = scraped vllm:kv_cache_usage_perc (0..1),  q = scraped waiting-queue length
        headroom = clamp((1 − kv − reserveFraction) / (1 − reserveFraction), 0, 1)
        score    = headroom / (1 + queuePenalty · q)

    An endpoint never scraped yet scores `unscrapedScore` (its state is unknown).

    Parameters: `reserveFraction` (0.1, in [0, 1)), `queuePenalty` (0.0 = ignore the queue, ≥ 0),
    `unscrapedScore` (0.5, in [0, 1]).
    """

    type = "kv-headroom-scorer"

    class Params(PluginParams):
        reserve_fraction: float = 0.1
        queue_penalty: float = 0.0
        unscraped_score: float = 0.5

        def __post_init__(self) -> None:
            if not 0.0 <= self.reserve_fraction < 1.0:
                raise ValueError("reserveFraction must be within [0, 1)")
            if self.queue_penalty < 0.0:
                raise ValueError("queuePenalty must be >= 0")
            if not 0.0 <= self.unscraped_score <= 1.0:
                raise ValueError("unscrapedScore must be within [0, 1]")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.reserve = params.reserve_fraction
        self.usable = 1.0 - params.reserve_fraction
        self.penalty = params.queue_penalty
        self.unscraped = params.unscraped_score

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [self._one(ep) for ep in endpoints]

    def _one(self, ep: Endpoint) -> float:
        m = ep.metrics
        if not m.update_time:
            return self.unscraped
        headroom = (1.0 - m.kv_cache_usage_percent - self.reserve) / self.usable
        headroom = 0.0 if headroom < 0.0 else 1.0 if headroom > 1.0 else headroom
        if self.penalty and m.waiting_queue_size:
            return headroom / (1.0 + self.penalty * m.waiting_queue_size)
        return headroom
