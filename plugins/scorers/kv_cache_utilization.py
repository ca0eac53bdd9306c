"""`kv-cache-utilization-scorer`: prefer endpoints with free KV cache."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest


class KVCacheUtilizationScorer(Scorer):
    """score(e) = 1 − kv_cache_usage(e)   (`vllm:kv_cache_usage_perc`, a 0..1 fraction).

    Parameters: none.

    Where the usage comes from is `utilizations` (multicluster-kv-cache-utilization-scorer: a
    cluster's pool average); an endpoint whose usage is unknown (None: never scraped) scores 0, as
    the reference's current scorer leaves an endpoint with no written metrics unscored.
    """

    type = "kv-cache-utilization-scorer"
    pod_only = "reads model-server metrics; use multicluster-kv-cache-utilization-scorer"

    def utilizations(self, endpoints: Sequence[Endpoint]) -> Sequence[float | None]:
        return [m.kv_cache_usage_percent if (m := ep.metrics).update_time else None for ep in endpoints]

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [0.0 if u is None else 1.0 - u for u in self.utilizations(endpoints)]
