"""`context-length-aware`: route prompts to endpoints labelled for their length range."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import prompt_tokens
from llmepp.framework.plugin import PluginParams
from llmepp.framework.scheduling import Filter, Scorer, ScorerCategory
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)

DEFAULT_LABEL = "llm-d.ai/context-length-range"
MAX_FALLBACK = 0.3  # in-range scores are strictly above, out-of-range strictly below
# Largest bound accepted, as the reference's strconv.Atoi (int64): a larger one is malformed (beyond
# float range the formula would raise OverflowError on every request).
MAX_BOUND = 2**63 - 1


# A bound as the reference's strconv.Atoi reads one, ASCII digits with an optional "+" (Python's int()
# would also take "8_192" and non-ASCII digits); spaces around it are forgiven.
_BOUND = re.compile(r"\s*\+?[0-9]+\s*")


def parse_range(value: str) -> tuple[int, int] | None:
    """`"min-max"` (integers, 0 ≤ min ≤ max ≤ 2^63 − 1) → (min, max); None when malformed."""
    lo, sep, hi = value.partition("-")
    if not sep or not _BOUND.fullmatch(lo) or not _BOUND.fullmatch(hi):
        return None
    a, b = int(lo), int(hi)
    return (a, b) if 0 <= a <= b <= MAX_BOUND else None


def range_score(length: int, lo: int, hi: int) -> float:
    if lo <= length <= hi:
        width = hi - lo
        if width == 0:
            return 1.0
        raw = 0.7 / (1.0 + width / 10000.0) + 0.3 * (hi - length) / width
        return MAX_FALLBACK + (1.0 - MAX_FALLBACK) * raw
    distance = length - hi if length > hi else lo - length
    return MAX_FALLBACK / (1.0 + distance / 1000.0)


class ContextLengthAware(Scorer, Filter):
    """Scores how well an endpoint's context-length range (label `llm-d.ai/context-length-range`
    = "min-max" tokens) fits the prompt length L:

        in range (min ≤ L ≤ max): 0.3 + 0.7 · (0.7 · 1/(1 + width/10000) + 0.3 · (max − L)/width)
                                  (width = max − min; width 0 → 1.0)
        out of range:             0.3 / (1 + distance/1000)   (distance to the nearer bound)
        no label: 0.5;  malformed label: 0.0

    Any in-range endpoint beats any out-of-range one; among in-range ones tighter ranges and
    more headroom win. With `enableFiltering` it is also a Filter that drops endpoints whose
    (valid) range excludes L and those with a malformed label; unlabelled endpoints pass.
    Without it, the filter step passes everything.

    Why: pools split by context length (short-prompt and long-prompt replicas with different
    max-model-len / batch settings) need prompts to land on the matching group.

    L = TokenizedPrompt count (token-producer), else prompt bytes / 4 rounded up (`prompt_tokens`).
    Parameters: `label` (llm-d.ai/context-length-range), `enableFiltering` (false).
    """

    type = "context-length-aware"
    category = ScorerCategory.AFFINITY

    class Params(PluginParams):
        label: str = DEFAULT_LABEL
        enable_filtering: bool = False

        def __post_init__(self) -> None:
            if not self.label:
                raise ValueError("label must not be empty")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.label = params.label
        self.filtering = params.enable_filtering
        # Label values repeat across endpoints and requests: parse each distinct one once.
        self._ranges: dict[str, tuple[int, int] | None] = {}

    def _range(self, value: str) -> tuple[int, int] | None:
        r = self._ranges.get(value, False)
        if r is False:
            r = parse_range(value)
            if r is None:
                log.warning("plugin %s: malformed %s label %r (want min-max)", self.name, self.label, value)
            if len(self._ranges) < 4096:
                self._ranges[value] = r
        return r  # type: ignore[return-value]

    def _label_scores(
        self, length: int, endpoints: Sequence[Endpoint]
    ) -> tuple[list[str | None], dict[str | None, float]]:
        """Each endpoint's label value and the score of each distinct value: a pool has a handful
        of ranges, so the formula runs a handful of times, not once per endpoint."""
        label = self.label
        values = [ep.spec.labels.get(label) for ep in endpoints]
        memo: dict[str | None, float] = {None: 0.5}
        for v in set(values):
            if v is not None:
                r = self._range(v)
                memo[v] = range_score(length, *r) if r is not None else 0.0
        return values, memo

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        values, memo = self._label_scores(prompt_tokens(request), endpoints)
        return [memo[v] for v in values]

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if not self.filtering:
            return endpoints
        # In range ⇔ score > 0.3; unlabelled (0.5) passes; malformed (0.0) does not.
        values, memo = self._label_scores(prompt_tokens(request), endpoints)
        return [ep for ep, v in zip(endpoints, values) if memo[v] > MAX_FALLBACK]
