"""`prefix-cache-scorer`: prefer endpoints that already hold the prompt's prefix in KV cache."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Scorer, ScorerCategory
from llmepp.request.types import InferenceRequest


class PrefixCacheScorer(Scorer):
    """Scores the matched prefix reported by a prefix-cache producer.

        m = matched blocks, T = prompt blocks, B = tokens per block
        score = w · min(1, m·B / matchLengthScaleTokens)² + (1 − w) · m / T

    Parameters: `matchLengthWeight` w (0.0: pure matched fraction), `matchLengthScaleTokens`
    (8192), `prefixMatchInfoProducerName` (which producer to read; default: the one producer
    of PrefixCacheMatchInfo, `approx-prefix-cache-producer` auto-created if none is configured).
    Requests without a prompt (passthrough) or without match data score 0 everywhere.
    """

    type = "prefix-cache-scorer"
    category = ScorerCategory.AFFINITY
    consumes = frozenset({PREFIX_CACHE_MATCH_INFO})

    class Params(PluginParams):
        match_length_weight: float = 0.0
        match_length_scale_tokens: int = 8192
        prefix_match_info_producer_name: str = ""

        def __post_init__(self) -> None:
            if not 0.0 <= self.match_length_weight <= 1.0:
                raise ValueError("matchLengthWeight must be within [0, 1]")
            if self.match_length_scale_tokens <= 0 and self.match_length_weight > 0.0:
                # As the reference: the scale is checked only when match length counts (w > 0).
                raise ValueError("matchLengthScaleTokens must be > 0 when matchLengthWeight is > 0")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.weight = params.match_length_weight
        self.scale = float(params.match_length_scale_tokens)
        self.data_key = ""

    def setup(self, ctx: PluginContext) -> None:
        self.data_key = ctx.producer_key(
            self,
            PREFIX_CACHE_MATCH_INFO,
            self.params.prefix_match_info_producer_name,
            "prefixMatchInfoProducerName",
        )

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        info: PrefixMatchInfo | None = request.data.get(self.data_key)
        if info is None or not info.total_blocks or not info.hits:
            return [0.0] * len(endpoints)
        hits = info.hits
        total = float(info.total_blocks)
        w = self.weight
        if w == 0.0:
            return [hits.get(ep, 0) / total for ep in endpoints]
        b, scale = info.block_size, self.scale
        return [w * min(1.0, m * b / scale) ** 2 + (1.0 - w) * m / total for m in (hits.get(ep, 0) for ep in endpoints)]
