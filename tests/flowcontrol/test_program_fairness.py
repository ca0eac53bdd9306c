"""program-aware-fairness (least attained service): decayed service, the pick, forgetting idle
programs, its metrics, and the controller serving the least-served program first."""

from __future__ import annotations

import math
from typing import Any

import pytest
from helpers import request
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from llmepp.config.loader import build, load_config
from llmepp.flowcontrol.controller import BandConfig, FlowController
from llmepp.flowcontrol.metrics import FlowControlMetrics
from llmepp.flowcontrol.types import ItemState, QueueItem
from llmepp.framework.plugin import ConfigError, PluginContext
from llmepp.observability.metrics import MAX_FAIRNESS_LABELS, OVERFLOW_LABEL, EppMetrics
from llmepp.plugins.flowcontrol.program_fairness import ProgramAwareFairness
from llmepp.request.types import ResponseInfo, Usage

from .kit import Clock, Server, concurrency_pool, controller, plugin, req, spin, until


def policy(**params: float) -> tuple[ProgramAwareFairness, Clock]:
    p: ProgramAwareFairness = plugin("program-aware-fairness", **params)
    clock = Clock()
    p.clock = clock
    return p, clock


def test_service_is_prompt_plus_twice_completion_halving_every_half_life() -> None:
    p, clock = policy(lasHalfLifeSeconds=60)
    p.response_complete(request(fairness_id="a"), ResponseInfo(usage=Usage(100, 50, 0, 150)), None)  # type: ignore[arg-type]
    assert p.service("a", clock.now) == pytest.approx(200)
    assert p.service("a", clock.now + 60) == pytest.approx(100)
    clock.now += 120
    p.response_complete(request(b"x" * 40, fairness_id="a"), ResponseInfo(), None)  # type: ignore[arg-type]
    assert p.service("a", clock.now) == pytest.approx(50 + 10)  # no usage: prompt bytes / 4
    assert p.service("unknown", clock.now) == 0.0


def test_idle_programs_are_forgotten() -> None:
    p, clock = policy(evictionTtlSeconds=100, evictionSweepSeconds=10)
    p.attained("old", 5, clock.now)
    clock.now += 101
    p.attained("new", 5, clock.now)
    assert set(p.programs(clock.now)) == {"new"}


def test_a_short_half_life_never_overflows_between_sweeps() -> None:
    # Services are kept scaled to an epoch moved at each sweep (300 s): with a half-life under
    # 300/1024 s the scale factor 2^(Δt/halfLife) overflowed before the next sweep (inf, then
    # OverflowError on every completion, then NaN services once the sweep multiplied inf by 0).
    p, clock = policy(lasHalfLifeSeconds=0.25)
    p.attained("a", 100, clock.now)
    for step in range(1, 30):
        clock.now += 10
        p.attained("b", 100, clock.now)
        services = p.programs(clock.now)
        assert all(math.isfinite(v) for v in services.values()), (step, services)
    assert p.service("b", clock.now) == pytest.approx(100)
    assert p.service("a", clock.now) == pytest.approx(0.0)


def test_programs_are_bounded_forgetting_the_least_served_first() -> None:
    # The fairness id is client-chosen: a fresh id per request made one record each, kept for
    # evictionTtlSeconds (an hour). Past maxPrograms the least-served records go (an unknown program
    # counts as service 0, so forgetting the smallest services changes the picks least).
    p, clock = policy(maxPrograms=100, lasHalfLifeSeconds=1e9)
    p.attained("heavy", 10_000, clock.now)
    for i in range(5000):
        clock.now += 0.01
        p.attained(f"fresh-{i}", 1 + i % 7, clock.now)
        assert len(p._programs) <= 100
    services = p.programs(clock.now)
    assert services["heavy"] == pytest.approx(10_000, rel=0.01)
    assert "fresh-4999" in services  # the newest record survives its own insertion
    assert plugin("program-aware-fairness").params.max_programs == 10_000


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ConfigError, match="strategy: 'wfq' is not supported"):
        plugin("program-aware-fairness", strategy="wfq")
    with pytest.raises(ConfigError, match="lasHalfLifeSeconds"):
        plugin("program-aware-fairness", lasHalfLifeSeconds=0)
    with pytest.raises(ConfigError, match="maxPrograms must be >= 1"):
        plugin("program-aware-fairness", maxPrograms=0)


