"""`endpoint-attribute-scorer`: linear score of one scalar endpoint attribute."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Scorer
from llmepp.plugins.filters.attributes import BUILTIN_ATTRIBUTES, AttributeReader, attribute_reader, check_attribute
from llmepp.plugins.filters.common import set_consumes
from llmepp.request.types import InferenceRequest

LOWER_IS_BETTER = "linear_lower_is_better"
HIGHER_IS_BETTER = "linear_higher_is_better"


class FixedRange(PluginParams):
    min: float
    max: float

    def __post_init__(self) -> None:
        if self.min >= self.max:
            raise ValueError("algorithm.normalization.fixedRange requires min < max")


class AdaptiveRange(PluginParams):
    pass


class Normalization(PluginParams):
    fixed_range: FixedRange | None = None
    adaptive_range: AdaptiveRange | None = None

    def __post_init__(self) -> None:
        if self.fixed_range is not None and self.adaptive_range is not None:
            raise ValueError("algorithm.normalization: at most one of fixedRange and adaptiveRange")


class ScorerAlgorithm(PluginParams):
    type: str = ""
    normalization: Normalization = msgspec.field(default_factory=Normalization)

    def __post_init__(self) -> None:
        if self.type not in (LOWER_IS_BETTER, HIGHER_IS_BETTER):
            raise ValueError(f"algorithm.type must be {LOWER_IS_BETTER!r} or {HIGHER_IS_BETTER!r}")


class EndpointAttributeScorer(Scorer):
    """Linear normalisation of one scalar attribute v(e):

        n(e) = (v(e) − lo) / (hi − lo), clamped to [0, 1]
        score(e) = 1 − n(e) for linear_lower_is_better, n(e) for linear_higher_is_better
        [lo, hi] = adaptiveRange (default): min / max of v over the candidates that have it
                   (all equal → 1.0 for each of them)
                 | fixedRange {min, max} (min < max)
        missing attribute → 0.0 (and no part in the adaptive range)

    Why: scores any signal no dedicated scorer covers, with the range chosen to suit it —
    adaptive for open-ended counts, fixed for bounded ratios.

    Parameters: `attributeKey` (required; built-in names and the producer contract in
    `plugins/filters/attributes.py`), `producer` (plugin publishing it; empty: built-in),
    `algorithm.type`, `algorithm.normalization`.
    """

    type = "endpoint-attribute-scorer"

    class Params(PluginParams):
        attribute_key: str = ""
        producer: str = ""
        algorithm: ScorerAlgorithm | None = None

        def __post_init__(self) -> None:
            try:
                check_attribute(self.attribute_key, self.producer)
            except ValueError as e:
                raise ValueError(f"attributeKey: {e}") from None
            if self.algorithm is None:
                raise ValueError(f"algorithm is required (algorithm.type: {LOWER_IS_BETTER} | {HIGHER_IS_BETTER})")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        algorithm = params.algorithm
        assert algorithm is not None  # checked in Params
        self.lower = algorithm.type == LOWER_IS_BETTER
        self.fixed = algorithm.normalization.fixed_range
        self.read: AttributeReader | None = None if params.producer else BUILTIN_ATTRIBUTES.get(params.attribute_key)
        set_consumes(self, {params.attribute_key} if params.producer else ())

    def setup(self, ctx: PluginContext) -> None:
        p = self.params
        self.read = attribute_reader(self, ctx, p.attribute_key, p.producer, "producer")

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        assert self.read is not None, "setup() not called"
        values = self.read(request, endpoints)
        if self.fixed is None:
            present = [v for v in values if v is not None]
            if not present:
                return [0.0] * len(values)
            lo, hi = min(present), max(present)
            if hi == lo:
                return [0.0 if v is None else 1.0 for v in values]
            # Values lie within [lo, hi]: no clamping needed. Divide rather than multiply by 1/span: a
            # subnormal span has an infinite reciprocal.
            span = hi - lo
            if self.lower:
                return [0.0 if v is None else (hi - v) / span for v in values]
            return [0.0 if v is None else (v - lo) / span for v in values]
        lo, hi = self.fixed.min, self.fixed.max
        span = hi - lo
        if self.lower:
            return [0.0 if v is None else 1.0 if v <= lo else 0.0 if v >= hi else (hi - v) / span for v in values]
        return [0.0 if v is None else 0.0 if v <= lo else 1.0 if v >= hi else (v - lo) / span for v in values]
