"""`probabilistic-admitter`: shed sheddable requests with a probability that rises steeply with load."""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import Saturated
from llmepp.framework.plugin import PluginParams
from llmepp.framework.requestcontrol import Admitter
from llmepp.request.types import InferenceRequest


class ProbabilisticAdmitter(Admitter):
    """Sheddable requests (priority < 0) only; others always pass.

        sat       = mean over the candidates of max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold)
        P(reject) = min(sat^power · k, 1)

    With the defaults (5, 0.8, power 5, k 300) shedding starts gently (sat 0.2: 10%) and is total
    from sat ≈ 0.34, well before the pool saturates, so interactive work keeps headroom. A rejected
    request gets 429 `rejected-saturated`, like the legacy saturation rule.

    Parameters: `queueDepthThreshold` (5), `kvCacheUtilThreshold` (0.8), `power` (5), `k` (300).
    """

    type = "probabilistic-admitter"

    class Params(PluginParams):
        queue_depth_threshold: float = 5
        kv_cache_util_threshold: float = 0.8
        power: float = 5
        k: float = 300

        def __post_init__(self) -> None:
            if self.queue_depth_threshold <= 0 or self.kv_cache_util_threshold <= 0:
                raise ValueError("queueDepthThreshold and kvCacheUtilThreshold must be > 0")
            if self.power <= 0 or self.k < 0:
                raise ValueError("power must be > 0 and k >= 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self._rng = random.Random()

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        p = self.params
        q, kv = p.queue_depth_threshold, p.kv_cache_util_threshold
        loads = [max(ep.metrics.waiting_queue_size / q, ep.metrics.kv_cache_usage_percent / kv) for ep in endpoints]
        return sum(loads) / len(loads) if loads else 0.0

    def reject_probability(self, endpoints: Sequence[Endpoint]) -> float:
        p = self.params
        try:
            return min(self.saturation(endpoints) ** p.power * p.k, 1.0)
        except OverflowError:  # sat^power past the float range: +Inf, as the reference's math.Pow
            return 1.0 if p.k > 0 else 0.0

    def admit(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if request.priority >= 0:
            return
        if self._rng.random() < self.reject_probability(endpoints):
            raise Saturated("sheddable request shed by probabilistic-admitter: the pool is loaded")
