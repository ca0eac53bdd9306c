"""Simulated time: the wall clock sped up by ``time_scale``.

Everything the engine measures or reports (TTFT/ITL histograms, latency flags) is in simulated seconds.
A client that measures wall-clock latency multiplies by ``time_scale`` to compare with simulated figures.
"""

from __future__ import annotations

import math
import time


class SimClock:
    def __init__(self, time_scale: float = 1.0) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError("time_scale must be a finite number > 0")
        self.time_scale = time_scale

    def now(self) -> float:
        """Simulated seconds on a monotonic clock (arbitrary origin)."""
        return time.monotonic() * self.time_scale

    def to_wall(self, sim_seconds: float) -> float:
        return sim_seconds / self.time_scale

    def to_sim(self, wall_seconds: float) -> float:
        return wall_seconds * self.time_scale
