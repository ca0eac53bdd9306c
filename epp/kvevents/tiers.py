"""KV-cache device tiers and their match weights (`indexerConfig.kvCacheBackendConfigs`).

A block the engine holds on GPU is worth a full block of prefill; one offloaded to CPU memory must be
copied back first, so it counts less (reference defaults: gpu 1.0, cpu 0.8). Events name the tier in
`medium` ("GPU", "CPU", ...; absent = GPU). A (key, pod) pair held on several tiers counts with its
best tier. Tiers are bits (at most 8), so a pair's tiers fit one small int.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TIERS: tuple[tuple[str, float], ...] = (("gpu", 1.0), ("cpu", 0.8))
MAX_TIERS = 8
_MEMO = 64


class TierTable:
    def __init__(self, tiers: Sequence[tuple[str, float]] = DEFAULT_TIERS) -> None:
        if not tiers:
            raise ValueError("kvCacheBackendConfigs: at least one tier is needed")
        if len(tiers) > MAX_TIERS:
            raise ValueError(f"kvCacheBackendConfigs: at most {MAX_TIERS} tiers")
        self.names = [name.lower() for name, _ in tiers]
        if len(set(self.names)) != len(self.names):
            raise ValueError("kvCacheBackendConfigs: tier names must be unique")
        weights = [float(w) for _, w in tiers]
        if any(w < 0 for w in weights):
            raise ValueError("kvCacheBackendConfigs: weights must be >= 0")
        self._bits = {name: 1 << i for i, name in enumerate(self.names)}
        # Medium → bit, memoised for the spellings seen on the wire ("GPU", "gpu", None).
        self._by_medium: dict[str | None, int] = {None: self._bits.get("gpu", 1)}
        # Best weight for every tier mask.
        self.weight_of: list[float] = [0.0] * (1 << len(weights))
        for mask in range(1, len(self.weight_of)):
            self.weight_of[mask] = max(w for i, w in enumerate(weights) if mask >> i & 1)
        self.top = max(weights)

    def bit(self, medium: str | None) -> int:
        """The tier bit of an event's medium; 0 for a tier no config names (not indexed)."""
        found = self._by_medium.get(medium)
        if found is None:
            found = self._bits.get(str(medium).lower(), 0)
            if len(self._by_medium) < _MEMO:  # a publisher chooses the strings: memoise a bounded few
                self._by_medium[medium] = found
        return found

    def name_of(self, bit: int) -> str:
        return self.names[bit.bit_length() - 1]
