"""`queue-scorer`: prefer endpoints with shorter waiting queues."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest


class QueueScorer(Scorer):
    """Min-max normalised waiting queue (`vllm:num_requests_waiting`).

    score(e) = (maxQ − q(e)) / (maxQ − minQ) over the candidates; 1.0 for all when equal.
    Parameters: none.
    """

    type = "queue-scorer"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        queues = [ep.metrics.waiting_queue_size for ep in endpoints]
        lo, hi = min(queues, default=0), max(queues, default=0)
        if hi == lo:
            return [1.0] * len(queues)
        inv_span = 1.0 / (hi - lo)
        return [(hi - q) * inv_span for q in queues]
