"""Simulated-time mode of the benchmarks: a discrete-event simulation of the EPP routing to simulated pods.

The real EPP pipeline (config loader, director, plugins) routes every request to ``llmepp_sim`` engines (the
same engine class the live simulator pods run), all on a virtual-time asyncio loop: no sockets, no wall
clock, deterministic for a seed. See ``benchmarks/DES.md`` for how it works, its validation against a live
run and what it does not model.

    python -m benchmarks.des --pods 64 --policy random,default,optimized-baseline --qps 128,384,640

For ``benchmarks/run_all.py``: ``run_suite(quick: bool) -> dict`` (JSON-able, writes no files).
Programmatic use: ``simulate(schedule(workload, stages, seed), SimOptions(...)) -> SimResult``.
"""

from benchmarks.des.sim import SimOptions, SimResult, simulate
from benchmarks.des.suite import run_suite
from benchmarks.des.workload import NoSharing, SharedPrefix, Stage, ladder, schedule

__all__ = [
    "NoSharing",
    "SharedPrefix",
    "SimOptions",
    "SimResult",
    "Stage",
    "ladder",
    "run_suite",
    "schedule",
    "simulate",
]
