"""The precise-vs-approximate prefix comparison (``benchmarks.precise_routing``) in simulated time.

    .venv/bin/python -m benchmarks.des.precise [--seeds 1-4] [--scenarios 1-epp,evict,2-replicas]
                                               [--profile default] [--rates 10,15,20,25,30] [--config P=path]

Same set-up as the live run: the scaled canonical shared-prefix workload (``benchmarks.workloads``: 4 pods,
75 groups, token unit 16, KV sized so the ideal prefix footprint is 73% of the cluster's), its warm-up
cycle and QPS ladder (canonical rates, halved for 4 pods; each stage starts when the previous one's requests
have finished, as the live ladder's do), the profile's two configs, and the three
scenarios (one EPP; 20% of pod 0's cache evicted every 30 simulated s; two replicas splitting the traffic).
The pods are the simulator's engines and the EPP its real pipeline (``benchmarks.des.sim``), with the
pods' KV events fed to precise producers in simulated time. A seed draws both the prompts and the arrivals,
so several seeds show what is routing and what is the luck of one draw, in minutes instead of hours.

Prints TTFT p90 and hit rate per stage and seed, then the median over seeds; ``--json`` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.des.sim import Eviction, SimOptions, simulate
from benchmarks.des.workload import Schedule, SharedPrefix, Stage, schedule
from benchmarks.precise_routing import PRODUCERS, PROFILES, SCENARIOS, Scenario
from benchmarks.workloads import (
    FULL_RATES,
    ITL_MS,
    MAX_MODEL_LEN,
    PREFILL_MS_PER_TOKEN,
    PROFILE,
    Scale,
    kv_blocks_per_pod,
    shared_prefix_stages,
)
from llmepp.plugins.producers.precise_prefix import PrecisePrefixCacheProducer
from llmepp.units import parse_duration

LIVE_TIME_SCALE = 4.0  # the live run's: wall-clock intervals of the EPP are this many simulated seconds
EPP_REFRESH_WALL = 0.050  # s, the EPP's metrics refresh interval
REQUEST_LATENCY_WALL = 0.004  # s, Envoy + ext_proc + HTTP per request, measured (benchmarks/DES.md)
REQUEST_TIMEOUT = 420.0  # simulated s, the live client's total timeout
FIRST_TOKEN_TIMEOUT = 300.0  # simulated s, the live client's time-to-first-token timeout


def live_schedule(scale: Scale, seed: int, rates: Sequence[float]) -> tuple[Schedule, int]:
    """The live shared-prefix workload in DES form (token-id prompts of the same lengths) and its pods' KV."""
    kv_blocks, live = kv_blocks_per_pod(scale, seed)
    workload = SharedPrefix(
        num_groups=live.groups,
        prompts_per_group=live.per_group,
        system_prompt_len=scale.tokens(live.system_tokens),
        question_len=scale.tokens(live.question_tokens),
        output_len=scale.tokens(live.output_tokens),
        seed=seed,
    )
    specs = shared_prefix_stages(scale, rates, live.groups * live.per_group)
    stages = [Stage(s.rate, s.duration, s.warmup) for s in specs]
    return schedule(workload, stages, seed=seed), kv_blocks


def live_durations(config: str) -> str:
    """`config` with the precise producer's speculative durations as the live run has them in simulated time:
    the EPP times them on the wall clock, which the live run's time scale stretches (2 s of `speculativeTTL`
    are 8 simulated s there); the DES times them on the simulated clock."""
    document = yaml.safe_load(config)
    defaults = PrecisePrefixCacheProducer.Params()
    for plugin in document.get("plugins") or []:
        if plugin.get("type") != PrecisePrefixCacheProducer.type:
            continue
        params = plugin["parameters"] = plugin.get("parameters") or {}  # absent or `parameters:` (null)
        for key, default in (("speculativeTTL", defaults.speculative_ttl),
                             ("speculativeMaxHold", defaults.speculative_max_hold)):  # fmt: skip
            params[key] = f"{parse_duration(params.get(key, default)) * LIVE_TIME_SCALE:g}s"
    return yaml.safe_dump(document, sort_keys=False)


