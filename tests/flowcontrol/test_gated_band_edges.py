"""Flow-control edges: a band held back by a zero ceiling revokes no in-flight work (revoking cannot open it; the
reference's reclamation skips such bands), and a request refused at capacity is not counted as queued in the
overflow flow."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from llmepp.errors import ResourceExhausted

from .kit import BandConfig, Server, concurrency_pool, controller, plugin, req, spin, until

ORDER = "priority-then-time-eviction-order-policy"


async def test_soft_reflective_thinning_below_saturation_does_not_revoke_in_flight_work() -> None:
    """soft-reflective-ceiling-policy closes band 0 on alternate ticks at 70 % (ceiling 0): its requests go out
    on the next open tick; evicting sheddable in-flight requests for it would only kill work."""
    pool, det = concurrency_pool(n=1, max_concurrency=10)
    band = lambda: BandConfig(ordering=plugin("fcfs-ordering-policy"), fairness=plugin("global-strict-fairness-policy"))  # noqa: E731
    ctl = controller(
        pool,
        det,
        eviction_grace=0.01,
        usage_limit=plugin("soft-reflective-ceiling-policy"),
        bands={10: band(), 0: band(), -1: band()},
        eviction_filter=plugin("sheddable-eviction-filter"),
        eviction_ordering=plugin(ORDER),
    )
    srv = Server(ctl, pool)
    batch = [f"batch-{i}" for i in range(7)]
    for rid in batch:
        srv.submit(srv.evictable(req(rid, priority=-1)))
    await until(lambda: all(b in srv.order for b in batch))
    assert pool()[0].inflight.requests == 7  # saturation 0.7: the pool is not full
    for i in range(2):
        srv.submit(req(f"interactive-{i}", priority=0))
    await until(lambda: all(f"interactive-{i}" in srv.order for i in range(2)))
    await spin(50)
    # Band 0 is only being thinned (soft-reflective alternates its ceiling 0 / 1 at this load), it dispatches
    # every other tick: no in-flight work should be revoked for it while the pool is at 70 %.
    assert srv.evicted == []
    await srv.close()


async def test_a_request_refused_at_capacity_is_not_counted_as_queued_in_the_overflow_flow() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(n=1, max_concurrency=1)
    pool()[0].inflight.requests = 1  # saturated: requests wait
    ctl = controller(pool, det, max_flows=1, band_max_requests=1, registry_=registry, poll_interval=10.0)
    srv = Server(ctl, pool)
    srv.submit(req("a", fairness="tenant-a"))
    await until(lambda: ctl.queued == 1)
    # Band full (maxRequests 1): a new tenant's request is refused with 429, it is queued nowhere.
    with pytest.raises(ResourceExhausted):
        await ctl.admit(req("b", fairness="tenant-b"), pool())
    assert ctl.queued == 1
    overflowed = registry.get_sample_value(
        "llm_d_epp_flow_control_overflow_requests_total", {"priority": "0", "inference_pool": "epp"}
    )
    # "Requests with a new fairness id queued in their band's shared overflow flow": none was.
    assert not overflowed
    await srv.close()
