"""Aggregated vs prefill/decode-disaggregated serving on a prefill-heavy workload, through Envoy.

Run (results and their discussion: benchmarks/PD.md)::

    .venv/bin/python benchmarks/pd_disagg.py                       # ~2.5 minutes
    .venv/bin/python benchmarks/pd_disagg.py --qps 1,2,3 --stage-seconds 15 --json /tmp/pd.json

Both deployments are 4 simulated pods with the same latency profile and time scale, behind a
real Envoy and the `epp` program (llmepp.testing.pdstack):

* **aggregated**: 4 pods with role `both`, the EPP's built-in default config (`DEFAULT_CONFIG`;
  one `default` profile);
* **disaggregated**: 2 `prefill` pods + 2 `decode` pods, each decode pod behind an
  `epp-pd-sidecar`, the reference P/D config (example B: disagg-profile-handler +
  prefix-based-pd-decider, nonCachedTokens 16 - every prompt here is uncached, so every
  request is disaggregated; the EPP's decision counter is reported to confirm it).

Workload: open loop, random (Poisson-like, fixed count) arrivals at each QPS stage (a small ladder), unique prompts of
3,000-6,000 tokens (exact counts in the simulator's tokenizer, unique from the first block so
nothing hits a prefix cache), 32 output tokens (`ignore_eos`), streamed. The same seeded
prompt sequence goes to both deployments. Per stage: TTFT (request sent → first token event)
and ITL (gaps between consecutive token events, pooled over requests), p50/p90, in simulated
milliseconds (wall × time scale).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.metrics import pct
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.testing.pdstack import PD_CONFIG, PDStack, PDStackOptions, scrape, total
from llmepp.testing.stack import Stack
from llmepp_sim.textgen import filler_vocabulary
from llmepp_sim.tokenizer import shared_tokenizer

MODEL = "sim-model"
OUTPUT_TOKENS = 32


@dataclass
class Result:
    ttft: float  # wall seconds
    gaps: list[float]  # wall seconds between consecutive token events
    tokens: int


@dataclass
class Stage:
    deployment: str
    qps: float
    sent: int
    ok: int
    errors: dict[str, int]
    ttft_p50: float
    ttft_p90: float
    itl_p50: float
    itl_p90: float
    e2e_p50: float
    decisions: dict[str, float] = field(default_factory=dict)


class Prompts:
    """Unique prompts of exact token counts (the simulator's tokenizer), from a seeded RNG."""

    def __init__(self, seed: int) -> None:
        self.words = [f.text for f in filler_vocabulary(shared_tokenizer())]
        self.rng = random.Random(seed)

    def make(self, index: int) -> str:
        tokens = self.rng.randint(3000, 6000)
        # A distinct first word per request keeps every prompt's first KV block unique.
        head = f" req{index}"
        return head + "".join(self.rng.choice(self.words) for _ in range(tokens - len(shared_tokenizer().encode(head))))


async def one_request(session: aiohttp.ClientSession, url: str, prompt: str) -> Result | str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "stream": True, "ignore_eos": True}
    start = time.monotonic()
    stamps: list[float] = []
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                return f"http {resp.status}"
            stamps = [
                time.monotonic()
                async for line in resp.content
                if line.startswith(b"data: {") and b'"text":""' not in line
            ]
    except (aiohttp.ClientError, TimeoutError) as e:
        return type(e).__name__
    if not stamps:
        return "no tokens"
    return Result(stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)], len(stamps))


def arrivals(qps: float, seconds: float, seed: int) -> list[float]:
    """Arrival offsets (s): exactly round(qps · seconds) requests at uniformly random times in the
    window (a Poisson process conditioned on its count), so every deployment and run gets the
    same offered load; the same list for every deployment."""
    rng = random.Random(seed * 1000 + int(qps * 1000))
    return sorted(rng.uniform(0.0, seconds) for _ in range(round(qps * seconds)))


async def run_stage(url: str, offsets: list[float], prompts: list[str]) -> list[Result | str]:
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.monotonic()
        tasks = []
        for offset, prompt in zip(offsets, prompts):
            await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
            tasks.append(asyncio.create_task(one_request(session, url, prompt)))
        return list(await asyncio.gather(*tasks))


async def decisions(stack: Stack) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        samples = await scrape(s, stack.metrics_url)
    kinds = ("decode-only", "prefill-decode")
    return {k: total(samples, "llm_d_epp_disagg_decision_total", decision_type=k) for k in kinds}


