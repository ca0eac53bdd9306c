"""Pool saturation per disaggregation stage, as the dispatcher gates on it.

Endpoints are split by their `llm-d.ai/role` label: prefill-only roles form the prefill
stage, encode-only endpoints are left out, everything else (including unlabelled pods)
is the decode stage. effective = max over the non-empty stages, so a P/D pool is full when
either side is. An empty pool reads the detector's empty-pool value (1.0: gated); a NaN reading
counts as 1.0 too (it compares false both ways, so it would gate nothing), a negative one as 0.

The split is cached per `datastore.endpoints` tuple (replaced only on membership change);
the value is reused for the detector's `max_cache_age` unless membership changed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.flowcontrol.interfaces import SaturationDetector

ROLE_LABEL = "llm-d.ai/role"
PREFILL_ROLES = frozenset({"prefill", "encode-prefill"})
ENCODE_ROLES = frozenset({"encode"})


def _sane(value: float) -> float:
    """A reading outside [0, ∞]: NaN (the detector could not tell) counts as full, a negative one as idle."""
    return 1.0 if value != value else 0.0


class StagedSaturation:
    """effective = max(detector(prefill endpoints), detector(decode endpoints))."""

    __slots__ = ("_at", "_decode", "_key", "_max_age", "_prefill", "decode", "detector", "effective", "prefill")

    def __init__(self, detector: SaturationDetector) -> None:
        self.detector = detector
        self._key: Sequence[Endpoint] | None = None
        self._prefill: list[Endpoint] = []
        self._decode: Sequence[Endpoint] = ()
        # Last computed values per stage, for the pool-saturation gauge (None: no such stage).
        self.prefill: float | None = None
        self.decode: float | None = None
        self.effective = 0.0
        # Reuse window (real time, so injected test clocks cannot freeze it).
        self._max_age = detector.max_cache_age
        self._at = -1.0

    def _split(self, pool: Sequence[Endpoint]) -> None:
        prefill: list[Endpoint] = []
        decode: list[Endpoint] = []
        for ep in pool:
            role = ep.labels.get(ROLE_LABEL, "")
            if role in PREFILL_ROLES:
                prefill.append(ep)
            elif role not in ENCODE_ROLES:
                decode.append(ep)
        self._prefill = prefill
        # The common case (no P/D) keeps the pool object itself: no copy per cycle.
        self._decode = pool if len(decode) == len(pool) else decode
        self._key = pool

    def __call__(self, pool: Sequence[Endpoint], now: float) -> float:
        if pool is not self._key:
            self._split(pool)
        elif self._max_age and time.perf_counter() - self._at < self._max_age:
            return self.effective
        if self._max_age:
            self._at = time.perf_counter()
        detector = self.detector
        if not self._prefill:
            self.prefill = None
            value = detector.saturation(self._decode, now)
            if not value >= 0.0:  # NaN or negative: rare
                value = _sane(value)
            self.decode = self.effective = value
            return value
        prefill = detector.saturation(self._prefill, now)
        if not prefill >= 0.0:
            prefill = _sane(prefill)
        self.prefill = prefill
        if self._decode:
            stale = detector.stale_endpoints
            decode = detector.saturation(self._decode, now)
            if not decode >= 0.0:
                decode = _sane(decode)
            self.decode = decode
            detector.stale_endpoints += stale
            value = max(prefill, decode)
        else:
            self.decode = None
            value = prefill
        self.effective = value
        return value

    def stages(self) -> dict[str, float]:
        out = {"effective": self.effective}
        if self.prefill is not None:
            out["prefill"] = self.prefill
        if self.decode is not None:
            out["decode"] = self.decode
        return out
