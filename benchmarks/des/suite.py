"""Canned DES experiments: the policy comparison at scale and the metrics-staleness sweep.

``run_suite(quick)`` is the entry point for ``benchmarks/run_all.py``: it returns JSON-able results and
writes nothing. ``benchmarks/des_validate.py`` uses the same functions for ``benchmarks/DES.md``.

Scale workload: the ``shared_prefix_synthetic`` shape of llm-d-benchmark (2048-token system prompts,
256-token questions, 256 output tokens) with 8 prefix groups per pod x 4 questions, so all the system prompts
together are pods / 18.75 times one pod's KV cache (13.7x at 256 pods, 3.4x at 64: a cache-blind router cannot
keep them resident; an affine one can).
Pods use the ``qwen3-32b-h100-tp2`` profile. The QPS ladder is per pod so it scales with the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.des.sim import SimOptions, SimResult, simulate
from benchmarks.des.workload import SharedPrefix, Stage, ladder, schedule

SCALE_POLICIES = ("random", "default", "optimized-baseline")
STALENESS_INTERVALS = (0.0, 0.01, 0.05, 0.1, 0.5)
SCALE_QPS_PER_POD = (2.0, 6.0, 10.0, 14.0)
PROFILE = "qwen3-32b-h100-tp2"


def scale_workload(pods: int, seed: int = 0) -> SharedPrefix:
    return SharedPrefix(
        num_groups=8 * pods,
        prompts_per_group=4,
        system_prompt_len=2048,
        question_len=256,
        output_len=256,
        seed=seed,
    )


def summarize(result: SimResult) -> dict[str, Any]:
    """A run's JSON without the per-pod detail (what the suite returns)."""
    out = result.to_json()
    out.pop("pods_detail", None)
    return out


def scale_run(
    pods: int,
    qps_per_pod: Sequence[float],
    stage_duration: float,
    policies: Sequence[str] = SCALE_POLICIES,
    refresh_interval: float = 0.05,
    seed: int = 0,
    warmup_qps_per_pod: float = 0.0,
    warmup_duration: float = 10.0,
) -> list[SimResult]:
    """The same arrivals through each policy on ``pods`` pods."""
    warmup = Stage(warmup_qps_per_pod * pods, warmup_duration, warmup=True) if warmup_qps_per_pod > 0 else None
    sched = schedule(scale_workload(pods, seed), ladder([q * pods for q in qps_per_pod], stage_duration, warmup), seed)
    return [
        simulate(sched, SimOptions(pods=pods, policy=p, profile=PROFILE, refresh_interval=refresh_interval, seed=seed))
        for p in policies
    ]


def staleness_sweep(
    pods: int,
    qps_per_pod: float,
    stage_duration: float,
    intervals: Sequence[float] = STALENESS_INTERVALS,
    policy: str = "load-only",
    seed: int = 0,
    warmup_qps_per_pod: float = 0.0,
    warmup_duration: float = 20.0,
) -> list[SimResult]:
    """One stage at a fixed load with the metrics refresh interval varied (0 = fresh at every decision).

    With ``warmup_qps_per_pod`` a warm-up stage at that rate (reported separately, excluded from the
    comparison) first sends every prompt once, so an affine policy starts from warm caches rather than
    from a cold backlog. ``load-only`` by default: its decisions rest entirely on the scraped queue / KV
    metrics, so staleness shows undiluted (prefix-aware policies also use router-local state, always fresh).
    """
    warmup = [Stage(warmup_qps_per_pod * pods, warmup_duration, warmup=True)] if warmup_qps_per_pod > 0 else []
    sched = schedule(scale_workload(pods, seed), [*warmup, Stage(qps_per_pod * pods, stage_duration)], seed)
    return [
        simulate(sched, SimOptions(pods=pods, policy=policy, profile=PROFILE, refresh_interval=i, seed=seed))
        for i in intervals
    ]


# (policy, QPS per pod, warm-up QPS per pod) of the staleness sweeps. A cache-blind policy prefills ~2.3k
# uncached tokens per request and sustains ~1.7 QPS per pod here; an affine one, once warm, > 14.
STALENESS_LOADS = (("load-only", 1.2, 0.0), ("default", 14.0, 2.0))


def staleness_runs(pods: int, stage_duration: float, intervals: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy, load, warmup in STALENESS_LOADS:
        sweep = staleness_sweep(pods, load, stage_duration, intervals, policy=policy, warmup_qps_per_pod=warmup)
        out[policy] = {"qps_per_pod": load, "warmup_qps_per_pod": warmup, "runs": [summarize(r) for r in sweep]}
    return out


def run_suite(quick: bool = False) -> dict[str, Any]:
    """Policy comparison at scale + staleness sweeps, in simulated time. JSON-able; writes no files.

    quick: 16 pods, 8 s stages, three refresh intervals (about 1.5 minutes on one core, 200 MB); full: 64 and
    256 pods, 15 s stages, five intervals on 32 pods (about 45 minutes on one core; 256 pods peak at ~3 GB RSS).
    """
    sizes: tuple[int, ...]
    intervals: tuple[float, ...]
    if quick:
        sizes, duration, stale_pods, stale_duration, intervals = (16,), 8.0, 16, 10.0, (0.0, 0.05, 0.5)
    else:
        sizes, duration, stale_pods, stale_duration, intervals = (64, 256), 15.0, 32, 30.0, STALENESS_INTERVALS
    scale = {str(n): [summarize(r) for r in scale_run(n, SCALE_QPS_PER_POD, duration)] for n in sizes}
    return {
        "mode": "des",
        "quick": quick,
        "profile": PROFILE,
        "workload": scale_workload(1).describe() | {"num_groups": "8 per pod"},
        "qps_per_pod": list(SCALE_QPS_PER_POD),
        "stage_duration_s": duration,
        "scale": scale,
        "staleness_pods": stale_pods,
        "staleness_stage_s": stale_duration,
        "staleness": staleness_runs(stale_pods, stale_duration, intervals),
    }
