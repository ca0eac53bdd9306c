"""benchmarks.flowcontrol_tenants: its pieces, quickly and without timing (the benchmark itself is `make bench`).

The configs it runs load through the real loader as flow controllers with the intended policies; arrivals are
seeded; percentiles count failed requests as infinite; the EPP's counters and the report's verdicts are computed
from the numbers; the SSE client reads a real simulator stream and a 429 with its reason header.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from benchmarks import flowcontrol_tenants as ft
from benchmarks import report
from llmepp.config.loader import build, load_config
from llmepp.flowcontrol.controller import FlowController
from llmepp.flowcontrol.objectives import ObjectivesFileWatcher, ObjectiveStore
from llmepp.plugins.flowcontrol.concurrency_detector import ConcurrencyDetector
from llmepp.plugins.flowcontrol.fairness import GlobalStrictFairnessPolicy, RoundRobinFairnessPolicy
from llmepp_sim.cluster import SimProcess

SETUP = ft.Setup()


def controller(policy: str) -> FlowController:
    admission = build(load_config(ft.epp_config(SETUP, policy))).pipeline.admission
    assert isinstance(admission, FlowController)
    return admission


@pytest.mark.parametrize(
    ("policy", "fairness"),
    [
        ("round-robin", RoundRobinFairnessPolicy),
        ("global-strict", GlobalStrictFairnessPolicy),
        ("priority", RoundRobinFairnessPolicy),
    ],
)
def test_each_config_is_a_flow_controller_gated_by_concurrency(policy: str, fairness: type) -> None:
    fc = controller(policy)
    assert isinstance(fc.detector, ConcurrencyDetector)
    assert fc.detector.max_requests == SETUP.max_concurrency
    assert fc.config.default_ttl == SETUP.ttl_s
    assert isinstance(fc.config.default_band.fairness, fairness)
    assert fc.config.default_band.max_requests == SETUP.band_max_requests
    if policy == "priority":
        assert sorted(fc.config.bands) == [ft.LOW_PRIORITY, ft.HIGH_PRIORITY]


def test_objectives_name_the_two_bands(tmp_path: Path) -> None:
    path = tmp_path / "objectives.yaml"
    path.write_text(ft.OBJECTIVES)
    store = ObjectiveStore()
    ObjectivesFileWatcher(str(path), store).load()
    assert store.priority(ft.HIGH_OBJECTIVE) == ft.HIGH_PRIORITY
    assert store.priority(ft.LOW_OBJECTIVE) == ft.LOW_PRIORITY


def test_scenarios_flood_at_ten_times_the_protected_rate() -> None:
    by_key = {s.key: s for s in ft.scenarios(SETUP)}
    assert list(by_key) == ["quiet-alone", "round-robin", "global-strict", "high-alone", "priority"]
    for key, protected in (("round-robin", "quiet"), ("global-strict", "quiet"), ("priority", "high")):
        rates = {t.label: t.rate for t in by_key[key].traffic}
        flood = next(r for label, r in rates.items() if label != protected)
        assert flood == 10 * rates[protected]
    assert dict(by_key["priority"].traffic[1].headers)[ft.OBJECTIVE_HEADER] == ft.LOW_OBJECTIVE


def test_arrivals_are_seeded_and_poisson_at_the_rate() -> None:
    s = replace(SETUP, duration=50.0)
    sc = next(x for x in ft.scenarios(s) if x.key == "round-robin")
    plan = ft.arrivals(sc, s)
    assert plan == ft.arrivals(sc, s)
    assert [a[0] for a in plan] == sorted(a[0] for a in plan)
    counts = {t.label: sum(1 for a in plan if a[1] is t) for t in sc.traffic}
    assert counts["quiet"] == pytest.approx(s.rate * s.duration, rel=0.2)
    assert counts["noisy"] == pytest.approx(10 * s.rate * s.duration, rel=0.1)


def test_percentiles_count_failed_requests_as_infinite() -> None:
    traffic = ft.Traffic("quiet", 6.0, ())
    samples = [ft.Sample("quiet", i, 200, ttft=(i + 1) / 10) for i in range(8)]
    samples += [ft.Sample("quiet", 8, 429, reason="rejected-ttl-expired"), ft.Sample("noisy", 9, 200, ttft=9.0)]
    samples.append(ft.Sample("quiet", 10, 429, reason="rejected-saturated"))
    t = ft.summarize(traffic, samples, {"quiet": (0.8, 8)})
    assert (t.sent, t.ok, t.success_rate) == (10, 8, 0.8)
    assert t.ttft_ms["p50"] == 500.0  # 10 values, nearest rank: the 5th smallest (was the 6th, one rank high)
    assert t.ttft_ms["p90"] is None  # falls on a 429
    assert t.ttft_ok_ms["p90"] == 800.0
    assert t.outcomes == {"ok": 8, "rejected-ttl-expired": 1, "rejected-saturated": 1}
    assert t.epp_wait_ms_mean == 100.0
    raw = ft.raw_requests({"round-robin": samples})
    assert raw["fields"][3] == "ttft_ms" and raw["scenarios"]["round-robin"][0][3] == 100.0


def test_epp_counters_are_read_as_deltas() -> None:
    def page(dispatched: int, ttl: int, quiet_sum: float, quiet_n: int) -> str:
        h = "llm_d_epp_flow_control_request_queue_duration_seconds"
        labels = 'inference_pool="epp",outcome="Dispatched",priority="0"'
        return f"""# TYPE llm_d_epp_flow_control_requests_total counter