async def test_the_least_served_program_goes_first_whatever_the_arrival_order() -> None:
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, fairness="program-aware-fairness", poll_interval=10.0)
    fairness = ctl.config.default_band.fairness
    assert isinstance(fairness, ProgramAwareFairness)
    fairness.attained("heavy", 50_000, fairness.clock())
    fairness.attained("light", 40_000, fairness.clock())
    srv = Server(ctl, pool, auto_complete=True)
    ep = pool()[0]
    ep.inflight.requests = 1
    for name, tenant in [("heavy-1", "heavy"), ("heavy-2", "heavy"), ("light-1", "light"), ("new-1", "new")]:
        srv.submit(req(name, fairness=tenant))
        await spin()
    ep.inflight.requests = 0
    ctl.pool_changed()
    await until(lambda: len(srv.order) == 4)
    await srv.close()
    # Service 0 (new) < 40,000 (light) < 50,000 (heavy): min-max normalised 0, 0.8, 1; the head-wait
    # term (weight 0.2) cannot make up for that, so heavy's older heads go last.
    assert srv.order == ["new-1", "light-1", "heavy-1", "heavy-2"]


def las_band() -> tuple[Any, ProgramAwareFairness, Clock, Any]:
    """A controller whose default band uses program-aware-fairness on a hand-driven clock, and that band."""
    pool, det = concurrency_pool(1)
    ctl = controller(pool, det, fairness="program-aware-fairness")
    p = ctl.config.default_band.fairness
    assert isinstance(p, ProgramAwareFairness)
    clock = Clock()
    p.clock = clock
    return ctl, p, clock, ctl._provision(0, 0.0)


def enqueue(ctl: Any, band: Any, fid: str, at: float, seq: int) -> QueueItem:
    """One request of program `fid` queued at `at` (its flow made on first use)."""
    flow = band.flows.get(fid) or ctl._new_flow(band, fid, at)
    item = QueueItem(req(f"{fid}-{seq}", fairness=fid), flow, seq, at, None)  # type: ignore[arg-type]
    band.push(item)
    return item


def test_equal_service_falls_back_to_the_longest_wait() -> None:
    ctl, _, _, band = las_band()
    for seq, (tenant, at) in enumerate([("b", 5.0), ("a", 1.0), ("c", 3.0)]):
        enqueue(ctl, band, tenant, at, seq)
    pick = band.fairness.pick()
    assert pick is not None and pick.fairness_id == "a"


def test_configured_it_learns_from_completions_and_exports_metrics() -> None:
    config = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- {type: program-aware-fairness, parameters: {lasHalfLifeSeconds: 600}}
flowControl:
  defaultPriorityBand: {fairnessPolicyRef: program-aware-fairness}
