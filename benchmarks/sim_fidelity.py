"""Simulator fidelity: TTFT/ITL as a client sees them vs the public figures a latency profile claims.

Run (writes benchmarks/SIM_FIDELITY.md)::

    .venv/bin/python benchmarks/sim_fidelity.py                 # full run, ~5 minutes
    .venv/bin/python benchmarks/sim_fidelity.py --quick         # smoke run, ~1.5 minutes

What it does, with ``epp-sim`` in a subprocess (so the client's CPU is not the simulator's event loop):

1. **Fidelity**: one pod with ``--latency-profile`` (default llama-8b-h100). Closed-loop streaming clients at
   each concurrency (1, 4, 16, 32) send unique prompts (no prefix-cache hits) of each size (128, 256, 1024
   tokens) asking for 64 output tokens. TTFT = request start to first token chunk; ITL = (last token
   chunk - first token chunk) / (tokens - 1) per request. Each ``--time-scale S`` (default 1 and 10) gets
   its own run; wall times are multiplied by S to get simulated time, which shows what a sped-up
   simulation costs in fidelity. A linear fit of single-stream TTFT over prompt size recovers
   the prefill slope/overhead. Measured values are compared with the profile's public ``targets`` and
   with the simulator's own model prediction.
2. **Capacity**: 16 pods in one process, 200 concurrent closed-loop streams (256-token prompts, 256
   output tokens) for a fixed duration; reports tokens/s, the simulator process' CPU, and how far ITL
   drifts from the model when one event loop carries that load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from llmepp_sim import SimProcess, load_profile
from llmepp_sim.profiles import profile_targets
from llmepp_sim.textgen import filler_vocabulary
from llmepp_sim.tokenizer import shared_tokenizer

OUTPUT = Path(__file__).resolve().parent / "SIM_FIDELITY.md"
OUTPUT_TOKENS = 64


@dataclass
class Sample:
    prompt_tokens: int
    ttft: float  # simulated seconds
    itl: float  # simulated seconds, mean over the request
    tokens: int


class PromptFactory:
    """Prompts of an exact token count, unique from their first block (so nothing hits the cache)."""

    def __init__(self, seed: int = 1) -> None:
        self._words = [f.text for f in filler_vocabulary(shared_tokenizer())]
        self._rng = random.Random(seed)

    def make(self, tokens: int) -> str:
        text = "".join(self._rng.choice(self._words) for _ in range(tokens))
        assert len(shared_tokenizer().encode(text)) == tokens
        return text


async def stream_once(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, scale: float
) -> Sample | None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    start = time.monotonic()
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != 200:
            return None
        stamps = [
            time.monotonic()
            async for line in response.content
            if line.startswith(b'data: {"id"') and b'"choices":[]' not in line
        ]
    if len(stamps) < 2:
        return None
    ttft = (stamps[0] - start) * scale
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * scale
    return Sample(0, ttft, itl, len(stamps))


async def closed_loop(
    url: str, concurrency: int, prompt_tokens: int, requests_per_client: int, scale: float, prompts: PromptFactory
) -> list[Sample]:
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for _ in range(requests_per_client):
                sample = await stream_once(session, url, prompts.make(prompt_tokens), OUTPUT_TOKENS, scale)
                if sample is not None:
                    sample.prompt_tokens = prompt_tokens
                    samples.append(sample)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def model_itl_ms(profile: dict[str, Any], running: float) -> float:
    span = max(1, profile["max_num_seqs"] - 1)
    factor = 1 + (profile["time_factor_under_load"] - 1) * min(1.0, max(0.0, running - 1) / span)
    return float(profile["inter_token_latency"] * factor)


def model_ttft_ms(profile: dict[str, Any], prompt_tokens: int, concurrent_prefills: float = 1.0) -> float:
    return float(
        profile.get("time_to_first_token", 0)
        + profile["prefill_overhead"]
        + prompt_tokens * profile["prefill_time_per_token"] * concurrent_prefills
    )


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


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


def in_range(value: float, bounds: Sequence[float]) -> str:
    return "yes" if bounds[0] <= value <= bounds[1] else "**no**"


async def fidelity(args: argparse.Namespace, time_scale: float, lines: list[str]) -> None:
    profile = load_profile(args.profile)
    targets = profile_targets(args.profile)
    sim_args = ["--host", "127.0.0.2", "--port", "0", "--latency-profile", args.profile,
                "--time-scale", str(time_scale)]  # fmt: skip
    prompts = PromptFactory()
    results: dict[tuple[int, int], list[Sample]] = {}
    with SimProcess(sim_args) as proc:
        url = proc.urls[0]
        for concurrency in args.concurrency:
            for size in args.prompt_tokens:
                per_client = max(2, args.requests // concurrency)
                samples = await closed_loop(url, concurrency, size, per_client, time_scale, prompts)
                results[(concurrency, size)] = samples
                print(
                    f"  x{time_scale:g} c={concurrency:>3} prompt={size:>5}: {len(samples)} requests", file=sys.stderr
                )

    lines.append(f"### Per-load results, profile `{args.profile}`, time scale {time_scale:g}")
    lines.append("")
    lines.append(
        "Simulated milliseconds. *model* columns are what the simulator's latency model predicts: TTFT of a "
        "lone request (`overhead + n x per_token`), TTFT when all `c` clients prefill together "
        "(`overhead + c x n x per_token`; the closed-loop clients start together, so this is the worst case; "
        "as they drift apart fewer prefills overlap and measured TTFT falls below it), and ITL at `c` running "
        "requests. At one stream, measured minus model is the client-visible overhead (HTTP, tokenisation, "
        "timer lateness)."
    )
    lines.append("")
    lines.append(
        "| streams | prompt tok | n | TTFT p50 | TTFT p90 | TTFT model alone | TTFT model lockstep "
        "| ITL mean | ITL p90 | ITL model |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (concurrency, size), samples in results.items():
        ttft = [s.ttft * 1000 for s in samples]
        itl = [s.itl * 1000 for s in samples]
        lines.append(
            f"| {concurrency} | {size} | {len(samples)} | {percentile(ttft, 50):.1f} | {percentile(ttft, 90):.1f} "
            f"| {model_ttft_ms(profile, size):.1f} | {model_ttft_ms(profile, size, concurrency):.1f} "
            f"| {statistics.fmean(itl):.2f} | {percentile(itl, 90):.2f} | {model_itl_ms(profile, concurrency):.2f} |"
        )
    lines.append("")

    # Single-stream figures against the public reference ranges.
    single = {size: results[(1, size)] for size in args.prompt_tokens if (1, size) in results}
    if single:
        points = [(size, statistics.median(s.ttft * 1000 for s in samples)) for size, samples in single.items()]
        lines.append(
            f"### Against the profile's public reference figures ({args.profile}, 1 stream, time scale {time_scale:g})"
        )
        lines.append("")
        lines.append("| quantity | measured | public reference | within |")
        lines.append("|---|---:|---:|:-:|")
        if 256 in single:
            ttft256 = statistics.median(s.ttft * 1000 for s in single[256])
            bounds = targets["ttft_ms_at_256_tokens"]
            within = in_range(ttft256, bounds)
            lines.append(f"| TTFT @256 tokens (p50) | {ttft256:.1f} ms | {bounds[0]}-{bounds[1]} ms | {within} |")
        itl1 = statistics.median(s.itl * 1000 for samples in single.values() for s in samples)
        bounds = targets["itl_ms"]
        lines.append(f"| ITL (p50) | {itl1:.2f} ms | {bounds[0]}-{bounds[1]} ms | {in_range(itl1, bounds)} |")
        if len(points) >= 2:
            slope, intercept = fit_line(points)
            bounds = targets["prefill_ms_per_token"]
            lines.append(
                f"| prefill slope (fit over {', '.join(str(p[0]) for p in points)} tokens) | {slope:.3f} ms/token "
                f"| {bounds[0]}-{bounds[1]} ms/token | {in_range(slope, bounds)} |"
            )
            bounds = targets["prefill_overhead_ms"]
            lines.append(
                f"| prefill overhead (fit intercept) | {intercept:.1f} ms | {bounds[0]}-{bounds[1]} ms "
                f"| {in_range(intercept, bounds)} |"
            )
        lines.append("")


async def capacity(args: argparse.Namespace, lines: list[str]) -> None:
    profile = load_profile(args.profile)
    sim_args = ["--pods", "16", "--port", "0", "--latency-profile", args.profile]
    prompts = [PromptFactory(seed=i).make(256) for i in range(args.capacity_streams)]
    samples: list[Sample] = []
    failures = 0
    with SimProcess(sim_args) as proc:
        assert proc.process is not None
        pid, urls = proc.process.pid, proc.urls
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            deadline = time.monotonic() + args.capacity_seconds
            server_cpu0, client_cpu0, start = process_cpu_seconds(pid), own_cpu_seconds(), time.monotonic()

            async def client(i: int) -> None:
                nonlocal failures
                round_ = 0
                while time.monotonic() < deadline:
                    # A fresh prefix per round keeps every request a cache miss, like the fidelity runs.
                    prompt = f"{i} {round_}" + prompts[i]
                    result = await stream_once(session, urls[i % len(urls)], prompt, 256, 1.0)
                    round_ += 1
                    if result is None:
                        failures += 1
                    else:
                        samples.append(result)

            await asyncio.gather(*(client(i) for i in range(args.capacity_streams)))
            elapsed = time.monotonic() - start
            server_cpu = (process_cpu_seconds(pid) - server_cpu0) / elapsed
            client_cpu = (own_cpu_seconds() - client_cpu0) / elapsed
    tokens = sum(s.tokens for s in samples)
    ttft = [s.ttft * 1000 for s in samples]
    itl = [s.itl * 1000 for s in samples]
    per_pod = args.capacity_streams / 16
    lines.append(f"### Capacity: 16 pods in one `epp-sim` process, {args.capacity_streams} concurrent streams")
    lines.append("")
    lines.append(
        f"Closed loop for {elapsed:.0f} s wall, time scale 1, profile `{args.profile}`, 256-token prompts "
        "(cache misses), 256 output tokens, client (aiohttp) in a separate process on the same 2 cores."
    )
    lines.append("")
    lines.append("| metric | value |")
    lines.append("|---|---:|")
    lines.append(f"| completed streams | {len(samples)} (failures {failures}) |")
    lines.append(f"| output tokens/s (SSE chunks received) | {tokens / elapsed:,.0f} |")
    lines.append(f"| simulator process CPU | {server_cpu * 100:.0f} % of one core |")
    lines.append(f"| client process CPU | {client_cpu * 100:.0f} % of one core |")
    lines.append(f"| ITL mean / p90 (model at {per_pod:.1f} running/pod) | {statistics.fmean(itl):.2f} / "
                 f"{percentile(itl, 90):.2f} ms ({model_itl_ms(profile, per_pod):.2f} ms) |")  # fmt: skip
    lines.append(f"| TTFT p50 / p90 | {percentile(ttft, 50):.0f} / {percentile(ttft, 90):.0f} ms |")
    lines.append("")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="llama-8b-h100")
    parser.add_argument(
        "--time-scale", type=float, nargs="+", default=[1.0, 10.0], help="one fidelity run per time scale"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--requests", type=int, default=32, help="requests per (concurrency, size) cell")
    parser.add_argument("--capacity-streams", type=int, default=200)
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--skip-capacity", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer requests and a short capacity run")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.capacity_seconds = 8, 8.0
    return args


async def run(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    lines = [
        "# Simulator fidelity (llmepp_sim)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/sim_fidelity.py', *argv])}`",
        "",
        f"Machine: {machine()}.",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]
    for time_scale in args.time_scale:
        await fidelity(args, time_scale, lines)
    if not args.skip_capacity:
        await capacity(args, lines)
    load = os.getloadavg()
    lines.append(
        f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. Client and simulator share the "
        "machine's cores with whatever else runs; when the load average exceeds the core count, wake-up "
        "latency shows up as extra TTFT/ITL (it is host contention, not part of the latency model)."
    )
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    lines = asyncio.run(run(args, argv))
    text = "\n".join(lines) + "\n"
    args.output.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
