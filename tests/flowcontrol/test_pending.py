"""Requests released by flow control but not yet charged to an endpoint (the director still runs async data
producers for them) count toward in-flight saturation: no over-admission while they wait, and no leak of
that count on any way out (routed, refused, failed, cancelled, closed)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from helpers import endpoint, request
from prometheus_client import CollectorRegistry

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint
from llmepp.director import Director, RoutingDecision
from llmepp.errors import NoEndpoints, RequestError
from llmepp.flowcontrol.controller import FlowController
from llmepp.flowcontrol.interfaces import SaturationDetector
from llmepp.framework.requestcontrol import DataProducer, DirectResponse, PreRequest
from llmepp.framework.scheduling import Filter, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import InferenceRequest, ResponseInfo

from .kit import Pool, Server, concurrency_pool, controller, plugin, req, until

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {{maxConcurrency: {cap}, concurrencyMode: {mode}, maxTokenConcurrency: {token_cap}}}
flowControl:
  saturationDetector: {{pluginRef: concurrency-detector}}
"""


class Gate(DataProducer):
    """An async producer (a remote tokenizer, a latency predictor) that waits for `open`; it records how many
    admitted requests were on their way (in it) or on an endpoint at most, and can fail a request."""

    type = "test-gate-producer"
    produce_timeout = 10.0

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        super().__init__("gate")
        self.endpoints = endpoints
        self.open = asyncio.Event()
        self.open.set()
        self.entered = 0
        self.inside = 0
        self.peak = 0  # most admitted requests at once: in the producer + charged to an endpoint
        self.fail: RequestError | None = None

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        self.entered += 1
        self.inside += 1
        self.peak = max(self.peak, self.inside + sum(ep.inflight.requests for ep in self.endpoints))
        try:
            await self.open.wait()
            if self.fail is not None:
                raise self.fail
        finally:
            self.inside -= 1


def setup(
    cap: int = 2, *, mode: str = "requests", token_cap: int = 1_000_000, first: DataProducer | None = None
) -> tuple[Director, FlowController, Gate]:
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    c = build(load_config(CONFIG.format(cap=cap, mode=mode, token_cap=token_cap)), datastore=ds, metrics=metrics)
    fc = c.pipeline.admission
    assert isinstance(fc, FlowController)
    fc._poll = 0.001  # dispatch cycles every millisecond while work waits (the default)
    gate = Gate(ds.endpoints)
    c.pipeline.producers[:0] = [first] if first is not None else []
    c.pipeline.producers.append(gate)
    return Director(ds, c.pipeline, metrics), fc, gate


def pending(fc: FlowController) -> tuple[int, int]:
    assert fc.pending is not None
    return fc.pending.requests, fc.pending.tokens


Routing = asyncio.Task[RoutingDecision | DirectResponse]


def burst(d: Director, requests: list[InferenceRequest]) -> dict[Routing, InferenceRequest]:
    return {asyncio.create_task(d.handle_request(r, None)): r for r in requests}


async def routed(d: Director, r: InferenceRequest) -> RoutingDecision:
    decision = await asyncio.wait_for(d.handle_request(r, None), 1.0)
    assert isinstance(decision, RoutingDecision)
    return decision


