"""Flow controller: priority, fairness, gating, capacity, TTL, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Sequence
from typing import Any

import pytest
from helpers import endpoint
from prometheus_client import CollectorRegistry

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics
from llmepp.errors import RequestError
from llmepp.flowcontrol.controller import BandConfig, FlowController
from llmepp.flowcontrol.interfaces import SaturationDetector, UsageLimitPolicy
from llmepp.server.stream import Pending

from .kit import Clock, Pool, Server, concurrency_pool, controller, plugin, req, spin, until


async def test_fast_path_dispatches_without_queueing_when_idle() -> None:
    pool, det = concurrency_pool(1, max_concurrency=4)
    ctl = controller(pool, det)
    await ctl.admit(req("a"), pool())
    assert ctl.queued == 0
    await ctl.aclose()


async def test_strict_priority_under_saturation() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, objectives={"premium": 10, "batch": -5}, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1  # saturated by a request already running
    for i in range(3):
        srv.submit(req(f"low-{i}"))
    srv.submit(req("batch", objective="batch"))
    srv.submit(req("high", objective="premium"))
    await spin()
    assert ctl.queued == 5 and srv.order == []  # all gated
    expected = ["high", "low-0", "low-1", "low-2", "batch"]
    for n in range(1, 6):
        srv.complete_one()
        await until(lambda n=n: len(srv.order) == n)  # type: ignore[misc]
        await spin()
        assert len(srv.order) == n, "one completion frees exactly one slot"
    assert srv.order == expected
    await srv.close()


async def test_priority_comes_from_the_objective_and_unknown_objective_is_zero() -> None:
    pool, det = concurrency_pool()
    ctl = controller(pool, det, objectives={"premium": 7})
    known, unknown, none = req("a", objective="premium"), req("b", objective="nope"), req("c")
    for r in (known, unknown, none):
        await ctl.admit(r, pool())
        ctl.release_pending(r)  # routed and finished at once
    assert (known.priority, unknown.priority, none.priority) == (7, 0, 0)
    assert set(ctl.bands) == {7, 0}  # bands provisioned on demand from the template
    await ctl.aclose()


async def _fairness_run(fairness: str) -> list[str]:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, fairness=fairness, poll_interval=10.0)
    srv = Server(ctl, pool, auto_complete=True)
    pool()[0].inflight.requests = 1
    for i in range(20):
        srv.submit(req(f"noisy-{i}", fairness="noisy"))
    await spin()
    srv.submit(req("quiet-0", fairness="quiet"))
    srv.submit(req("quiet-1", fairness="quiet"))
    await spin()
    assert ctl.queue_lengths() == {("noisy", 0): 20, ("quiet", 0): 2}
    srv.complete_one()  # the running request ends; completions chain the rest
    await until(lambda: len(srv.order) == 22)
    await srv.close()
    return srv.order


async def test_round_robin_isolates_a_quiet_tenant_from_a_noisy_one() -> None:
    order = await _fairness_run("round-robin-fairness-policy")
    # Flows alternate (sorted ids: noisy, quiet): the quiet tenant waits one turn, not 20.
    assert order[:4] == ["noisy-0", "quiet-0", "noisy-1", "quiet-1"]
    assert order[4:] == [f"noisy-{i}" for i in range(2, 20)]


async def test_global_strict_gives_no_isolation() -> None:
    order = await _fairness_run("global-strict-fairness-policy")
    assert order == [f"noisy-{i}" for i in range(20)] + ["quiet-0", "quiet-1"]


async def test_round_robin_skips_flows_emptied_by_cancellation() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, fairness="round-robin-fairness-policy", poll_interval=10.0)
    srv = Server(ctl, pool, auto_complete=True)
    pool()[0].inflight.requests = 1
    for fid in ("a", "b", "c"):
        srv.submit(req(f"{fid}-0", fairness=fid))
        srv.submit(req(f"{fid}-1", fairness=fid))
    await spin()
    for rid in ("b-0", "b-1"):
        srv.tasks[rid].cancel()
    await spin()
    srv.complete_one()
    await until(lambda: len(srv.order) == 4)
    assert srv.order == ["a-0", "c-0", "a-1", "c-1"]
    await srv.close()


async def test_one_free_slot_takes_one_request_even_with_spare_credits() -> None:
    # A poll tick and a completion in the same loop iteration give the dispatcher two credits.
    # The concurrency detector only sees a dispatch once it is scheduled, so the second credit
    # must wait for a fresh reading rather than fill the same slot again.
    pool, det = concurrency_pool(2, max_concurrency=1)
    ctl = controller(pool, det, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = pool()[1].inflight.requests = 1
    for i in range(3):
        srv.submit(req(f"r{i}"))
    await spin()
    pool()[1].inflight.requests = 0
    ctl.request_completed(req("a"))
    ctl.request_completed(req("b"))
    await spin(50)
    assert srv.order == ["r0"] and ctl.queued == 2
    await srv.close()


class _HighBandHeldBack(UsageLimitPolicy):
    """Test policy: the highest band is gated from 0.4, every other band only at 1.0."""

    type = "test-high-band-held-back"

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        return [0.4] + [1.0] * (len(priorities) - 1)


async def test_head_of_line_blocking_stops_lower_bands() -> None:
    # Saturation 0.5: the high band (ceiling 0.4) is gated, the low band (1.0) is not. The
    # cycle must stop at the blocked high band rather than let low-priority work overtake it.
    pool, det = concurrency_pool(1, max_concurrency=2)
    ctl = controller(pool, det, objectives={"vip": 5}, usage_limit=_HighBandHeldBack("t"), poll_interval=0.001)
    pool()[0].inflight.requests = 1
    srv = Server(ctl, pool)
    srv.submit(req("low"))
    srv.submit(req("high", objective="vip"))
    await asyncio.sleep(0.02)  # many poll ticks
    assert srv.order == [] and ctl.queued == 2
    pool()[0].inflight.requests = 0  # saturation 0: both may go, high first
    await until(lambda: len(srv.order) == 2)
    assert srv.order[0] == "high"
    await srv.close()


async def test_usage_limit_threshold_below_one_keeps_headroom() -> None:
    pool, det = concurrency_pool(1, max_concurrency=10)
    ctl = controller(pool, det, usage_limit=plugin("static-usage-limit-policy", threshold=0.5))
    pool()[0].inflight.requests = 5  # saturation 0.5 = the ceiling: gated
    srv = Server(ctl, pool)
    srv.submit(req("a"))
    await asyncio.sleep(0.01)
    assert srv.order == []
    pool()[0].inflight.requests = 4
    await until(lambda: srv.order == ["a"])
    await srv.close()


async def test_stale_metrics_gate_dispatch_and_fresh_scrapes_unblock() -> None:
    clock = Clock()
    ep = endpoint(0)
    ep.metrics = EndpointMetrics(waiting_queue_size=0, update_time=clock.now - 1.0)  # 1 s old: stale
    pool = Pool([ep])
    det = plugin("utilization-detector")  # staleness threshold 200 ms
    ctl = controller(pool, det, clock=clock, poll_interval=0.001)
    srv = Server(ctl, pool)
    srv.submit(req("a"))
    await asyncio.sleep(0.01)
    assert srv.order == [] and ctl.queued == 1
    assert det.stale_endpoints == 1 and ctl.last_saturation["effective"] == 1.0
    ep.metrics = EndpointMetrics(waiting_queue_size=1, update_time=clock.now)  # a fresh scrape arrives
    await until(lambda: srv.order == ["a"])  # picked up by the poll tick, no other event needed
    assert det.stale_endpoints == 0 and ctl.last_saturation["effective"] == pytest.approx(0.2)
    await srv.close()


async def test_never_scraped_and_empty_pool_gate() -> None:
    det = plugin("utilization-detector")
    pool = Pool([endpoint(0, scraped=False)])
    ctl = controller(pool, det)
    srv = Server(ctl, pool)
    srv.submit(req("a"))
    await asyncio.sleep(0.01)
    assert ctl.queued == 1
    pool.set([])
    ctl.pool_changed()
    await asyncio.sleep(0.01)
    assert ctl.queued == 1 and srv.order == []
    pool.set([endpoint(1)])  # a scraped, idle pod joins
    ctl.pool_changed()
    await until(lambda: srv.order == ["a"])
    await srv.close()


class _FixedDetector(SaturationDetector):
    """Test detector: reports `value`, whatever the pool (a third-party plugin's bad reading)."""

    type = "test-fixed-detector"
    counts_inflight = True

    def __init__(self, value: float) -> None:
        super().__init__("fixed")
        self.value = value

    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        return self.value


@pytest.mark.parametrize("usage_limit", ["static-usage-limit-policy", "soft-reflective-ceiling-policy"])
async def test_a_nan_saturation_reading_counts_as_saturated(usage_limit: str, caplog: pytest.LogCaptureFixture) -> None:
    # NaN compares false both ways: the fast path read it as gated, the dispatcher as open, and the
    # soft-reflective policy raised on it every cycle (1 ms), so the queue never moved.
    det = _FixedDetector(math.nan)
    pool = Pool([endpoint(0)])
    ctl = controller(pool, det, objectives={"vip": 5}, usage_limit=plugin(usage_limit), poll_interval=0.001)
    srv = Server(ctl, pool)
    srv.submit(req("vip", objective="vip"))
    srv.submit(req("low"))
    await asyncio.sleep(0.02)  # many poll ticks
    assert srv.order == [] and ctl.queued == 2
    assert ctl.last_saturation["effective"] == 1.0
    assert not [r for r in caplog.records if "dispatch cycle failed" in r.getMessage()]
    det.value = 0.0
    await until(lambda: len(srv.order) == 2)
    assert srv.order == ["vip", "low"]
    await srv.close()


async def test_a_negative_saturation_reading_counts_as_idle() -> None:
    # -inf made the soft-reflective policy compute int(-inf / inf): ValueError on every admission.
    det = _FixedDetector(-math.inf)
    pool = Pool([endpoint(0)])
    ctl = controller(pool, det, objectives={"vip": 5}, usage_limit=plugin("soft-reflective-ceiling-policy"))
    await ctl.admit(req("vip", objective="vip"), pool())
    await ctl.admit(req("low"), pool())  # two bands now: the policy's formula runs
    assert ctl.queued == 0 and ctl.last_saturation["effective"] == 0.0
    await ctl.aclose()


async def test_backlog_drains_by_poll_ticks_when_nothing_else_happens() -> None:
    # Capacity appears without a completion event (e.g. a scrape): ticks drain the backlog.
    pool, det = concurrency_pool(1, max_concurrency=100)
    ctl = controller(pool, det, poll_interval=0.001)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 100
    for i in range(5):
        srv.submit(req(f"r{i}"))
    await spin()
    assert ctl.queued == 5
    pool()[0].inflight.requests = 0  # no request_completed(): only ticks
    await until(lambda: len(srv.order) == 5)
    assert srv.order == [f"r{i}" for i in range(5)]
    await srv.close()


# -- capacity ------------------------------------------------------------------------------------
async def _saturated(**config: Any) -> tuple[Server, FlowController]:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, poll_interval=10.0, **config)
    pool()[0].inflight.requests = 1
    return Server(ctl, pool), ctl


