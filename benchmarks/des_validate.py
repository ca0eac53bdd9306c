"""Validate the simulated-time mode (DES) against a live run, then demonstrate it at scale. Writes benchmarks/DES.md.

    .venv/bin/python -m benchmarks.des_validate            # validation (~6 min live) + scale demo (~30 min)
    .venv/bin/python -m benchmarks.des_validate --quick    # shorter stages, 16/64-pod demo
    .venv/bin/python -m benchmarks.des_validate --skip-scale / --skip-live

Validation: the same schedule (same prompts, same Poisson arrival times) and the same EPP config run

* **live**: ``llmepp.testing.stack.Stack`` (real Envoy, the ``epp`` process, ``epp-sim`` pods on
  127.0.0.160+), an open-loop streaming client in this process; wall times x ``time_scale`` = simulated;
* **DES**: ``benchmarks.des.simulate`` with the same pod config and the EPP's metrics refresh interval
  converted to simulated time (50 ms wall x ``time_scale``).

Per stage it reports TTFT p50/p90, ITL p50, prefix hit rate and output tok/s for both and the relative
error (DES - live) / live; the target is |error| <= 20% for TTFT p90 and hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.des.policies import policy_config
from benchmarks.des.results import RequestRecord, format_table, stage_metrics
from benchmarks.des.sim import SimOptions, SimResult, simulate
from benchmarks.des.suite import PROFILE as SCALE_PROFILE
from benchmarks.des.suite import SCALE_QPS_PER_POD, STALENESS_INTERVALS, scale_run, staleness_runs, summarize
from benchmarks.des.workload import Arrival, Schedule, SharedPrefix, Stage, ladder, request_body, schedule
from llmepp.testing.stack import Stack, StackOptions

ROOT = Path(__file__).resolve().parent
OUTPUT = ROOT / "DES.md"
RESULTS = ROOT / "results" / "des"
FIRST_HOST = 160  # 127.0.0.160-199 are this benchmark's pod addresses
EPP_REFRESH_WALL = 0.050  # the EPP's default --refresh-metrics-interval (wall clock)

# The validation setup: 4 small-KV pods, so a cache-blind policy thrashes and an affine one does not.
PODS = 4
PROFILE = "llama-8b-h100"
POD_OVERRIDES: dict[str, Any] = {"kv_cache_size": 1000, "max_num_seqs": 32}
POLICIES = ("random", "default", "optimized-baseline")
CALIBRATION_REQUESTS = 20


TITLE = "# Simulated-time mode (DES): validation against a live run, and scale"
HOW_IT_WORKS = [
    "## How it works",
    "",
    "`python -m benchmarks.des` (package `benchmarks/des/`) runs the real routing code against the real "
    "simulator engine on a simulated clock:",
    "",
    "- **Virtual time** (`vloop.py`): an `asyncio` event loop whose `time()` is a simulated clock and whose "
    "selector never blocks: with nothing ready it jumps to the next timer. Tasks, futures, `call_soon`, "
    "`call_later`, `asyncio.sleep`, `wait_for` and `timeout` work unchanged; timers at the same instant fire in "
    "scheduling order; there is no I/O and no thread, so a run is deterministic.",
    "- **Pods** are `llmepp_sim.engine.Engine` objects, the same class the live `epp-sim` pods run, with their "
    "own step loops, on a `SimClock` subclass reading the loop's time. Only `SimPod`'s HTTP layer is left out. "
    "The engine needed no change for virtual time. Two per-token hot spots were made cheaper for speed "
    "(`_ensure_blocks` returns early while the last block has room; `_store_full_blocks` copies only the blocks "
    "it stores instead of the whole sequence every 16 tokens); `tests/des` checks the KV events, hits and "
    "timings are identical to the previous code, and the live simulator gets the same saving.",
    "- **EPP**: `llmepp.config.loader.build` + `llmepp.director.Director` with a `Datastore` of one endpoint per "
    "pod; each arrival is the JSON body the live client sends, parsed by `parse_request`, routed by "
    "`await director.handle_request`, then `response_first_chunk` / `response_complete` at the engine's "
    "first-token and finish events. Plugins' RNGs are seeded. A repeated prompt reuses its first parse and "
    "block hashes (parsing is a pure function of the body; a test checks the copy equals a real parse).",
    "- **Metrics** are refreshed from each engine (waiting, running, KV usage, block size/count) every "
    "`refresh_interval` of simulated time, the pool split into the live collector's 5 staggered slots; "
    "`0` = fresh at every decision.",
    "- **Clients** are open-loop Poisson stages (inference-perf's `shared_prefix` generator: shuffled prompt "
    "list, cycled; with `drain_between_stages`, as the live routing ladder and `benchmarks.des.precise`, each "
    "stage starts when the previous one's requests have finished), token-id prompts "
    '(`"prompt": [ids]`) so the EPP and the pods see exactly the live prompts; 300 s request timeout.',
    "- **KV events** (configs with a `precise-prefix-cache-producer`): each engine's block pool reports "
    "stored / removed blocks to a feed that batches them like the live publisher (a full batch of 16 events at "
    "once, a partial one `kv_event_delay` after its first change), encodes them in vLLM's wire format and hands the "
    "decoded batch to every EPP replica's `SourceIngest`, the sink its ZeroMQ subscriber feeds live; the "
    "index reads the loop's clock, so speculative entries lapse in simulated time (`benchmarks.des.precise` "
    "stretches `speculativeTTL` and `speculativeMaxHold` by the live run's time scale, 4, as the live run's wall "
    "clock does). Scenario options: "
    "`replicas` (independent EPPs from one config, arrivals alternating between them) and `eviction` (part "
    "of one pod's prefix cache evicted periodically behind the EPP's back, as `POST /admin/evict`). "
    "`python -m benchmarks.des.precise` runs the live precise benchmark's set-up this way.",
    "",
    "Not modelled: network, Envoy, HTTP and EPP CPU time (a constant `request_latency` can stand in for "
    "them; the validation measures it), scrape round trips, ZeroMQ loss and replay, flow control (its "
    "timers read the wall clock).",
    "",
    "Metric definitions (both modes): TTFT from arrival to first token; ITL = per-request mean "
    "(last - first token) / (tokens - 1), percentiles over requests; hit rate = cached / prompt tokens from "
    "the pods' usage; output tok/s = the stage's output tokens / (last completion - stage start); a request "
    "belongs to the stage it arrived in.",
    "",
]


def validation_workload(seed: int) -> SharedPrefix:
    # 24 system prompts of 1000 tokens (~1.5x one pod's 16k-token KV cache with the questions), 4 questions
    # of 200 tokens each, 64 output tokens.
    return SharedPrefix(
        num_groups=24, prompts_per_group=4, system_prompt_len=1000, question_len=200, output_len=64, seed=seed
    )


def sim_args(time_scale: float) -> list[str]:
    args = ["--latency-profile", PROFILE, "--time-scale", str(time_scale)]
    for key, value in POD_OVERRIDES.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# ---------------------------------------------------------------------------------------------- live
async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, rec: RequestRecord, scale: float, wall_timeout: float
) -> None:
    sent = time.monotonic()
    first = last = None
    usage: dict[str, Any] | None = None
    try:
        async with session.post(
            url,
            data=body,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=wall_timeout),
        ) as resp:
            pod = resp.headers.get("x-inference-pod", "")
            rec.pod = int(pod.rsplit("-", 1)[1]) if pod.startswith("sim-") else -1
            if resp.status != 200:
                rec.error = f"http-{resp.status}"
                await resp.read()
                return
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.monotonic()
                event = json.loads(line[6:])
                if event.get("choices"):
                    if first is None:
                        first = now
                    last = now
                if event.get("usage"):
                    usage = event["usage"]
    except (aiohttp.ClientError, TimeoutError) as e:
        rec.error = type(e).__name__
        return
    if first is None or last is None or usage is None:
        rec.error = "incomplete"
        return
    n = int(usage.get("completion_tokens", 0))
    rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
    rec.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    rec.output_tokens = n
    rec.ttft = (first - sent) * scale
    rec.itl = (last - first) / (n - 1) * scale if n > 1 else None
    rec.finished = rec.arrival + (last - sent) * scale


async def live_run(sched: Schedule, policy: str, time_scale: float, request_timeout: float) -> list[RequestRecord]:
    """Run the schedule through a real Stack; records in simulated seconds."""
    options = StackOptions(
        pods=PODS, sim_args=sim_args(time_scale), epp_config=policy_config(policy), first_host=FIRST_HOST
    )
    records: list[RequestRecord] = []
    workload = sched.workload
    async with Stack(options) as stack:
        url = f"{stack.url}/v1/completions"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = []
            start = time.monotonic()
            for a in sched.arrivals:
                body = request_body(workload.prompt(a.index))
                delay = start + a.time / time_scale - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = RequestRecord(a.index, a.stage, a.time)
                records.append(rec)
                tasks.append(
                    asyncio.create_task(_one(session, url, body, rec, time_scale, request_timeout / time_scale))
                )
            await asyncio.gather(*tasks)
    return records


def des_run(
    sched: Schedule, policy: str, time_scale: float, timeout: float, request_latency: float = 0.0, seed: int = 0
) -> SimResult:
    options = SimOptions(
        seed=seed,
        pods=PODS,
        policy=policy,
        profile=PROFILE,
        pod_overrides=dict(POD_OVERRIDES),
        refresh_interval=EPP_REFRESH_WALL * time_scale,
        request_timeout=timeout,
        request_latency=request_latency,
    )
    return simulate(sched, options)


def calibration_schedule() -> Schedule:
    """20 identical small requests, 0.5 s apart (never overlapping): TTFT = model + the stack's overhead."""
    workload = SharedPrefix(
        num_groups=1, prompts_per_group=1, system_prompt_len=200, question_len=56, output_len=4, seed=12345
    )
    return Schedule(workload, [Stage(2.0, 10.0)], [Arrival(i, 0.5 * i, 0) for i in range(CALIBRATION_REQUESTS)])