"""
    metrics = EppMetrics(CollectorRegistry())
    c = build(load_config(config), metrics=metrics)
    assert isinstance(c.pipeline.admission, FlowController)
    fairness = c.plugins["program-aware-fairness"]
    assert isinstance(fairness, ProgramAwareFairness) and fairness in c.pipeline.response_complete
    assert c.pipeline.admission.config.default_band.fairness is fairness
    for tenant, tokens in [("a", 300), ("b", 100)]:
        for processor in c.pipeline.response_complete:
            processor.response_complete(
                request(fairness_id=tenant),
                ResponseInfo(usage=Usage(tokens, 0, 0, tokens)),
                None,  # type: ignore[arg-type]
            )
    r = metrics.registry
    # The reference's names (its program-aware plugin's collectors).
    service = r.get_sample_value("llm_d_epp_program_aware_attained_service_tokens", {"program_id": "a"})
    assert service == pytest.approx(300, rel=1e-3)
    # No request has waited in a queue yet: equal (no) waits.
    assert r.get_sample_value("llm_d_epp_program_aware_jains_fairness_index") == pytest.approx(1.0)


def test_average_waits_and_their_fairness_index_are_the_programs_queue_waits() -> None:
    """As the reference: program_aware_avg_wait_time_milliseconds{program_id} is the mean flow-control
    queue wait of a program's dispatched requests, and the Jain index is over those means."""
    p, _ = policy()
    registry = CollectorRegistry()
    p.setup(PluginContext({}, datastore=None, settings=None, metrics=EppMetrics(registry)))
    pool, det = concurrency_pool(1)
    ctl = controller(
        pool, det, registry_=registry, bands={0: BandConfig(ordering=plugin("fcfs-ordering-policy"), fairness=p)}
    )
    for fid, waits in [("a", [0.1, 0.3]), ("b", [0.6])]:
        for waited in waits:
            ctl.metrics.wait_histogram(fid, "0", "Dispatched", "epp", "m", "m").observe(waited)
    ctl.metrics.wait_histogram("a", "0", "EvictedTTL", "epp", "m", "m").observe(60.0)  # not dispatched
    ctl.metrics.wait_histogram("c", "7", "Dispatched", "epp", "m", "m").observe(9.0)  # another policy's band
    value = registry.get_sample_value
    assert value("llm_d_epp_program_aware_avg_wait_time_milliseconds", {"program_id": "a"}) == pytest.approx(200)
    assert value("llm_d_epp_program_aware_avg_wait_time_milliseconds", {"program_id": "b"}) == pytest.approx(600)
    assert value("llm_d_epp_program_aware_avg_wait_time_milliseconds", {"program_id": "c"}) is None
    # Jain: (200 + 600)^2 / (2 * (200^2 + 600^2)) = 0.8
    assert value("llm_d_epp_program_aware_jains_fairness_index") == pytest.approx(0.8)


def test_attained_service_series_are_capped_like_the_queue_metrics() -> None:
    # Programs are remembered for evictionTtlSeconds (an hour): a client sending a fresh fairness id per
    # request made one series each. Beyond MAX_FAIRNESS_LABELS they fold into "other", as the queues' do.
    p, clock = policy()
    registry = CollectorRegistry()
    p.setup(PluginContext({}, datastore=None, settings=None, metrics=EppMetrics(registry)))
    extra = 50
    for i in range(MAX_FAIRNESS_LABELS + extra):
        p.attained(f"tenant-{i}", 1, clock.now)
    families = {m.name: m for m in registry.collect()}
    samples = families["llm_d_epp_program_aware_attained_service_tokens"].samples
    assert len(samples) == MAX_FAIRNESS_LABELS + 1
    by_label = {s.labels["program_id"]: s.value for s in samples}
    assert by_label["tenant-0"] == pytest.approx(1) and by_label[OVERFLOW_LABEL] == pytest.approx(extra)


def test_the_winner_can_be_neither_the_least_served_nor_the_oldest_head() -> None:
    # a (service 0, head at 100), b (1000, 0), c (10, 10): normalised costs 0.2, 0.8, 0.028.
    ctl, p, clock, band = las_band()
    p.attained("b", 1000, clock.now)
    p.attained("c", 10, clock.now)
    for seq, (fid, at) in enumerate([("a", 100.0), ("b", 0.0), ("c", 10.0)]):
        enqueue(ctl, band, fid, at, seq)
    pick = band.fairness.pick()
    assert pick is not None and pick.fairness_id == "c" == brute_force_pick(band, p)


