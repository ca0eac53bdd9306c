"""One hot prefix: every request opens with the same system prompt (one chat app), in simulated time.

    .venv/bin/python -m benchmarks.des.hot_prefix [--seeds 1-5] [--rates 3,6,9,12] [--json PATH]

The benchmark workloads spread their prefixes (150 groups, 8 apps), which hides what prefix affinity does
when one prefix carries the traffic: no load score outweighs a 79% prefix match, so every request goes to the
pod that cached the prompt first while the others idle. This run shows it and what the escape hatch in the
default profile (`load-balance-filter`, smg's balance rule on in-flight requests) does about it.

Set-up as the live runs (``benchmarks.workloads`` scale: 4 pods, token unit 16, time scale 4, the EPP's refresh
and per-request latency in simulated time; ``benchmarks.des.precise.options``): one 1,500-token system prompt,
each request its own 400-token question and 300 output tokens (the multi-turn workload's first turn), Poisson
arrivals at each rate (requests/s over 4 pods) for 60 simulated s, each stage starting on drained pods.
Contenders: the built-in default, the default without its escape hatch (the default until 2026-11-25), the
reference's optimized-baseline and load-only (cache-blind, the balance floor). Prints TTFT p90 and the busiest
pod's share of the stage's requests.

``--check-seeds`` also runs the live shared-prefix and no-sharing workloads (same scale and ladders) with the
default and without its escape hatch, and counts the requests the hatch sends to another pod: what it costs the
workloads where affinity should not yield.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.des.policies import policy_config
from benchmarks.des.precise import cell, live_schedule, options, seed_list, seed_median
from benchmarks.des.sim import SimResult, simulate
from benchmarks.des.workload import NoSharing, Schedule, SharedPrefix, Stage, schedule
from benchmarks.precise_routing import SCENARIOS
from benchmarks.workloads import FULL_RATES, Scale, build, kv_blocks_per_pod
from benchmarks.workloads import NoSharing as LiveNoSharing

ROOT = Path(__file__).resolve().parents[2]
CONTENDERS = {  # name → a named DES policy or a config file under the repository root
    "default": "default",
    "default-no-hatch": "benchmarks/configs/default-no-hatch.yaml",
    "optimized-baseline": "optimized-baseline",
    "load-only": "load-only",
}
RATES = (3.0, 6.0, 9.0, 12.0)
STAGE_S = 60.0
SYSTEM, QUESTION, OUTPUT = 1500, 400, 300  # real tokens


def one_app_schedule(scale: Scale, seed: int, rates: list[float], stage_s: float = STAGE_S) -> Schedule:
    n = round(sum(rates) * stage_s * 2) + 100  # distinct questions: more than the requests sent
    workload = SharedPrefix(
        num_groups=1,
        prompts_per_group=n,
        system_prompt_len=scale.tokens(SYSTEM),
        question_len=scale.tokens(QUESTION),
        output_len=scale.tokens(OUTPUT),
        seed=seed,
    )
    return schedule(workload, [Stage(r, stage_s) for r in rates], seed=seed)


def no_sharing_schedule(scale: Scale, seed: int) -> Schedule:
    """The live no-sharing workload (its length ranges and ladder) in DES form."""
    live = build("no-sharing", scale, quick=False, seed=seed)
    assert isinstance(live, LiveNoSharing)
    prompt = (scale.tokens(live.input_tokens[0]), scale.tokens(live.input_tokens[1]))
    output = (scale.tokens(live.output_tokens[0]), scale.tokens(live.output_tokens[1]))
    workload = NoSharing(prompt_len=prompt, output_len=output, seed=seed)
    return schedule(workload, [Stage(s.rate, s.duration, s.warmup) for s in live.stages], seed=seed)


def rerouted(scale: Scale, seeds: list[int], configs: tuple[str, str]) -> list[dict[str, Any]]:
    """Per benchmark workload and seed: requests the second config sends to another pod than the first."""
    rows = []
    for workload in ("shared-prefix", "no-sharing"):
        for seed in seeds:
            kv_blocks, _ = kv_blocks_per_pod(scale, seed)
            sched = (
                live_schedule(scale, seed, FULL_RATES)[0]
                if workload == "shared-prefix"
                else no_sharing_schedule(scale, seed)
            )
            base, other = (_pods(simulate(sched, options(scale, kv_blocks, c, SCENARIOS[0], seed))) for c in configs)
            moved = sum(1 for i, pod in other.items() if base.get(i) != pod)
            rows.append({"workload": workload, "seed": seed, "requests": len(base), "rerouted": moved})
            print(f"{workload} seed {seed}: {moved} of {len(base)} requests routed elsewhere", flush=True)
    return rows


def _pods(res: SimResult) -> dict[int, int]:
    return {r.index: r.pod for r in res.records}


def stage_rows(res: SimResult) -> list[dict[str, Any]]:
    """Per stage: the simulator's metrics plus the busiest pod's share of the stage's requests."""
    pods: list[Counter[int]] = [Counter() for _ in res.schedule.stages]
    for r in res.records:
        if r.pod >= 0:
            pods[r.stage][r.pod] += 1
    rows = []
    for stage, counts in zip(res.stages(), pods):
        total = sum(counts.values())
        rows.append({**stage, "busiest_pod_share": max(counts.values()) / total if total else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.des.hot_prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=seed_list, default=[1, 2, 3, 4, 5], help="e.g. 1-5 or 1,3")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES), help="requests/s over the 4 pods")
    p.add_argument("--stage-duration", type=float, default=STAGE_S, help="simulated s per stage")
    p.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    p.add_argument("--check-seeds", type=seed_list, default=[], help="also count what the hatch reroutes in the "
                   "shared-prefix and no-sharing workloads, e.g. 1-10")  # fmt: skip
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    scale = Scale()
    rates = [float(r) for r in a.rates.split(",") if r]
    names = [n for n in CONTENDERS if not a.only or n in a.only.split(",")]
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    configs = {name: policy_config(str(ROOT / policy) if policy.endswith(".yaml") else policy)
               for name, policy in CONTENDERS.items()}  # fmt: skip
    for seed in a.seeds:
        kv_blocks, _ = kv_blocks_per_pod(scale, seed)
        sched = one_app_schedule(scale, seed, rates, a.stage_duration)
        for name in names:
            res = simulate(sched, options(scale, kv_blocks, configs[name], SCENARIOS[0], seed))
            stages = stage_rows(res)
            results.append({"seed": seed, "contender": name, "stages": stages, "wall_s": res.wall_seconds})
            cells = "  ".join(cell(s["ttft_p90_s"], s["busiest_pod_share"]) for s in stages)
            print(f"seed {seed} {name:22} {cells}   ({res.wall_seconds:.0f}s wall, "
                  f"{time.monotonic() - t0:.0f}s in)", flush=True)  # fmt: skip
    checks = rerouted(scale, a.check_seeds, (configs["default-no-hatch"], configs["default"]))
    listed = ", ".join(f"{r:g}" for r in rates)
    print(f"\nmedian over seeds: TTFT p90 s / busiest pod's share per stage (req/s {listed})")
    for name in names:
        runs = [r for r in results if r["contender"] == name]
        medians = [
            cell(seed_median(runs, k, "ttft_p90_s"), seed_median(runs, k, "busiest_pod_share"))
            for k in range(len(rates))
        ]
        print(f"  {name:22} " + "  ".join(medians))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        started = time.gmtime(time.time() - (time.monotonic() - t0))
        doc = {
            "argv": [x.replace(f"{ROOT}/", "") for x in (sys.argv[1:] if argv is None else argv)],
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", started),
            "rates": rates,
            "stage_s": a.stage_duration,
            "workload": {"system_tokens": SYSTEM, "question_tokens": QUESTION, "output_tokens": OUTPUT},
            "contenders": {n: CONTENDERS[n] for n in names},
            "runs": results,
            "benchmark_workloads": checks,
        }
        a.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
