"""benchmarks.predicted_latency's `slo-mix` comparison: its pieces, quickly and without timing (the benchmark
itself is `python -m benchmarks.predicted_latency --workloads slo-mix`).

The workload is seeded and states each class's SLOs in the units the EPP sees (wall ms, simulated tokens); the
client asks for usage and does not count the usage event as a token (checked against a real simulator
stream, with the SLO headers on the wire); attainment counts failed requests as misses; the tables render.
"""

from __future__ import annotations

import json
import math
from typing import Any, cast

import aiohttp
from aiohttp import web

from benchmarks import predicted_latency as pl
from benchmarks.loadgen import Outcome, drop_trailing_events, execute
from benchmarks.workloads import SLO_CLASSES, Scale, SloMix, build
from llmepp.config.loader import build as build_config
from llmepp.config.loader import load_config
from llmepp.plugins.scorers.latency import LatencyScorer
from llmepp.testing.ports import free_port
from llmepp_sim.cluster import SimProcess


def test_slo_mix_is_seeded_and_states_slos_in_the_epps_units() -> None:
    scale = Scale(time_scale=4.0, token_unit=16)
    wl = build("slo-mix", scale, quick=False, seed=3)
    assert isinstance(wl, SloMix)
    assert wl.stages[0].warmup and not any(s.warmup for s in wl.stages[1:])
    again = build("slo-mix", scale, quick=False, seed=3)
    assert isinstance(again, SloMix)
    assert [wl.call(i).body for i in range(20)] == [again.call(i).body for i in range(20)]
    calls = [wl.call(i) for i in range(2000)]
    interactive = [c for c in calls if c.key.startswith("interactive/")]
    assert 0.66 < len(interactive) / len(calls) < 0.74
    # 300 simulated ms at time scale 4 = 75 wall ms; 25 ms per real token = 25 x 16 / 4 wall ms per sim token.
    assert dict(interactive[0].headers) == {"x-llm-d-slo-ttft-ms": "75", "x-llm-d-slo-tpot-ms": "100"}
    body = json.loads(interactive[0].body)
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and interactive[0].usage
    batch = [c for c in calls if c.key.startswith("batch/")]
    assert min(c.prompt_tokens for c in batch) >= 4000 / 16 - 1 > max(c.prompt_tokens for c in interactive)
    assert build("slo-mix", scale, quick=True, seed=3).stages[0].warmup


def test_trailing_events_are_taken_back_across_reads() -> None:
    reads = [(1.0, 3), (2.0, 1), (3.0, 2)]
    drop_trailing_events(reads, 2)
    assert reads == [(1.0, 3), (2.0, 1)]
    drop_trailing_events(reads, 2)
    assert reads == [(1.0, 2)]
    drop_trailing_events(reads, 5)
    assert reads == []


async def test_the_client_sends_the_headers_and_counts_tokens_without_the_usage_event() -> None:
    wl = build("slo-mix", Scale(time_scale=20.0), quick=True, seed=1)
    assert isinstance(wl, SloMix)
    call = wl.call(0)
    args = ["--hosts", "127.0.0.241", "--port", "0", "--time-scale", "20", "--served-model-name", *wl.served_models()]
    with SimProcess(args) as sim:
        async with aiohttp.ClientSession() as session:
            out, _ = await execute(session, sim.urls[0], call, 0, 10.0, 30.0)
    assert out.ok, out
    assert out.tokens == call.max_tokens

    seen: dict[str, str] = {}

    async def echo(request: web.Request) -> web.Response:
        seen.update(request.headers)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/v1/completions", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            out, _ = await execute(session, f"http://127.0.0.1:{port}", call, 0, 5.0, 5.0)
    finally:
        await runner.cleanup()
    assert out.error == "http 503"
    assert seen["x-llm-d-slo-ttft-ms"] == dict(call.headers)["x-llm-d-slo-ttft-ms"]


def _outcome(ttft_s: float, tpot_ms: float, tokens: int = 11, error: str | None = None) -> Outcome:
    # Wall times at time scale 1, token unit 1: first token at ttft_s, then tokens - 1 gaps of tpot_ms.
    o = Outcome(0, "interactive/0", 0.0, tokens, first=ttft_s, error=error)
    if error is None:
        o.reads = [(ttft_s, 1), (ttft_s + (tokens - 1) * tpot_ms / 1000, tokens - 1)]
        o.tokens = tokens
    return o


def test_attainment_needs_both_slos_and_counts_failures_as_misses() -> None:
    cls = SLO_CLASSES[0]  # 300 ms, 25 ms
    scale = Scale(time_scale=1.0, token_unit=1)
    outs = [_outcome(0.2, 20), _outcome(0.2, 30), _outcome(0.4, 20), _outcome(0.0, 0, error="timeout")]
    st = pl.class_stats(outs, cls, scale, sim_seconds=10.0)
    assert st["sent"] == 4 and st["ok"] == 3 and st["success_rate"] == 0.75
    assert st["slo_attainment"] == 0.25 and st["ttft_slo_attainment"] == 0.5 and st["tpot_slo_attainment"] == 0.5
    assert st["ttft_p90_s"] == "timeout" and math.isclose(st["ttft_p50_s"], 0.2)
    assert math.isclose(st["tpot_p50_ms"], 20) and st["output_tokens_per_s"] == 3.3


def _report() -> dict[str, Any]:
    def contender(att: float) -> dict[str, Any]:
        cls = {"sent": 100, "slo_attainment": att, "ttft_p50_s": 0.2, "ttft_p90_s": 0.4, "tpot_p50_ms": 20.5,
               "tpot_p90_ms": 21.0, "output_tokens_per_s": 900.0, "success_rate": 1.0}  # fmt: skip
        stages = [{"label": label, "warmup": label == "warm-up", "classes": {"interactive": cls, "batch": cls}}
                  for label in ("warm-up", "2", "4")]  # fmt: skip
        return {"status": "ok", "classes": stages}

    runs = [{"seed": s, "contenders": {"epp-default": contender(0.5 + s / 10),
                                       "epp-predicted-latency": contender(0.9)}} for s in (1, 2)]  # fmt: skip
    return {"workload": {"classes": [{"name": "interactive"}, {"name": "batch"}]}, "runs": runs}


def test_the_tables_give_the_median_and_range_over_seeds() -> None:
    md = pl.slo_tables(_report())
    assert "**interactive**" in md and "**batch**" in md and "warm-up" not in md
    assert "| 2 | 100 | default | 65 (60-70) | 0.20 / 0.40 | 20.5 / 21.0 | 900 | 100.0 |" in md
    assert "| 4 | 100 | predicted | 90 | 0.20 / 0.40 |" in md


def test_the_spreading_variant_changes_only_the_headroom_strategy() -> None:
    def strategies(text: str) -> list[bool]:
        return [
            cast(LatencyScorer, p).most
            for p in build_config(load_config(text)).plugins.values()
            if p.type == "latency-scorer"
        ]

    assert strategies(pl.preset_text()) == [False] and strategies(pl.preset_text("most")) == [True]
    assert [c.name for c in pl.contenders()] == ["epp-default", "epp-predicted-latency"]