def brute_force_pick(band: Any, policy: ProgramAwareFairness) -> str | None:
    """The documented formula over every non-empty flow of the band (the pick must equal it)."""
    rows = []
    for fid, flow in band.flows.items():
        head = flow.peek() if flow.count else None
        if head is not None:
            record = policy._programs.get(fid)
            rows.append((fid, record.scaled if record is not None else 0.0, head.enqueued_at))
    if not rows:
        return None
    if len(rows) == 1:
        return rows[0][0]
    p = policy.params
    s_lo, s_hi = min(r[1] for r in rows), max(r[1] for r in rows)
    e_lo, e_hi = min(r[2] for r in rows), max(r[2] for r in rows)
    a = p.las_weight_service / (s_hi - s_lo) if s_hi > s_lo else 0.0
    b = p.las_weight_head_wait / (e_hi - e_lo) if e_hi > e_lo else 0.0
    return min(rows, key=lambda r: (a * r[1] + b * r[2], r[2], r[0]))[0]


enqueue_op = st.tuples(st.just("enqueue"), st.integers(0, 11))
serve_op = st.tuples(st.just("serve"), st.integers(0, 11), st.sampled_from([0, 1, 3, 10, 30, 100, 300, 1000]))
ops = st.lists(
    st.one_of(
        enqueue_op,
        enqueue_op,
        enqueue_op,
        serve_op,
        serve_op,
        st.tuples(st.just("pick"), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("sweep"), st.just(0)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_the_pick_is_the_formula_whatever_happens_in_between(ops: list[tuple[Any, ...]]) -> None:
    ctl, p, clock, band = las_band()
    queued: list[QueueItem] = []
    seq = 0
    for op in ops:
        clock.now += 0.5
        kind = op[0]
        if kind == "enqueue":
            seq += 1
            queued.append(enqueue(ctl, band, f"t{op[1]}", clock.now, seq))
        elif kind == "serve":
            p.attained(f"t{op[1]}", op[2], clock.now)
        elif kind == "cancel" and queued:
            item = queued.pop(op[1] % len(queued))
            if item.state is ItemState.QUEUED:
                item.state = ItemState.DONE
                band.discard(item)
        elif kind == "sweep":
            clock.now += 400  # past evictionSweepSeconds: rebase (and forget programs idle 3,600 s)
            p.attained("t0", 0, clock.now)
        else:
            expected = brute_force_pick(band, p)
            flow = band.fairness.pick()
            assert (flow.fairness_id if flow is not None else None) == expected
            if flow is not None:
                item = band.pop(flow)
                assert item is not None
                item.state = ItemState.DONE


@settings(max_examples=300, deadline=None)
@given(
    flows=st.lists(
        st.tuples(st.integers(0, 5000), st.integers(0, 1000)), min_size=1, max_size=40
    )  # (service, head enqueue time)
)
def test_the_pick_is_the_formula_for_any_services_and_heads(flows: list[tuple[int, int]]) -> None:
    ctl, p, clock, band = las_band()
    for seq, (service, head) in enumerate(flows):
        p.attained(f"t{seq}", service, clock.now)
        enqueue(ctl, band, f"t{seq}", float(head), seq)
    pick = band.fairness.pick()
    assert pick is not None and pick.fairness_id == brute_force_pick(band, p)


def test_a_scrape_survives_a_new_program_arriving_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    # /metrics renders in a worker thread while the event loop charges requests: a program the loop adds
    # between two steps of the scrape must not fail it ("dictionary changed size during iteration": a 500).
    p, clock = policy()
    registry = CollectorRegistry()
    p.setup(PluginContext({}, datastore=None, settings=None, metrics=EppMetrics(registry)))
    p.attained("a", 1, clock.now)
    p.attained("b", 1, clock.now)
    service = p.service

    def service_while_the_loop_runs(fid: str, now: float) -> float:
        p.attained(f"new-{fid}", 1, now)  # what the event loop may do while the thread is switched out
        return service(fid, now)

    monkeypatch.setattr(p, "service", service_while_the_loop_runs)
    families = {m.name: m for m in registry.collect()}
    samples = families["llm_d_epp_program_aware_attained_service_tokens"].samples
    assert {s.labels["program_id"] for s in samples} >= {"a", "b"}


def test_two_program_aware_policies_export_each_series_once() -> None:
    """Two program-aware-fairness plugins (e.g. a half-life per band) used to register a collector each:
    every family came out twice, which Prometheus refuses (a second HELP / TYPE line fails the whole
    scrape). One collector per registry serves them all: waits over every band they order, one index."""
    config = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- {type: program-aware-fairness, name: fast, parameters: {lasHalfLifeSeconds: 10}}
- {type: program-aware-fairness, name: slow}
flowControl:
  priorityBands:
  - {priority: 10, fairnessPolicyRef: fast}
  - {priority: 0, fairnessPolicyRef: slow}
"""
    from prometheus_client import generate_latest

    metrics = EppMetrics(CollectorRegistry())
    c = build(load_config(config), metrics=metrics)
    ctl = c.pipeline.admission
    assert isinstance(ctl, FlowController)
    for processor in c.pipeline.response_complete:
        processor.response_complete(
            request(fairness_id="a"),
            ResponseInfo(usage=Usage(100, 0, 0, 100)),
            None,  # type: ignore[arg-type]
        )
    ctl.metrics.wait_histogram("a", "10", "Dispatched", "epp", "m", "m").observe(0.2)
    ctl.metrics.wait_histogram("b", "0", "Dispatched", "epp", "m", "m").observe(0.6)
    text = generate_latest(metrics.registry).decode()
    for name in ("attained_service_tokens", "avg_wait_time_milliseconds", "jains_fairness_index"):
        assert text.count(f"# TYPE llm_d_epp_program_aware_{name} ") == 1, name
    lines = [line for line in text.splitlines() if line.startswith("llm_d_epp_program_aware_")]
    assert len(lines) == len(set(lines))
    value = metrics.registry.get_sample_value
    # Both policies saw the completion; the program is one series (not summed twice).
    assert value("llm_d_epp_program_aware_attained_service_tokens", {"program_id": "a"}) == pytest.approx(100, rel=1e-3)
    assert value("llm_d_epp_program_aware_avg_wait_time_milliseconds", {"program_id": "a"}) == pytest.approx(200)
    assert value("llm_d_epp_program_aware_avg_wait_time_milliseconds", {"program_id": "b"}) == pytest.approx(600)
    assert value("llm_d_epp_program_aware_jains_fairness_index") == pytest.approx(0.8)


def test_service_and_wait_series_fold_the_same_programs_into_other() -> None:
    """Both program-aware series cap program ids at MAX_FAIRNESS_LABELS. The service series kept a list of its
    own, filled in sorted order at scrape time, the wait series flow control's (in order of first flow): past
    the cap a program had one series under its name and the other folded into "other"."""
    registry = CollectorRegistry()
    policy = plugin("program-aware-fairness")
    clock = Clock()
    policy.clock = clock
    policy.setup(PluginContext({}, datastore=None, settings=None, metrics=EppMetrics(registry)))
    policy.priorities.add("0")
    flow_metrics = FlowControlMetrics.for_registry(registry)
    for fid in [f"t{i:04d}" for i in range(MAX_FAIRNESS_LABELS + 1)][::-1]:  # flows appear in reverse name order
        flow_metrics.wait_histogram(flow_metrics.fairness_label(fid), "0", "Dispatched", "pool", "m", "m").observe(0.01)
        policy.attained(fid, 10, clock.now)

    def program_ids(family: str) -> set[str]:
        return {s.labels["program_id"] for m in registry.collect() if m.name == family for s in m.samples}

    service = program_ids("llm_d_epp_program_aware_attained_service_tokens")
    wait = program_ids("llm_d_epp_program_aware_avg_wait_time_milliseconds")
    assert OVERFLOW_LABEL in service and service == wait