async def _rejected(srv: Server, r: object) -> RequestError:
    with pytest.raises(RequestError) as err:
        await srv.ctl.admit(r, srv.pool())  # type: ignore[arg-type]
    return err.value


async def test_band_max_requests_rejects_with_429_saturated() -> None:
    srv, _ = await _saturated(band_max_requests=2)
    srv.submit(req("a"))
    srv.submit(req("b"))
    await spin()
    err = await _rejected(srv, req("c"))
    assert (err.status, err.reason) == (429, "rejected-saturated")
    assert srv.ctl.queued == 2
    await srv.close()


async def test_band_max_bytes_counts_body_bytes() -> None:
    srv, _ = await _saturated(band_max_bytes=100)
    srv.submit(req("a", body=b"x" * 60))
    await spin()
    err = await _rejected(srv, req("b", body=b"x" * 41))
    assert err.status == 429 and srv.ctl.queued_bytes == 60
    srv.submit(req("c", body=b"x" * 40))  # exactly fills the band
    await spin()
    assert srv.ctl.queued_bytes == 100
    await srv.close()


async def test_global_limits_span_bands() -> None:
    srv, _ = await _saturated(max_requests=3, max_bytes=1000)
    fc = srv.ctl
    fc.objectives.replace({"hi": 5})
    srv.submit(req("a"))
    srv.submit(req("b", objective="hi"))
    srv.submit(req("c", objective="hi"))
    await spin()
    assert fc.queued == 3
    assert (await _rejected(srv, req("d", objective="hi"))).reason == "rejected-saturated"
    assert (await _rejected(srv, req("e"))).status == 429
    await srv.close()
    srv2, _ = await _saturated(max_bytes=100)
    srv2.submit(req("a", body=b"x" * 90))
    await spin()
    assert (await _rejected(srv2, req("b", body=b"x" * 20))).status == 429
    await srv2.close()


