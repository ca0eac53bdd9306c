"""PoolReconciler semantics without an API server: pods + pool spec → datastore calls."""

from __future__ import annotations

import logging
from typing import cast

import msgspec
import pytest

from llmepp.datalayer.datastore import Datastore
from llmepp.k8s.client import KubeClient
from llmepp.k8s.discovery import DiscoveryTarget, KubernetesDiscovery, _PoolEvents
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


def pool_object(*, deleting: bool = False) -> InferencePool:
    meta: dict[str, object] = {"name": "p", "namespace": NS}
    if deleting:  # DELETE of a pool a finalizer holds: it stays, with deletionTimestamp
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        meta["finalizers"] = ["example.com/hold"]
    spec = {"selector": {"matchLabels": {"app": "v"}}, "targetPorts": [{"number": 8000}]}
    return msgspec.convert({"metadata": meta, "spec": spec}, InferencePool)


def pool_discovery(ds: Datastore) -> tuple[KubernetesDiscovery, _PoolEvents]:
    """Pool-mode discovery without an API server: the pool events are fed directly."""
    discovery = KubernetesDiscovery(cast(KubeClient, None), DiscoveryTarget(namespace=NS, pool_name="p"))
    discovery.reconciler = PoolReconciler(ds, NS)
    return discovery, _PoolEvents(discovery.reconciler, "p")


def deletion_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.name == "llmepp.k8s.discovery" and r.levelno >= logging.WARNING and "delet" in r.getMessage()
    ]  # fmt: skip


def test_a_pool_marked_for_deletion_is_a_deleted_pool(caplog: pytest.LogCaptureFixture) -> None:
    """A DELETE of a pool a finalizer holds leaves it in place with metadata.deletionTimestamp (a MODIFIED
    event, then more as finalizers go). The reference's inferencepool_reconciler clears the datastore for it
    as for a deleted pool: no endpoints, EPP not ready (`has_pool` is what readiness checks). Logged once for
    the episode, not at every event; a later event without deletionTimestamp makes the pool active again."""
    ds = Datastore()
    discovery, events = pool_discovery(ds)
    assert discovery.reconciler is not None
    discovery.reconciler.pod_changed(pod("a"))
    events.upsert(pool_object())
    assert state(ds) == {"a-rank-0": "10.0.0.1:8000"} and discovery.has_pool

    with caplog.at_level(logging.INFO, logger="llmepp.k8s.discovery"):
        for _ in range(3):  # one event per finalizer removed or status written
            events.upsert(pool_object(deleting=True))
        assert state(ds) == {} and not discovery.has_pool
        assert len(deletion_warnings(caplog)) == 1, deletion_warnings(caplog)
        discovery.reconciler.pod_changed(pod("b", ip="10.0.0.2"))  # pods still tracked, not routed to
        assert state(ds) == {}

        events.upsert(pool_object())  # no deletionTimestamp any more: the latest object is the truth
        assert state(ds) == {"a-rank-0": "10.0.0.1:8000", "b-rank-0": "10.0.0.2:8000"} and discovery.has_pool

        events.upsert(pool_object(deleting=True))  # a new episode: logged again
        assert state(ds) == {} and not discovery.has_pool
        assert len(deletion_warnings(caplog)) == 2, deletion_warnings(caplog)


def test_a_pool_first_seen_marked_for_deletion_never_counts_as_found() -> None:
    """At start-up the pool is already being deleted: like a missing pool, discovery does not count it as
    seen (the datastore is not marked synced); the last finalizer goes (DELETED), then a new pool of the same
    name is created and becomes the active pool."""
    ds = Datastore()
    discovery, events = pool_discovery(ds)
    assert discovery.reconciler is not None
    discovery.reconciler.pod_changed(pod("a"))
    events.upsert(pool_object(deleting=True))
    assert not events.seen.is_set() and not discovery.has_pool and state(ds) == {}
    events.delete(pool_object(deleting=True))
    assert not discovery.has_pool
    events.upsert(pool_object())  # re-created
    assert events.seen.is_set() and discovery.has_pool and state(ds) == {"a-rank-0": "10.0.0.1:8000"}
