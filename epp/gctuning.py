"""The cyclic garbage collector's settings for a serving process (`epp`, the P/D sidecar)."""

from __future__ import annotations

import gc

# CPython's cyclic GC with its default thresholds (700, 10, 10) runs young collections about every request: a
# request allocates about a thousand short-lived containers. Almost everything dies by reference counting; the
# collector only has to find the rare cycle (asyncio tracebacks), so it can run ~30x less often. Measured
# (benchmarks/EXTPROC.md): the stream logic with the default profile in-process 96 -> 59 us of CPU per request;
# end to end through the h2 server, 221 -> 206 us (noisy).
GC_THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    """For a serving process, once everything long-lived is built: move it out of the collector's way
    (`gc.freeze`) and collect young cycles less often. Not for test processes (frozen objects stay)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
