"""Exponential backoff with full jitter, for reconnecting to the API server.

Jitter matters here: when the API server restarts, every EPP replica (and every other
controller) loses its watches at the same instant; without jitter they would all come
back in lock-step and hammer the new server together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    initial: float = 0.2  # seconds
    maximum: float = 30.0
    factor: float = 2.0
    _attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The next wait: uniform in [cap/2, cap], cap doubling per failure up to `maximum`."""
        cap = min(self.maximum, self.initial * self.factor**self._attempt)
        self._attempt += 1
        return cap / 2 + self._rng.random() * cap / 2

    def reset(self) -> None:
        self._attempt = 0

    @property
    def failures(self) -> int:
        return self._attempt