async def run_deployment(
    name: str, options: PDStackOptions, ladder: list[float], args: argparse.Namespace
) -> list[Stage]:
    scale = args.time_scale
    stages: list[Stage] = []
    async with PDStack(options) as stack:
        warm = Prompts(seed=999)
        async with aiohttp.ClientSession() as s:
            for i in range(2):  # connections, EPP caches, first scrape
                await one_request(s, stack.url, warm.make(i))
        factory = Prompts(seed=args.seed)
        index = 0
        for qps in ladder:
            offsets = arrivals(qps, args.stage_seconds, args.seed)
            prompts = [factory.make(index + i) for i in range(len(offsets))]
            index += len(offsets)
            before = await decisions(stack)
            t0 = time.monotonic()
            results = await run_stage(stack.url, offsets, prompts)
            after = await decisions(stack)
            ok = [r for r in results if isinstance(r, Result)]
            errors: dict[str, int] = {}
            for r in results:
                if isinstance(r, str):
                    errors[r] = errors.get(r, 0) + 1
            gaps = [g for r in ok for g in r.gaps]
            stage = Stage(
                deployment=name,
                qps=qps,
                sent=len(results),
                ok=len(ok),
                errors=errors,
                ttft_p50=pct([r.ttft for r in ok], 0.5) * scale * 1000,
                ttft_p90=pct([r.ttft for r in ok], 0.9) * scale * 1000,
                itl_p50=pct(gaps, 0.5) * scale * 1000,
                itl_p90=pct(gaps, 0.9) * scale * 1000,
                e2e_p50=pct([r.ttft + sum(r.gaps) for r in ok], 0.5) * scale * 1000,
                decisions={k: after[k] - before[k] for k in after if after[k] - before[k]},
            )
            stages.append(stage)
            print(f"  {name} qps={qps}: {len(ok)}/{len(results)} ok in {time.monotonic() - t0:.1f}s wall, "
                  f"TTFT p50/p90 {stage.ttft_p50:.0f}/{stage.ttft_p90:.0f} ms, "
                  f"ITL p50/p90 {stage.itl_p50:.1f}/{stage.itl_p90:.1f} ms", flush=True)  # fmt: skip
    return stages


def machine() -> str:
    cpus = os.cpu_count()
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
        model = next(
            (ln.split(":", 1)[1].strip() for ln in subprocess.run(
                ["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
             if ln.startswith("Model name")), "?"
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        nproc, model = str(cpus), "?"
    return f"nproc={nproc}, {model}, Python {platform.python_version()}"


def table(stages: list[Stage]) -> str:
    lines = [
        "| deployment | QPS | ok/sent | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 | E2E p50 | EPP decisions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in stages:
        dec = ", ".join(f"{k} {v:.0f}" for k, v in s.decisions.items()) or "-"
        err = f" ({', '.join(f'{k}: {v}' for k, v in s.errors.items())})" if s.errors else ""
        lines.append(
            f"| {s.deployment} | {s.qps:g} | {s.ok}/{s.sent}{err} | {s.ttft_p50:.0f} | {s.ttft_p90:.0f} | "
            f"{s.itl_p50:.1f} | {s.itl_p90:.1f} | {s.e2e_p50:.0f} | {dec} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[Stage]:
    ladder = [float(q) for q in args.qps.split(",")]
    sim = ["--latency-profile", args.latency_profile, "--time-scale", str(args.time_scale)]
    deployments = {
        "aggregated": PDStackOptions(prefill=0, decode=0, both=4, sidecars=False, sim_args=sim,
                                     epp_config=DEFAULT_CONFIG, first_host=134),
        "disaggregated": PDStackOptions(prefill=2, decode=2, sim_args=sim, epp_config=PD_CONFIG, first_host=134),
    }  # fmt: skip
    stages: list[Stage] = []
    for name, options in deployments.items():
        print(f"{name}: starting", flush=True)
        stages += await run_deployment(name, options, ladder, args)
    return stages


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qps", default="1,2,3", help="comma-separated QPS ladder (wall-clock requests/s)")
    p.add_argument("--stage-seconds", type=float, default=15.0, help="arrival window per stage (wall)")
    p.add_argument("--latency-profile", default="llama-8b-h100")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path, help="also write the raw stage results here")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    stages = asyncio.run(main_async(args))
    print()
    print(f"machine: {machine()}")
    print(f"command: {' '.join(sys.argv)}; total {time.monotonic() - t0:.0f}s wall")
    print(f"latency profile {args.latency_profile}, time scale {args.time_scale}, {OUTPUT_TOKENS} output tokens, "
          "times in simulated ms")  # fmt: skip
    print(table(stages))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in stages], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