def calibrate(time_scale: float) -> dict[str, Any]:
    """The live stack's per-request overhead in simulated seconds: median(live TTFT - DES TTFT) of idle requests.

    It is what the DES does not model (client -> Envoy -> EPP -> pod and back, HTTP parsing, the EPP's
    ext_proc round trips, timer lateness), measured at idle; under load it is larger.
    """
    sched = calibration_schedule()
    live = asyncio.run(live_run(sched, "default", time_scale, 60.0))
    des = des_run(sched, "default", time_scale, 60.0)
    pairs = [(lv.ttft, ds.ttft) for lv, ds in zip(live, des.records) if lv.ttft is not None and ds.ttft is not None]
    diffs = sorted(lv - ds for lv, ds in pairs[1:])  # the first request warms up code paths
    if not diffs:
        raise RuntimeError("calibration failed: no successful request")
    return {
        "requests": len(pairs),
        "overhead_s": diffs[len(diffs) // 2],
        "overhead_min_s": diffs[0],
        "overhead_max_s": diffs[-1],
        "live_ttft_s": [lv for lv, _ in pairs],
        "des_ttft_s": [ds for _, ds in pairs],
    }


def _rel(des: float | None, live: float | None) -> float | None:
    if des is None or live is None or live == 0:
        return None
    return (des - live) / live


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def _summary(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    xs = [x for x in values if x is not None]
    return (_median(xs), min(xs), max(xs)) if xs else (None, None, None)


def compare(
    live_runs: list[list[dict[str, Any]]], des_runs: list[list[dict[str, Any]]], raw_runs: list[list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Per stage and metric: live and DES medians with their ranges (over live repeats / DES seeds) and the
    relative error of the DES median against the live median."""
    out = []
    for k, lv in enumerate(live_runs[0]):
        row: dict[str, Any] = {"qps": lv["qps"], "live_requests": lv["completed"],
                               "des_requests": des_runs[0][k]["completed"]}  # fmt: skip
        for key in ("ttft_p50_s", "ttft_p90_s", "itl_p50_s", "prefix_hit_rate", "output_tokens_per_s"):
            live, live_min, live_max = _summary([run[k][key] for run in live_runs])
            des, des_min, des_max = _summary([run[k][key] for run in des_runs])
            raw, _, _ = _summary([run[k][key] for run in raw_runs])
            row[key] = {
                "live": live, "live_min": live_min, "live_max": live_max,
                "des": des, "des_min": des_min, "des_max": des_max,
                "rel_error": _rel(des, live), "des_raw": raw, "rel_error_raw": _rel(raw, live),
            }  # fmt: skip
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- report
def machine() -> str:
    model = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"`nproc` = {os.cpu_count()}, `lscpu | grep 'Model name'` = {model}, Python {platform.python_version()}, "
        f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the machine is shared)"
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _range(m: dict[str, Any], side: str, fmt: Any) -> str:
    lo, hi = m[f"{side}_min"], m[f"{side}_max"]
    return f"{fmt(m[side])}" if lo == hi else f"{fmt(m[side])} [{fmt(lo)}-{fmt(hi)}]"


def validation_section(policy: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"#### `{policy}`",
        "",
        "| QPS | n | TTFT p50 live / DES (ms) | TTFT p90 live (ms) | TTFT p90 DES (ms) | TTFT p90 error "
        "| error, raw DES | hit rate live | hit rate DES | hit rate error | ITL p50 live / DES (ms) "
        "| out tok/s live / DES |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t50, t90, hit, itl, tps = (r[k] for k in ("ttft_p50_s", "ttft_p90_s", "prefix_hit_rate", "itl_p50_s",
                                                   "output_tokens_per_s"))  # fmt: skip
        lines.append(
            f"| {r['qps']:g} | {r['live_requests']} | {_ms(t50['live'])} / {_ms(t50['des'])} "
            f"| {_range(t90, 'live', _ms)} | {_range(t90, 'des', _ms)} "
            f"| {_pct(t90['rel_error'])} | {_pct(t90['rel_error_raw'])} "
            f"| {_range(hit, 'live', _num)} | {_range(hit, 'des', _num)} | {_pct(hit['rel_error'])} "
            f"| {_num(None if itl['live'] is None else itl['live'] * 1e3, 1)} / "
            f"{_num(None if itl['des'] is None else itl['des'] * 1e3, 1)} "
            f"| {_num(tps['live'], 0)} / {_num(tps['des'], 0)} |"
        )
    return lines


def _speed_text(speed: dict[str, Any]) -> str:
    return (
        f"{speed['simulated_s']:.1f} simulated s in {speed['wall_s']:.1f} s wall = "
        f"**{speed['sim_s_per_wall_s']:.2f} sim-s/wall-s**, {speed['requests_per_wall_s']:.0f} requests/wall-s, "
        f"{speed['output_tokens_per_wall_s']:.0f} output tokens/wall-s ({speed['requests']} requests"
        + (f"; EPP {speed['epp_us_per_request']:.0f} µs wall per routing decision)" if "epp_us_per_request" in speed
           else ")")
    )  # fmt: skip


def scale_section(pods: str, runs: list[dict[str, Any]]) -> list[str]:
    names = [r["policy"] for r in runs]
    lines = [
        f"#### {pods} pods",
        "",
        "Per policy: TTFT p50 / p90 / p99 (ms), ITL p50 (ms), prefix hit rate, output tok/s.",
        "",
        "| QPS | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for k, row in enumerate(runs[0]["stages"]):
        cells = []
        for run in runs:
            s = run["stages"][k]
            done = f" ({s['completed']}/{s['requests']} done)" if s["completed"] < s["requests"] else ""
            cells.append(
                f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p90_s'])} / {_ms(s['ttft_p99_s'])}, "
                f"{_num(None if s['itl_p50_s'] is None else s['itl_p50_s'] * 1e3, 1)}, "
                f"{_num(s['prefix_hit_rate'], 2)}, {_num(s['output_tokens_per_s'], 0)}{done}"
            )
        label = f"{row['qps']:g}" + (" (warm-up)" if row["warmup"] else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Simulation speed (one core):", ""]
    lines += [f"- `{r['policy']}`: {_speed_text(r['speed'])}" for r in runs]
    lines.append("")
    return lines


def staleness_section(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| refresh interval | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
        "| mean waiting queue / pod | hit rate |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        s = r["stages"][-1]
        interval = "fresh (0)" if r["refresh_interval_s"] <= 0 else f"{r['refresh_interval_s'] * 1e3:g} ms"
        lines.append(
            f"| {interval} | {_ms(s['ttft_p50_s'])} | {_ms(s['ttft_p90_s'])} | {_ms(s['ttft_p99_s'])} "
            f"| {_num(None if s['itl_p50_s'] is None else s['itl_p50_s'] * 1e3, 1)} "
            f"| {_num(s['mean_waiting_queue'], 2)} | {_num(s['prefix_hit_rate'], 2)} |"
        )
    return lines


def _meta(argv: list[str]) -> dict[str, str]:
    return {
        "command": ".venv/bin/python -m benchmarks.des_validate" + "".join(" " + a for a in argv),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _meta_lines(meta: dict[str, str]) -> list[str]:
    return [f"Command: `{meta['command']}`", "", f"Machine: {meta['machine']}.", "", f"Date: {meta['date']}.", ""]


# ---------------------------------------------------------------------------------------------- experiments
def run_validation(args: argparse.Namespace) -> dict[str, Any]:
    qps = [float(x) for x in args.qps.split(",")]
    duration = args.stage_duration or (20.0 if args.quick else 40.0)
    time_scale = args.time_scale
    reused: dict[str, Any] | None = None
    if args.reuse_live:
        # The live side of an earlier run (its schedule parameters, calibration and live stage metrics).
        reused = json.loads(args.reuse_live.read_text())["validation"]
        qps, duration, time_scale = reused["qps"], reused["stage_duration_s"], reused["time_scale"]
    timeout = 300.0
    sched = schedule(validation_workload(args.seed), ladder(qps, duration), seed=args.seed)
    if reused is not None and reused["workload"] != sched.workload.describe():
        raise SystemExit(f"--reuse-live: {args.reuse_live} used another workload: {reused['workload']}")
    out: dict[str, Any] = {
        "meta": _meta(sys.argv[1:]),
        "live_meta": (reused.get("live_meta") or reused["meta"]) if reused else None,
        "pods": PODS,
        "profile": PROFILE,
        "pod_overrides": POD_OVERRIDES,
        "workload": sched.workload.describe(),
        "qps": qps,
        "stage_duration_s": duration,
        "requests": len(sched.arrivals),
        "time_scale": time_scale,
        "des_refresh_interval_s": EPP_REFRESH_WALL * time_scale,
        "des_seeds": args.des_seeds,
        "live_repeats": reused["live_repeats"] if reused else args.live_repeats,
        "calibration": None,
        "policies": {},
    }
    if reused is None:
        out["live_meta"] = out["meta"]
    latency = 0.0
    if reused is not None:
        out["calibration"] = cal = reused["calibration"]
        latency = max(0.0, cal["overhead_s"]) if cal else 0.0
    elif not args.no_calibration:
        print("calibrating the live stack's overhead ...", file=sys.stderr, flush=True)
        out["calibration"] = cal = calibrate(time_scale)
        latency = max(0.0, cal["overhead_s"])
    policies = list(reused["policies"]) if reused else [p for p in args.policies.split(",") if p]
    for policy in policies:
        if reused is not None:
            live_runs, live_wall = reused["policies"][policy]["live"], reused["policies"][policy]["live_wall_s"]
        else:
            live_runs, live_wall = [], 0.0
            for repeat in range(args.live_repeats):
                print(f"live run: {policy} ({repeat + 1}/{args.live_repeats}) ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                records = asyncio.run(live_run(sched, policy, time_scale, timeout))
                live_wall += time.monotonic() - t0
                live_runs.append(stage_metrics(records, sched))
                print(format_table(live_runs[-1], f"{policy}: live"), file=sys.stderr, flush=True)
        seeds = range(args.des_seeds)
        des = [des_run(sched, policy, time_scale, timeout, latency, seed) for seed in seeds]
        raw = [des_run(sched, policy, time_scale, timeout, 0.0, seed) for seed in seeds] if latency > 0 else des
        print(format_table(des[0].stages(), f"{policy}: DES (seed 0)"), file=sys.stderr, flush=True)
        out["policies"][policy] = {
            "live": live_runs,
            "des": [d.stages() for d in des],
            "des_raw": [d.stages() for d in raw],
            "comparison": compare(live_runs, [d.stages() for d in des], [d.stages() for d in raw]),
            "live_wall_s": live_wall,
            "des_speed": des[0].speed(),
        }
    return out


def render_validation(v: dict[str, Any]) -> list[str]:
    lines = [
        "## Validation: live vs DES",
        "",
        *_meta_lines(v["meta"]),
        *(
            [f"Live results reused from a run on {v['live_meta']['date']} (`{v['live_meta']['command']}`).", ""]
            if v.get("live_meta") and v["live_meta"] != v["meta"]
            else []
        ),
        f"{v['pods']} pods, profile `{v['profile']}` with {v['pod_overrides']} (a 16k-token KV cache per pod), "
        f"workload {v['workload']}, Poisson ladder {v['qps']} QPS x {v['stage_duration_s']:g} s, "
        f"{v['requests']} requests; the live stack runs at time scale {v['time_scale']:g} with the EPP's default "
        f"50 ms metrics refresh (= {v['des_refresh_interval_s'] * 1e3:g} ms simulated, the DES's refresh "
        "interval). Same prompts, same arrival times in both. Each policy runs live "
        f"{v['live_repeats']} times (fresh stack each time) and in the DES once per plugin RNG seed "
        f"0..{v['des_seeds'] - 1} (random picks and tie-breaks differ, as between any two live runs); cells show "
        "the median with the range over runs / seeds in brackets. Error = (DES median - live median) / live "
        "median; target |error| <= 20% for TTFT p90 and hit rate.",
        "",
    ]
    cal = v.get("calibration")
    if cal:
        lines += [
            f"Calibration: {cal['requests']} idle requests (256-token prompt, 4 output tokens, 0.5 s apart) "
            "through a fresh live stack and through the DES; median live - DES TTFT = "
            f"**{cal['overhead_s'] * 1e3:.1f} ms** (min {cal['overhead_min_s'] * 1e3:.1f}, max "
            f"{cal['overhead_max_s'] * 1e3:.1f}). That is the stack's own per-request cost (client -> Envoy -> "
            "EPP -> pod and the ext_proc round trips on the way back), which the DES does not model; the DES "
            "runs below add it as `request_latency` before routing. The *raw* column is the DES without it.",
            "",
        ]
    for policy, res in v["policies"].items():
        lines += validation_section(policy, res["comparison"])
        speed = _speed_text(res["des_speed"])
        lines += ["", f"Live runs {res['live_wall_s']:.0f} s wall in all; DES (seed 0): {speed}.", ""]
    return lines


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    """The policy comparison at scale (``run_suite``'s experiment, with progress)."""
    sizes = (16, 64) if args.quick else (64, 256)
    per_pod = SCALE_QPS_PER_POD
    stage = 10.0 if args.quick else 15.0
    out: dict[str, Any] = {"meta": _meta(sys.argv[1:]), "qps_per_pod": per_pod, "stage_duration_s": stage, "runs": {}}
    for n in sizes:
        print(f"scale demo: {n} pods ...", file=sys.stderr, flush=True)
        out["runs"][str(n)] = runs = [summarize(r) for r in scale_run(n, per_pod, stage)]
        for r in runs:
            print(f"  {r['policy']}: {_speed_text(r['speed'])}", file=sys.stderr, flush=True)
    return out


def run_staleness(args: argparse.Namespace) -> dict[str, Any]:
    pods, duration = (16, 20.0) if args.quick else (32, 30.0)
    print("staleness sweeps ...", file=sys.stderr, flush=True)
    return {
        "meta": _meta(sys.argv[1:]),
        "pods": pods,
        "stage_s": duration,
        "sweeps": staleness_runs(pods, duration, STALENESS_INTERVALS),
    }


def render_scale(sc: dict[str, Any]) -> list[str]:
    lines = [
        "## Scale demo (DES only)",
        "",
        *_meta_lines(sc["meta"]),
        f"Pods use the `{SCALE_PROFILE}` profile. Workload (`benchmarks/des/suite.py`): 8 prefix groups per pod "
        "x 4 questions, 2048-token system prompts, 256-token questions, 256 output tokens (the shape of "
        "llm-d-benchmark's `shared_prefix_synthetic`), so all the system prompts together are pods / 18.75 times "
        "one pod's KV cache of 19,200 blocks = 307k tokens (13.7x at 256 pods, 3.4x at 64); Poisson "
        f"ladder {list(sc['qps_per_pod'])} QPS per pod x {sc['stage_duration_s']:g} s, no warm-up (the first "
        "pass over the prompts is cold); metrics refresh 50 ms; request timeout 300 s. Every policy gets the "
        "same arrivals.",
        "",
    ]
    for pods, runs in sc["runs"].items():
        lines += scale_section(pods, runs)
    return lines


def render_staleness(st: dict[str, Any]) -> list[str]:
    lines = [
        "## Metrics staleness (DES only)",
        "",
        *_meta_lines(st["meta"]),
        f"{st['pods']} pods, the scale workload, one {st['stage_s']:g} s stage at a fixed rate (after a 20 s "
        "warm-up at 2 QPS per pod for the affine policy, so it starts warm), the metrics refresh interval varied "
        "(`fresh` = refreshed right before every decision). For comparison, BLIS reports 10 ms -> +14% TTFT p99 "
        "and 100 ms -> +354% (peers.md section 7).",
        "",
    ]
    for policy, sweep in st["sweeps"].items():
        lines += [f"`{policy}` at {sweep['qps_per_pod']:g} QPS per pod:", "", *staleness_section(sweep["runs"]), ""]
    return lines


# ---------------------------------------------------------------------------------------------- DES.md
# "notes" is written by hand (findings, caveats) and always kept from the existing file.
SECTIONS = ("header", "notes", "validation", "scale", "staleness")


def _split_sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in SECTIONS:
        start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
        if start in text and end in text:
            out[name] = text[text.index(start) + len(start) : text.index(end)].strip("\n")
    return out


def write_report(path: Path, produced: dict[str, list[str]]) -> None:
    """DES.md from this run's sections; a section this run did not produce is kept from the existing file."""
    old = _split_sections(path.read_text()) if path.exists() else {}
    body = {name: "\n".join(lines).strip("\n") for name, lines in produced.items()}
    parts = []
    for name in SECTIONS:
        text = body.get(name, old.get(name))
        if text:
            parts += [f"<!-- section:{name} -->", text, f"<!-- /section:{name} -->", ""]
    path.write_text("\n".join(parts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-live", action="store_true", help="no validation (keeps DES.md's validation section)")
    ap.add_argument("--skip-scale", action="store_true", help="no scale demo (keeps DES.md's scale section)")
    ap.add_argument("--skip-staleness", action="store_true", help="no staleness sweeps (keeps DES.md's section)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="live simulator time scale")
    ap.add_argument("--qps", default="4,8,12", help="validation QPS ladder (4 pods)")
    ap.add_argument("--stage-duration", type=float, default=None, help="simulated s per validation stage")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-calibration", action="store_true", help="DES without the measured stack overhead")
    ap.add_argument("--des-seeds", type=int, default=5, help="DES runs per policy (plugin RNG seeds 0..N-1)")
    ap.add_argument("--live-repeats", type=int, default=2, help="live runs per policy (run-to-run noise)")
    ap.add_argument("--render", type=Path, nargs="+", help="only re-render DES.md from saved validate-*.json")
    ap.add_argument("--reuse-live", type=Path, help="a validate-*.json whose live results (and calibration) to reuse")
    ap.add_argument("--out", type=Path, default=OUTPUT)
    args = ap.parse_args()
    produced: dict[str, list[str]] = {"header": [TITLE, "", *HOW_IT_WORKS]}
    results: dict[str, Any] = {}
    if args.render:
        for path in args.render:
            results.update(json.loads(path.read_text()))
    else:
        if not args.skip_live:
            results["validation"] = run_validation(args)
        if not args.skip_scale:
            results["scale"] = run_scale(args)
        if not args.skip_staleness:
            results["staleness"] = run_staleness(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        json_path = RESULTS / f"validate-{time.strftime('%Y%m%d-%H%M%S')}.json"
        json_path.write_text(json.dumps(results, indent=1))
        print(f"wrote {json_path}", file=sys.stderr)
    sources = [str(p) for p in args.render] if args.render else [str(json_path.relative_to(ROOT.parent))]
    raw_line = ["", "Raw results: " + ", ".join(f"`{p}`" for p in sources) + ".", ""]
    if "validation" in results:
        produced["validation"] = render_validation(results["validation"]) + raw_line
    if "scale" in results:
        produced["scale"] = render_scale(results["scale"]) + raw_line
    if "staleness" in results:
        produced["staleness"] = render_staleness(results["staleness"]) + raw_line
    write_report(args.out, produced)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