async def test_explicit_band_limits_and_negative_template() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    base = {"ordering": plugin("fcfs-ordering-policy"), "fairness": plugin("global-strict-fairness-policy")}
    ctl = controller(pool, det, bands={10: BandConfig(max_requests=1, **base)}, objectives={"vip": 10, "bg": -1})
    ctl.config.default_negative_band = BandConfig(max_requests=1, **base)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    srv.submit(req("v1", objective="vip"))
    srv.submit(req("b1", objective="bg"))
    srv.submit(req("n1"))
    srv.submit(req("n2"))  # priority 0 uses the default template (5000)
    await spin()
    assert (await _rejected(srv, req("v2", objective="vip"))).status == 429
    assert (await _rejected(srv, req("b2", objective="bg"))).status == 429
    assert not ctl.bands[10].dynamic and ctl.bands[-1].dynamic and ctl.bands[-1].max_requests == 1
    await srv.close()


async def test_capacity_rejection_with_an_empty_pool_is_503() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, band_max_requests=1, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool.set([])
    srv.submit(req("a"))
    await spin()
    err = await _rejected(srv, req("b"))
    assert (err.status, err.reason) == (503, "rejected-no-endpoints")
    await srv.close()


# -- TTL -----------------------------------------------------------------------------------------
async def test_ttl_expiry_is_429_ttl_expired() -> None:
    clock = Clock()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, clock=clock, default_ttl=5.0, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    a = srv.submit(req("a"))
    await spin()
    clock.advance(3.0)
    b = srv.submit(req("b"))
    await spin()
    clock.advance(2.5)  # a is 5.5 s old, b 2.5 s
    assert ctl.expire_due() == 1
    await spin()
    assert a.done() and not b.done()
    err = a.exception()
    assert isinstance(err, RequestError) and (err.status, err.reason) == (429, "rejected-ttl-expired")
    assert ctl.queued == 1
    await srv.close()


