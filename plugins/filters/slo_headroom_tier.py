"""`slo-headroom-tier-filter`: keep the endpoints predicted to meet the request's SLOs."""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import LATENCY_PREDICTION_INFO, LatencyPredictionInfo
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.request.types import InferenceRequest


class SLOHeadroomTierFilter(Filter):
    """Splits the candidates by LatencyPredictionInfo (predicted-latency-producer) into tiers:

        positive = {e : ttftHeadroom(e) ≥ 0 and tpotHeadroom(e) ≥ 0}
        negative = every other endpoint, those without a prediction included (their SLO is unconfirmed)
        keep     = all        if ≤ 1 candidate or no candidate has a prediction
                   negative   with probability epsilonExploreNeg when both tiers are non-empty
                              (so an overloaded endpoint still gets the odd request and shows it recovered)
                   positive   otherwise; the one non-empty tier when only one is

    Without SLO headers every headroom is negative (an absent SLO counts as 0): one tier, nothing removed.
    Never returns an empty list. Parameters: `epsilonExploreNeg` (0.01, in [0, 1]),
    `latencyPredictionInfoProducerName` (default: the only producer).
    """

    type = "slo-headroom-tier-filter"
    consumes = frozenset({LATENCY_PREDICTION_INFO})

    class Params(PluginParams):
        epsilon_explore_neg: float = 0.01
        latency_prediction_info_producer_name: str = ""

        def __post_init__(self) -> None:
            if not 0.0 <= self.epsilon_explore_neg <= 1.0:
                raise ValueError(f"epsilonExploreNeg must be in [0, 1], got {self.epsilon_explore_neg}")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.epsilon = params.epsilon_explore_neg
        self.key = ""
        self._rng = random.Random()

    def setup(self, ctx: PluginContext) -> None:
        self.key = ctx.producer_key(
            self,
            LATENCY_PREDICTION_INFO,
            self.params.latency_prediction_info_producer_name,
            "latencyPredictionInfoProducerName",
        )

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        infos: dict[Endpoint, LatencyPredictionInfo] | None = request.data.get(self.key)
        if len(endpoints) <= 1 or not infos:
            return endpoints
        positive: list[Endpoint] = []
        negative: list[Endpoint] = []
        predicted = False
        for ep in endpoints:
            info = infos.get(ep)
            if info is None:
                negative.append(ep)
                continue
            predicted = True
            (positive if info.ttft_headroom >= 0 and info.tpot_headroom >= 0 else negative).append(ep)
        if not predicted:
            return endpoints
        if positive and negative:
            return negative if self.epsilon and self._rng.random() < self.epsilon else positive
        return positive or negative
