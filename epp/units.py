"""Durations and byte sizes as the reference spells them (YAML config and CLI flags).

Durations follow Go's `time.ParseDuration` ("60s", "200ms", "1m30s", "0"); a bare YAML
number is seconds. Sizes follow Kubernetes quantities ("1G" = 10⁹, "1Gi" = 2³⁰, "500M",
"64Ki", "1e9"), with an optional trailing "B" ("1GB", "1GiB"), or a plain integer of bytes.
Both raise ValueError with a message meant to follow a field path. `go_round` rounds as the
reference's formulas do (Go's math.Round).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(?:\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?B?|[eE]([+-]?\d{1,3}))$")
_SIZE_UNITS = {
    "": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


# Go's time.Duration is int64 nanoseconds: the reference's parser refuses anything longer (~292 years).
MAX_DURATION = (2**63 - 1) / 1e9


def parse_duration(value: str | int | float) -> float:
    """Seconds from a Go duration string or a number of seconds; never negative."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '60s' or '200ms', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        if text in ("0", "0.0"):
            return 0.0
        seconds = 0.0
        pos = 0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or pos == 0:
            raise ValueError(f"invalid duration {value!r} (examples: 60s, 200ms, 1m30s)")
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"duration must be a finite value >= 0, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is out of range (at most {MAX_DURATION:.0f}s, about 292 years)")
    return seconds


def parse_bytes(value: str | int) -> int:
    """Bytes from a Kubernetes quantity ("1Gi", "500M"), "1GB"/"1GiB", or an integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size like '1Gi' or '500M', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"byte size must be >= 0, got {value}")
        return value
    m = _SIZE.match(value.strip())
    if not m:
        raise ValueError(f"invalid byte size {value!r} (examples: 1Gi, 500M, 1e9, 1048576)")
    number = Decimal(m.group(1))  # exact: a float would round sizes past 2**53
    size = number.scaleb(int(m.group(3))) if m.group(3) else number * _SIZE_UNITS[m.group(2) or ""]
    return math.ceil(size)  # a fraction of a byte rounds up, as Kubernetes' Quantity.Value()


def go_round(x: float) -> int:
    """Go's math.Round for a finite x ≥ 0: a half rounds up (Python's round() rounds it to even)."""
    r = math.floor(x)
    return r + 1 if x - r >= 0.5 else r