async def test_ttl_while_the_pool_is_empty_is_503_and_the_regime_is_reevaluated() -> None:
    clock = Clock()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, clock=clock, default_ttl=60.0, no_endpoint_ttl=2.0, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    a = srv.submit(req("a"))  # enqueued while the pool has endpoints (60 s TTL)
    await spin()
    clock.advance(3.0)
    assert ctl.expire_due() == 0
    pool.set([])  # scaled to zero while a waits: the 2 s no-endpoint TTL now applies, from now
    ctl.pool_changed()
    await spin()
    assert ctl.expire_due() == 0 and not a.done()
    clock.advance(1.9)
    assert ctl.expire_due() == 0
    clock.advance(0.2)
    assert ctl.expire_due() == 1
    await spin()
    err = a.exception()
    assert isinstance(err, RequestError) and (err.status, err.reason) == (503, "rejected-no-endpoints")
    await srv.close()


async def test_a_pod_appearing_starts_a_fresh_default_ttl_budget() -> None:
    """noEndpointRequestTTL > defaultRequestTTL (a scale-from-zero waiting room): a request that waited
    longer than defaultRequestTTL for the first pod is not shed the moment it appears (reference
    controller/config.go: "each change of regime starts a fresh budget")."""
    clock = Clock()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ep = pool()[0]
    ctl = controller(pool, det, clock=clock, default_ttl=5.0, no_endpoint_ttl=60.0, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool.set([])
    a = srv.submit(req("a"))
    await spin()
    clock.advance(30.0)
    assert ctl.expire_due() == 0
    ep.inflight.requests = 1  # the first pod is up, and busy: a still waits
    pool.set([ep])
    ctl.pool_changed()
    await spin()  # the expiry timer, re-armed for the new regime, must not fire now
    assert not a.done() and ctl.expire_due() == 0
    timer = ctl._expiry_timer
    assert timer is not None
    assert timer.when() - asyncio.get_running_loop().time() == pytest.approx(5.0, abs=0.5)
    clock.advance(4.9)
    assert ctl.expire_due() == 0
    clock.advance(0.2)
    assert ctl.expire_due() == 1
    await spin()
    err = a.exception()
    assert isinstance(err, RequestError) and (err.status, err.reason) == (429, "rejected-ttl-expired")
    await srv.close()


async def test_a_request_enqueued_after_the_regime_change_keeps_its_own_budget() -> None:
    clock = Clock()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ep = pool()[0]
    ctl = controller(pool, det, clock=clock, default_ttl=5.0, no_endpoint_ttl=60.0, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool.set([])
    a = srv.submit(req("a"))
    await spin()
    clock.advance(30.0)
    ep.inflight.requests = 1
    pool.set([ep])
    ctl.pool_changed()
    clock.advance(2.0)
    b = srv.submit(req("b"))  # 2 s into the new regime
    await spin()
    clock.advance(3.5)  # a: 5.5 s into the regime; b: 3.5 s old
    assert ctl.expire_due() == 1
    await spin()
    assert a.done() and not b.done()
    clock.advance(1.6)
    assert ctl.expire_due() == 1
    await srv.close()


async def test_zero_ttl_disables_expiry() -> None:
    clock = Clock()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, clock=clock, default_ttl=0.0, no_endpoint_ttl=0.0, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    srv.submit(req("a"))
    await spin()
    clock.advance(10_000)
    assert ctl.expire_due() == 0 and ctl.queued == 1
    await srv.close()


async def test_expiry_timer_fires_on_its_own() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, default_ttl=0.03, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    a = srv.submit(req("a"))
    await until(a.done, within=1.0)
    err = a.exception()
    assert isinstance(err, RequestError) and err.reason == "rejected-ttl-expired"
    await srv.close()


# -- ordering ------------------------------------------------------------------------------------
async def _regime_order(ordering: str) -> list[str]:
    """a is enqueued under the 60 s TTL, b later while the pool is empty (5 s): b's deadline is earlier."""
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, ordering=ordering, default_ttl=60.0, no_endpoint_ttl=5.0, poll_interval=10.0)
    srv = Server(ctl, pool, auto_complete=True)
    ep = pool()[0]
    ep.inflight.requests = 1
    srv.submit(req("a"))
    await spin()
    pool.set([])
    ctl.pool_changed()
    srv.submit(req("b"))
    await spin()
    pool.set([ep])
    ep.inflight.requests = 0
    ctl.pool_changed()
    await until(lambda: len(srv.order) == 2)
    await srv.close()
    return srv.order


async def test_edf_follows_the_fresh_budget_of_a_regime_change() -> None:
    """b's TTL at enqueue was shorter, but each regime change restarts every waiting request's budget: a,
    enqueued first, expires first. Before, EDF keyed on the TTL at enqueue and sent b first."""
    assert await _regime_order("edf-ordering-policy") == ["a", "b"]
    assert await _regime_order("fcfs-ordering-policy") == ["a", "b"]


async def test_edf_after_scale_from_zero_serves_the_request_that_waited_for_the_first_pod() -> None:
    """a waits for the first pod (noEndpointRequestTTL 300 s); the pod comes at t=10, so a expires at 70;
    b arrives at 20 and expires at 80. Before, a kept its enqueue-time key (0 + 300) and b (20 + 60) went
    first, leaving a to be shed at 70."""
    clock = Clock()
    pool = Pool([])
    ctl = controller(pool, plugin("concurrency-detector", maxConcurrency=1), ordering="edf-ordering-policy",
                     clock=clock, poll_interval=10.0, default_ttl=60.0, no_endpoint_ttl=300.0)  # fmt: skip
    srv = Server(ctl, pool)
    srv.submit(req("a"))
    await spin()
    clock.advance(10)
    ep = endpoint(0)
    ep.inflight.requests = 1  # the first pod, busy
    pool.set([ep])
    ctl.pool_changed()
    clock.advance(10)
    srv.submit(req("b"))
    await spin()
    assert ctl.queued == 2
    srv.complete_one()
    await spin(50)
    assert srv.order == ["a"]
    await srv.close()


async def test_slo_deadline_orders_by_arrival_plus_the_ttft_objective() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, ordering="slo-deadline-ordering-policy", poll_interval=10.0)
    srv = Server(ctl, pool, auto_complete=True)
    ep = pool()[0]
    ep.inflight.requests = 1
    t0 = 1000.0
    # (name, arrival, header): deadlines 1002.0, 1000.5 + 0.5 = 1001.0, none, 1001.5 (the deprecated
    # header name, reference §1.2), bad
    for name, arrival, slo in [("slow", 0.0, "2000"), ("tight", 0.5, "500"), ("none", 0.1, None),
                               ("mid", 1.0, "500"), ("junk", 0.2, "-3")]:  # fmt: skip
        r = req(name)
        r.received_at = t0 + arrival
        if slo is not None:
            r.headers["x-slo-ttft-ms" if name == "mid" else "x-llm-d-slo-ttft-ms"] = slo
        srv.submit(r)
        await spin()
    ep.inflight.requests = 0
    ctl.pool_changed()
    await until(lambda: len(srv.order) == 5)
    await srv.close()
    # Objectives by deadline; requests without a usable one after them, in arrival order.
    assert srv.order == ["tight", "mid", "slow", "none", "junk"]


