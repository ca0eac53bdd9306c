"""`latency-slo-admitter`: shed sheddable requests no endpoint is predicted to serve within their SLO."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import Saturated
from llmepp.framework.datakeys import LATENCY_PREDICTION_INFO, LatencyPredictionInfo
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.requestcontrol import Admitter
from llmepp.plugins.producers.predicted_latency import request_slos
from llmepp.request.types import InferenceRequest

COLD_KV = 0.02


class LatencySLOAdmitter(Admitter):
    """Sheddable requests (priority < 0) with an SLO header (`x-llm-d-slo-ttft-ms` or `x-llm-d-slo-tpot-ms`
    > 0) only; everything else is admitted. With LatencyPredictionInfo (predicted-latency-producer):

        admit  if some candidate is valid (TTFT and TPOT predicted within the SLO),
               or idle (0 requests dispatched by this EPP; the scraped running count when it has no
               prediction), or cold (KV utilisation < 2%: its predictions are least reliable)
        reject otherwise: 429, `x-llm-d-request-dropped-reason: rejected-saturated` (as probabilistic-admitter;
               the reference answers an admitter's denial 500)

    A never-scraped candidate (its metrics read 0) proves nothing either way. No prediction for any candidate
    (the predictor is down or slow, nothing scraped): admitted (fail-open).
    Parameters: `latencyPredictionInfoProducerName` (default: the only producer).
    """

    type = "latency-slo-admitter"
    consumes = frozenset({LATENCY_PREDICTION_INFO})

    class Params(PluginParams):
        latency_prediction_info_producer_name: str = ""

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.key = ""

    def setup(self, ctx: PluginContext) -> None:
        self.key = ctx.producer_key(
            self,
            LATENCY_PREDICTION_INFO,
            self.params.latency_prediction_info_producer_name,
            "latencyPredictionInfoProducerName",
        )

    def admit(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if request.priority >= 0:
            return
        ttft_slo, tpot_slo = request_slos(request)
        if ttft_slo <= 0 and tpot_slo <= 0:
            return
        infos: dict[Endpoint, LatencyPredictionInfo] | None = request.data.get(self.key)
        if not infos or not any(ep in infos for ep in endpoints):
            return
        for ep in endpoints:
            if not ep.metrics.update_time:  # never scraped: its KV 0 and running 0 are unknown, not cold and idle
                continue
            info = infos.get(ep)
            if ep.metrics.kv_cache_usage_percent < COLD_KV:
                return
            if info is None:
                if ep.metrics.running_requests_size == 0:
                    return
            elif info.valid or info.dispatched_requests == 0:
                return
        raise Saturated("sheddable request shed by latency-slo-admitter: no endpoint is predicted to meet its SLO")
