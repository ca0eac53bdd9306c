"""Routing quality, live: every contender in front of the same simulated pods, one after another.

    .venv/bin/python -m benchmarks.routing [--quick] [--contenders a,b] [--workloads shared-prefix,...]
                                           [--time-scale 4] [--json benchmarks/results/routing.json]

One `epp-sim` process runs the pods (127.0.0.200, .201, ...) for the whole run. For each workload, for
each contender: wait until the pods are idle, reset their prefix caches (`POST /reset_prefix_cache`),
start the contender, check that a request goes through, reset the caches again, run the workload's
ladder (stages back to back), stop the contender. Metrics per stage: `benchmarks.metrics`.
Workloads and the scaling to this machine: `benchmarks.workloads`. Contenders: `benchmarks.contenders`.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.contenders import Contender, EppBehindEnvoy, all_contenders, wait_ready
from benchmarks.loadgen import Outcome, RunConfig, StageWindow, run_ladder
from benchmarks.metrics import Sampler, parse_pod_metrics, proc_rss_mb, summarize_stage
from benchmarks.speed_probe import SpeedProbe
from benchmarks.workloads import MODEL, WORKLOADS, Scale, SharedPrefix, Workload, build, kv_blocks_per_pod, sim_args
from llmepp.testing.ports import free_port
from llmepp_sim.cluster import SimProcess

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
FIRST_HOST = 200

QUICK_CONTENDERS = {
    "shared-prefix": ["envoy-round-robin", "epp-default", "vllm-router-cache-aware", "smg-cache-aware"],
    "multi-turn": ["epp-default", "vllm-router-cache-aware", "smg-cache-aware"],
    # The full run has every contender here; quick keeps the baseline and one rival (≤ 10 minutes in all).
    "no-sharing": ["envoy-round-robin", "epp-default", "vllm-router-cache-aware"],
}  # fmt: skip


async def pods_idle(urls: Sequence[str], within: float) -> bool:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while time.monotonic() < deadline:
            busy = 0.0
            for u in urls:
                async with s.get(u + "/metrics") as r:
                    m = parse_pod_metrics(await r.text())
                busy += m["running"] + m["waiting"]
            if busy == 0:
                return True
            await asyncio.sleep(0.5)
    return False


async def reset_caches(urls: Sequence[str], within: float = 120.0) -> None:
    """Wait for idle pods, then empty every pod's prefix cache (409 while requests run: retry)."""
    if not await pods_idle(urls, within):
        raise RuntimeError(f"pods still busy after {within:.0f}s")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for u in urls:
            for _ in range(50):
                async with s.post(u + "/reset_prefix_cache") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"{u}: prefix cache reset refused")


def outcome_row(o: Outcome, time_scale: float) -> list[Any]:
    ttft = (o.first - o.sent) * time_scale if o.first else None
    return [o.stage, o.key, o.pod, round(ttft, 4) if ttft is not None else None, o.tokens,
            round((o.end - o.sent) * time_scale, 3), o.error]  # fmt: skip