# -- cancellation and shutdown -------------------------------------------------------------------
async def test_cancelled_client_frees_its_slot_at_once() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, band_max_requests=1, registry_=registry, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    task = srv.submit(req("a", fairness="t", body=b"x" * 123))
    await spin()
    assert (ctl.queued, ctl.queued_bytes) == (1, 123)
    assert ctl.bands[0].flows["t"].count == 1
    assert (await _rejected(srv, req("b"))).status == 429  # the band is full
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (ctl.queued, ctl.queued_bytes) == (0, 0)
    assert (ctl.bands[0].count, ctl.bands[0].bytes, ctl.bands[0].flows["t"].count) == (0, 0, 0)
    assert (
        registry.get_sample_value(
            "llm_d_epp_flow_control_requests_total",
            {"outcome": "EvictedContextCancelled", "priority": "0", "inference_pool": "epp"},
        )
        == 1.0
    )
    srv.submit(req("c"))  # the freed slot is usable
    await spin()
    assert ctl.queued == 1
    await srv.close()


async def test_cancelled_request_is_never_dispatched() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    a = srv.submit(req("a"))
    srv.submit(req("b"))
    await spin()
    a.cancel()  # cancelled, and capacity frees in the same loop iteration
    srv.complete_one()
    await until(lambda: srv.order == ["b"])
    await srv.close()


