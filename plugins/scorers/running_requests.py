"""`running-requests-size-scorer`: prefer endpoints running fewer requests."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest


class RunningRequestsSizeScorer(Scorer):
    """Min-max normalised running batch (`vllm:num_requests_running`).

    score(e) = (maxRun − run(e)) / (maxRun − minRun) over the candidates; 1.0 for all when equal.

    Why: the running batch is what slows each decode step; spreading it evens out
    inter-token latency, where the queue scorer only sees requests not yet admitted.
    Parameters: none. Never-scraped endpoints read 0 running (last known values, as the reference).
    """

    type = "running-requests-size-scorer"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        running = [ep.metrics.running_requests_size for ep in endpoints]
        lo, hi = min(running, default=0), max(running, default=0)
        if hi == lo:
            return [1.0] * len(running)
        inv_span = 1.0 / (hi - lo)
        return [(hi - r) * inv_span for r in running]
