"""`header-label-affinity-scorer`: prefer endpoints whose label equals a request header."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import PluginParams
from llmepp.framework.scheduling import Scorer, ScorerCategory
from llmepp.request.types import InferenceRequest


class HeaderLabelAffinityScorer(Scorer):
    """score(e) = 1 if labels(e)[labelKey] == headers[headerName] (header present, non-empty) else 0

    Why: a soft, client-driven placement hint (tenant, region, hardware tier) that other
    scorers can still outweigh — label-selector-filter is the hard version.

    Parameters: `headerName` (required; matched case-insensitively), `labelKey` (required).
    """

    type = "header-label-affinity-scorer"
    category = ScorerCategory.AFFINITY

    class Params(PluginParams):
        header_name: str = ""
        label_key: str = ""

        def __post_init__(self) -> None:
            if not self.header_name.strip():
                raise ValueError("headerName is required")
            if not self.label_key:
                raise ValueError("labelKey is required")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.header = params.header_name.strip().lower()
        self.label = params.label_key

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        wanted = request.headers.get(self.header)
        if not wanted:
            return [0.0] * len(endpoints)
        label = self.label
        return [1.0 if ep.spec.labels.get(label) == wanted else 0.0 for ep in endpoints]
