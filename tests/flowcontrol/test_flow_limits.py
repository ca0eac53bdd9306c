"""maxFlows: the fairness id is client-chosen (a header), so the flows it makes are bounded.

At the limit a new fairness id takes the place of the idlest empty flow; when every flow has requests
waiting it joins its band's shared overflow flow. Either way no request is refused or lost for it.
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from llmepp.flowcontrol.controller import DEFAULT_MAX_FLOWS
from llmepp.flowcontrol.types import FLOW_ID_KEY, OVERFLOW_FAIRNESS_ID
from llmepp.framework.plugin import ConfigError
from llmepp.plugins.flowcontrol.program_fairness import ProgramAwareFairness
from llmepp.request.types import ResponseInfo, Usage

from .kit import Clock, Server, concurrency_pool, controller, req, spin, until
from .test_config import HEAD, controller_of


def flow_ids(ctl) -> set[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return {(fid, p) for p, band in ctl.bands.items() for fid in band.flows}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value("llm_d_epp_" + name, {"inference_pool": "epp", **labels})


async def test_a_new_fairness_id_at_the_limit_replaces_the_idlest_empty_flow() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=100)
    ctl = controller(pool, det, clock=clock, max_flows=3, registry_=registry)
    for fid in ("a", "b", "c"):
        await ctl.admit(req(fid, fairness=fid), pool())
        clock.advance(1)
    await ctl.admit(req("a-again", fairness="a"), pool())  # a is now the most recently used
    clock.advance(1)
    await ctl.admit(req("d", fairness="d"), pool())
    assert flow_ids(ctl) == {("a", 0), ("c", 0), ("d", 0)}  # b was the idlest
    assert ctl.flow_count == 3
    assert sample(registry, "flow_control_flows_evicted_total", priority="0") == 1
    assert sample(registry, "flow_control_flows") == 3
    await ctl.aclose()


async def test_a_fresh_fairness_id_per_request_keeps_the_flows_bounded() -> None:
    pool, det = concurrency_pool(1, max_concurrency=100)
    ctl = controller(pool, det, max_flows=50, objectives={"hi": 5})
    for i in range(5000):
        r = req(f"r{i}", fairness=f"fresh-{i}", objective="hi" if i % 3 == 0 else "")
        await ctl.admit(r, pool())
        ctl.release_pending(r)  # routed and finished at once
    assert sum(len(b.flows) for b in ctl.bands.values()) == ctl.flow_count == 50
    # The most recent ids are the ones kept.
    assert ("fresh-4999", 0) in flow_ids(ctl) and ("fresh-4998", 5) in flow_ids(ctl)
    await ctl.aclose()


async def test_the_default_bounds_flows_too() -> None:
    pool, det = concurrency_pool(1, max_concurrency=100)
    ctl = controller(pool, det)
    assert ctl.max_flows == DEFAULT_MAX_FLOWS
    for i in range(DEFAULT_MAX_FLOWS + 10):
        r = req(f"r{i}", fairness=f"fresh-{i}")
        await ctl.admit(r, pool())
        ctl.release_pending(r)  # routed and finished at once
    assert ctl.flow_count == DEFAULT_MAX_FLOWS
    await ctl.aclose()


async def test_when_every_flow_has_requests_waiting_new_ids_share_the_overflow_flow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, max_flows=2, registry_=registry, poll_interval=10.0)
    srv = Server(ctl, pool, auto_complete=True)
    pool()[0].inflight.requests = 1  # saturated: everything waits
    with caplog.at_level(logging.WARNING, logger="llmepp.flowcontrol.controller"):
        for rid, fid in [("a1", "a"), ("b1", "b"), ("c1", "c"), ("d1", "d"), ("a2", "a")]:
            srv.submit(req(rid, fairness=fid))
            await spin()
    assert ctl.queue_lengths() == {("a", 0): 2, ("b", 0): 1, (OVERFLOW_FAIRNESS_ID, 0): 2}
    assert ctl.flow_count == 2  # the overflow flow is not one of the maxFlows
    assert sample(registry, "flow_control_overflow_requests_total", priority="0") == 2
    warnings = [r for r in caplog.records if "overflow flow" in r.getMessage()]
    assert len(warnings) == 1, "rate-limited: one line for the burst"
    assert "maxFlows" in warnings[0].getMessage()
    # Nothing is lost or left hanging: all five are served once capacity frees up.
    srv.complete_one()
    await until(lambda: len(srv.order) == 5)
    assert sorted(srv.order) == ["a1", "a2", "b1", "c1", "d1"]
    assert ctl.queued == 0
    # With the flows empty again, a new id gets a flow of its own (the idlest one makes room).
    await ctl.admit(req("e1", fairness="e"), pool())
    assert ("e", 0) in flow_ids(ctl) and ctl.flow_count == 2
    await srv.close()


async def test_an_overflowed_request_is_charged_to_the_overflow_program() -> None:
    """Else program-aware fairness would see the overflow flow as a program that was never served
    (service 0) and put it first: a client flooding fresh ids would win."""
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, max_flows=1, fairness="program-aware-fairness", poll_interval=10.0)
    las = ctl.config.default_band.fairness
    assert isinstance(las, ProgramAwareFairness)
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1
    own, spilled = req("a1", fairness="a"), req("b1", fairness="b")
    srv.submit(own)
    await spin()
    srv.submit(spilled)
    await spin()
    assert FLOW_ID_KEY not in own.data and spilled.data[FLOW_ID_KEY] == OVERFLOW_FAIRNESS_ID
    las.response_complete(spilled, ResponseInfo(usage=Usage(100, 0, 0, 100)), None)  # type: ignore[arg-type]
    now = las.clock()
    assert las.service(OVERFLOW_FAIRNESS_ID, now) == pytest.approx(100) and las.service("b", now) == 0.0
    await srv.close()


async def test_a_request_naming_the_overflow_flow_joins_it() -> None:
    pool, det = concurrency_pool(1, max_concurrency=100)
    ctl = controller(pool, det, max_flows=1)
    await ctl.admit(req("x", fairness=OVERFLOW_FAIRNESS_ID), pool())
    await ctl.admit(req("a", fairness="a"), pool())
    assert flow_ids(ctl) == {(OVERFLOW_FAIRNESS_ID, 0), ("a", 0)} and ctl.flow_count == 1
    await ctl.aclose()


async def test_garbage_collection_keeps_the_flow_count() -> None:
    clock = Clock()
    pool, det = concurrency_pool(1, max_concurrency=100)
    ctl = controller(pool, det, clock=clock, max_flows=3, flow_gc_timeout=300.0)
    for fid in ("a", "b", "c"):
        await ctl.admit(req(fid, fairness=fid), pool())
    clock.advance(301)
    ctl.collect_garbage()
    assert ctl.flow_count == 0 and flow_ids(ctl) == set()
    for fid in ("d", "e", "f", "g"):
        await ctl.admit(req(fid, fairness=fid), pool())
        clock.advance(1)
    assert flow_ids(ctl) == {("e", 0), ("f", 0), ("g", 0)}
    await ctl.aclose()


def test_max_flows_is_configured_under_flow_control() -> None:
    fc = controller_of(HEAD + "featureGates: [flowControl]\nflowControl: {maxFlows: 200}\n")
    assert fc.max_flows == 200
    fc = controller_of(HEAD + "featureGates: [flowControl]\n")
    assert fc.max_flows == DEFAULT_MAX_FLOWS


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_flows_must_be_positive(value: str) -> None:
    with pytest.raises(ConfigError, match=r"flowControl\.maxFlows: must be >= 1"):
        controller_of(HEAD + f"featureGates: [flowControl]\nflowControl: {{maxFlows: {value}}}\n")
