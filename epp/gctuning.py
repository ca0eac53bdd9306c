"""The cyclic garbage collector's settings for a serving process (`epp`, the P/D sidecar)."""

from __future__ import annotations

import gc

# CPython's cyclic GC with its default thresholds (700, 10, 10) took ~40% of the request path's CPU: a
# request allocates about a thousand short-lived containers, so young collections ran every request and
# middle ones every few. Almost everything dies by reference counting; the cycle collector only has to
# find the rare cycle (asyncio tracebacks), so it can run 30x less often (benchmarks/EXTPROC.md).
GC_THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    """For a serving process, once everything long-lived is built: move it out of the collector's way
    (`gc.freeze`) and collect young cycles less often. Not for test processes (frozen objects stay)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
