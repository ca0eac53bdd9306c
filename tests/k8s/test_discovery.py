"""Endpoint discovery against a real kube-apiserver: InferencePool + pods → datastore."""

from __future__ import annotations

import asyncio

from llmepp.k8s.discovery import DiscoveryTarget

from .cluster import Cluster
from .harness import endpoints, kube_settings, running_app, running_discovery
from .kubeapi import POOL_API, ApiError, TestKube, eventually
from .proxy import CuttableProxy

POOL = "llama"
APP = {"app": "vllm-llama"}


def pool_target(ns: str) -> DiscoveryTarget:
    return DiscoveryTarget(namespace=ns, pool_name=POOL)


async def test_ready_pods_become_one_endpoint_per_target_port(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000, 8001])
    await kube.ready_pod(ns, "ready", {**APP, "tier": "gold"}, "10.1.0.1")
    await kube.ready_pod(ns, "rank1-only", APP, "10.1.0.2", annotations={"llm-d.ai/active-ports": "8001, 9999"})
    await kube.ready_pod(ns, "legacy-note", APP, "10.1.0.3", {"inference.networking.k8s.io/active-ports": "8000"})
    await kube.ready_pod(ns, "other-app", {"app": "other"}, "10.1.0.9")
    await kube.create_pod(ns, "pending", APP)  # no status: not Ready, no IP
    await kube.create_pod(ns, "not-ready", APP)
    await kube.set_pod_status(ns, "not-ready", ready=False, ip="10.1.0.4")
    await kube.create_pod(ns, "no-ip", APP)
    await kube.set_pod_status(ns, "no-ip", ready=True, ip=None)

    async with running_discovery(cluster.kubeconfig, pool_target(ns)) as (ds, _):
        await eventually(lambda: ds.synced, within=10)
        assert endpoints(ds) == {
            "ready-rank-0": "10.1.0.1:8000",
            "ready-rank-1": "10.1.0.1:8001",
            "rank1-only-rank-1": "10.1.0.2:8001",
            "legacy-note-rank-0": "10.1.0.3:8000",
        }
        ep = ds.get("ready-rank-1", ns)
        assert ep is not None
        assert dict(ep.labels) == {"app": "vllm-llama", "tier": "gold"}
        assert ep.namespace == ns