def options(scale: Scale, kv_blocks: int, config: str, scenario: Scenario, seed: int) -> SimOptions:
    """The live run's set-up in simulated time, routing with `config` (EndpointPickerConfig YAML)."""
    k = scale.token_unit
    return SimOptions(
        pods=scale.pods,
        epp_config=live_durations(config),
        profile=PROFILE,
        pod_overrides={
            "prefill_time_per_token": PREFILL_MS_PER_TOKEN * k,
            "inter_token_latency": ITL_MS * k,
            "kv_cache_size": kv_blocks,
            "block_size": scale.block_size,
            "max_model_len": MAX_MODEL_LEN // k,
            "max_num_seqs": scale.max_num_seqs,
        },
        refresh_interval=EPP_REFRESH_WALL * LIVE_TIME_SCALE,
        request_latency=REQUEST_LATENCY_WALL * LIVE_TIME_SCALE,
        request_timeout=REQUEST_TIMEOUT,
        first_token_timeout=FIRST_TOKEN_TIMEOUT,
        seed=seed,
        replicas=scenario.replicas,
        eviction=Eviction(seed=seed) if scenario.evict else None,
        drain_between_stages=True,
    )


def seed_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _row(stage: dict[str, Any]) -> tuple[float | None, float | None]:
    return stage["ttft_p90_s"], stage["prefix_hit_rate"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.des.precise", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=seed_list, default=[1, 2, 3, 4], help="e.g. 1-4 or 1,3")
    p.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS))
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--rates", default=",".join(str(r) for r in FULL_RATES), help="canonical QPS")
    p.add_argument("--config", action="append", default=[], metavar="NAME=PATH",
                   help="an extra contender (another config), e.g. mine=benchmarks/configs/x.yaml")  # fmt: skip
    p.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    scale = Scale()
    rates = [float(r) for r in a.rates.split(",") if r]
    scenarios = [s for s in SCENARIOS if s.key in a.scenarios.split(",")]
    configs: dict[str, Path] = {name: PROFILES[a.profile][name] for name in PRODUCERS}
    for item in a.config:
        name, _, path = item.partition("=")
        configs[name] = Path(path)
    if a.only:
        configs = {n: c for n, c in configs.items() if n in a.only.split(",")}
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for seed in a.seeds:
        sched, kv_blocks = live_schedule(scale, seed, rates)
        for scenario in scenarios:
            for name, config in configs.items():
                res = simulate(sched, options(scale, kv_blocks, config.read_text(), scenario, seed))
                stages = [s for s in res.stages() if not s["warmup"]]
                results.append({"seed": seed, "scenario": scenario.key, "contender": name, "stages": stages,
                                "wall_s": res.wall_seconds})  # fmt: skip
                cells = "  ".join(f"{cell(*_row(s))}" for s in stages)
                print(f"seed {seed} {scenario.key:10} {name:16} {cells}   ({res.wall_seconds:.0f}s wall, "
                      f"{time.monotonic() - t0:.0f}s in)", flush=True)  # fmt: skip
    print("\nmedian over seeds: TTFT p90 s / hit rate per stage (QPS " + ", ".join(f"{r / 2:g}" for r in rates) + ")")
    stage_ids = range(len(rates))
    for scenario in scenarios:
        for name in configs:
            runs = [r for r in results if r["scenario"] == scenario.key and r["contender"] == name]
            medians = [
                cell(seed_median(runs, k, "ttft_p90_s"), seed_median(runs, k, "prefix_hit_rate")) for k in stage_ids
            ]
            print(f"  {scenario.key:10} {name:16} " + "  ".join(medians))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"argv": argv, "profile": a.profile, "rates": rates, "configs": {n: str(c) for n, c in configs.items()},
               "runs": results}  # fmt: skip
        a.json.write_text(json.dumps(doc, indent=1))
    return 0


def seed_median(runs: list[dict[str, Any]], stage: int, metric: str) -> float | None:
    """The median over `runs` (one per seed) of a stage's metric, its missing values left out."""
    values = [r["stages"][stage][metric] for r in runs if r["stages"][stage][metric] is not None]
    return statistics.median(values) if values else None


def cell(ttft: float | None, hit: float | None) -> str:
    """`TTFT/fraction` for the printed tables (a hit rate here, a pod's share in hot_prefix)."""
    t = "-" if ttft is None else f"{ttft:6.2f}"
    h = "-" if hit is None else f"{hit:4.2f}"
    return f"{t}/{h}"


if __name__ == "__main__":
    raise SystemExit(main())
