"""Usage-limit policies: the saturation ceiling at which each priority band stops dispatching."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.flowcontrol.interfaces import UsageLimitPolicy
from llmepp.framework.plugin import PluginParams


class StaticUsageLimitParams(PluginParams):
    threshold: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


class StaticUsageLimitPolicy(UsageLimitPolicy):
    """The same ceiling for every band (the default).

    ceiling(band) = threshold; a band is gated while pool saturation ≥ threshold.
    Parameters: `threshold` (1.0), in (0, 1]: below 1 keeps headroom in the pool.
    """

    type = "static-usage-limit-policy"
    Params = StaticUsageLimitParams

    def __init__(self, name: str, params: StaticUsageLimitParams | None = None) -> None:
        super().__init__(name, params)
        self.threshold: float = self.params.threshold
        self._cache: list[float] = []

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        if len(self._cache) != len(priorities):
            self._cache = [self.threshold] * len(priorities)
        return self._cache
