"""Flow-control queue gauges' label cardinality against client input.

`flow_control_queue_size` / `flow_control_queue_bytes` are labelled (fairness_id, priority, inference_pool,
model_name, target_model_name). Fairness ids and model names are each capped at 1,000 values (client input);
their product is capped at MAX_WAIT_SERIES (4,096) as for `flow_control_request_queue_duration_seconds` and
the request series (README "Metrics"), else 1,000 tenants x 1,000 model names would be 1,000,000 series per
gauge, each kept (at 0) while its flow lives.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmepp.flowcontrol.metrics import MAX_WAIT_SERIES

from .kit import concurrency_pool, controller, req

TENANTS = 80
MODELS = 80  # 6,400 combinations > MAX_WAIT_SERIES


def _series(registry: CollectorRegistry, name: str) -> int:
    text = generate_latest(registry).decode()
    return sum(len(f.samples) for f in text_string_to_metric_families(text) if f.name == name)


async def test_queue_size_gauge_label_combinations_are_capped() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=1)
    pool()[0].inflight.requests = 1  # saturated: everything queues
    ctl = controller(pool, det, registry_=registry, poll_interval=10.0, band_max_requests=100_000)
    tasks = []
    for t in range(TENANTS):
        for m in range(MODELS):
            r = req(f"r{t}-{m}", fairness=f"tenant-{t}")
            r.model = r.target_model = f"model-{m}"
            tasks.append(asyncio.ensure_future(ctl.admit(r, pool())))
    for _ in range(50):
        await asyncio.sleep(0)
    assert ctl.queued == TENANTS * MODELS
    try:
        size_series = _series(registry, "llm_d_epp_flow_control_queue_size")
        bytes_series = _series(registry, "llm_d_epp_flow_control_queue_bytes")
        wait_cap = MAX_WAIT_SERIES + 1  # the wait histogram's bound: MAX_WAIT_SERIES, then one "other" set
        assert size_series <= wait_cap, f"flow_control_queue_size: {size_series} series from client input"
        assert bytes_series <= wait_cap, f"flow_control_queue_bytes: {bytes_series} series from client input"
    finally:
        await ctl.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_queue_size_series_of_past_models_stay_while_the_flow_lives() -> None:
    """The combinations persist after their requests leave: one tenant cycling through model names keeps
    adding series (at 0) until its flow is garbage-collected, which never happens while it stays busy."""
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=1)
    pool()[0].inflight.requests = 1
    ctl = controller(pool, det, registry_=registry, poll_interval=10.0, band_max_requests=100_000)
    try:
        for rnd in range(3):
            tasks = []
            for m in range(2000):
                r = req(f"r{rnd}-{m}", fairness=f"tenant-{(m + 7 * rnd) % 80}")
                r.model = r.target_model = f"model-{m % 250}"  # 250 model names, 80 tenants
                tasks.append(asyncio.ensure_future(ctl.admit(r, pool())))
            for _ in range(20):
                await asyncio.sleep(0)
            _series(registry, "llm_d_epp_flow_control_queue_size")  # a scrape while they wait
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert ctl.queued == 0
        series = _series(registry, "llm_d_epp_flow_control_queue_size")
        assert series <= MAX_WAIT_SERIES + 1, f"{series} zero-valued series left behind by requests that are gone"
    finally:
        await ctl.aclose()
