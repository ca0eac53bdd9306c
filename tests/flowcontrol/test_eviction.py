"""In-flight eviction: which dispatched requests are revoked, how many, how often, and the controller
revoking sheddable work so a blocked higher band gets the capacity."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import endpoint

from llmepp.datalayer.endpoint import Endpoint
from llmepp.flowcontrol.controller import FlowController
from llmepp.flowcontrol.eviction import MAX_PER_DECISION, Evictor
from llmepp.flowcontrol.interfaces import EvictionFilterPolicy, EvictionOrderingPolicy
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.fast import Tally
from llmepp.request.types import InferenceRequest

from .kit import Pool, Server, concurrency_pool, controller, plugin, req, spin, until

ORDER = "priority-then-time-eviction-order-policy"


class Victims:
    """Requests with an `evict` that records the revocation (as the ext_proc stream's would). They carry no
    scheduling result unless a test gives one, so the pool passed to `reclaim` does not exclude them."""

    def __init__(self, accept: EvictionFilterPolicy | None = None, order: EvictionOrderingPolicy | None = None) -> None:
        self.evicted: list[str] = []
        self.counts: dict[int, Tally] = {}
        self.evictor = Evictor(
            1.0,
            lambda p: self.counts.setdefault(p, Tally()),
            accept or plugin("sheddable-eviction-filter"),
            order or plugin(ORDER),
        )

    def dispatch(
        self, rid: str, priority: int, *, answerable: bool = True, on: Endpoint | None = None
    ) -> InferenceRequest:
        r = req(rid, priority=priority)
        if on is not None:
            r.scheduling = SchedulingResult("p", {"p": ProfileResult(targets=[on])})
        if answerable:
            r.evict = self._evict(rid)
        self.evictor.dispatched(r)
        return r

    def _evict(self, rid: str) -> Callable[[], bool]:
        def evict() -> bool:
            self.evicted.append(rid)
            return True

        return evict


def test_lowest_priority_then_newest_first_at_most_two_per_decision_one_decision_per_grace() -> None:
    v = Victims()
    for rid, priority in [("a", -1), ("b", -5), ("c", -5), ("d", -1), ("e", 0), ("f", 3)]:
        v.dispatch(rid, priority)
    assert len(v.evictor) == 4  # priority >= 0 is never a victim, not even tracked
    assert v.evictor.reclaim(0, 5, now=100.0, pool=()) == MAX_PER_DECISION == 2
    assert v.evicted == ["c", "b"]
    assert v.evictor.reclaim(0, 5, now=100.5, pool=()) == 0  # within the grace: saturation may not show it yet
    assert v.evictor.reclaim(0, 5, now=101.0, pool=()) == 2
    assert v.evicted == ["c", "b", "d", "a"]
    assert v.counts[0].value == 4  # counted for the blocked band (the reference's revocations_issued_total)
    assert v.evictor.reclaim(0, 5, now=200.0, pool=()) == 0 and len(v.evictor) == 0


def test_no_more_than_the_blocked_band_waits_for() -> None:
    v = Victims()
    for rid in ("a", "b", "c"):
        v.dispatch(rid, -1)
    assert v.evictor.reclaim(0, 1, now=0.0, pool=()) == 1 and v.evicted == ["c"]


def test_a_blocked_band_with_nothing_below_it_in_flight_does_not_walk_the_in_flight_set() -> None:
    """The dispatcher asks for a decision every tick (1 ms) while a band is blocked. A sheddable band
    backed up behind its own in-flight work (the usual saturated state) has no victim below it: that
    must be known without a scan of every request in flight, 1,000 times a second."""

    class Walks(dict):
        walks = 0

        def values(self):  # type: ignore[no-untyped-def]
            Walks.walks += 1
            return super().values()

    v = Victims()
    v.evictor._inflight = Walks()
    for i in range(100):
        v.dispatch(f"r{i}", -1)
    for tick in range(1000):
        assert v.evictor.reclaim(-1, 10, now=tick * 0.001, pool=()) == 0
    assert Walks.walks == 0
    low = v.dispatch("low", -2)
    assert v.evictor.reclaim(-1, 10, now=1.0, pool=()) == 1 and v.evicted == ["low"]
    v.evictor.completed(low)
    assert v.evictor.reclaim(-1, 10, now=5.0, pool=()) == 0 and Walks.walks == 1


def test_only_bands_below_the_blocked_one_and_only_answerable_unfinished_requests() -> None:
    v = Victims()
    v.dispatch("low", -5)
    v.dispatch("mid", -2)
    v.dispatch("mute", -9, answerable=False)  # its transport cannot answer on its own (grpc.aio)
    done = v.dispatch("done", -9)
    v.evictor.completed(done)
    assert v.evictor.reclaim(-2, 5, now=0.0, pool=()) == 1  # a blocked sheddable band may take from lower ones only
    assert v.evicted == ["low"]
    assert v.evictor.reclaim(-5, 5, now=10.0, pool=()) == 0
    gone = v.dispatch("gone", -3)
    gone.evict = lambda: False  # ended between dispatch and now
    assert v.evictor.reclaim(0, 5, now=20.0, pool=()) == 1
    assert v.evicted == ["low", "mid"] and v.counts[0].value == 1 and v.counts[-2].value == 1  # "gone": none


def test_a_request_on_an_endpoint_that_left_the_pool_is_no_victim() -> None:
    """Saturation is read from the pool's endpoints: revoking a request still running on a pod that has left
    the pool (deleted, failed readiness) frees nothing the detector reads, and fails its client for nothing."""
    v = Victims()
    stays, left = endpoint(0), endpoint(1)
    v.dispatch("on-stays", -1, on=stays)
    v.dispatch("on-left", -1, on=left)  # the newest: first in line if both were victims
    assert v.evictor.reclaim(0, 1, now=0.0, pool=(stays,)) == 1 and v.evicted == ["on-stays"]
    assert v.evictor.reclaim(0, 1, now=10.0, pool=(stays,)) == 0  # only "on-left" is in flight: no victim
    assert v.evictor.reclaim(0, 1, now=20.0, pool=(stays, left)) == 1 and v.evicted == ["on-stays", "on-left"]


async def _two_sheddable_in_flight(max_concurrency: int) -> tuple[Pool, FlowController, Server]:
    """One pod, eviction on (default policies), two sheddable requests dispatched to it."""
    pool, det = concurrency_pool(n=1, max_concurrency=max_concurrency)
    policies = {"eviction_filter": plugin("sheddable-eviction-filter"), "eviction_ordering": plugin(ORDER)}
    ctl = controller(pool, det, eviction_grace=0.01, **policies)
    srv = Server(ctl, pool)
    for rid in ("batch-1", "batch-2"):
        srv.submit(srv.evictable(req(rid, priority=-1)))
    await until(lambda: srv.order == ["batch-1", "batch-2"])
    return pool, ctl, srv


async def test_a_blocked_band_gets_the_capacity_sheddable_work_held() -> None:
    _, ctl, srv = await _two_sheddable_in_flight(max_concurrency=2)
    srv.submit(req("interactive", priority=0))
    await until(lambda: "interactive" in srv.order)
    assert srv.evicted == ["batch-2"]  # the newest one; one slot was all the blocked request needed
    # The reference's flow_control_revocations_issued_total{priority} is the blocked band's.
    assert ctl.metrics.revocations[("0", "epp")].value == 1
    assert ctl.metrics.revocation_outcomes[("confirmed", "epp")].value == 1
    # A sheddable newcomer does not evict its own band.
    srv.submit(srv.evictable(req("batch-3", priority=-1)))
    await spin(200)
    assert srv.evicted == ["batch-2"] and "batch-3" not in srv.order
    await srv.close()


async def test_an_empty_pool_revokes_nothing() -> None:
    """Saturation reads 1.0 while the pool is empty (its last pod failed readiness, say), but what is still in
    flight runs on pods that have left it: revoking those would fail their clients and open nothing."""
    pool, _, srv = await _two_sheddable_in_flight(max_concurrency=4)
    pool.set([])
    srv.submit(req("interactive", priority=0))
    await spin(200)
    assert srv.evicted == [] and "interactive" not in srv.order
    await srv.close()


# -- the policies are plugins ------------------------------------------------------------------------
class OldestFirst(EvictionOrderingPolicy):
    """A custom ordering a plugin author might write: the longest-running victim first."""

    type = "test-oldest-first"

    def eviction_key(self, request: InferenceRequest, sequence: int) -> tuple[float, ...]:
        return (sequence,)


class EveryPriority(EvictionFilterPolicy):
    type = "test-every-priority"

    def accept(self, request: InferenceRequest) -> bool:
        return True


def test_custom_policies_decide_the_victims() -> None:
    v = Victims(order=OldestFirst("oldest"))
    for rid in ("a", "b", "c"):
        v.dispatch(rid, -1)
    assert v.evictor.reclaim(0, 1, now=0.0, pool=()) == 1 and v.evicted == ["a"]
    # A filter admitting non-sheddable work: still only below the blocked band.
    v = Victims(accept=EveryPriority("every"))
    v.dispatch("p5", 5)
    v.dispatch("p0", 0)
    assert v.evictor.reclaim(10, 2, now=0.0, pool=()) == 2 and v.evicted == ["p0", "p5"]
    assert v.evictor.reclaim(0, 2, now=5.0, pool=()) == 0


class RaisesOnTenants(EvictionFilterPolicy):
    """A plugin author's filter with a bug: it raises on some requests (here, those whose id starts "bad")."""

    type = "test-raises-on-tenants"

    def accept(self, request: InferenceRequest) -> bool:
        if request.request_id.startswith("bad"):
            raise KeyError("tenant")
        return request.priority < 0


async def test_a_policy_that_raises_leaves_the_request_admitted_and_unevictable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool, det = concurrency_pool(n=1, max_concurrency=2)
    ctl = controller(
        pool, det, eviction_grace=0.01, eviction_filter=RaisesOnTenants("r"), eviction_ordering=plugin(ORDER)
    )
    srv = Server(ctl, pool)
    for rid in ("bad-1", "batch-2"):
        srv.submit(srv.evictable(req(rid, priority=-1)))
    await until(lambda: srv.order == ["bad-1", "batch-2"])  # admitted although the policy raised on bad-1
    assert "eviction policy 'test-raises-on-tenants'" in caplog.text
    srv.submit(req("interactive", priority=0))
    await until(lambda: "interactive" in srv.order)
    assert srv.evicted == ["batch-2"]  # the one the policy could judge
    await srv.close()
