"""`running-requests-size-scorer`: prefer endpoints running fewer requests."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Scorer
from llmepp.plugins.scorers.queue import shortest_first
from llmepp.request.types import InferenceRequest


class RunningRequestsSizeScorer(Scorer):
    """Min-max normalised running batch (`vllm:num_requests_running`).

    score(e) = (maxRun − run(e)) / (maxRun − minRun) over the candidates; 1.0 for all when equal.

    Why: the running batch is what slows each decode step; spreading it evens out
    inter-token latency, where the queue scorer only sees requests not yet admitted.
    Parameters: none. A never-scraped endpoint scores 0 and is left out of minRun / maxRun, as the
    reference's current scorer leaves an endpoint with no written metrics unscored.
    """

    type = "running-requests-size-scorer"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return shortest_first([m.running_requests_size if (m := ep.metrics).update_time else None for ep in endpoints])
