"""The benchmark's pod sampler: a failed /metrics scrape is no sample of zeros."""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from benchmarks import (
    extproc_overhead,
    flowcontrol_overhead,
    flowcontrol_tenants,
    pd_disagg,
    scheduling,
    scrape_cost,
)
from benchmarks.loadgen import StageWindow
from benchmarks.metrics import Sampler, pct, summarize_stage
from benchmarks.workloads import StageSpec


async def test_a_failed_scrape_at_a_stage_edge_is_skipped_not_read_as_zero_counters() -> None:
    """Counters are deltas between the samples nearest a stage's ends: a failed scrape there read as zeros
    made the stage's hit rate the whole run's (warm-up included), or its deltas negative."""
    counters = {"hits": 100.0, "queries": 1000.0}
    failing = False

    async def metrics(request: web.Request) -> web.Response:
        if failing:
            return web.Response(status=503, text="vllm:prefix_cache_queries_total 0\n")
        lines = [f"vllm:prefix_cache_{name}_total {value}" for name, value in counters.items()]
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    sampler = Sampler([f"http://127.0.0.1:{runner.addresses[0][1]}"], {})
    try:
        await sampler.start()  # a good sample before the stage: 100 / 1000
        assert sampler._task is not None
        sampler._task.cancel()  # sampled by hand below
        failing = True
        await sampler.sample()  # the scrape at the stage's start fails
        failing = False
        await asyncio.sleep(0.2)  # the stage runs (the sample before it is the good one nearest its start)
        counters.update(hits=1000.0, queries=2000.0)  # the stage: 900 hits of 1000 queries
        await sampler.sample()
    finally:
        await sampler.stop()
        await runner.cleanup()
    edges = [s.t for s in sampler.samples]
    assert [s.complete for s in sampler.samples] == [True, False, True, True]
    window = StageWindow(1, StageSpec(1.0, 10.0), start=edges[1], end=edges[2])
    summary = summarize_stage(window, [], sampler, time_scale=1.0, token_unit=1)
    assert summary["prefix_hit_rate"] == 0.9


def test_every_benchmark_takes_nearest_rank_percentiles() -> None:
    """Five benchmarks had their own percentile, one rank high (index int(q * n)): p90 of ten values was the
    maximum, p50 of two the larger. They all take metrics.pct now."""
    for module in (pd_disagg, flowcontrol_tenants, flowcontrol_overhead, scrape_cost, extproc_overhead, scheduling):
        assert module.pct is pct, module.__name__
    assert pct([float(i) for i in range(10, 0, -1)], 0.9) == 9.0
    assert pct([2.0, 1.0], 0.5) == 1.0 and pct([1.0, math.inf], 0.99) == math.inf and math.isnan(pct([], 0.5))
