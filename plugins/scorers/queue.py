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

    Where q comes from is `queue_sizes` (multicluster-queue-scorer: a cluster's pool average); an
    endpoint whose queue is unknown (None: never scraped) scores 0 and is left out of minQ / maxQ,
    as the reference's current scorer leaves an endpoint with no written metrics unscored. Reading
    it as 0 would make a pod that just joined, or whose /metrics never answers, the idlest one.
    """

    type = "queue-scorer"
    pod_only = "reads model-server metrics; use multicluster-queue-scorer"

    def queue_sizes(self, endpoints: Sequence[Endpoint]) -> Sequence[float | None]:
        return [m.waiting_queue_size if (m := ep.metrics).update_time else None for ep in endpoints]

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return shortest_first(self.queue_sizes(endpoints))


def shortest_first(queues: Sequence[float | None]) -> list[float]:
    """(maxQ − q) / (maxQ − minQ) over the known queues, 1.0 for each when they are all equal, 0.0 for
    an unknown one (None)."""
    if None in queues:
        known = [q for q in queues if q is not None]
        if not known:
            return [0.0] * len(queues)
        lo, hi = min(known), max(known)
        if hi == lo:
            return [0.0 if q is None else 1.0 for q in queues]
        span = hi - lo
        return [0.0 if q is None else (hi - q) / span for q in queues]
    values: Sequence[float] = queues  # type: ignore[assignment]  # no None, checked above
    lo, hi = min(values, default=0), max(values, default=0)
    if hi == lo:
        return [1.0] * len(values)
    # Divide (as the reference): a rounded reciprocal makes the shortest queue 0.9999999999999999 for some
    # spans (49 · (1/49)), which turns a reference tie into a deterministic loss.
    span = hi - lo
    return [(hi - q) / span for q in values]