async def test_ready_transitions_reach_the_datastore_within_a_second(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    async with running_discovery(cluster.kubeconfig, pool_target(ns)) as (ds, _):
        await eventually(lambda: ds.synced, within=10)
        assert endpoints(ds) == {}

        await kube.create_pod(ns, "p", APP)
        await kube.set_pod_status(ns, "p", ready=True, ip="10.2.0.1")
        assert await eventually(lambda: "p-rank-0" in endpoints(ds)) < 1.0

        await kube.set_pod_status(ns, "p", ready=False, ip="10.2.0.1")
        assert await eventually(lambda: "p-rank-0" not in endpoints(ds)) < 1.0

        await kube.set_pod_status(ns, "p", ready=True, ip="10.2.0.7")  # back, with a new IP
        assert await eventually(lambda: endpoints(ds).get("p-rank-0") == "10.2.0.7:8000") < 1.0

        await kube.label_pod(ns, "p", {"app": "something-else"})  # no longer selected
        assert await eventually(lambda: endpoints(ds) == {}) < 1.0
        await kube.label_pod(ns, "p", {"app": APP["app"]})
        assert await eventually(lambda: "p-rank-0" in endpoints(ds)) < 1.0

        await kube.delete_pod(ns, "p")
        assert await eventually(lambda: endpoints(ds) == {}) < 1.0


async def test_terminating_pod_leaves_before_it_is_gone(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    """A pod on a node is deleted gracefully: it stays, with deletionTimestamp, until its kubelet
    confirms (none here). It must stop receiving traffic at once."""
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.create_pod(ns, "p", APP, node_name="node-1")
    await kube.set_pod_status(ns, "p", ready=True, ip="10.3.0.1")
    async with running_discovery(cluster.kubeconfig, pool_target(ns)) as (ds, _):
        await eventually(lambda: "p-rank-0" in endpoints(ds), within=10)
        await kube.delete_pod(ns, "p", grace_seconds=30)
        assert await eventually(lambda: endpoints(ds) == {}) < 1.0
        pod = await kube.request("GET", f"/api/v1/namespaces/{ns}/pods/p")
        assert pod["metadata"]["deletionTimestamp"]  # still there: removed for being terminating
        await kube.delete_pod(ns, "p", grace_seconds=0)


async def test_pool_changes_reevaluate_every_pod(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    ns = namespace
    await kube.ready_pod(ns, "a", {"app": "a"}, "10.4.0.1")
    await kube.ready_pod(ns, "b", {"app": "b"}, "10.4.0.2")
    async with running_discovery(cluster.kubeconfig, pool_target(ns)) as (ds, disc):
        await asyncio.sleep(0.5)
        assert not ds.synced, "synced before the InferencePool exists"
        await kube.create_pool(ns, POOL, {"app": "a"}, [8000])
        await eventually(lambda: ds.synced, within=10)
        assert endpoints(ds) == {"a-rank-0": "10.4.0.1:8000"}

        await kube.patch_pool(ns, POOL, {"selector": {"matchLabels": {"app": "b"}}})
        await eventually(lambda: endpoints(ds) == {"b-rank-0": "10.4.0.2:8000"})

        await kube.patch_pool(ns, POOL, {"targetPorts": [{"number": 8000}, {"number": 9000}]})
        await eventually(lambda: endpoints(ds) == {"b-rank-0": "10.4.0.2:8000", "b-rank-1": "10.4.0.2:9000"})

        await kube.patch_pool(ns, POOL, {"targetPorts": [{"number": 9000}]})
        await eventually(lambda: endpoints(ds) == {"b-rank-0": "10.4.0.2:9000"})

        await kube.delete_pool(ns, POOL)
        await eventually(lambda: endpoints(ds) == {} and not disc.has_pool)


async def test_a_pool_held_by_a_finalizer_is_deleted_for_the_epp(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    """DELETE of a pool a finalizer holds (a gateway controller's, say) only sets deletionTimestamp: the pool
    stays until the finalizer goes. As in the reference (inferencepool_reconciler), the EPP treats it as
    deleted at once: no endpoints, readiness NOT_SERVING."""
    ns = namespace
    pool_path = f"{POOL_API}/namespaces/{ns}/inferencepools/{POOL}"
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.merge_patch(pool_path, {"metadata": {"finalizers": ["example.com/hold"]}})
    await kube.ready_pod(ns, "p", APP, "10.7.0.1")
    async with running_app(kube_settings(cluster.kubeconfig, ns, pool=POOL)) as app:
        await eventually(lambda: app.ready() and endpoints(app.datastore) == {"p-rank-0": "10.7.0.1:8000"}, within=10)

        await kube.delete_pool(ns, POOL)
        assert (await kube.request("GET", pool_path))["metadata"]["deletionTimestamp"]  # still there
        await eventually(lambda: endpoints(app.datastore) == {} and not app.ready())
        await kube.ready_pod(ns, "q", APP, "10.7.0.2")  # a pod arriving meanwhile is not routed to either
        await asyncio.sleep(0.3)
        assert endpoints(app.datastore) == {} and not app.ready()

        await kube.merge_patch(pool_path, {"metadata": {"finalizers": None}})  # the finalizer goes: deleted
        try:
            await kube.request("GET", pool_path)
            raise AssertionError("the pool outlived its last finalizer")
        except ApiError as e:
            assert e.status == 404
        await asyncio.sleep(0.3)
        assert endpoints(app.datastore) == {} and not app.ready()

        await kube.create_pool(ns, POOL, APP, [8000])  # re-created: active again
        await eventually(lambda: app.ready() and set(endpoints(app.datastore)) == {"p-rank-0", "q-rank-0"})


async def test_standalone_selector_mode(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    ns = namespace
    labels = {"app": "vllm", "role": "decode"}
    await kube.ready_pod(ns, "d1", labels, "10.5.0.1")
    await kube.ready_pod(ns, "p1", {"app": "vllm", "role": "prefill"}, "10.5.0.2")
    target = DiscoveryTarget(namespace=ns, selector="app=vllm,role=decode", target_ports=(8000, 8001))
    async with running_discovery(cluster.kubeconfig, target) as (ds, _):
        await eventually(lambda: ds.synced, within=10)
        assert endpoints(ds) == {"d1-rank-0": "10.5.0.1:8000", "d1-rank-1": "10.5.0.1:8001"}

        await kube.ready_pod(ns, "d2", labels, "10.5.0.3")
        await eventually(lambda: "d2-rank-1" in endpoints(ds))
        # Relabelled out of the selector: the server-side filtered watch reports it as DELETED.
        await kube.label_pod(ns, "d1", {"role": "prefill"})
        await eventually(lambda: set(endpoints(ds)) == {"d2-rank-0", "d2-rank-1"})


async def eventually_compacted(kube: TestKube, ns: str, resource_version: str, within: float = 30.0) -> None:
    """Wait until a pod watch from `resource_version` is answered 410 Gone (etcd compacted past it)."""
    deadline = asyncio.get_running_loop().time() + within
    path = f"/api/v1/namespaces/{ns}/pods?watch=1&timeoutSeconds=1&resourceVersion={resource_version}"
    while True:
        try:
            reply = await kube.request("GET", path)  # one line: the ERROR event, or nothing
            if reply.get("type") == "ERROR" and reply["object"].get("code") == 410:
                return
        except ApiError as e:
            if e.status == 410:
                return
        except ValueError:
            pass  # several events in the answer: not compacted yet
        assert asyncio.get_running_loop().time() < deadline, "etcd did not compact the old revision"
        await asyncio.sleep(0.5)


async def test_watch_relists_after_410_and_converges(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    """The link to the API server breaks; meanwhile pods change and etcd compacts (every 2 s on
    the test server), so resuming the watch from the last resourceVersion gets 410 Gone. The
    informer must relist, and the datastore must end up equal to the cluster."""
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.ready_pod(ns, "stays", APP, "10.6.0.1")
    await kube.ready_pod(ns, "goes", APP, "10.6.0.2")
    await kube.ready_pod(ns, "turns-unready", APP, "10.6.0.3")
    proxy = CuttableProxy(cluster.api_port)
    await proxy.start()
    kubeconfig = cluster.write_kubeconfig(
        cluster.workdir / f"proxy-{ns}.kubeconfig", "admin-token", server=f"https://127.0.0.1:{proxy.port}"
    )
    try:
        async with running_discovery(kubeconfig, pool_target(ns)) as (ds, disc):
            await eventually(lambda: len(endpoints(ds)) == 3, within=10)
            assert disc.pods is not None
            gone_before = disc.pods.stats.gone

            proxy.cut()
            last_seen = disc.pods.resource_version
            await kube.delete_pod(ns, "goes")
            await kube.set_pod_status(ns, "turns-unready", ready=False, ip="10.6.0.3")
            await kube.ready_pod(ns, "new", APP, "10.6.0.4")
            for i in range(20):  # more history for the compactor to drop
                await kube.label_pod(ns, "stays", {"churn": str(i)})
            await eventually_compacted(kube, ns, last_seen)
            assert set(endpoints(ds)) == {"stays-rank-0", "goes-rank-0", "turns-unready-rank-0"}  # stale, cut off

            proxy.restore()
            await eventually(lambda: set(endpoints(ds)) == {"stays-rank-0", "new-rank-0"}, within=10)
            assert disc.pods.stats.gone > gone_before, "converged without a 410 relist: the test proves nothing"
            ep = ds.get("stays-rank-0", ns)
            assert ep is not None and ep.labels.get("churn") == "19"
    finally:
        await proxy.aclose()


async def test_a_pod_larger_than_128k_on_the_watch_does_not_kill_discovery(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    """Pod annotations may total 256 KiB. A watch event line longer than aiohttp's default readline limit
    (128 KiB) would raise LineTooLong, which no retry gets past (the same event comes again): the client's
    session must read big lines (kubernetes_asyncio's sets read_bufsize=2 MiB, so lines up to 4 MiB)."""
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.ready_pod(ns, "small", APP, "10.8.0.1")
    async with running_discovery(cluster.kubeconfig, pool_target(ns)) as (ds, disc):
        await eventually(lambda: ds.synced and len(endpoints(ds)) == 1, within=10)
        await kube.ready_pod(ns, "big", APP, "10.8.0.2", annotations={"blob": "x" * 200_000})
        await kube.ready_pod(ns, "after", APP, "10.8.0.3")
        await eventually(lambda: set(endpoints(ds)) == {"small-rank-0", "big-rank-0", "after-rank-0"}, within=10)
        assert disc.pods is not None and disc.pods.stats.lists == 1


async def test_the_app_protocol_survives_the_shipped_crd(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    """The EPP's readiness protocol check reads spec.appProtocol: the shipped CRD had no such field, so the
    API server pruned it and an h2c pool read as one without a protocol."""
    pool = {
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "h2c"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}],
                 "appProtocol": "kubernetes.io/h2c", "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}},
    }  # fmt: skip
    await kube.request("POST", f"{POOL_API}/namespaces/{namespace}/inferencepools", pool)
    async with running_discovery(cluster.kubeconfig, DiscoveryTarget(namespace=namespace, pool_name="h2c")) as (
        ds,
        disc,
    ):
        await eventually(lambda: ds.synced, within=10)
        assert disc.app_protocol == "kubernetes.io/h2c"