async def run_contender(
    c: Contender, workload_name: str, scale: Scale, quick: bool, pods: list[tuple[str, int]], workdir: Path,
    seed: int, raw: list[dict[str, Any]], host_pids: dict[str, int], workload: Workload | None = None,
    outcomes_sink: list[Outcome] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One contender through one workload's ladder. `workload` (default: `build(workload_name, ...)`) lets a
    separate comparison (benchmarks.precise_routing) run its own ladder of the same workload; `outcomes_sink`
    receives every request's outcome (benchmarks.predicted_latency's per-class metrics)."""
    urls = [f"http://{h}:{p}" for h, p in pods]
    reason = c.unavailable()
    if reason:
        print(f"  {c.name}: SKIPPED - {reason}", flush=True)
        return {"status": "skipped", "reason": reason}
    await reset_caches(urls)
    cdir = workdir / f"{workload_name}-{c.name}"
    cdir.mkdir()
    try:
        await c.start(pods, cdir)
        await wait_ready(c, MODEL)
    except Exception as exc:
        await c.stop()
        msg = f"{type(exc).__name__}: {exc}"
        print(f"  {c.name}: FAILED TO START - {msg[:800]}", flush=True)
        return {"status": "failed", "reason": msg[:4000], "log_tail": c.log_tail, "setup": c.setup()}
    workload = workload or build(workload_name, scale, quick, seed)
    await reset_caches(urls)
    await c.before_ladder()
    sampler = Sampler(urls, {**c.pids, **host_pids})
    await sampler.start()
    probe = SpeedProbe(cdir / "speed_probe.txt")
    probe.start()
    t0 = time.monotonic()

    def progress(window: StageWindow) -> None:
        print(f"    stage {window.spec.label:>8} ({window.spec.rate:g}/s sim x {window.spec.duration:g}s): "
              f"sent {window.sent}, {window.end - window.start:.0f}s wall, {time.monotonic() - t0:.0f}s so far",
              flush=True)  # fmt: skip

    try:
        outcomes, windows = await run_ladder(workload, RunConfig(c.url, scale.time_scale), progress)
    finally:
        probe.stop()
        await sampler.stop()
        peak = {name: proc_rss_mb(pid)[1] for name, pid in c.pids.items()}
        await c.stop()
    stages = [summarize_stage(w, outcomes, sampler, scale.time_scale, scale.token_unit, peak, probe) for w in windows]
    if outcomes_sink is not None:
        outcomes_sink.extend(outcomes)
    raw.append({"workload": workload_name, "contender": c.name,
                "columns": ["stage", "key", "pod", "ttft_s", "tokens", "e2e_s", "error"],
                "rows": [outcome_row(o, scale.time_scale) for o in outcomes]})  # fmt: skip
    for s in stages:
        print("    " + stage_line(s), flush=True)
    print(f"  {c.name}: done in {time.monotonic() - t0:.0f}s wall", flush=True)
    return {"status": "ok", "description": c.description, "setup": c.setup(), "wall_s": time.monotonic() - t0,
            "stages": stages, "log_tail": c.log_tail[-1500:] if _suspicious(c.log_tail) else ""}  # fmt: skip


def _suspicious(log: str) -> bool:
    low = log.lower()
    return "error" in low or "panic" in low or "traceback" in low


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def stage_line(s: dict[str, Any]) -> str:
    cpu = ", ".join(f"{k} {v * 100:.0f}%" for k, v in s["cpu_cores"].items() if v is not None)
    hit = s["prefix_hit_rate"]
    hit_pct = _fmt(hit * 100 if hit is not None else None, ".0f")
    return (
        f"{s['label']:>8}: {s['ok']}/{s['sent']} ok, TTFT p50/p90 {_fmt(s['ttft_p50_s'], '.2f')}/"
        f"{_fmt(s['ttft_p90_s'], '.2f')} s, ITL p50 {_fmt(s['itl_p50_ms'], '.0f')} ms, "
        f"out {_fmt(s['output_tokens_per_s'], '.0f')} tok/s, hit {hit_pct}%, "
        f"wait {s['pod_waiting_mean']:.1f}, cpu {cpu}, probe {_fmt(s.get('probe_cpu_us'), '.0f')} us"
    )


async def start_sim(args: list[str]) -> tuple[SimProcess, dict[str, int]]:
    """Start the `epp-sim` process running every pod; returns it and the host pids the sampler follows."""
    sim = SimProcess(args, ready_timeout=60)
    await sim.start_async()
    assert sim.process is not None
    return sim, {"sim": sim.process.pid, "client": os.getpid()}


def source_commit() -> str | None:
    """The checkout's commit, "+dirty" when tracked files differ from it (None outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def run_header(
    quick: bool, seed: int, scale: Scale, kv_blocks: int, sp: SharedPrefix, sim_argv: list[str]
) -> dict[str, Any]:
    """What a routing run's JSON records about its set-up (shared with benchmarks.precise_routing)."""
    return {
        "quick": quick,
        "seed": seed,
        "scale": asdict(scale),
        "kv_blocks_per_pod": kv_blocks,
        "kv_real_tokens_per_pod": kv_blocks * scale.block_size * scale.token_unit,
        "footprint_blocks": sp.footprint_blocks(),
        "footprint_share": sp.footprint_blocks() / (kv_blocks * scale.pods),
        "sim_args": sim_argv,
        "ttft_timeout_s": RunConfig.ttft_timeout_sim,
        "total_timeout_s": RunConfig.total_timeout_sim,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "commit": source_commit(),
        # The command that wrote this JSON (results/run.json is only the last run_all's, whatever it ran).
        "argv": [f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]],
    }


