"""CLI: ``python -m benchmarks.des --pods 64 --policy random,default,optimized-baseline --qps 10,20,40``.

Runs the schedule once per policy (same arrivals, same prompts), prints a table per policy and a
side-by-side comparison, and writes the JSON to ``benchmarks/results/des/`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.des.results import format_table
from benchmarks.des.sim import SimOptions, SimResult, simulate
from benchmarks.des.workload import NoSharing, SharedPrefix, Stage, Workload, ladder, length_range, schedule

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results" / "des"


def _floats(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or any(not v > 0 for v in values):  # `not v > 0` also rejects NaN
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" error
    return parse


def _length(text: str) -> int | tuple[int, int]:
    """A token count, or a uniform range ``LOW:HIGH`` (checked as the workload checks it)."""
    low, sep, high = text.partition(":")
    try:
        value = (int(low), int(high)) if sep else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH, got {text!r}") from None
    try:
        length_range(value, "length")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}") from None
    return value


def _pod_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.des", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=_positive(int), default=8)
    p.add_argument(
        "--policy",
        default="default",
        help="comma-separated: random, load-only, prefix-only, default, optimized-baseline or config paths",
    )
    p.add_argument("--qps", type=_floats, default=[3.0, 10.0, 15.0], help="QPS ladder, e.g. 10,20,40")
    p.add_argument("--stage-duration", type=_positive(float), default=30.0, help="simulated seconds per stage")
    p.add_argument("--warmup-qps", type=float, default=0.0, help="a warm-up stage at this rate first (0 = none)")
    p.add_argument("--warmup-duration", type=float, default=50.0)
    p.add_argument("--workload", choices=("shared-prefix", "no-sharing"), default="shared-prefix")
    p.add_argument("--groups", type=int, default=150)
    p.add_argument("--prompts-per-group", type=int, default=5)
    p.add_argument("--system-len", type=int, default=6000, help="shared system prompt tokens")
    p.add_argument("--question-len", type=int, default=1200)
    p.add_argument("--prompt-len", type=_length, default=1000, help="no-sharing prompt tokens, or LOW:HIGH (uniform)")
    p.add_argument("--output-len", type=_length, default=1000, help="output tokens (no-sharing: also LOW:HIGH)")
    p.add_argument("--profile", default="qwen3-32b-h100-tp2", help="simulator latency profile (name or YAML path)")
    p.add_argument(
        "--pod-config",
        type=_pod_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="PodConfig field on top of the profile, e.g. kv_cache_size=4000 (repeatable)",
    )
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=0.05,
        help="simulated seconds between endpoint metrics refreshes (0 = fresh at every decision)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="request timeout, simulated seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help=f"JSON output (default: {RESULTS_DIR}/des-<time>.json)")
    p.add_argument("--no-json", action="store_true")
    return p  # fmt: skip


def make_workload(args: argparse.Namespace) -> Workload:
    if args.workload == "no-sharing":
        return NoSharing(prompt_len=args.prompt_len, output_len=args.output_len, seed=args.seed)
    assert isinstance(args.output_len, int)  # main() rejects a range for shared-prefix
    return SharedPrefix(
        num_groups=args.groups,
        prompts_per_group=args.prompts_per_group,
        system_prompt_len=args.system_len,
        question_len=args.question_len,
        output_len=args.output_len,
        seed=args.seed,
    )


def speed_line(result: SimResult) -> str:
    sp = result.speed()
    return (
        f"  simulated {sp['simulated_s']:.1f} s in {sp['wall_s']:.1f} s wall: "
        f"{sp['sim_s_per_wall_s']:.2f} sim-s/wall-s, {sp['requests_per_wall_s']:.0f} requests/wall-s, "
        f"{sp['output_tokens_per_wall_s']:.0f} output tokens/wall-s, EPP {sp['epp_us_per_request']:.0f} µs/decision"
    )


def comparison_table(results: list[SimResult]) -> str:
    """TTFT p90 / hit rate / output tok/s per stage, one column group per policy."""
    names = [Path(r.options.policy).stem if "/" in r.options.policy else r.options.policy for r in results]
    stages = [r.stages() for r in results]
    head = f"{'qps':>7} " + " ".join(f"{n[:26]:>26}" for n in names)
    sub = f"{'':>7} " + " ".join(f"{'ttft p90 ms':>11} {'hit':>5} {'tok/s':>8}" for _ in names)
    lines = [head, sub]
    for k, row in enumerate(stages[0]):
        cells = []
        for st in stages:
            r = st[k]
            p90 = "-" if r["ttft_p90_s"] is None else f"{r['ttft_p90_s'] * 1e3:.0f}"
            hit = "-" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.2f}"
            tps = "-" if r["output_tokens_per_s"] is None else f"{r['output_tokens_per_s']:.0f}"
            cells.append(f"{p90:>11} {hit:>5} {tps:>8}")
        lines.append(f"{row['qps']:>7g} " + " ".join(cells) + (" (warm-up)" if row["warmup"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.workload != "no-sharing" and not isinstance(args.output_len, int):
        p.error("argument --output-len: a LOW:HIGH range is for --workload no-sharing")
    workload = make_workload(args)
    warmup = Stage(args.warmup_qps, args.warmup_duration, warmup=True) if args.warmup_qps > 0 else None
    sched = schedule(workload, ladder(args.qps, args.stage_duration, warmup), seed=args.seed)
    print(
        f"DES: {args.pods} pods ({args.profile}), {len(sched.arrivals)} requests over {sched.end:g} simulated s, "
        f"workload {workload.describe()}, metrics refresh {args.refresh_interval * 1e3:g} ms",
        flush=True,
    )
    results = []
    for policy in [p.strip() for p in args.policy.split(",") if p.strip()]:
        options = SimOptions(
            pods=args.pods,
            policy=policy,
            profile=args.profile,
            pod_overrides=dict(args.pod_config),
            refresh_interval=args.refresh_interval,
            request_timeout=args.timeout,
            seed=args.seed,
        )
        result = simulate(sched, options)
        results.append(result)
        print()
        print(format_table(result.stages(), f"policy {policy} (latencies in ms)"))
        print(speed_line(result), flush=True)
    if len(results) > 1:
        print()
        print(comparison_table(results))
    if not args.no_json:
        out = args.out or RESULTS_DIR / f"des-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                   "runs": [r.to_json() for r in results]}, indent=1))  # fmt: skip
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
