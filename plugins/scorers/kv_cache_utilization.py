"""`kv-cache-utilization-scorer`: prefer endpoints with free KV cache."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest


class KVCacheUtilizationScorer(Scorer):
    """score(e) = 1 − kv_cache_usage(e)   (`vllm:kv_cache_usage_perc`, a 0..1 fraction).

    Parameters: none.
    """

    type = "kv-cache-utilization-scorer"

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0 - ep.metrics.kv_cache_usage_percent for ep in endpoints]