async def run(
    quick: bool, scale: Scale, workloads: Sequence[str], contender_names: Sequence[str] | None, seed: int,
    out: Path, extra_epp: Sequence[tuple[str, str]] = (), stages: Sequence[tuple[float, float]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    extras = [(n, path, Path(path).read_text()) for n, path in extra_epp]  # noqa: ASYNC240 (before the run)
    kv_blocks, sp = kv_blocks_per_pod(scale, seed)
    hosts = [f"127.0.0.{FIRST_HOST + i}" for i in range(scale.pods)]
    port = free_port(hosts[0])
    args = ["--hosts", ",".join(hosts), "--port", str(port), *sim_args(scale, kv_blocks)]
    report: dict[str, Any] = {**run_header(quick, seed, scale, kv_blocks, sp, args), "workloads": {}}
    print(f"routing: {scale.pods} pods, KV {kv_blocks} blocks/pod "
          f"(shared-prefix footprint {report['footprint_share'] * 100:.1f}% of the cluster), "
          f"time scale {scale.time_scale:g}, token unit {scale.token_unit}", flush=True)  # fmt: skip
    sim, host_pids = await start_sim(args)
    pods = [(h, port) for h in hosts]
    raw: list[dict[str, Any]] = []
    t_all = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
            for wl_name in workloads:
                wl = build(wl_name, scale, quick, seed, stages)
                names = contender_names or (QUICK_CONTENDERS[wl_name] if quick else None)
                contenders = [c for c in all_contenders() if names is None or c.name in names]
                contenders += [EppBehindEnvoy(n, text, f"EPP, {path} (extra)") for n, path, text in extras]
                entry: dict[str, Any] = {"workload": wl.describe(), "contenders": {}}
                report["workloads"][wl_name] = entry
                print(f"workload {wl_name}: {len(contenders)} contenders", flush=True)
                for c in contenders:
                    print(f"  {c.name} ({c.description}) - {time.monotonic() - t_all:.0f}s into the run", flush=True)
                    entry["contenders"][c.name] = await run_contender(
                        c, wl_name, scale, quick, pods, Path(tmp), seed, raw, host_pids,
                        workload=build(wl_name, scale, quick, seed, stages),
                    )  # fmt: skip
                    _write(report, out)
    finally:
        await asyncio.to_thread(sim.stop)
    report["wall_s"] = time.monotonic() - t_all
    _write(report, out)
    with gzip.open(out.with_name(out.stem + "-requests.json.gz"), "wt") as f:
        json.dump(raw, f)
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_default))


def _default(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the pods, routers and Envoy started by the run are stopped too."""
    signal.signal(signal.SIGTERM, _interrupt)


def parse_extra(values: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"--extra-epp {v!r}: expected NAME=CONFIG_FILE")
        out.append((name, path))
    return out


def parse_stages(text: str) -> list[tuple[float, float]]:
    """'12:60,20:60' -> [(12.0, 60.0), (20.0, 60.0)]: rate and simulated seconds per stage."""
    try:
        stages = [(float(r), float(d)) for r, d in (part.split(":") for part in text.split(",") if part.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE:SECONDS,... (e.g. 12:60,20:60), got {text!r}") from None
    if not stages or any(not (math.isfinite(r) and r > 0 and math.isfinite(d) and d > 0) for r, d in stages):
        raise argparse.ArgumentTypeError(f"rates and durations must be finite and > 0, got {text!r}")
    return stages


def scale_from_args(a: argparse.Namespace) -> Scale:
    return Scale(token_unit=a.token_unit, time_scale=a.time_scale, pods=a.pods)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contenders", help="comma-separated names (default: all; --quick: a subset)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--time-scale", type=float, default=None, help="default 4 (--quick: 4)")
    p.add_argument("--token-unit", type=int, default=16)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--extra-epp", action="append", default=[], metavar="NAME=CONFIG",
                   help="also run the EPP with this EndpointPickerConfig file (diagnostics)")  # fmt: skip
    p.add_argument("--stages", type=parse_stages, default=None, metavar="RATE:SECONDS,...",
                   help="replace each workload's measured stages (rates in its ladder's units; warm-up kept); "
                   "diagnostics")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=RESULTS / "routing.json")
    add_args(p)
    a = p.parse_args(argv)
    if a.time_scale is None:
        a.time_scale = 4.0
    names = a.contenders.split(",") if a.contenders else None
    workloads = [w for w in a.workloads.split(",") if w]
    import uvloop

    stop_cleanly_on_sigterm()
    uvloop.run(run(a.quick, scale_from_args(a), workloads, names, a.seed, a.json, parse_extra(a.extra_epp), a.stages))


if __name__ == "__main__":
    main()
