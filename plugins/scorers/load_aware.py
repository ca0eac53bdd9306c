"""`load-aware-scorer`: an absolute (not min-max) waiting-queue score, capped at 0.5."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import PluginParams, reference_default
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest


class LoadAwareScorer(Scorer):
    """Scores the waiting queue q against a fixed threshold:

        q = 0            → 0.5
        q ≥ threshold    → 0
        otherwise        → 0.5 · (1 − q / threshold)

    The maximum is 0.5 on purpose (the reference reserves (0.5, 1] for endpoints with spare
    running capacity, which vLLM metrics don't expose). Unlike queue-scorer the score does not
    depend on the other candidates, so two lightly loaded endpoints stay close.

    Parameters: `threshold` (128; a value ≤ 0 means 128, as in the reference).

    A never-scraped endpoint scores 0. The reference's load-aware scorer still reads it as q = 0,
    but its queue, running-requests and KV scorers now leave such an endpoint unscored, and one rule
    for all four is what an operator can reason about: unknown load is not an idle pod.
    """

    type = "load-aware-scorer"

    class Params(PluginParams):
        threshold: int = 128

        def __post_init__(self) -> None:
            if self.threshold <= 0:
                self.threshold = reference_default("load-aware-scorer", "threshold", self.threshold, 128, "not > 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.threshold = params.threshold
        self.half_inv = 0.5 / params.threshold

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        t, k = self.threshold, self.half_inv
        scores = []
        for ep in endpoints:
            m = ep.metrics
            q = m.waiting_queue_size
            scores.append(0.5 - q * k if m.update_time and q < t else 0.0)
        return scores