async def finish_all(d: Director, tasks: dict[Routing, InferenceRequest], gate: Gate, cap: int) -> None:
    """Complete every request as it is routed; at no point more than `cap` admitted at once."""
    left = set(tasks)
    while left:
        done, left = await asyncio.wait(left, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
        assert done, "requests stuck in the queue"
        for task in done:
            decision = task.result()
            assert isinstance(decision, RoutingDecision)
            d.response_complete(tasks[task], ResponseInfo(status=200), decision)
    assert gate.peak <= cap


async def test_a_burst_held_in_an_async_producer_is_not_over_admitted() -> None:
    # The fast path: nothing is queued and nothing is on the endpoint yet, but the first two requests are
    # already released (waiting for the producer): the rest must queue.
    d, fc, gate = setup(cap=2)
    gate.open.clear()
    tasks = burst(d, [request() for _ in range(10)])
    await asyncio.sleep(0.05)  # ~50 dispatcher ticks
    assert gate.entered == 2
    assert fc.queued == 8
    gate.open.set()
    await finish_all(d, tasks, gate, cap=2)
    assert gate.entered == 10
    assert pending(fc) == (0, 0) and fc.queued == 0
    await fc.aclose()


async def test_dispatch_cycles_count_requests_still_in_producers() -> None:
    # The dispatcher: both slots taken, six queued; one completion frees one slot. The request dispatched into
    # it waits in the producer; later cycles (one per tick) must not see the slot as free.
    d, fc, gate = setup(cap=2)
    held = [request(), request()]
    decisions = [await routed(d, r) for r in held]
    gate.open.clear()
    tasks = burst(d, [request() for _ in range(6)])
    await until(lambda: fc.queued == 6)
    d.response_complete(held[0], ResponseInfo(status=200), decisions[0])
    await until(lambda: gate.entered >= 3)
    await asyncio.sleep(0.05)  # ~50 dispatcher ticks
    assert gate.entered == 3 and fc.queued == 5
    gate.open.set()
    d.response_complete(held[1], ResponseInfo(status=200), decisions[1])
    await finish_all(d, tasks, gate, cap=2)
    assert pending(fc) == (0, 0)
    await fc.aclose()


async def test_tokens_mode_counts_the_prompt_estimate_of_requests_in_producers() -> None:
    # 400-byte prompts: ~100 tokens each (the director's bytes/4 estimate); room for 250 tokens.
    d, fc, gate = setup(cap=100, mode="tokens", token_cap=250)
    gate.open.clear()
    tasks = burst(d, [request(b"x" * 400) for _ in range(6)])
    await asyncio.sleep(0.03)
    assert gate.entered == 3  # 0, 100, 200 < 250: admitted; 300 is not
    assert pending(fc) == (3, 300)
    gate.open.set()
    await finish_all(d, tasks, gate, cap=100)
    assert pending(fc) == (0, 0)
    assert d.datastore.endpoints[0].inflight.tokens == 0
    await fc.aclose()


class FailingPreRequest(PreRequest):
    type = "test-failing-pre-request"

    def __init__(self) -> None:
        super().__init__("failing-pre-request")

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        raise RequestError("no", status=503)


@pytest.mark.parametrize("way", ["producer-refuses", "client-cancels", "no-endpoint", "pre-request-fails"])
async def test_a_request_that_fails_between_dispatch_and_charging_is_no_longer_pending(way: str) -> None:
    d, fc, gate = setup(cap=1)
    gate.open.clear()
    r = request(b"x" * 40)
    if way == "producer-refuses":
        gate.fail = RequestError("refused", status=503)
    if way == "pre-request-fails":
        d.pipeline.pre_request.append(FailingPreRequest())
    subset = ["10.9.9.9:8000"] if way == "no-endpoint" else None
    task = asyncio.create_task(d.handle_request(r, subset))
    if way != "no-endpoint":
        await until(lambda: gate.entered == 1)
        assert pending(fc) == (1, 10)
        waiting = asyncio.create_task(d.handle_request(request(), None))  # the pool is full meanwhile
        await until(lambda: fc.queued == 1)
        waiting.cancel()
    if way == "client-cancels":
        task.cancel()
    gate.open.set()
    with pytest.raises((RequestError, NoEndpoints, asyncio.CancelledError)):
        await task
    assert pending(fc) == (0, 0)
    assert d.datastore.endpoints[0].inflight.requests == 0
    # Nothing holds the only slot: the next request goes straight through.
    gate.fail = None
    d.pipeline.pre_request.clear()
    nxt = request()
    decision = await routed(d, nxt)
    assert pending(fc) == (0, 0)
    d.response_complete(nxt, ResponseInfo(status=200), decision)
    await fc.aclose()


async def test_a_request_cancelled_after_dispatch_before_it_resumes_is_no_longer_pending() -> None:
    pool, det = concurrency_pool(1, 1)
    ctl = controller(pool, det, poll_interval=10.0)
    s = Server(ctl, pool)
    await s.serve(req("a"))  # holds the only slot
    task = asyncio.create_task(ctl.admit(req("b", body=b"x" * 8), pool()))
    await until(lambda: ctl.queued == 1)
    s.complete_one()
    assert ctl.dispatch_cycle() == 1  # dispatched: counted pending...
    assert pending(ctl) == (1, 1)
    task.cancel()  # ...and its client leaves before its task runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pending(ctl) == (0, 0)
    await ctl.aclose()


async def test_a_waiting_coroutine_closed_after_dispatch_is_no_longer_pending() -> None:
    # A transport that drops the waiting coroutine closes it (GeneratorExit at its await) instead of cancelling.
    pool, det = concurrency_pool(1, 1)
    ctl = controller(pool, det, poll_interval=10.0)
    s = Server(ctl, pool)
    await s.serve(req("a"))
    coro = ctl.admit(req("b"), pool())
    future = coro.send(None)  # queued: suspended on its item's future
    assert ctl.queued == 1 and isinstance(future, asyncio.Future)
    s.complete_one()
    assert ctl.dispatch_cycle() == 1
    assert pending(ctl)[0] == 1
    coro.close()
    assert pending(ctl) == (0, 0)
    await ctl.aclose()


class PromptRewriter(DataProducer):
    """A third-party producer that replaces the prompt (a template it renders, a compression it applies)."""

    type = "test-prompt-rewriter"

    def __init__(self) -> None:
        super().__init__("prompt-rewriter")

    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        request.prompt = b"y" * 4000


async def test_a_prompt_changed_while_pending_releases_the_tokens_it_was_counted_with() -> None:
    d, fc, gate = setup(cap=100, mode="tokens", token_cap=1_000_000, first=PromptRewriter())
    gate.open.clear()
    r = request(b"x" * 400)
    task = asyncio.create_task(d.handle_request(r, None))
    await until(lambda: gate.entered == 1)
    assert r.prompt == b"y" * 4000 and pending(fc) == (1, 100)  # counted when dispatched, before the rewrite
    gate.open.set()
    decision = await task
    assert isinstance(decision, RoutingDecision)
    assert pending(fc) == (0, 0)
    d.response_complete(r, ResponseInfo(status=200), decision)
    await fc.aclose()


async def test_a_second_release_of_the_same_request_does_not_count_below_zero() -> None:
    d, fc, _ = setup(cap=1)
    r = request()
    decision = await routed(d, r)
    assert pending(fc) == (0, 0)
    fc.release_pending(r)  # released again (a plugin bug, a double cleanup): no effect
    assert pending(fc) == (0, 0)
    d.response_complete(r, ResponseInfo(status=200), decision)
    # Still one slot, not two: a count below zero would let a second request through.
    held = request()
    held_decision = await routed(d, held)
    waiting = asyncio.create_task(d.handle_request(request(), None))
    await until(lambda: fc.queued == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    d.response_complete(held, ResponseInfo(status=200), held_decision)
    await fc.aclose()


async def test_the_pending_count_is_on_metrics_while_requests_wait_in_producers() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, 10)
    ctl = controller(pool, det, registry_=registry, poll_interval=10.0)

    def value(name: str) -> float | None:
        return registry.get_sample_value("llm_d_epp_flow_control_pending_" + name, {"inference_pool": "epp"})

    assert (value("requests"), value("tokens")) == (0, 0)
    a, b = request(b"x" * 40), request(b"x" * 8)  # 10 and 2 tokens
    for r in (a, b):
        await ctl.admit(r, pool())  # released; its director has not charged it yet
    assert (value("requests"), value("tokens")) == (2, 12)
    ctl.release_pending(a)
    assert (value("requests"), value("tokens")) == (1, 2)
    ctl.release_pending(b)
    assert (value("requests"), value("tokens")) == (0, 0)
    await ctl.aclose()
    # A scraped detector keeps no pending count: no series.
    registry = CollectorRegistry()
    scraped = controller(Pool([endpoint(0)]), plugin("utilization-detector"), registry_=registry)
    assert value("requests") is None
    await scraped.aclose()


async def test_scraped_detectors_keep_no_pending_count() -> None:
    ctl = controller(Pool([endpoint(0)]), plugin("utilization-detector"))
    assert ctl.pending is None
    await ctl.admit(req("a"), ctl._pool())
    ctl.release_pending(req("a"))  # harmless
    await ctl.aclose()


def test_the_concurrency_formulas_count_pending_requests_and_the_filter_does_not() -> None:
    a, b = endpoint(0), endpoint(1)
    a.inflight.requests, a.inflight.tokens = 30, 100_000
    b.inflight.requests, b.inflight.tokens = 10, 700_000
    now = 0.0
    requests: SaturationDetector = plugin("concurrency-detector")
    tokens: SaturationDetector = plugin("concurrency-detector", concurrencyMode="tokens")
    hybrid: SaturationDetector = plugin(
        "concurrency-detector", concurrencyMode="hybrid", maxConcurrency=20, maxTokenConcurrency=1_000_000
    )
    for det in (requests, tokens, hybrid):
        assert det.pending is not None
        det.pending.requests, det.pending.tokens = 60, 200_000
    assert requests.saturation([a, b], now) == pytest.approx((40 + 60) / 200)
    assert tokens.saturation([a, b], now) == pytest.approx((800_000 + 200_000) / 2_000_000)
    # a: max(30/20, 0.1) = 1.5; b: max(10/20, 0.7) = 0.7; pending: max(60/20, 0.2) = 3 → (1.5 + 0.7 + 3) / 2
    assert hybrid.saturation([a, b], now) == pytest.approx(2.6)
    assert hybrid.saturation([], now) == 1.0
    # As a filter: per endpoint, and pending requests are on none (a: 99 + 60 pending would be over 100).
    a.inflight.requests = 99
    assert [e.name for e in plugin_filter(requests).filter(request(), [a, b])] == ["pod-0", "pod-1"]
    a.inflight.requests = 100
    assert [e.name for e in plugin_filter(requests).filter(request(), [a, b])] == ["pod-1"]


def plugin_filter(det: SaturationDetector) -> Filter:
    assert isinstance(det, Filter)
    return det
