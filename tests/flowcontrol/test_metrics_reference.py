"""Flow control's series under the reference's names, label names and meaning (llm-d-router docs/metrics.md,
pkg/epp/metrics): in-flight eviction, the optional global limit, the enqueue step. The series every flow
control deployment has are pinned on a running EPP in tests/server/test_metrics_reference_names.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .kit import Server, concurrency_pool, controller, plugin, req, spin, until

ORDER = "priority-then-time-eviction-order-policy"


def families(registry: CollectorRegistry) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
        out.setdefault("#types", []).append((family.name, {"type": family.type}, 0.0))
    return out


async def test_revocations_are_counted_as_issued_for_the_blocked_band_and_by_outcome() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(n=1, max_concurrency=2)
    policies = {"eviction_filter": plugin("sheddable-eviction-filter"), "eviction_ordering": plugin(ORDER)}
    ctl = controller(pool, det, eviction_grace=0.01, registry_=registry, **policies)
    srv = Server(ctl, pool)

    for rid in ("batch-1", "batch-2"):
        srv.submit(srv.evictable(req(rid, priority=-1)))
    await until(lambda: srv.order == ["batch-1", "batch-2"])
    srv.submit(req("interactive", priority=3))
    await until(lambda: "interactive" in srv.order)
    found = families(registry)
    types = {name: labels["type"] for name, labels, _ in found["#types"]}
    # flow_control_revocations_issued_total{priority, inference_pool}: the demand (blocked) band's priority.
    assert types["llm_d_epp_flow_control_revocations_issued"] == "counter"
    issued = found["llm_d_epp_flow_control_revocations_issued"]
    assert [(n, labels, v) for n, labels, v in issued] == [
        ("llm_d_epp_flow_control_revocations_issued_total", {"priority": "3", "inference_pool": "epp"}, 1.0)
    ]
    # flow_control_revocations_total{outcome, inference_pool}: each revocation's terminal outcome.
    assert types["llm_d_epp_flow_control_revocations"] == "counter"
    assert found["llm_d_epp_flow_control_revocations"] == [
        ("llm_d_epp_flow_control_revocations_total", {"outcome": "confirmed", "inference_pool": "epp"}, 1.0)
    ]
    await srv.close()


async def test_the_global_capacity_series_are_absent_unless_a_global_limit_is_set() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1)
    ctl = controller(pool, det, registry_=registry)
    await ctl.admit(req("a"), pool())
    found = families(registry)
    assert found["llm_d_epp_flow_control_global_capacity_utilization_requests"] == []
    assert found["llm_d_epp_flow_control_global_capacity_utilization_bytes"] == []
    # The per-band ones fall back to the band's default capacity: always there.
    assert found["llm_d_epp_flow_control_capacity_utilization_requests"]
    limited = CollectorRegistry()
    kept = controller(pool, det, registry_=limited, max_requests=10, max_bytes=1000)  # sources are weak
    found = families(limited)
    assert [labels for _, labels, _ in found["llm_d_epp_flow_control_global_capacity_utilization_requests"]] == [
        {"inference_pool": "epp"}
    ]
    assert found["llm_d_epp_flow_control_global_capacity_utilization_bytes"] and kept is not None


async def test_enqueue_durations_carry_the_outcome_the_request_had_when_its_enqueue_ended() -> None:
    registry = CollectorRegistry()
    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, registry_=registry, band_max_requests=1)
    srv = Server(ctl, pool)
    srv.submit(req("a", fairness="t"))  # dispatched at once
    await until(lambda: srv.order == ["a"])
    srv.submit(req("b", fairness="t"))  # waits (the pod is full)
    await spin()
    srv.submit(req("c", fairness="t"))  # the band holds one: refused
    await spin()
    counts = {
        labels["outcome"]: value
        for name, labels, value in families(registry)["llm_d_epp_flow_control_request_enqueue_duration_seconds"]
        if name.endswith("_count")
    }
    assert counts == {"NotYetFinalized": 2.0, "RejectedCapacity": 1.0}
    await srv.close()
