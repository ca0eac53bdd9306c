"""`latency-scorer`: score endpoints by predicted latency headroom (SLO − predicted)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import (
    LATENCY_PREDICTION_INFO,
    PREFIX_CACHE_MATCH_INFO,
    LatencyPredictionInfo,
    PrefixMatchInfo,
)
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest
from llmepp.units import go_round

LEAST = "least"
MOST = "most"
W_MAX = 100
EPS = 1e-9


class LatencyScorer(Scorer):
    """Scores LatencyPredictionInfo (predicted-latency-producer); meant to run after
    prefix-cache-affinity-filter and slo-headroom-tier-filter have narrowed the candidates.

    Groups (an endpoint without a prediction — never scraped: its load is unknown — scores 0):
      * positive = TTFT and TPOT headroom ≥ 0. If any endpoint is positive, only positive ones are
        scored (the others 0), with `headroomSelectionStrategy`.
      * all negative: if any has 0 dispatched requests (idle), only the idle ones are scored; otherwise
        the first non-empty deficit bucket — only TPOT negative, then only TTFT negative, then both —
        is scored (the rest 0). Negative headroom is always scored with `least` (closest to the SLO).
    Within the scored group, over its endpoints:

        nTTFT = (|hTTFT| − min|hTTFT|) / range, nTPOT likewise   (0.5 when a range is 0)
        α, β  = ttftWeight, tpotWeight normalised to sum 1 (1, 0 when both are 0); a dimension whose range
                is 0 while the other's is not gets weight 0 (the other 1)
        c     = α·nTTFT + β·nTPOT
        score = (⌊(1 − c)·100⌋ + 1) / 100   `least`: closest to the SLO wins (bin-packing, keeps idle pods free)
                (⌊c·100⌋ + 1) / 100         `most`: the most headroom wins (spreading)
    (capped at 1 by the framework). Without SLO headers every headroom is −predicted, so the lowest
    predicted latency wins.

    No prediction for any endpoint (the predictor is down, slow or not configured): the composite fallback

        score = round(100·(wKV·(1 − kv) + wQ·(maxQ − q)/maxQ + wP·prefix)) / 100   (wQ term 1 when maxQ = 0)

    with weights `compositeKVWeight`, `compositeQueueWeight`, `compositePrefixWeight` (1, 1, 1) normalised to
    sum 1 (KV alone when all are 0) and prefix = matched / total blocks (PrefixCacheMatchInfo); a half
    rounds up (the reference's Go math.Round; Python's round() would round it to even). A never-scraped
    endpoint scores 0 and is left out of maxQ (unknown load, not an idle pod, as queue-scorer and
    kv-cache-utilization-scorer).

    Parameters: `ttftWeight` (0.8), `tpotWeight` (0.2), `headroomSelectionStrategy` (least | most),
    `compositeKVWeight`, `compositeQueueWeight`, `compositePrefixWeight` (1 each, ≥ 0),
    `latencyPredictionInfoProducerName`, `prefixMatchInfoProducerName` (default: the only producer).
    """

    type = "latency-scorer"
    consumes = frozenset({LATENCY_PREDICTION_INFO, PREFIX_CACHE_MATCH_INFO})

    class Params(PluginParams):
        ttft_weight: float = 0.8
        tpot_weight: float = 0.2
        headroom_selection_strategy: str = LEAST
        composite_kv_weight: float = msgspec.field(default=1.0, name="compositeKVWeight")
        composite_queue_weight: float = 1.0
        composite_prefix_weight: float = 1.0
        latency_prediction_info_producer_name: str = ""
        prefix_match_info_producer_name: str = ""

        def __post_init__(self) -> None:
            for name, value in (("ttftWeight", self.ttft_weight), ("tpotWeight", self.tpot_weight),
                                ("compositeKVWeight", self.composite_kv_weight),
                                ("compositeQueueWeight", self.composite_queue_weight),
                                ("compositePrefixWeight", self.composite_prefix_weight)):  # fmt: skip
                if not value >= 0:
                    raise ValueError(f"{name} must be >= 0, got {value}")
            if self.headroom_selection_strategy not in (LEAST, MOST):
                raise ValueError(
                    f"headroomSelectionStrategy must be {LEAST!r} or {MOST!r}, got {self.headroom_selection_strategy!r}"
                )

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        a, b = params.ttft_weight, params.tpot_weight
        self.alpha, self.beta = (a / (a + b), b / (a + b)) if a + b > 0 else (1.0, 0.0)
        self.most = params.headroom_selection_strategy == MOST
        wkv, wq, wp = params.composite_kv_weight, params.composite_queue_weight, params.composite_prefix_weight
        total = wkv + wq + wp
        self.composite = (wkv / total, wq / total, wp / total) if total > 0 else (1.0, 0.0, 0.0)
        self.latency_key = ""
        self.prefix_key = ""

    def setup(self, ctx: PluginContext) -> None:
        p = self.params
        self.latency_key = ctx.producer_key(
            self, LATENCY_PREDICTION_INFO, p.latency_prediction_info_producer_name, "latencyPredictionInfoProducerName"
        )
        self.prefix_key = ctx.producer_key(
            self, PREFIX_CACHE_MATCH_INFO, p.prefix_match_info_producer_name, "prefixMatchInfoProducerName"
        )

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        infos: dict[Endpoint, LatencyPredictionInfo] | None = request.data.get(self.latency_key)
        n = len(endpoints)
        if not infos or not any(ep in infos for ep in endpoints):
            return self.composite_scores(request, endpoints)
        scores = [0.0] * n
        positive: list[int] = []
        negative: list[int] = []
        for i, ep in enumerate(endpoints):
            info = infos.get(ep)
            if info is None:
                continue
            if info.ttft_headroom < 0 or info.tpot_headroom < 0:
                negative.append(i)
            else:
                positive.append(i)
        if positive:
            self._score_group(endpoints, infos, positive, scores, force_least=False)
            return scores
        idle = [i for i in negative if infos[endpoints[i]].dispatched_requests == 0]
        if idle:
            self._score_group(endpoints, infos, idle, scores, force_least=True)
            return scores
        tpot_only: list[int] = []
        ttft_only: list[int] = []
        both: list[int] = []
        for i in negative:
            info = infos[endpoints[i]]
            ttft_neg, tpot_neg = info.ttft_headroom < 0, info.tpot_headroom < 0
            (tpot_only if tpot_neg and not ttft_neg else ttft_only if ttft_neg and not tpot_neg else both).append(i)
        group = tpot_only or ttft_only or both
        self._score_group(endpoints, infos, group, scores, force_least=True)
        return scores

    def _score_group(
        self,
        endpoints: Sequence[Endpoint],
        infos: dict[Endpoint, LatencyPredictionInfo],
        group: list[int],
        scores: list[float],
        *,
        force_least: bool,
    ) -> None:
        ttft: list[float] = []
        tpot: list[float] = []
        for i in group:
            info = infos.get(endpoints[i])
            ttft.append(abs(info.ttft_headroom) if info is not None else 0.0)
            tpot.append(abs(info.tpot_headroom) if info is not None else 0.0)
        lo_ttft, lo_tpot = min(ttft), min(tpot)
        ttft_range, tpot_range = max(ttft) - lo_ttft, max(tpot) - lo_tpot
        alpha, beta = self.alpha, self.beta
        if ttft_range <= EPS < tpot_range:
            alpha, beta = 0.0, 1.0
        elif tpot_range <= EPS < ttft_range:
            alpha, beta = 1.0, 0.0
        most = self.most and not force_least
        for k, i in enumerate(group):
            n_ttft = (ttft[k] - lo_ttft) / ttft_range if ttft_range > EPS else 0.5
            n_tpot = (tpot[k] - lo_tpot) / tpot_range if tpot_range > EPS else 0.5
            combined = alpha * n_ttft + beta * n_tpot
            w = int((combined if most else 1.0 - combined) * W_MAX) + 1
            scores[i] = min(1.0, w / W_MAX)

    def composite_scores(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        """The fallback without predictions: free KV, relative queue and prefix hit, blended."""
        wkv, wq, wp = self.composite
        info: PrefixMatchInfo | None = request.data.get(self.prefix_key)
        hits = info.hits if info is not None and info.total_blocks > 0 else {}
        total = info.total_blocks if info is not None else 0
        max_q = max((ep.metrics.waiting_queue_size for ep in endpoints if ep.metrics.update_time), default=0)
        out = []
        for ep in endpoints:
            m = ep.metrics
            if not m.update_time:
                out.append(0.0)
                continue
            rel_queue = (max_q - m.waiting_queue_size) / max_q if max_q > 0 else 1.0
            prefix = hits.get(ep, 0) / total if hits else 0.0
            composite = wkv * (1.0 - m.kv_cache_usage_percent) + wq * rel_queue + wp * prefix
            if not 0.0 <= composite <= 1.0:  # a KV usage past [0, 1] (1e308: round() overflows) or NaN
                composite = 1.0 if composite > 1.0 else 0.0
            out.append(go_round(W_MAX * composite) / W_MAX)
        return out