async def test_a_routing_step_dropped_before_it_resumed_frees_its_slot() -> None:
    # The h2 transport runs routing eagerly and hands the rest to a task; Envoy resetting the stream
    # in the same batch cancels that task before it ever runs, so the admit coroutine waiting on its
    # queue item is never resumed: it is closed (GeneratorExit), not cancelled.
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, band_max_requests=1, registry_=registry, poll_interval=10.0)
    pool()[0].inflight.requests = 1

    async def route() -> None:
        await ctl.admit(req("a", body=b"x" * 10), pool())

    done, step = Pending(route()).step()
    assert not done and (ctl.queued, ctl.queued_bytes) == (1, 10)

    async def await_pending(step: Any) -> None:
        await step

    task = asyncio.get_running_loop().create_task(await_pending(step))
    del step
    task.cancel()  # before its first step
    await spin()
    assert task.cancelled()
    del task  # as the transport drops it (its exception's traceback holds the step)
    gc.collect()
    assert (ctl.queued, ctl.queued_bytes) == (0, 0)  # freed when dropped, not when it would be dispatched
    assert (ctl.bands[0].count, ctl.bands[0].flows["default-flow"].count) == (0, 0)
    pool()[0].inflight.requests = 0
    ctl.request_completed(req("done"))
    await spin()

    def total(outcome: str) -> float | None:
        labels = {"outcome": outcome, "priority": "0", "inference_pool": "epp"}
        return registry.get_sample_value("llm_d_epp_flow_control_requests_total", labels)

    assert total("EvictedContextCancelled") == 1.0 and total("Dispatched") is None  # never dispatched
    await ctl.aclose()


