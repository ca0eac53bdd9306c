"""PoolReconciler semantics without an API server: pods + pool spec → datastore calls."""

from __future__ import annotations

import msgspec

from llmepp.datalayer.datastore import Datastore
from llmepp.k8s.models import InferencePool, Pod
from llmepp.k8s.pool import PoolReconciler, PoolSpec, active_ports

NS = "ns"


def pod(name: str, *, labels: dict[str, str] | None = None, ip: str = "10.0.0.1", ready: bool = True,
        terminating: bool = False, annotations: dict[str, str] | None = None) -> Pod:  # fmt: skip
    meta: dict[str, object] = {"name": name, "namespace": NS, "labels": labels or {"app": "v"}}
    if annotations:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return msgspec.convert({"metadata": meta, "status": status}, Pod)


def state(ds: Datastore) -> dict[str, str]:
    return {ep.name: ep.hostport for ep in ds.endpoints}


def test_one_endpoint_per_target_port_with_rank_names_and_labels() -> None:
    ds = Datastore()
    r = PoolReconciler(ds, NS)
    r.set_pool(PoolSpec((8000, 8001, 8002), {"app": "v"}))
    r.pod_changed(pod("a", labels={"app": "v", "zone": "z1"}))
    assert state(ds) == {"a-rank-0": "10.0.0.1:8000", "a-rank-1": "10.0.0.1:8001", "a-rank-2": "10.0.0.1:8002"}
    ep = ds.get("a-rank-2", NS)
    assert ep is not None and dict(ep.labels) == {"app": "v", "zone": "z1"}
    # The data-parallel rank (KV events on socketPort + rank) is the target port's position.
    assert [ds.get(f"a-rank-{i}", NS).spec.rank for i in range(3)] == [0, 1, 2]  # type: ignore[union-attr]


def test_an_ipv6_pod_ip_gives_bracketed_endpoints() -> None:
    """An IPv6-only cluster: status.podIP is an IPv6 literal; the endpoints go out as `[ip]:port`."""
    ds = Datastore()
    r = PoolReconciler(ds, NS)
    r.set_pool(PoolSpec((8000, 8001), {"app": "v"}))
    r.pod_changed(pod("a", ip="fd00:10:244::5"))
    assert state(ds) == {"a-rank-0": "[fd00:10:244::5]:8000", "a-rank-1": "[fd00:10:244::5]:8001"}
    assert ds.get("a-rank-1", NS).address == "fd00:10:244::5"  # type: ignore[union-attr]


def test_not_ready_terminating_ip_less_or_unselected_pods_contribute_nothing() -> None:
    ds = Datastore()
    r = PoolReconciler(ds, NS)
    r.set_pool(PoolSpec((8000,), {"app": "v"}))
    for p in (pod("a", ready=False), pod("b", terminating=True), pod("c", ip=""), pod("d", labels={"app": "x"})):
        r.pod_changed(p)
    assert state(ds) == {}


def test_active_ports_annotation_keeps_rank_positions() -> None:
    p = pod("a", annotations={"llm-d.ai/active-ports": " 8002,junk, 7000,²,８００１"})  # non-ASCII digits: junk
    assert active_ports(p, (8000, 8001, 8002)) == {8002}
    legacy = pod("a", annotations={"inference.networking.k8s.io/active-ports": "8000"})
    assert active_ports(legacy, (8000, 8001)) == {8000}
    ds = Datastore()
    r = PoolReconciler(ds, NS)
    r.set_pool(PoolSpec((8000, 8001, 8002), {"app": "v"}))
    r.pod_changed(p)
    assert state(ds) == {"a-rank-2": "10.0.0.1:8002"}
    assert ds.get("a-rank-2", NS).spec.rank == 2  # type: ignore[union-attr]


def test_pool_before_pods_pods_before_pool_and_pool_deletion() -> None:
    ds = Datastore()
    r = PoolReconciler(ds, NS)
    r.pod_changed(pod("a"))
    assert state(ds) == {}  # no pool yet: no target ports
    r.set_pool(PoolSpec((8000,), {"app": "v"}))
    assert state(ds) == {"a-rank-0": "10.0.0.1:8000"}
    r.set_pool(PoolSpec((9000, 8000), {"app": "v"}))
    assert state(ds) == {"a-rank-0": "10.0.0.1:9000", "a-rank-1": "10.0.0.1:8000"}
    r.set_pool(None)
    assert state(ds) == {} and r.endpoint_count == 0


def test_ip_change_replaces_the_endpoint() -> None:
    ds = Datastore()
    r = PoolReconciler(ds, NS)
    r.set_pool(PoolSpec((8000,), None))  # selector None: server-side selection
    r.pod_changed(pod("a", labels={"anything": "goes"}))
    r.pod_changed(pod("a", labels={"anything": "goes"}, ip="10.0.0.9"))
    assert state(ds) == {"a-rank-0": "10.0.0.9:8000"}
    r.pod_deleted(pod("a"))
    assert state(ds) == {}


def test_pool_object_selector_and_ports_in_both_api_versions() -> None:
    v1 = msgspec.json.decode(
        b'{"metadata":{"name":"p"},"spec":{"selector":{"matchLabels":{"app":"v"}},"targetPorts":[{"number":8000},'
        b'{"number":8001}],"endpointPickerRef":{"name":"e"}}}',
        type=InferencePool,
    )
    assert v1.match_labels() == {"app": "v"} and v1.ports() == (8000, 8001)
    legacy = msgspec.json.decode(
        b'{"metadata":{"name":"p"},"spec":{"selector":{"app":"v"},"targetPortNumber":8000}}', type=InferencePool
    )
    assert legacy.match_labels() == {"app": "v"} and legacy.ports() == (8000,)


def test_a_port_listed_twice_in_target_ports_is_one_endpoint() -> None:
    """The CRD's uniqueness rule is CEL, which an older API server does not enforce: [8000, 8001, 8000]
    made two rank endpoints at one host:port (colliding wherever endpoints are keyed by address). The
    repeat is ignored; the ranks are the remaining ports' positions."""
    pool = msgspec.json.decode(
        b'{"metadata":{"name":"p"},"spec":{"selector":{"matchLabels":{"app":"v"}},"targetPorts":[{"number":8000},'
        b'{"number":8001},{"number":8000}]}}',
        type=InferencePool,
    )
    assert pool.ports() == (8000, 8001)
    ds = Datastore()
    r = PoolReconciler(ds, NS)
    r.set_pool(PoolSpec(pool.ports(), pool.match_labels()))
    r.pod_changed(pod("a"))
    assert state(ds) == {"a-rank-0": "10.0.0.1:8000", "a-rank-1": "10.0.0.1:8001"}
