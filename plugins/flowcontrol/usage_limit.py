"""Usage-limit policies: the saturation ceiling at which each priority band stops dispatching."""

from __future__ import annotations

import itertools
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


class PriorityHoldbackParams(PluginParams):
    shape: str = "linear"
    domain: str = "rank"
    # None = not set: `explicit` rejects them, the other domains need minCeiling.
    min_ceiling: float | None = None
    max_ceiling: float | None = None
    ceilings: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if self.domain not in ("rank", "value", "explicit"):
            raise ValueError(f"domain must be rank, value or explicit, got {self.domain!r}")
        if self.domain == "explicit":
            if self.min_ceiling is not None or self.max_ceiling is not None or self.shape != "linear":
                raise ValueError("domain explicit takes `ceilings` only: shape, minCeiling, maxCeiling must not be set")
            if not self.ceilings:
                raise ValueError("domain explicit needs `ceilings` (priority: ceiling)")
            ordered = [self.ceilings[p] for p in sorted(self.ceilings, reverse=True)]
            for p, c in self.ceilings.items():
                if not 0.0 <= c <= 1.0:
                    raise ValueError(f"ceilings[{p}] must be in [0, 1], got {c}")
            if any(lower > higher for higher, lower in itertools.pairwise(ordered)):
                raise ValueError("ceilings must not increase from the highest priority to the lowest")
            return
        if self.shape != "linear":
            raise ValueError(f"shape must be linear (the only shape), got {self.shape!r}")
        if self.ceilings is not None:
            raise ValueError(f"`ceilings` is for domain explicit (domain is {self.domain})")
        if self.min_ceiling is None:
            raise ValueError(f"minCeiling is required for domain {self.domain}")
        if not 0.0 <= self.min_ceiling < 1.0:
            raise ValueError(f"minCeiling must be in [0, 1), got {self.min_ceiling}")
        if self.max_ceiling is None:
            self.max_ceiling = 1.0
        if not 0.0 < self.max_ceiling <= 1.0:
            raise ValueError(f"maxCeiling must be in (0, 1], got {self.max_ceiling}")
        if self.min_ceiling > self.max_ceiling:
            raise ValueError(f"minCeiling ({self.min_ceiling}) is above maxCeiling ({self.max_ceiling})")


class PriorityHoldbackPolicy(UsageLimitPolicy):
    """Lower bands stop first as saturation rises, reserving the rest for higher priorities.

    With N active bands, i their rank (0 = highest), p their priority:
        rank     c_i = maxCeiling − i·(maxCeiling − minCeiling)/(N − 1)
        value    c_i = minCeiling + (p_i − pMin)/(pMax − pMin)·(maxCeiling − minCeiling)
        explicit c_i = ceilings[p_i]; an unlisted p_i takes the ceiling of the nearest listed priority
                 below it (below them all: the lowest listed ceiling)
    One band (or equal priorities in `value`) gets maxCeiling. Parameters: `shape` (linear),
    `domain` (rank), `minCeiling` (required for rank/value), `maxCeiling` (1.0), `ceilings`.
    """

    type = "priority-holdback-policy"
    Params = PriorityHoldbackParams

    def __init__(self, name: str, params: PriorityHoldbackParams | None = None) -> None:
        super().__init__(name, params)
        # The controller replaces its priority list when bands change; the ceilings follow it.
        self._for: Sequence[int] | None = None
        self._ceilings: list[float] = []

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        if priorities is not self._for:
            self._ceilings = self._compute(priorities)
            self._for = priorities
        return self._ceilings

    def _compute(self, priorities: Sequence[int]) -> list[float]:
        p = self.params
        if p.domain == "explicit":
            return [_listed_ceiling(p.ceilings or {}, prio) for prio in priorities]
        lo, hi = p.min_ceiling or 0.0, p.max_ceiling if p.max_ceiling is not None else 1.0
        n = len(priorities)
        if p.domain == "rank":
            if n < 2:
                return [hi] * n
            return [hi - i * (hi - lo) / (n - 1) for i in range(n)]
        p_min, p_max = min(priorities, default=0), max(priorities, default=0)
        if p_max == p_min:
            return [hi] * n
        return [lo + (prio - p_min) / (p_max - p_min) * (hi - lo) for prio in priorities]


def _listed_ceiling(table: dict[int, float], priority: int) -> float:
    """`priority`'s ceiling in an explicit table; unlisted (an objective added after the config), the nearest
    listed priority's below it, else the lowest listed one's. Not 0: a band gated even on an idle pool
    would hold back every band below it (head-of-line) until its requests' TTL."""
    if priority in table:
        return table[priority]
    below = [p for p in table if p < priority]
    return table[max(below)] if below else table[min(table)]


class SoftReflectiveCeilingPolicy(UsageLimitPolicy):
    """Graduated gating with no parameters: the highest band is never held back below saturation 1,
    lower bands are thinned out, not shut, as saturation rises.

        reflective_i = 1 − i·saturation/(N − 1)        (i = rank, 0 = highest; N bands)
        saturation < reflective_i  → open
        saturation ≥ 1             → every band but the highest closed (the highest is gated by
                                      its ceiling 1.0 like any band at saturation ≥ 1)
        otherwise                  → open one call in `period`, period = round(sat/(1 − sat)),
                                      so the band dispatches at about (1 − sat)/sat of its rate
    A call is one ceiling read: every dispatch cycle and every fast-path admission.
    """

    type = "soft-reflective-ceiling-policy"
    rejects_parameters = True  # its reference README: "Any non-empty parameters block is rejected"

    def __init__(self, name: str, params: PluginParams | None = None) -> None:
        super().__init__(name, params)
        self._ticks: list[int] = []
        self._out: list[float] = []

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        n = len(priorities)
        if len(self._ticks) != n:
            self._ticks = [0] * n
            self._out = [1.0] * n
        out = self._out  # reused: callers read it before the next call
        if n < 2:
            return out
        if saturation >= 1.0:
            for i in range(1, n):
                out[i] = 0.0
            return out
        step = saturation / (n - 1)
        period = int(saturation / (1.0 - saturation) + 0.5)  # round half away from zero, as the reference
        ticks = self._ticks
        for i in range(1, n):
            if saturation < 1.0 - i * step or period <= 1:
                out[i] = 1.0
                continue
            ticks[i] += 1
            if ticks[i] >= period:
                ticks[i] = 0
                out[i] = 1.0
            else:
                out[i] = 0.0
        return out