async def test_shutdown_rejects_queued_and_new_requests_with_503() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, poll_interval=10.0)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    tasks = [srv.submit(req(f"r{i}")) for i in range(3)]
    await spin()
    await srv.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        err = t.exception()
        assert isinstance(err, RequestError) and (err.status, err.reason) == (503, "rejected-shutting-down")
    assert ctl.queued == 0
    err2 = await _rejected(srv, req("late"))
    assert (err2.status, err2.reason) == (503, "rejected-shutting-down")


async def test_drain_serves_normally_then_rejects_what_still_waits() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, poll_interval=10.0)
    srv = Server(ctl, pool, auto_complete=True)
    pool()[0].inflight.requests = 1
    for i in range(3):
        srv.submit(req(f"r{i}"))
    await spin()
    drain = asyncio.get_running_loop().create_task(ctl.drain(grace=0.1))
    srv.complete_one()  # capacity during the drain: queued requests still go
    await until(lambda: len(srv.order) == 3)
    pool()[0].inflight.requests = 1
    srv.submit(req("arrives-while-draining"))  # still accepted and queued
    await spin()
    assert ctl.queued == 1 and not drain.done()
    await drain  # the grace ends: what still waits gets 503
    err = srv.tasks["arrives-while-draining"].exception()
    assert isinstance(err, RequestError) and err.reason == "rejected-shutting-down"
    assert srv.order == ["r0", "r1", "r2"]
    await srv.close()


async def test_drain_ends_early_when_the_controller_is_closed() -> None:
    pool, det = concurrency_pool()
    ctl = controller(pool, det)
    drain = asyncio.get_running_loop().create_task(ctl.drain(grace=30.0))
    await spin()
    await ctl.aclose()
    await asyncio.wait_for(drain, 1.0)


async def test_flows_and_template_bands_are_garbage_collected_when_idle() -> None:
    clock = Clock()
    pool, det = concurrency_pool(1, max_concurrency=10)
    ctl = controller(pool, det, clock=clock, objectives={"x": 3}, flow_gc_timeout=300.0, band_gc_timeout=600.0)
    await ctl.admit(req("a", fairness="t1", objective="x"), pool())
    assert set(ctl.bands[3].flows) == {"t1"}
    clock.advance(301)
    ctl.collect_garbage()
    assert 3 in ctl.bands and ctl.bands[3].flows == {}
    clock.advance(601)
    ctl.collect_garbage()
    assert 3 not in ctl.bands
    await ctl.aclose()


async def test_saturation_and_stale_gauges_stay_current_while_nothing_is_queued() -> None:
    # The reference reads saturation every dispatch tick, queue or not, so flow_control_pool_saturation and
    # flow_control_stale_endpoints (how operators tell a scrape outage from overload) follow the pods. Read
    # only by requests, they froze at the last request's values: a scrape outage during a lull showed no
    # stale pod, and after one the pool stayed "saturated, all stale" until the next request.
    ep = endpoint(0)
    pool = Pool([ep])
    det = plugin("utilization-detector")  # staleness threshold 200 ms
    ctl = controller(pool, det, saturation_refresh=0.005)
    try:
        await ctl.admit(req("a"), pool())  # fast path
        assert ctl.stale_endpoints == 0 and ctl.last_saturation["effective"] == 0.0
        ep.metrics = EndpointMetrics(update_time=time.monotonic() - 1.0)  # /metrics stopped answering
        await until(lambda: ctl.stale_endpoints == 1 and ctl.last_saturation["effective"] == 1.0)
        ep.metrics = EndpointMetrics(waiting_queue_size=1, update_time=time.monotonic() + 60.0)  # answers again
        await until(lambda: ctl.stale_endpoints == 0 and ctl.last_saturation["effective"] == pytest.approx(0.2))
    finally:
        await ctl.aclose()
