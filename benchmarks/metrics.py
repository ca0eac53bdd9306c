"""Per-stage metrics for the routing benchmark.

Client side (from `loadgen.Outcome`): TTFT p50/p90/p99, ITL p50/p90 (pooled gaps between token events)
and TPOT p50/p90 (per request), output tokens/s, success rate. Failed requests count as an infinite
TTFT (a percentile that lands on one is reported as "timeout"), so a router that drops requests cannot
look fast.

Pod side (sampled by `Sampler` from every pod's /metrics): prefix-cache hit rate over the stage
(delta of `vllm:prefix_cache_hits_total` / delta of `vllm:prefix_cache_queries_total`, summed over pods) and
queueing (`vllm:num_requests_waiting` summed over pods, averaged over the samples in the stage).

Router side (from /proc): CPU (cores, and CPU-ms per request) and resident memory of each process on the
request path (the EPP, Envoy, or the Rust router).

Machine (from `speed_probe.SpeedProbe`): the median CPU time of a fixed piece of work run beside the stage,
so stages of different contenders can be checked for having met an equally fast machine.

Conversions: client times are wall-clock; times in the results are simulated (wall x time scale). One
simulated token is `token_unit` real tokens: ITL/TPOT are per real token (gap x time scale / token unit),
throughput is real output tokens per simulated second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.loadgen import Outcome, StageWindow
from benchmarks.speed_probe import SpeedProbe

POD_METRICS = {
    "hits": "vllm:prefix_cache_hits_total",
    "queries": "vllm:prefix_cache_queries_total",
    "waiting": "vllm:num_requests_waiting",
    "running": "vllm:num_requests_running",
    "kv": "vllm:kv_cache_usage_perc",
    "gen": "vllm:generation_tokens_total",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def parse_pod_metrics(text: str) -> dict[str, float]:
    """The few vLLM series we need, summed over label sets."""
    out = dict.fromkeys(POD_METRICS, 0.0)
    names = {v: k for k, v in POD_METRICS.items()}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = names.get(name)
        if key is not None:
            with contextlib.suppress(ValueError, IndexError):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def proc_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    except (OSError, IndexError, ValueError):
        return math.nan


def proc_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    rss = hwm = math.nan
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, hwm


@dataclass
class Sample:
    t: float
    pods: list[dict[str, float]]
    cpu: dict[str, float]
    rss: dict[str, float]
    complete: bool = True  # every pod answered its scrape (a failed one reads as zeros: never used)


@dataclass
class Sampler:
    """Scrapes every pod and reads /proc of the router processes every `interval` wall seconds."""

    pod_urls: Sequence[str]
    pids: dict[str, int]
    interval: float = 0.25
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await self.sample()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sample()

    async def sample(self) -> None:
        assert self._session is not None
        t = time.monotonic()
        texts = await asyncio.gather(*(self._get(u) for u in self.pod_urls))
        pods = [parse_pod_metrics(x) for x in texts]
        cpu = {name: proc_cpu_seconds(pid) for name, pid in self.pids.items()}
        rss = {name: proc_rss_mb(pid)[0] for name, pid in self.pids.items()}
        self.samples.append(Sample(t, pods, cpu, rss, complete=all(texts)))

    async def _get(self, url: str) -> str:
        assert self._session is not None
        try:
            async with self._session.get(url + "/metrics") as r:
                return await r.text() if r.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError):
            return ""

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sample()
        if self._session is not None:
            await self._session.close()

    def at(self, t: float) -> Sample:
        """The complete sample closest to wall time `t` (a failed scrape's zeros would make a stage's
        counter deltas span the whole run, or go negative); any sample if none is complete."""
        candidates = [s for s in self.samples if s.complete] or self.samples
        return min(candidates, key=lambda s: abs(s.t - t))

    def between(self, a: float, b: float) -> list[Sample]:
        return [s for s in self.samples if a <= s.t <= b and s.complete]


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; inf values (failures) sort last."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _finite(x: float) -> float | None:
    return None if (math.isnan(x) or math.isinf(x)) else x


def _censored(x: float) -> float | str | None:
    """A latency percentile: the value, "timeout" when it falls on a failed request, None without data."""
    if math.isinf(x):
        return "timeout"
    return None if math.isnan(x) else x


def request_ttft_s(o: Outcome, time_scale: float) -> float:
    """Simulated seconds from send to the first token; inf for a failed request."""
    return (o.first - o.sent) * time_scale if o.ok else math.inf


def request_tpot_ms(o: Outcome, time_scale: float, token_unit: int) -> float | None:
    """Simulated ms per real output token after the first (None without two tokens)."""
    if o.tokens > 1 and o.reads:
        return (o.reads[-1][0] - o.first) / (o.tokens - 1) * time_scale / token_unit * 1000.0
    return None


def summarize_stage(
    window: StageWindow,
    outcomes: Sequence[Outcome],
    sampler: Sampler,
    time_scale: float,
    token_unit: int,
    peak_rss: dict[str, float] | None = None,
    probe: SpeedProbe | None = None,
) -> dict[str, Any]:
    mine = [o for o in outcomes if o.stage == window.index]
    ok = [o for o in mine if o.ok]
    errors: dict[str, int] = {}
    for o in mine:
        if not o.ok:
            errors[o.error or "none"] = errors.get(o.error or "none", 0) + 1
    ttft = [request_ttft_s(o, time_scale) for o in mine]
    gaps: list[float] = []
    tpot: list[float] = []
    per_token = time_scale / token_unit * 1000.0  # wall s -> simulated ms per real token
    for o in ok:
        prev = None
        for stamp, n in o.reads:
            if prev is not None:
                gaps.append((stamp - prev) * per_token)
            gaps.extend([0.0] * (n - 1))
            prev = stamp
        t = request_tpot_ms(o, time_scale, token_unit)
        if t is not None:
            tpot.append(t)
    # Output throughput as inference-perf reports it per stage: the stage's output tokens over the stage's
    # time (its start, the first arrival slot, to its last completion, drain included).
    tokens_out = sum(o.tokens for o in mine)
    wall = window.end - window.start
    sim_seconds = wall * time_scale
    # Pods: counters as deltas between the samples nearest to the window's ends; gauges averaged inside it.
    s0, s1 = sampler.at(window.start), sampler.at(window.end)
    hits = sum(p["hits"] for p in s1.pods) - sum(p["hits"] for p in s0.pods)
    queries = sum(p["queries"] for p in s1.pods) - sum(p["queries"] for p in s0.pods)
    inside = sampler.between(window.start, window.end) or [s1]
    waiting = sum(sum(p["waiting"] for p in s.pods) for s in inside) / len(inside)
    running = sum(sum(p["running"] for p in s.pods) for s in inside) / len(inside)
    kv = sum(sum(p["kv"] for p in s.pods) / max(1, len(s.pods)) for s in inside) / len(inside)
    dt = s1.t - s0.t
    cpu = {name: ((s1.cpu[name] - s0.cpu[name]) / dt if dt > 0 else math.nan) for name in s1.cpu}  # cores (wall)
    # CPU-ms per request of the stage (independent of the time scale; includes what the process does in the
    # background meanwhile, e.g. the EPP's metric scraping, over the whole window including the drain).
    cpu_ms_per_req = {name: (c * dt * 1000 / len(mine) if mine else math.nan) for name, c in cpu.items()}
    return {
        "stage": window.index,
        "label": window.spec.label,
        "warmup": window.spec.warmup,
        "rate": window.spec.rate,
        "duration_s": window.spec.duration,
        "wall_s": wall,
        "sim_s": sim_seconds,
        "sent": len(mine),
        "ok": len(ok),
        "success_rate": len(ok) / len(mine) if mine else None,
        "errors": errors,
        "ttft_p50_s": _censored(pct(ttft, 0.5)),
        "ttft_p90_s": _censored(pct(ttft, 0.9)),
        "ttft_p99_s": _censored(pct(ttft, 0.99)),
        "ttft_mean_ok_s": (sum(t for t in ttft if not math.isinf(t)) / len(ok)) if ok else None,
        "itl_p50_ms": _finite(pct(gaps, 0.5)),
        "itl_p90_ms": _finite(pct(gaps, 0.9)),
        "tpot_p50_ms": _finite(pct(tpot, 0.5)),
        "tpot_p90_ms": _finite(pct(tpot, 0.9)),
        "output_tokens_per_s": tokens_out * token_unit / sim_seconds if sim_seconds > 0 else None,
        "prefix_hit_rate": hits / queries if queries > 0 else None,
        "pod_waiting_mean": waiting,
        "pod_running_mean": running,
        "pod_kv_usage_mean": kv,
        "cpu_cores": {k: _finite(v) for k, v in cpu.items()},
        "cpu_ms_per_request": {k: _finite(v) for k, v in cpu_ms_per_req.items()},
        "rss_mb": {k: _finite(v) for k, v in s1.rss.items()},
        "peak_rss_mb": {k: _finite(v) for k, v in (peak_rss or {}).items()},
        "pods_used": sorted({o.pod for o in mine if o.pod}),
        # The machine's speed in this stage (benchmarks.speed_probe): comparable across contenders of a run.
        "probe_cpu_us": probe.median_between(window.start, window.end) if probe is not None else None,
    }
