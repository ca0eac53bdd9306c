"""Flow control under saturation, end to end: noisy neighbour and priority bands, TTFT per tenant.

    .venv/bin/python -m benchmarks.flowcontrol_tenants [--quick] [--json benchmarks/results/flowcontrol_tenants.json]

Everything is real except the GPUs: `epp-sim` pods (one process, each pod on its own 127.0.0.x address),
the `epp` program with `featureGates: [flowControl]`, and Envoy in front (the benchmarks' bootstrap of
`llmepp.testing.envoy`, no access log). The client (aiohttp) sends streamed chat completions, open-loop Poisson
per tenant, and measures TTFT from send to the first content token, on the wall clock.

Saturation is deterministic: the `concurrency-detector` gates dispatch at `maxConcurrency` requests in flight
per pod (counted by the EPP itself, no scrape lag) and, as the scheduling filter, sends each dispatched request
to a pod below that limit. The pods could run far more (vLLM's 256 seats), so nothing ever waits in a pod's own
queue: every wait happens in the EPP's flow-control queues, where fairness and priority apply. The pods run in
slow motion (time scale < 1) so that the host's few milliseconds per request (Python client, Envoy, Python
EPP, all on 2 shared cores) stay small next to the model's latencies, and the request rate stays one the host
can carry.

Scenarios, on the same pods, one EPP config per policy (the EPP and Envoy are restarted between configs):

| key | EPP config | traffic |
|---|---|---|
| quiet-alone | round-robin | quiet tenant at r (its unloaded baseline) |
| round-robin | round-robin | quiet at r + noisy at 10r (the noisy tenant alone exceeds the pool's capacity) |
| global-strict | global-strict | the same traffic |
| high-alone | two bands | high band at r (its baseline) |
| priority | two bands | high band at r + low band at 10r |

Targets (issue 5): quiet TTFT p90 ≤ 2× unloaded with round-robin, not with global-strict; high band TTFT p90
≤ 2× unloaded while the low band takes the wait. Verdicts: `benchmarks.report.flowcontrol_tenant_targets`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import report
from benchmarks.contenders import envoy_yaml
from benchmarks.metrics import pct
from llmepp.testing.envoy import EnvoyProcess
from llmepp.testing.ports import free_port
from llmepp.testing.stack import EppProcess, loopback_epp_args, with_file_discovery
from llmepp_sim.cluster import SimProcess

RESULTS = Path(__file__).parent / "results"
MODEL = "sim-model"
FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"
OBJECTIVE_HEADER = "x-llm-d-inference-objective"
DROPPED_HEADER = "x-llm-d-request-dropped-reason"
HIGH_OBJECTIVE, LOW_OBJECTIVE = "interactive", "batch"
HIGH_PRIORITY, LOW_PRIORITY = 10, 0
OBJECTIVES = f"""\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {{name: {HIGH_OBJECTIVE}}}
spec: {{priority: {HIGH_PRIORITY}, poolRef: {{name: epp}}}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {{name: {LOW_OBJECTIVE}}}
spec: {{priority: {LOW_PRIORITY}, poolRef: {{name: epp}}}}
"""
# Filler for prompts: plain words, so the simulator's tokenizer gives a steady token count per word.
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "bright", "birds",
          "sing", "about", "rivers", "and", "hills", "under", "an", "open", "sky")  # fmt: skip
SAMPLE_INTERVAL = 0.25  # wall s between samples of the pods' running / waiting gauges


@dataclass(frozen=True, slots=True)
class Setup:
    """Every knob of a run; stored in the JSON next to the results."""

    # A protected request waits for the next slot to free: about (service time / slots). 32 slots keep that
    # small next to the unloaded TTFT, as in pools of realistic size (see FLOWCONTROL.md for 16 slots).
    pods: int = 8
    max_concurrency: int = 4  # concurrency-detector maxConcurrency: requests in flight per pod
    # Slow motion (simulated seconds per wall second): the 8B profile's latencies x 5 on the wall clock, so host
    # overheads and jitter (a few to tens of wall ms on the shared cores) are small next to the model's, and
    # 32 slots turn over at only ~43 requests/s.
    time_scale: float = 0.2
    profile: str = "llama-8b-h100"
    # ~40 prompt tokens (a unique lead-in + filler words): the prefill is mostly the profile's fixed 30 ms, so a
    # pod at its concurrency limit still prefills at near-unloaded speed (the simulator shares prefill work
    # among concurrent prefills). Measured and reported.
    prompt_words: int = 8
    # Output length drawn uniformly per request: with one fixed length, requests that start together finish
    # together (decode runs in lockstep per pod) and slots free in bursts, which no real workload does.
    output_min: int = 4
    output_max: int = 16
    rate: float = 7.0  # quiet tenant / high band, requests per wall second (~1/6 of the pool's capacity)
    flood_factor: float = 10.0  # noisy tenant / low band rate = flood_factor x rate
    duration: float = 20.0  # wall s of arrivals per scenario
    ttl_s: float = 5.0  # flowControl.defaultRequestTTL (wall clock: the EPP runs on it)
    band_max_requests: int = 1000
    seed: int = 7
    first_host: int = 230  # pods on 127.0.0.230-237 (other suites use 60-223)

    @property
    def slots(self) -> int:
        return self.pods * self.max_concurrency

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.{self.first_host + i}" for i in range(self.pods)]


QUICK = Setup(duration=8.0)


@dataclass(frozen=True, slots=True)
class Traffic:
    label: str  # tenant (fairness id) or band name
    rate: float  # requests per wall second, Poisson
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    policy: str  # key of the EPP config it runs under
    traffic: tuple[Traffic, ...]


def scenarios(s: Setup) -> list[Scenario]:
    flood = s.rate * s.flood_factor
    quiet = Traffic("quiet", s.rate, ((FAIRNESS_HEADER, "quiet"),))
    noisy = Traffic("noisy", flood, ((FAIRNESS_HEADER, "noisy"),))
    high = Traffic("high", s.rate, ((OBJECTIVE_HEADER, HIGH_OBJECTIVE), (FAIRNESS_HEADER, "high")))
    low = Traffic("low", flood, ((OBJECTIVE_HEADER, LOW_OBJECTIVE), (FAIRNESS_HEADER, "low")))
    return [
        Scenario("quiet-alone", "quiet tenant alone (unloaded baseline)", "round-robin", (quiet,)),
        Scenario("round-robin", "quiet + noisy at 10x, round-robin fairness", "round-robin", (quiet, noisy)),
        Scenario("global-strict", "quiet + noisy at 10x, global-strict fairness", "global-strict", (quiet, noisy)),
        Scenario("high-alone", "high band alone (unloaded baseline)", "priority", (high,)),
        Scenario("priority", "high band + low band at 10x", "priority", (high, low)),
    ]


POLICIES = {
    "round-robin": "round-robin-fairness-policy",
    "global-strict": "global-strict-fairness-policy",
    "priority": "round-robin-fairness-policy",
}


def epp_config(s: Setup, policy: str) -> str:
    """The EndpointPickerConfig of one policy (file discovery is added by the runner)."""
    fairness = POLICIES[policy]
    bands = ""
    if policy == "priority":
        bands = (
            "  priorityBands:\n"
            # An explicit band does not take defaultPriorityBand's fields (as the reference): name the policy.
            f"  - {{priority: {HIGH_PRIORITY}, maxRequests: {s.band_max_requests}, fairnessPolicyRef: {fairness}}}\n"
            f"  - {{priority: {LOW_PRIORITY}, maxRequests: {s.band_max_requests}, fairnessPolicyRef: {fairness}}}\n"
        )
    # concurrency-detector twice over: the dispatch gate (flowControl.saturationDetector) and the filter that
    # sends a dispatched request to a pod with a free slot; active-request-scorer spreads quiet-time load.
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {{maxConcurrency: {s.max_concurrency}}}
- type: active-request-scorer
- type: {fairness}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: concurrency-detector}}, {{pluginRef: active-request-scorer}}]
flowControl:
  defaultRequestTTL: {s.ttl_s:g}s
  saturationDetector: {{pluginRef: concurrency-detector}}
  defaultPriorityBand: {{fairnessPolicyRef: {fairness}, maxRequests: {s.band_max_requests}}}
{bands}"""


def sim_args(s: Setup, port: int) -> list[str]:
    return ["--hosts", ",".join(s.hosts), "--port", str(port), "--latency-profile", s.profile,
            "--time-scale", f"{s.time_scale:g}"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ results
@dataclass(slots=True)
class Sample:
    """One request as the client saw it (wall seconds)."""

    label: str
    sent: float  # since the scenario started
    status: int = 0
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    reason: str = ""  # x-llm-d-request-dropped-reason, or the client-side error

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.ttft is not None and not self.reason


@dataclass(slots=True)
class TenantSummary:
    label: str
    rate: float  # offered, requests per wall second
    sent: int
    ok: int
    success_rate: float
    # Percentiles over every request sent, failures (429s, errors) counted as infinite TTFT: None when the
    # percentile falls on one. So a tenant cannot look fast by being rejected.
    ttft_ms: dict[str, float | None]
    ttft_ok_ms: dict[str, float | None]  # the same over successful requests only
    # Mean TTFT of successful requests and, below, the mean of its part spent in the EPP's queues: the
    # difference is the rest of the path (Envoy, EPP scheduling, the pod's prefill).
    ttft_ok_mean_ms: float | None
    outcomes: dict[str, int]  # "ok", "rejected-ttl-expired", "rejected-saturated", other reasons
    epp_wait_ms_mean: float | None  # mean time in the EPP's queues of dispatched requests (EPP histogram)
    epp_dispatched: int
    prompt_tokens: int  # median over successful requests (from the usage chunk)


@dataclass(slots=True)
class PodLoad:
    max_running: int  # any pod, any sample
    max_waiting: int
    max_in_pod: int  # running + waiting of one pod in one sample: never above maxConcurrency if the gate holds
    mean_running_total: float  # over samples, summed over pods
    # Mean TTFT the pods themselves report (vllm:time_to_first_token_seconds, arrival at the pod to first token),
    # converted to wall ms: what is left of the client's TTFT is the EPP's queue plus the host path.
    pod_ttft_ms_mean: float | None = None


@dataclass(slots=True)
class ScenarioResult:
    key: str
    title: str
    policy: str
    duration_s: float
    wall_s: float
    tenants: list[TenantSummary]
    served_per_s: float  # successful requests per wall second, first arrival to last response
    pods: PodLoad
    epp_outcomes: dict[str, int]  # llm_d_epp_flow_control_requests_total deltas
    cpu_cores: dict[str, float]  # per process over the scenario window
    loadavg: str


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        v = pct(values, q)
        out[name] = None if v == float("inf") else round(v * 1000, 1)
    return out


def summarize(
    traffic: Traffic, samples: list[Sample], epp_waits: dict[str, tuple[float, int]] | None = None
) -> TenantSummary:
    """Per-tenant numbers from the client's samples and the EPP's queue-wait histogram deltas."""
    mine = [x for x in samples if x.label == traffic.label]
    ok = [x for x in mine if x.ok]
    all_ttft = [x.ttft if x.ok and x.ttft is not None else float("inf") for x in mine]
    ok_ttft = [x.ttft for x in ok if x.ttft is not None]
    outcomes = Counter("ok" if x.ok else (x.reason or f"http {x.status}") for x in mine)
    wait_sum, dispatched = (epp_waits or {}).get(traffic.label, (0.0, 0))
    prompt = sorted(x.prompt_tokens for x in ok)
    return TenantSummary(
        label=traffic.label,
        rate=traffic.rate,
        sent=len(mine),
        ok=len(ok),
        success_rate=round(len(ok) / len(mine), 4) if mine else 0.0,
        ttft_ms=_pcts(all_ttft),
        ttft_ok_ms=_pcts(ok_ttft),
        ttft_ok_mean_ms=round(sum(ok_ttft) / len(ok_ttft) * 1000, 1) if ok_ttft else None,
        outcomes=dict(outcomes),
        epp_wait_ms_mean=round(wait_sum / dispatched * 1000, 1) if dispatched else None,
        epp_dispatched=dispatched,
        prompt_tokens=prompt[len(prompt) // 2] if prompt else 0,
    )


# ------------------------------------------------------------------------------------------------ client
def request_body(label: str, i: int, s: Setup, rng: random.Random) -> bytes:
    # A unique lead-in first: no two prompts share their first KV block, so no prefix-cache hits and every
    # prefill costs the same.
    words = " ".join(rng.choice(_WORDS) for _ in range(s.prompt_words))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"{label} request {i} {rng.getrandbits(48):012x}: {words}"}],
        "max_tokens": rng.randint(s.output_min, s.output_max),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')


async def send(
    session: aiohttp.ClientSession, url: str, label: str, body: bytes, headers: dict[str, str], start: float
) -> Sample:
    """One streamed chat completion; never raises. TTFT = the first token event (the role chunk is not one)."""
    t0 = time.monotonic()
    out = Sample(label, t0 - start)
    events = 0
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.reason = resp.headers.get(DROPPED_HEADER) or f"http {resp.status}"
                await resp.read()
            else:
                buf = b""
                async for chunk in resp.content.iter_any():
                    now = time.monotonic()
                    buf += chunk
                    *complete, buf = buf.split(b"\n\n")  # SSE events end with a blank line
                    for event in complete:
                        events += 1
                        if events == 2:  # event 1 is the chat role chunk, written before the prefill
                            out.ttft = now - t0
                        m = _PROMPT_TOKENS.search(event)
                        if m:
                            out.prompt_tokens = int(m.group(1))
                # role chunk, usage chunk and [DONE] carry no token
                out.tokens = max(0, events - 3)
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        out.reason = type(exc).__name__
    out.latency = time.monotonic() - t0
    if out.status == 200 and not out.reason and out.ttft is None:
        out.reason = "no-token"
    return out


def arrivals(scenario: Scenario, s: Setup) -> list[tuple[float, Traffic, int]]:
    """Poisson arrival times per tenant over the scenario, merged; seeded, so every run sends the same."""
    out: list[tuple[float, Traffic, int]] = []
    for t in scenario.traffic:
        rng = random.Random(f"{s.seed}-{scenario.key}-{t.label}")
        at, i = rng.expovariate(t.rate), 0
        while at < s.duration:
            out.append((at, t, i))
            at += rng.expovariate(t.rate)
            i += 1
    out.sort(key=lambda a: a[0])
    return out


# ------------------------------------------------------------------------------------------------ processes
class EppBehindEnvoy:
    """The `epp` program (flowControl config + objectives file) and Envoy in front of it, as the routing
    benchmark runs them (benchmarks.contenders: the bootstrap of llmepp.testing.envoy without the access log),
    with the EPP's metrics port known so the runner can read its queue-wait histograms."""

    def __init__(self, config_text: str, pods: list[tuple[str, int]], workdir: Path, objectives: Path) -> None:
        self.config_text = config_text
        self.pods = pods
        self.workdir = workdir
        self.objectives = objectives
        self.epp: EppProcess | None = None
        self.envoy: EnvoyProcess | None = None
        self.url = ""
        self.metrics_url = ""

    async def start(self) -> None:
        endpoints = self.workdir / "endpoints.yaml"
        entries = [{"name": f"pod-{i}", "address": h, "port": p} for i, (h, p) in enumerate(self.pods)]
        endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
        config = self.workdir / "epp-config.yaml"
        config.write_text(with_file_discovery(self.config_text, endpoints))
        grpc_port, health, metrics = free_port(), free_port(), free_port()
        args = loopback_epp_args(config, grpc_port, health, metrics, "--objectives-file", str(self.objectives))
        self.epp = EppProcess(args, health, self.workdir / "epp.log")
        await self.epp.start()
        port, admin = free_port(), free_port()
        self.envoy = EnvoyProcess(envoy_yaml(port, admin, epp_port=grpc_port), admin)
        await self.envoy.start()
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        if self.epp is not None:
            await self.epp.stop()

    def pids(self) -> dict[str, int]:
        out = {}
        for name, p in (("epp", self.epp), ("envoy", self.envoy)):
            if p is not None and p.proc is not None:
                out[name] = p.proc.pid
        return out


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _metrics_text(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return ""


@dataclass(slots=True)
class EppCounters:
    """Cumulative flow-control counters of the EPP, read before and after a scenario."""

    outcomes: dict[str, float] = field(default_factory=dict)
    waits: dict[str, tuple[float, float]] = field(default_factory=dict)  # fairness id → (sum s, count) dispatched

    @classmethod
    def parse(cls, text: str) -> EppCounters:
        out = cls()
        for family in text_string_to_metric_families(text):
            for sm in family.samples:
                if sm.name == "llm_d_epp_flow_control_requests_total":
                    key = sm.labels["outcome"]
                    out.outcomes[key] = out.outcomes.get(key, 0.0) + sm.value
                elif sm.name.startswith("llm_d_epp_flow_control_request_queue_duration_seconds_") and (
                    sm.labels.get("outcome") == "Dispatched"
                ):
                    fid = sm.labels["fairness_id"]
                    total, count = out.waits.get(fid, (0.0, 0.0))
                    if sm.name.endswith("_sum"):
                        total += sm.value
                    elif sm.name.endswith("_count"):
                        count += sm.value
                    out.waits[fid] = (total, count)
        return out

    def minus(self, before: EppCounters) -> tuple[dict[str, int], dict[str, tuple[float, int]]]:
        outcomes = {k: round(v - before.outcomes.get(k, 0.0)) for k, v in self.outcomes.items()}
        waits = {}
        for fid, (total, count) in self.waits.items():
            b_total, b_count = before.waits.get(fid, (0.0, 0.0))
            waits[fid] = (total - b_total, round(count - b_count))
        return {k: v for k, v in outcomes.items() if v}, waits


class PodSampler:
    """Samples every pod's running / waiting gauges: shows that the backlog sits in the EPP, not in the pods."""

    def __init__(self, session: aiohttp.ClientSession, pods: list[tuple[str, int]]) -> None:
        self.session = session
        self.urls = [f"http://{h}:{p}/metrics" for h, p in pods]
        self.max_running = 0
        self.max_waiting = 0
        self.max_in_pod = 0
        self.totals: list[int] = []

    async def _pages(self) -> list[str]:
        return list(await asyncio.gather(*(_metrics_text(self.session, u) for u in self.urls)))

    async def ttft_totals(self) -> tuple[float, float]:
        """(sum of simulated seconds, count) of the pods' TTFT histograms, summed over pods."""
        total = count = 0.0
        for text in await self._pages():
            for line in text.splitlines():
                if line.startswith("vllm:time_to_first_token_seconds_sum"):
                    total += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:time_to_first_token_seconds_count"):
                    count += float(line.rsplit(" ", 1)[1])
        return total, count

    async def sample(self) -> tuple[int, int]:
        texts = await self._pages()
        running_total = waiting_total = 0
        for text in texts:
            running = waiting = 0
            for line in text.splitlines():
                if line.startswith("vllm:num_requests_running"):
                    running = int(float(line.rsplit(" ", 1)[1]))
                elif line.startswith("vllm:num_requests_waiting"):
                    waiting = int(float(line.rsplit(" ", 1)[1]))
            self.max_running = max(self.max_running, running)
            self.max_waiting = max(self.max_waiting, waiting)
            self.max_in_pod = max(self.max_in_pod, running + waiting)
            running_total += running
            waiting_total += waiting
        return running_total, waiting_total

    async def run(self) -> None:
        while True:
            running, _ = await self.sample()
            self.totals.append(running)
            await asyncio.sleep(SAMPLE_INTERVAL)

    def result(self, ttft_before: tuple[float, float], ttft_after: tuple[float, float], time_scale: float) -> PodLoad:
        mean = sum(self.totals) / len(self.totals) if self.totals else 0.0
        n = ttft_after[1] - ttft_before[1]
        ttft = round((ttft_after[0] - ttft_before[0]) / n / time_scale * 1000, 1) if n else None
        return PodLoad(self.max_running, self.max_waiting, self.max_in_pod, round(mean, 2), ttft)


# ------------------------------------------------------------------------------------------------ runner
async def until_idle(session: aiohttp.ClientSession, sampler: PodSampler, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        running, waiting = await sampler.sample()
        if running == 0 and waiting == 0:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("pods still busy after the scenario")


async def warm_up(session: aiohttp.ClientSession, url: str, s: Setup) -> None:
    """Until a request goes through (Envoy ↔ EPP stream up), then a few more to warm every process."""
    rng = random.Random(0)
    deadline = time.monotonic() + 30
    while True:
        sample = await send(session, url, "warm", request_body("warm", 0, s, rng), {}, time.monotonic())
        if sample.ok:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up request failed: {sample}")
        await asyncio.sleep(0.25)
    await asyncio.gather(
        *(send(session, url, "warm", request_body("warm", i, s, rng), {}, time.monotonic()) for i in range(8))
    )


async def run_scenario(
    scenario: Scenario, s: Setup, stack: EppBehindEnvoy, session: aiohttp.ClientSession, sim_pid: int
) -> tuple[ScenarioResult, list[Sample]]:
    plan = arrivals(scenario, s)
    bodies = [request_body(t.label, i, s, random.Random(f"{s.seed}-{scenario.key}-{t.label}-{i}")) for _, t, i in plan]
    url = stack.url + "/v1/chat/completions"
    sampler = PodSampler(session, stack.pods)
    before = EppCounters.parse(await _metrics_text(session, stack.metrics_url))
    pod_ttft0 = await sampler.ttft_totals()
    pids = {**stack.pids(), "sim": sim_pid}
    cpu0 = {k: _cpu_seconds(p) for k, p in pids.items()}
    client0 = time.process_time()
    sampling = asyncio.create_task(sampler.run())
    start = time.monotonic()
    tasks: list[asyncio.Task[Sample]] = []
    for (at, traffic, _), body in zip(plan, bodies):
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {"Content-Type": "application/json", **dict(traffic.headers)}
        tasks.append(asyncio.create_task(send(session, url, traffic.label, body, headers, start)))
    samples = list(await asyncio.gather(*tasks))
    wall = time.monotonic() - start
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    cpu = {}
    for k, p in pids.items():
        c1, c0 = _cpu_seconds(p), cpu0[k]
        if c1 is not None and c0 is not None:
            cpu[k] = round((c1 - c0) / wall, 3)
    cpu["client"] = round((time.process_time() - client0) / wall, 3)
    after = EppCounters.parse(await _metrics_text(session, stack.metrics_url))
    outcomes, waits = after.minus(before)
    tenants = [summarize(t, samples, waits) for t in scenario.traffic]
    served = sum(t.ok for t in tenants) / wall  # under saturation: the pool's capacity
    await until_idle(session, sampler)
    pod_ttft1 = await sampler.ttft_totals()
    result = ScenarioResult(
        key=scenario.key,
        title=scenario.title,
        policy=scenario.policy,
        duration_s=s.duration,
        wall_s=round(wall, 1),
        tenants=tenants,
        served_per_s=round(served, 2),
        pods=sampler.result(pod_ttft0, pod_ttft1, s.time_scale),
        epp_outcomes=outcomes,
        cpu_cores=cpu,
        loadavg=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )
    return result, samples


REQUEST_FIELDS = ("label", "sent_s", "status", "ttft_ms", "latency_ms", "tokens", "prompt_tokens", "reason")


def raw_requests(raw: dict[str, list[Sample]]) -> dict[str, Any]:
    """Every request of every scenario as a compact row (wall-clock times; ttft_ms null when no token came)."""
    rows = {
        key: [
            [x.label, round(x.sent, 4), x.status, None if x.ttft is None else round(x.ttft * 1000, 2),
             round(x.latency * 1000, 2), x.tokens, x.prompt_tokens, x.reason]
            for x in samples
        ]
        for key, samples in raw.items()
    }  # fmt: skip
    return {"fields": list(REQUEST_FIELDS), "scenarios": rows}


def _line(r: ScenarioResult) -> str:
    parts = []
    for t in r.tenants:
        q = t.ttft_ms
        bad = {k: v for k, v in t.outcomes.items() if k != "ok"}
        parts.append(f"{t.label}: sent {t.sent} ok {t.success_rate:.0%} TTFT p50/p90/p99 {q['p50']}/{q['p90']}/"
                     f"{q['p99']} ms, EPP wait {t.epp_wait_ms_mean} ms {bad or ''}")  # fmt: skip
    return (f"  {r.key}: {'; '.join(parts)} | served {r.served_per_s}/s, pods max running {r.pods.max_running} "
            f"waiting {r.pods.max_waiting} in one pod {r.pods.max_in_pod}, mean running {r.pods.mean_running_total}, "
            f"pod TTFT {r.pods.pod_ttft_ms_mean} ms, "
            f"cpu {r.cpu_cores}, "
            f"load {r.loadavg}")  # fmt: skip


async def run(s: Setup, only: list[str] | None = None) -> tuple[dict[str, Any], dict[str, list[Sample]]]:
    """Every chosen scenario on one set of pods; the summary (for the JSON) and every request per scenario."""
    chosen = [sc for sc in scenarios(s) if not only or sc.key in only]
    t0 = time.monotonic()
    out: dict[str, Any] = {
        "benchmark": "flowcontrol_tenants",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": report.machine_info(),
        "loadavg": {"start": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        # The benchmark machine is shared (2 cores): other work may run meanwhile, see the load average.
        "shared_machine": "shared machine: other work may have run at the same time",
        "setup": {**asdict(s), "slots": s.slots},
        "objectives": OBJECTIVES,
        "configs": {p: epp_config(s, p) for p in dict.fromkeys(sc.policy for sc in chosen)},
        "scenarios": {},
    }
    raw: dict[str, list[Sample]] = {}
    port = free_port(s.hosts[0])
    args = sim_args(s, port)
    out["sim_args"] = args
    sim = SimProcess(args, ready_timeout=60)
    await sim.start_async()
    assert sim.process is not None
    pods = [(h, port) for h in s.hosts]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=s.ttl_s + 60)
    try:
        with tempfile.TemporaryDirectory(prefix="fc-tenants-") as tmp:
            objectives = Path(tmp) / "objectives.yaml"
            objectives.write_text(OBJECTIVES)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                for policy, config in out["configs"].items():
                    workdir = Path(tmp) / policy
                    workdir.mkdir()
                    stack = EppBehindEnvoy(config, pods, workdir, objectives)
                    try:
                        await stack.start()
                        await warm_up(session, stack.url + "/v1/chat/completions", s)
                        for sc in (c for c in chosen if c.policy == policy):
                            print(f"== {sc.key}: {sc.title} ({s.duration:g} s)", flush=True)
                            result, samples = await run_scenario(sc, s, stack, session, sim.process.pid)
                            raw[sc.key] = samples
                            print(_line(result), flush=True)
                            out["scenarios"][sc.key] = asdict(result)
                    finally:
                        await stack.stop()
    finally:
        await asyncio.to_thread(sim.stop)
    out["loadavg"]["end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out, raw


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_section(quick: bool, out_dir: Path, timeout: float = 900.0) -> bool:
    """`benchmarks.run_all`'s flow-control section: this module in a child process (its own event loop and
    children), output streamed; a failure is reported, not raised, so the other sections still run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.flowcontrol_tenants", "--json", str(out_dir / "flowcontrol_tenants.json")]
    if quick:
        cmd.append("--quick")
    print(f"  $ {' '.join(cmd)}", flush=True)
    child = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    try:
        code = child.wait(timeout)
    except BaseException as exc:
        # SIGTERM, not SIGKILL: the child unwinds and stops the pods, the EPP and Envoy it started.
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            print(f"  flowcontrol_tenants: timed out after {timeout:.0f} s", flush=True)
            return False
        raise
    if code != 0:
        print(f"  flowcontrol_tenants: exit {code}", flush=True)
    return code == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK.duration:g} s per scenario instead of "
                   f"{Setup().duration:g}")  # fmt: skip
    p.add_argument("--json", type=Path, default=RESULTS / "flowcontrol_tenants.json")
    p.add_argument("--scenarios", default="", help="comma-separated subset of scenario keys (development)")
    for name, kind in (("duration", float), ("rate", float), ("time-scale", float), ("max-concurrency", int),
                       ("pods", int), ("output-min", int), ("output-max", int), ("prompt-words", int),
                       ("ttl-s", float)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, help="override the setup (development)")
    a = p.parse_args(argv)
    s = QUICK if a.quick else Setup()
    overrides = {
        k: getattr(a, k)
        for k in (
            "duration",
            "rate",
            "time_scale",
            "max_concurrency",
            "pods",
            "output_min",
            "output_max",
            "prompt_words",
            "ttl_s",
        )
        if getattr(a, k) is not None
    }
    s = replace(s, **overrides)
    only = [k for k in a.scenarios.split(",") if k]
    signal.signal(signal.SIGTERM, _interrupt)  # unwind like Ctrl-C: the finally blocks stop every child
    import uvloop

    data, raw = uvloop.run(run(s, only))
    data["quick"] = a.quick
    data["command"] = " ".join([".venv/bin/python -m benchmarks.flowcontrol_tenants", *sys.argv[1:]])
    a.json.parent.mkdir(parents=True, exist_ok=True)
    # Every request, compact, next to the summary (like routing-requests.json.gz): percentiles can be recomputed.
    requests = a.json.with_name(a.json.stem + "-requests.json.gz")
    data["requests_file"] = requests.name
    a.json.write_text(json.dumps(data, indent=1))
    with gzip.open(requests, "wt") as fh:
        json.dump(raw_requests(raw), fh, separators=(",", ":"))
    print(report.flowcontrol_tenants_table(data))
    print()
    for row in report.flowcontrol_tenant_targets(data):
        print(" | ".join(row))
    print(f"wrote {a.json} ({data['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
