"""`endpoint-attribute-filter`: keep endpoints whose scalar attribute passes a test."""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.plugins.filters.attributes import BUILTIN_ATTRIBUTES, AttributeReader, attribute_reader, check_attribute
from llmepp.plugins.filters.common import set_consumes
from llmepp.request.types import InferenceRequest

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "LessThan": operator.lt,
    "LessThanOrEqual": operator.le,
    "GreaterThan": operator.gt,
    "GreaterThanOrEqual": operator.ge,
    "Equal": operator.eq,
    "NotEqual": operator.ne,
}
ALGORITHMS = ("threshold", "range", "topK", "percentile")


class ThresholdParams(PluginParams):
    operator: str
    value: float

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"algorithm.threshold.operator must be one of {', '.join(OPERATORS)}")


class RangeParams(PluginParams):
    min: float
    max: float

    def __post_init__(self) -> None:
        if self.min > self.max:
            raise ValueError("algorithm.range: min must be <= max")


class TopKParams(PluginParams):
    k: int
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError("algorithm.topK.k must be > 0")


class PercentileParams(PluginParams):
    percentile: float
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError("algorithm.percentile.percentile must be within [0, 100]")


class AlgorithmParams(PluginParams):
    type: str = ""
    threshold: ThresholdParams | None = None
    range: RangeParams | None = None
    top_k: TopKParams | None = None
    percentile: PercentileParams | None = None

    def __post_init__(self) -> None:
        if self.type not in ALGORITHMS:
            raise ValueError(f"algorithm.type must be one of {', '.join(ALGORITHMS)}")
        block = {"threshold": self.threshold, "range": self.range, "topK": self.top_k}.get(self.type, self.percentile)
        if block is None:
            raise ValueError(f"algorithm.{self.type} is required when algorithm.type is {self.type}")


class EndpointAttributeFilter(Filter):
    """Keeps the endpoints whose value of one scalar attribute passes the configured algorithm.

    Why: hard limits on signals no dedicated filter covers (a custom load metric, a value
    another plugin computes), with explicit handling of endpoints that lack the value.

    Algorithms (`algorithm.type`):
      * `threshold` {operator, value}: keep when value(e) <op> threshold.value, op ∈ LessThan,
        LessThanOrEqual, GreaterThan, GreaterThanOrEqual, Equal, NotEqual.
      * `range` {min, max}: keep when min ≤ value(e) ≤ max.
      * `topK` {k, higherIsBetter=true}: keep the k highest (lowest) values (all if fewer).
      * `percentile` {percentile P, higherIsBetter=true}: cutoff = the nearest-rank value at
        position ceil(P/100·N) (1-based, within [1, N]; computed as the reference, int(P/100·N + 0.999999),
        so float noise does not round it up) of the ascending values; keep value ≥ cutoff (≤ when
        higherIsBetter is false).
    Endpoints missing the attribute are kept with `onMissing: Pass` (default, also when empty) or
    dropped with `Fail`; they take no part in topK / percentile ranking. With `fallbackOnEmpty`
    (false) and nothing kept, every candidate is kept.

    Parameters: `attribute` (required; see `plugins/filters/attributes.py` for the built-in
    names and the producer contract), `producer` (plugin publishing the attribute; empty:
    built-in), `onMissing` Pass|Fail, `fallbackOnEmpty`, `algorithm`.
    """

    type = "endpoint-attribute-filter"

    class Params(PluginParams):
        attribute: str = ""
        producer: str = ""
        on_missing: str = "Pass"
        fallback_on_empty: bool = False
        algorithm: AlgorithmParams | None = None

        def __post_init__(self) -> None:
            check_attribute(self.attribute, self.producer)
            if not self.on_missing:  # the reference reads an empty value as its default
                self.on_missing = "Pass"
            if self.on_missing not in ("Pass", "Fail"):
                raise ValueError("onMissing must be Pass or Fail")
            if self.algorithm is None:
                raise ValueError("algorithm is required (algorithm.type: threshold | range | topK | percentile)")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.pass_missing = params.on_missing == "Pass"
        self.fallback = params.fallback_on_empty
        assert params.algorithm is not None  # checked in Params
        self.algorithm: AlgorithmParams = params.algorithm
        self._rng = random.Random()  # topK: who of the endpoints tied at the cut is kept
        # Built-ins need no other plugin; custom metrics and a producer's attribute are resolved in setup.
        self.read: AttributeReader | None = None if params.producer else BUILTIN_ATTRIBUTES.get(params.attribute)
        set_consumes(self, {params.attribute} if params.producer else ())

    def setup(self, ctx: PluginContext) -> None:
        p = self.params
        self.read = attribute_reader(self, ctx, p.attribute, p.producer, "producer")

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        assert self.read is not None, "setup() not called"
        values = self.read(request, endpoints)
        keep = self._keep(values)
        kept = [ep for ep, k, v in zip(endpoints, keep, values) if k or (v is None and self.pass_missing)]
        if not kept and self.fallback:
            return endpoints
        return kept

    def _keep(self, values: list[float | None]) -> list[bool]:
        """Per endpoint: passes the algorithm (False for a missing value)."""
        a = self.algorithm
        if a.type == "threshold":
            assert a.threshold is not None
            op, ref = OPERATORS[a.threshold.operator], a.threshold.value
            return [v is not None and op(v, ref) for v in values]
        if a.type == "range":
            assert a.range is not None
            lo, hi = a.range.min, a.range.max
            return [v is not None and lo <= v <= hi for v in values]
        present = sorted(v for v in values if v is not None)
        if not present:
            return [False] * len(values)
        if a.type == "topK":
            assert a.top_k is not None
            k = min(a.top_k.k, len(present))
            higher = a.top_k.higher_is_better
            ranked = sorted(((v, i) for i, v in enumerate(values) if v is not None), key=_first, reverse=higher)
            chosen = {i for _, i in ranked[:k]}
            if 0 < k < len(ranked) and ranked[k][0] == ranked[k - 1][0]:
                # A tie across the cut (an idle pool: every queue 0) shares its places at random; in candidate
                # order every request of a burst would see the same k endpoints until the next scrape.
                cut = ranked[k - 1][0]
                tied = [i for v, i in ranked if v == cut]
                chosen.difference_update(tied)
                chosen.update(self._rng.sample(tied, k - len(chosen)))
            return [i in chosen for i in range(len(values))]
        assert a.percentile is not None
        # The reference's nearest rank: a float error just above an integer (14/100·50 = 7.000000000000001)
        # does not push the position up, as a plain ceil would.
        pos = min(len(present), max(1, int(a.percentile.percentile / 100.0 * len(present) + 0.999999)))
        cutoff = present[pos - 1]
        if a.percentile.higher_is_better:
            return [v is not None and v >= cutoff for v in values]
        return [v is not None and v <= cutoff for v in values]


def _first(pair: tuple[float, int]) -> float:
    return pair[0]
