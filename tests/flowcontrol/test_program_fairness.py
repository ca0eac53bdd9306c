"""program-aware-fairness (least attained service): decayed service, the pick, forgetting idle
programs, its metrics, and the controller serving the least-served program first."""

from __future__ import annotations

import math

import pytest
from helpers import request
from prometheus_client import CollectorRegistry

from llmepp.config.loader import build, load_config
from llmepp.flowcontrol.controller import FlowController
from llmepp.flowcontrol.types import QueueItem
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.flowcontrol.program_fairness import ProgramAwareFairness
from llmepp.request.types import ResponseInfo, Usage

from .kit import Server, concurrency_pool, controller, plugin, req, spin, until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ConfigError, match="strategy: 'wfq' is not supported"):
        plugin("program-aware-fairness", strategy="wfq")
    with pytest.raises(ConfigError, match="lasHalfLifeSeconds"):
        plugin("program-aware-fairness", lasHalfLifeSeconds=0)


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


def test_equal_service_falls_back_to_the_longest_wait() -> None:
    pool, det = concurrency_pool(1)
    ctl = controller(pool, det, fairness="program-aware-fairness")
    band = ctl._provision(0, 0.0)
    for seq, (tenant, at) in enumerate([("b", 5.0), ("a", 1.0), ("c", 3.0)]):
        item = req(f"{tenant}-1", fairness=tenant)
        flow = ctl._new_flow(band, tenant, at)
        qi = QueueItem(item, flow, seq, at, math.inf, None)  # type: ignore[arg-type]
        qi.sort_key = at
        band.push(qi)
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
    service = r.get_sample_value("llm_d_epp_flow_control_program_attained_service", {"fairness_id": "a"})
    assert service == pytest.approx(300, rel=1e-3)
    # Jain: (300 + 100)^2 / (2 * (300^2 + 100^2)) = 0.8
    assert r.get_sample_value("llm_d_epp_flow_control_program_fairness_index") == pytest.approx(0.8, rel=1e-3)
