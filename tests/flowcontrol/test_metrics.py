"""Flow-control metrics on the app's registry: reference names, per-flow gauges, outcomes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from llmepp.flowcontrol.metrics import MAX_FAIRNESS_LABELS, MAX_WAIT_SERIES, FlowControlMetrics

from .kit import Server, concurrency_pool, controller, req, spin


async def test_queue_gauges_outcome_counters_and_wait_histogram() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, registry_=registry, objectives={"vip": 2}, poll_interval=10.0)
    srv = Server(ctl, pool)
    fast = req("fast", fairness="t1")
    await ctl.admit(fast, pool())  # fast path: dispatched, not queued
    pool()[0].inflight.requests = 1
    ctl.release_pending(fast)  # charged to the endpoint
    srv.submit(req("a", fairness="t1", body=b"x" * 10))
    srv.submit(req("b", fairness="t1", body=b"x" * 5))
    srv.submit(req("c", fairness="t2", objective="vip"))
    await spin()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value("llm_d_epp_" + name, {"inference_pool": "epp", **labels})

    # Queued requests are counted per model too (the reference's labels).
    m = {"model_name": "m", "target_model_name": "m"}
    assert value("flow_control_queue_size", fairness_id="t1", priority="0", **m) == 2
    assert value("flow_control_queue_bytes", fairness_id="t1", priority="0", **m) == 15
    assert value("flow_control_queue_size", fairness_id="t2", priority="2", **m) == 1
    assert value("flow_control_capacity_utilization_requests", priority="0") == 2 / 5000
    assert value("flow_control_pool_saturation", stage="effective") == 1.0
    assert value("flow_control_requests_total", outcome="Dispatched", priority="0") == 1
    srv.complete_one()
    await spin()
    assert value("flow_control_requests_total", outcome="Dispatched", priority="2") == 1  # vip went first
    assert (
        value(
            "flow_control_request_queue_duration_seconds_count",
            fairness_id="t2",
            priority="2",
            outcome="Dispatched",
            **m,
        )
        == 1
    )
    assert value("flow_control_queue_size", fairness_id="t2", priority="2", **m) == 0  # the flow lives: 0
    await srv.close()
    assert value("flow_control_requests_total", outcome="EvictedOther", priority="0") == 2
    text = generate_latest(registry).decode()
    for name in ("flow_control_dispatch_cycle_duration_seconds", "flow_control_stale_endpoints",
                 "flow_control_global_capacity_utilization_bytes"):  # fmt: skip
        assert "llm_d_epp_" + name in text


def test_fairness_id_labels_are_capped() -> None:
    m = FlowControlMetrics.for_registry(CollectorRegistry())
    labels = {m.fairness_label(f"tenant-{i}") for i in range(MAX_FAIRNESS_LABELS + 50)}
    assert len(labels) == MAX_FAIRNESS_LABELS + 1 and "other" in labels
    assert m.fairness_label("tenant-3") == "tenant-3"


def test_wait_histogram_label_combinations_are_capped() -> None:
    """Fairness ids, models and targets are each capped; their combinations were not (a histogram of 18
    buckets per fairness x model x target x outcome)."""
    m = FlowControlMetrics.for_registry(CollectorRegistry())
    for f in range(80):
        for model in range(80):
            m.wait_histogram(f"t{f}", "0", "Dispatched", "epp", f"m{model}", f"m{model}").observe(0.1)
    assert len(m.waits) == MAX_WAIT_SERIES + 1
    other = m.waits[("other", "0", "Dispatched", "epp", "other", "other")]
    assert other is m.wait_histogram("t79", "0", "Dispatched", "epp", "m79", "m79")


def test_one_metrics_object_per_registry() -> None:
    r = CollectorRegistry()
    assert FlowControlMetrics.for_registry(r) is FlowControlMetrics.for_registry(r)
