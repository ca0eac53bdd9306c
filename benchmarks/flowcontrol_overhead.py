"""In-process flow-control cost: admit() latency, dispatch throughput, queued-memory bound.

    .venv/bin/python -m benchmarks.flowcontrol_overhead [--loop uvloop|asyncio] [--quick] [--json out.json]

Scenarios (16 endpoints, utilization detector over fresh metrics, no sockets):
  fast path     nothing queued, pool not saturated: admit() decides inline (no task switch)
  queued path   every request is enqueued, woken by the dispatcher task and resumed: a single
                permanently-gated request sits in a low band so the queues are never empty
                (this is enqueue → dispatch → return, the full actor round trip)
  throughput    C concurrent clients over F flows, closed loop, all through the queue path;
                both fairness policies
  memory        band maxBytes 64 MiB, 4,000 × 64 KiB bodies offered to a saturated pool:
                capacity rejections keep queued bytes ≤ maxBytes

Targets (issue 5): queue overhead ≤ 20 µs per request; ≥ 20,000 dispatches/s in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.metrics import pct
from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, EndpointSpec
from llmepp.errors import RequestError
from llmepp.flowcontrol.controller import BandConfig, FlowControlConfig, FlowController
from llmepp.flowcontrol.interfaces import UsageLimitPolicy
from llmepp.flowcontrol.metrics import FlowControlMetrics
from llmepp.flowcontrol.objectives import ObjectiveStore
from llmepp.framework.plugin import registry
from llmepp.request.types import InferenceRequest, RequestKind

STUCK_PRIORITY = -100


class _LowestBandHeld(UsageLimitPolicy):
    """Benchmark policy: the lowest band never dispatches (ceiling 0), every other band at 1.0."""

    type = "bench-lowest-band-held"

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        return [0.0 if p == STUCK_PRIORITY else 1.0 for p in priorities]


def make_pool(n: int) -> tuple[Endpoint, ...]:
    pool = []
    for i in range(n):
        ep = Endpoint(EndpointSpec(name=f"pod-{i}", address=f"10.1.0.{i + 1}", port=8000))
        # "Scraped in the future": never stale, so the benchmark needs no scraper.
        ep.metrics = EndpointMetrics(waiting_queue_size=1, kv_cache_usage_percent=0.3, update_time=1e18)
        pool.append(ep)
    return tuple(pool)


def make_controller(
    pool: tuple[Endpoint, ...], *, fairness: str = "global-strict-fairness-policy", hold_lowest: bool = False,
    band_max_bytes: int = 1_000_000_000, band_max_requests: int = 100_000,
) -> FlowController:  # fmt: skip
    build = registry.build
    usage: Any = _LowestBandHeld("bench") if hold_lowest else build("static-usage-limit-policy", "u", None)
    cfg = FlowControlConfig(
        detector=build("utilization-detector", "utilization-detector", None),  # type: ignore[arg-type]
        usage_limit=usage,
        default_band=BandConfig(
            ordering=build("fcfs-ordering-policy", "o", None),  # type: ignore[arg-type]
            fairness=build(fairness, "f", None),  # type: ignore[arg-type]
            max_requests=band_max_requests,
            max_bytes=band_max_bytes,
        ),
        default_ttl=60.0,
    )
    return FlowController(
        cfg,
        pool=lambda: pool,
        objectives=ObjectiveStore(),
        metrics=FlowControlMetrics.for_registry(CollectorRegistry()),
    )


def make_request(i: int, fairness_id: str = "default-flow", priority: int = 0, body: bytes = b"{}") -> InferenceRequest:
    return InferenceRequest(
        request_id=f"r{i}",
        path="/v1/completions",
        headers={},
        kind=RequestKind.COMPLETIONS,
        body=body,
        fairness_id=fairness_id,
        priority=priority,
    )


async def _stick_one(ctl: FlowController, pool: tuple[Endpoint, ...]) -> asyncio.Task[None]:
    """A request in the held lowest band: the queues are never empty, so nothing takes the fast path."""
    task = asyncio.get_running_loop().create_task(ctl.admit(make_request(-1, "stuck", STUCK_PRIORITY), pool))
    for _ in range(5):
        await asyncio.sleep(0)
    assert ctl.queued == 1
    return task


async def latency(n: int, queued: bool) -> dict[str, float]:
    pool = make_pool(16)
    ctl = make_controller(pool, hold_lowest=queued)
    stuck = await _stick_one(ctl, pool) if queued else None
    reqs = [make_request(i) for i in range(n)]
    samples: list[float] = []
    clock = time.perf_counter_ns
    warm = n // 10
    gc.collect()
    gc.disable()
    try:
        for i, r in enumerate(reqs):
            if i == warm:
                cpu0 = time.process_time()
            t0 = clock()
            await ctl.admit(r, pool)
            t1 = clock()
            if i >= warm:  # warm-up excluded
                samples.append((t1 - t0) / 1000)
        # CPU time per request, dispatcher task included: immune to preemption by other processes.
        cpu_us = (time.process_time() - cpu0) / (n - warm) * 1e6
    finally:
        gc.enable()
    await ctl.aclose()
    if stuck is not None:
        await asyncio.gather(stuck, return_exceptions=True)
    return {
        "p50_us": pct(samples, 0.5),
        "p90_us": pct(samples, 0.9),
        "p99_us": pct(samples, 0.99),
        "mean_us": statistics.fmean(samples),
        "cpu_us_per_request": cpu_us,
    }


async def throughput(seconds: float, clients: int, flows: int, fairness: str, queued: bool) -> dict[str, float]:
    pool = make_pool(16)
    ctl = make_controller(pool, fairness=fairness, hold_lowest=queued)
    stuck = await _stick_one(ctl, pool) if queued else None
    done = 0
    stop = False

    # A policy that learns from completions (program-aware-fairness) is told each request's service,
    # tenants differing by up to 10x, so its ordering by service keeps changing as in real use.
    learn = getattr(ctl.config.default_band.fairness, "attained", None)

    async def client(k: int) -> None:
        nonlocal done
        tenant = f"tenant-{k % flows}"
        r = make_request(k, tenant)
        tokens = 100 * (1 + k % 10)
        while not stop:
            await ctl.admit(r, pool)
            done += 1
            if learn is not None:
                learn(tenant, tokens, time.monotonic())
            await asyncio.sleep(0)  # the request goes on to schedule / proxy: yield like real work

    tasks = [asyncio.get_running_loop().create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(0.2)  # warm-up
    start_done, t0, cpu0 = done, time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    n = done - start_done
    rate = n / (time.perf_counter() - t0)
    # Per CPU-second: what one core sustains, whatever else the machine runs meanwhile.
    cpu_rate = n / max(1e-9, time.process_time() - cpu0)
    stop = True
    await ctl.aclose()
    await asyncio.gather(*tasks, return_exceptions=True)
    if stuck is not None:
        await asyncio.gather(stuck, return_exceptions=True)
    return {"dispatches_per_s": rate, "dispatches_per_cpu_s": cpu_rate, "clients": clients, "flows": flows}


async def memory(offered: int, body_kib: int, max_bytes: int) -> dict[str, float]:
    pool = make_pool(16)
    for ep in pool:  # saturated: everything that fits waits
        ep.metrics = EndpointMetrics(waiting_queue_size=50, update_time=1e18)  # "scraped in the future": never stale
    ctl = make_controller(pool, band_max_bytes=max_bytes)
    loop = asyncio.get_running_loop()
    rejected = 0

    async def submit(i: int) -> None:
        # Like the ext_proc stream: a rejected request is answered and dropped with its body.
        nonlocal rejected
        body = bytes(body_kib * 1024)  # a fresh body per request, as the stream buffers it
        try:
            await ctl.admit(make_request(i, f"t{i % 50}", body=body), pool)
        except RequestError:
            rejected += 1

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tasks = []
    for i in range(offered):
        tasks.append(loop.create_task(submit(i)))
        if i % 100 == 99:
            await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    result = {
        "offered": offered,
        "body_kib": body_kib,
        "max_bytes": max_bytes,
        "queued": ctl.queued,
        "queued_bytes": ctl.queued_bytes,
        "rejected_429": rejected,
        "traced_mib_held": held / 2**20,
        "traced_mib_peak": peak / 2**20,
    }
    await ctl.aclose()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert result["queued_bytes"] <= max_bytes
    return result


async def main_async(quick: bool) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    secs = 1.0 if quick else 3.0
    out: dict[str, Any] = {
        "fast_path": await latency(n, queued=False),
        "queued_path": await latency(n, queued=True),
        "throughput": [],
    }
    runs = [
        (fairness, clients, flows, True)
        for fairness in ("global-strict-fairness-policy", "round-robin-fairness-policy")
        for clients, flows in ((256, 100), (2000, 1000))
    ]
    runs.append(("global-strict-fairness-policy", 256, 100, False))
    # Least attained service scores every active flow of the band per dispatch: O(flows).
    runs += [("program-aware-fairness", clients, flows, True) for clients, flows in ((256, 100), (2000, 1000))]
    for fairness, clients, flows, queued in runs:
        r: dict[str, Any] = dict(await throughput(secs, clients, flows, fairness, queued=queued))
        r.update(fairness=fairness, path="queued" if queued else "fast")
        out["throughput"].append(r)
    out["memory"] = await memory(4000, 64, 64 * 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.loop == "uvloop":
        import uvloop

        uvloop.install()
    out = asyncio.run(main_async(a.quick))
    out["loop"] = a.loop
    f, q = out["fast_path"], out["queued_path"]
    print(f"loop: {a.loop}")
    for label, r in (("fast path  ", f), ("queued path", q)):
        print(
            f"{label} admit(): p50 {r['p50_us']:.2f} µs  p90 {r['p90_us']:.2f} µs  p99 {r['p99_us']:.2f} µs  "
            f"mean {r['mean_us']:.2f} µs  cpu {r['cpu_us_per_request']:.2f} µs/request"
        )
    for t in out["throughput"]:
        print(
            f"throughput {t['path']:6s} {t['fairness']:32s} clients={t['clients']:5d} flows={t['flows']:5d}: "
            f"{t['dispatches_per_s']:,.0f} dispatches/s wall, {t['dispatches_per_cpu_s']:,.0f} per CPU-second"
        )
    m = out["memory"]
    print(
        f"memory: offered {m['offered']} x {m['body_kib']} KiB to a saturated pool, band maxBytes "
        f"{m['max_bytes'] / 2**20:.0f} MiB → queued {m['queued']} ({m['queued_bytes'] / 2**20:.2f} MiB), "
        f"rejected {m['rejected_429']} with 429; traced memory held {m['traced_mib_held']:.1f} MiB "
        f"(peak {m['traced_mib_peak']:.1f} MiB)"
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