llm_d_epp_flow_control_requests_total{{outcome="Dispatched",priority="0",inference_pool="epp"}} {dispatched}
llm_d_epp_flow_control_requests_total{{outcome="EvictedTTL",priority="0",inference_pool="epp"}} {ttl}
# TYPE {h} histogram
{h}_bucket{{fairness_id="quiet",{labels},le="+Inf"}} {quiet_n}
{h}_sum{{fairness_id="quiet",{labels}}} {quiet_sum}
{h}_count{{fairness_id="quiet",{labels}}} {quiet_n}
"""

    before = ft.EppCounters.parse(page(10, 0, 1.0, 10))
    after = ft.EppCounters.parse(page(40, 5, 1.6, 22))
    outcomes, waits = after.minus(before)
    assert outcomes == {"Dispatched": 30, "EvictedTTL": 5}
    assert waits["quiet"][1] == 12 and waits["quiet"][0] == pytest.approx(0.6)


def _tenant(label: str, p90: float | None, p50: float | None = 100.0, wait: float | None = 5.0) -> dict[str, Any]:
    t = ft.TenantSummary(label, 6.0, 100, 100, 1.0, {"p50": p50, "p90": p90, "p99": p90}, {}, 100.0, {"ok": 100},
                         wait, 100, 40)  # fmt: skip
    return asdict(t)


def _scenario(key: str, *tenants: dict[str, Any]) -> dict[str, Any]:
    pods = asdict(ft.PodLoad(4, 0, 4, 15.0))
    return {"key": key, "tenants": list(tenants), "served_per_s": 30.0, "pods": pods}


def results(rr_quiet: float | None, strict_quiet: float | None, high: float | None) -> dict[str, Any]:
    return {
        "setup": {**asdict(SETUP), "slots": SETUP.slots},
        "started": "now",
        "wall_s": 100.0,
        "loadavg": {"start": "1", "end": "2"},
        "scenarios": {
            "quiet-alone": _scenario("quiet-alone", _tenant("quiet", 100.0)),
            "round-robin": _scenario("round-robin", _tenant("quiet", rr_quiet), _tenant("noisy", None, None)),
            "global-strict": _scenario("global-strict", _tenant("quiet", strict_quiet), _tenant("noisy", None)),
            "high-alone": _scenario("high-alone", _tenant("high", 100.0)),
            "priority": _scenario("priority", _tenant("high", high), _tenant("low", None, None, 3000.0)),
        },
    }


def test_report_verdicts_are_computed_from_the_json() -> None:
    rows = report.flowcontrol_tenant_targets(results(150.0, None, 190.0))
    assert [r[3] for r in rows] == ["**met**"] * 4
    assert "1.50x" in rows[0][2] and "∞" in rows[1][2] and "1.90x" in rows[2][2]
    rows = report.flowcontrol_tenant_targets(results(250.0, 150.0, None))
    assert [r[3] for r in rows] == ["**not met**", "**not met**", "**not met**", "**met**"]
    assert report.flowcontrol_tenant_targets(None)[0][3] == "not measured"
    table = report.flowcontrol_tenants_table(results(150.0, None, 190.0))  # header + a row per tenant
    assert table.count("\n| ") == 1 + 8 and "| round-robin | quiet |" in table and "429/failed" in table


def test_ratio_is_infinite_when_the_loaded_p90_is_a_failure() -> None:
    assert math.isinf(report._fc_ratio(results(None, None, None), "round-robin", "quiet") or 0.0)


async def test_the_client_reads_a_simulator_stream_and_a_429() -> None:
    s = replace(SETUP, output_min=5, output_max=5)
    with SimProcess(["--hosts", "127.0.0.240", "--port", "0", "--time-scale", "20"]) as sim:
        url = sim.urls[0] + "/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            body = ft.request_body("quiet", 1, s, ft.random.Random(1))
            sample = await ft.send(session, url, "quiet", body, {"Content-Type": "application/json"}, 0.0)
    assert sample.ok, sample
    assert sample.tokens == 5 and sample.prompt_tokens > 20
    assert sample.ttft is not None and 0 < sample.ttft <= sample.latency

    async def rejected(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={ft.DROPPED_HEADER: "rejected-ttl-expired"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", rejected)
    runner = web.AppRunner(app)
    await runner.setup()
    port = ft.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            sample = await ft.send(session, f"http://127.0.0.1:{port}/v1/chat/completions", "noisy", b"{}", {}, 0.0)
    finally:
        await runner.cleanup()
    assert (sample.ok, sample.status, sample.reason, sample.ttft) == (False, 429, "rejected-ttl-expired", None)
