"""Flow controller invariants under random interleavings (hypothesis state machine).

Every admitted request ends exactly once (dispatched, rejected or evicted), the queue counts and
bytes at controller, band and flow level equal what actually waits, nothing is dispatched after
its client went away, and nothing is left waiting after shutdown. The flows stay within maxFlows
(plus one overflow flow per band) and no flow with requests waiting is ever dropped. A request
expires exactly when its regime's TTL has passed since the later of its enqueue and the last
change between an empty pool and not (never early, never left overdue).
"""

from __future__ import annotations

import asyncio
from typing import Any

from helpers import endpoint
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmepp.errors import RequestError
from llmepp.flowcontrol.controller import FlowController
from llmepp.flowcontrol.types import OVERFLOW_FAIRNESS_ID, ItemState

from .kit import Clock, Pool, controller, plugin, req

FAIRNESS = ["a", "b", "c", "d", "e", "", OVERFLOW_FAIRNESS_ID]
# (defaultRequestTTL, noEndpointRequestTTL): either regime the shorter one
TTLS = [(5.0, 2.0), (2.0, 5.0)]
OBJECTIVES = {"hi": 5, "bg": -1}


class FlowControlMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.ep = endpoint(0)
        self.pool = Pool([self.ep])
        self.ctl: FlowController
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.sizes: dict[str, int] = {}
        self.abandoned = 0  # admissions run by hand (abandon_before_first_step), all finished
        self.cancelled: set[str] = set()
        self.running: list[str] = []  # dispatched and not completed (hold a slot)
        self.served: list[str] = []  # every request that got through admission
        self.seq = 0
        self.enqueued_at: dict[str, float] = {}
        self.regime_since = float("-inf")  # the last change between an empty pool and not
        self.seen_waiting: set[str] = set()
        self.settled: set[str] = set()

    @initialize(
        fairness=st.sampled_from(
            ["round-robin-fairness-policy", "global-strict-fairness-policy", "program-aware-fairness"]
        ),
        ordering=st.sampled_from(["fcfs-ordering-policy", "edf-ordering-policy", "slo-deadline-ordering-policy"]),
        holdback=st.booleans(),
        max_flows=st.integers(1, 5),
        ttls=st.sampled_from(TTLS),
        preloaded=st.integers(0, 2),
    )
    def build(
        self, fairness: str, ordering: str, holdback: bool, max_flows: int, ttls: tuple[float, float], preloaded: int
    ) -> None:
        self.default_ttl, self.no_endpoint_ttl = ttls
        for i in range(preloaded):  # requests already running (2 saturate the pool): later ones queue
            self.ep.inflight.requests += 1
            self.running.append(f"pre{i}")
        usage = plugin("priority-holdback-policy", minCeiling=0.5) if holdback else None
        self.ctl = controller(
            self.pool,
            plugin("concurrency-detector", maxConcurrency=2),
            fairness=fairness,
            ordering=ordering,
            usage_limit=usage,
            objectives=OBJECTIVES,
            clock=self.clock,
            default_ttl=self.default_ttl,
            no_endpoint_ttl=self.no_endpoint_ttl,
            max_flows=max_flows,
            poll_interval=10.0,  # ticks only by the `tick` rule
            band_max_requests=4,
            max_bytes=120,
            flow_gc_timeout=1.0,
            band_gc_timeout=2.0,
        )

    # -- helpers ---------------------------------------------------------------------------------
    def spin(self, n: int = 30) -> None:
        async def go() -> None:
            for _ in range(n):
                await asyncio.sleep(0)

        self.loop.run_until_complete(go())

    async def serve(self, rid: str, r: Any) -> None:
        await self.ctl.admit(r, self.pool())
        assert rid not in self.cancelled, f"{rid} dispatched after its client went away"
        higher = [b for p, b in self.ctl.bands.items() if p > r.priority and b.count]
        assert not higher, f"{rid} (priority {r.priority}) overtook waiting requests of {higher}"
        self.ep.inflight.requests += 1
        self.ctl.release_pending(r)  # charged to the endpoint: no longer pending
        self.running.append(rid)
        self.served.append(rid)

    def waiting(self) -> list[str]:
        return [rid for rid, t in self.tasks.items() if not t.done()]

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (outcome, _, _), tally in self.ctl.metrics.outcomes.items():
            out[outcome] = out.get(outcome, 0) + int(tally.value)
        return out

    # -- rules -----------------------------------------------------------------------------------
    @rule(
        fairness=st.sampled_from(FAIRNESS),
        objective=st.sampled_from(["", "hi", "bg", "unknown"]),
        size=st.integers(0, 50),
    )
    def submit(self, fairness: str, objective: str, size: int) -> None:
        self.seq += 1
        rid = f"r{self.seq}"
        r = req(rid, fairness=fairness, objective=objective, body=b"x" * size)
        self.sizes[rid] = size
        self.enqueued_at[rid] = self.clock.now
        self.tasks[rid] = self.loop.create_task(self.serve(rid, r))
        self.spin()

    @rule(size=st.integers(1, 50))
    def abandon_before_first_step(self, size: int) -> None:
        """A routing coroutine that queued, then was dropped without ever being resumed (its
        transport task was cancelled before it started): Python closes it (GeneratorExit)."""
        self.seq += 1
        self.abandoned += 1
        rid = f"ab{self.seq}"

        async def step_then_drop() -> None:
            r = req(rid, body=b"y" * size)
            coro = self.ctl.admit(r, self.pool())
            try:
                coro.send(None)
            except StopIteration:
                self.ep.inflight.requests += 1  # fast path: dispatched, holds a slot like any other
                self.ctl.release_pending(r)
                self.running.append(rid)
                return
            except RequestError:
                return
            coro.close()

        self.loop.run_until_complete(step_then_drop())
        self.spin()

    @precondition(lambda self: bool(self.waiting()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.waiting()))
        self.cancelled.add(rid)
        self.tasks[rid].cancel()
        self.spin()

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.running))
        self.running.remove(rid)
        self.ep.inflight.requests -= 1
        self.ctl.request_completed(req(rid))
        self.spin()

    @rule(empty=st.booleans())
    def pool_membership(self, empty: bool) -> None:
        if empty != (not self.pool()):
            self.regime_since = self.clock.now
        self.pool.set([] if empty else [self.ep])
        self.ctl.pool_changed()
        self.spin()

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.5, 2.5, 3.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.ctl.expire_due()
        self.spin()

    def budget(self, rid: str) -> tuple[float, float]:
        """When `rid`'s TTL budget started, and the TTL of the regime in force."""
        ttl = self.no_endpoint_ttl if not self.pool() else self.default_ttl
        return max(self.enqueued_at[rid], self.regime_since), ttl

    @rule()
    def tick(self) -> None:
        self.ctl._tick()
        self.spin()

    @rule()
    def garbage_collection(self) -> None:
        self.ctl.collect_garbage()
        self.spin()

    @rule()
    def shutdown(self) -> None:
        """Mid-run: every waiting request is answered 503; later ones are refused with 503."""
        self.loop.run_until_complete(self.ctl.aclose())
        self.spin()
        assert not self.waiting() and self.ctl.queued == 0

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def counts_match_what_waits(self) -> None:
        ctl = self.ctl
        waiting = self.waiting()
        assert ctl.queued == len(waiting), (ctl.queued, waiting)
        assert ctl.queued_bytes == sum(self.sizes[rid] for rid in waiting)
        assert ctl.queued == sum(b.count for b in ctl.bands.values())
        assert ctl.queued_bytes == sum(b.bytes for b in ctl.bands.values())
        for band in ctl.bands.values():
            assert band.count == sum(f.count for f in band.flows.values())
            assert band.bytes == sum(f.bytes for f in band.flows.values())
            assert 0 <= band.count <= band.max_requests
        assert 0 <= ctl.queued_bytes <= 120

    @invariant()
    def nothing_stays_pending(self) -> None:
        """Every dispatched request was charged to the endpoint or dropped by its client by now: none is
        still counted as on its way (flowcontrol.interfaces.PendingLoad)."""
        pending = self.ctl.pending
        assert pending is not None and (pending.requests, pending.tokens) == (0, 0), pending

    @invariant()
    def flows_are_bounded_and_none_with_requests_is_dropped(self) -> None:
        ctl = self.ctl
        counted = [f for b in ctl.bands.values() for f in b.flows.values() if not f.overflow]
        assert ctl.flow_count == len(counted) <= ctl.max_flows
        assert ctl._busy_flows == sum(1 for f in counted if f.count)
        for band in ctl.bands.values():
            for fid, flow in band.flows.items():
                assert flow.fairness_id == fid and flow.band is band
                assert flow.overflow == (fid == OVERFLOW_FAIRNESS_ID)
                assert flow.idle_entry or flow.count or flow.overflow, f"empty flow {flow} not evictable"

    @invariant()
    def every_waiting_request_is_in_a_flow_of_its_band(self) -> None:
        for item in self.ctl._expiry:
            if item.state is ItemState.QUEUED:
                flow = item.flow
                assert flow.band.flows.get(flow.fairness_id) is flow, f"{flow} dropped with requests waiting"
                assert self.ctl.bands.get(flow.priority) is flow.band

    @invariant()
    def requests_expire_on_time(self) -> None:
        """Expiry happens at the current clock (time moves only in time_passes, which expires what is
        due): a request that expired since the last check had used up its budget, and no request
        still waiting has."""
        for rid in self.seen_waiting - self.settled:
            task = self.tasks[rid]
            if not task.done():
                continue
            self.settled.add(rid)
            if task.cancelled() or task.exception() is None:
                continue
            err = task.exception()
            if isinstance(err, RequestError) and err.reason in ("rejected-ttl-expired", "rejected-no-endpoints"):
                start, ttl = self.budget(rid)
                assert start + ttl <= self.clock.now, f"{rid} expired early ({start} + {ttl} > {self.clock.now})"
        waiting = self.waiting()
        self.seen_waiting.update(waiting)
        for rid in waiting:
            if rid in self.cancelled or self.ctl._closed:
                continue
            start, ttl = self.budget(rid)
            assert start + ttl > self.clock.now, f"{rid} overdue ({start} + {ttl} <= {self.clock.now})"

    @invariant()
    def every_finished_request_has_exactly_one_outcome(self) -> None:
        finished = [t for t in self.tasks.values() if t.done()]
        outcomes = self.outcomes()
        assert sum(outcomes.values()) == len(finished) + self.abandoned, (outcomes, len(finished), self.abandoned)
        served_tasks = sum(1 for t in finished if not t.cancelled() and t.exception() is None)
        assert served_tasks == sum(1 for rid in self.served if rid in self.tasks)
        for t in finished:
            if not t.cancelled() and t.exception() is not None:
                err = t.exception()
                assert isinstance(err, RequestError) and err.status in (429, 503), err

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.ctl.aclose())
            self.spin()
            assert not self.waiting(), "a request still waits after shutdown"
            assert (self.ctl.queued, self.ctl.queued_bytes) == (0, 0)
            for band in self.ctl.bands.values():
                assert (band.count, band.bytes) == (0, 0)
                assert all((f.count, f.bytes) == (0, 0) for f in band.flows.values())
            for t in self.tasks.values():
                if not t.cancelled() and t.exception() is not None:
                    err = t.exception()
                    assert isinstance(err, RequestError) and err.status in (429, 503), err
        finally:
            for t in self.tasks.values():
                t.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


FlowControlMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestFlowControlMachine = FlowControlMachine.TestCase
