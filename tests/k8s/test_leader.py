"""Leader election on the Lease epp-<ns>-<pool>.llm-d.ai: only the leader is ready, a follower takes
over when the leader dies (after the lease expires) or shuts down (at once: the lease is released)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmepp.k8s.client import KubeClient
from llmepp.k8s.leader import LeaderElector, LeaseConfig

from .cluster import Cluster
from .eppproc import NOT_SERVING, SERVING, Epp
from .harness import LEADER_ONLY_CONFIG, endpoints, kube_settings, running_app
from .kubeapi import ApiError, TestKube, eventually

POOL = "llama"
APP = {"app": "vllm-llama"}
# Short timings keep the test fast; the semantics are those of the 15 s / 10 s / 2 s defaults.
LEASE, RENEW, RETRY = 3.0, 2.0, 0.5


async def readiness_eventually(epp: Epp, status: int, within: float) -> float:
    start = time.monotonic()
    while await epp.health("readiness") != status:
        if time.monotonic() - start > within:
            raise AssertionError(f"{epp.name}: readiness not {status} within {within}s\n{epp.log[-3000:]}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def holder(kube: TestKube, ns: str) -> str:
    lease = await kube.get_lease(ns, f"epp-{ns}-{POOL}.llm-d.ai")
    return str(lease["spec"].get("holderIdentity") or "")


async def test_failover_between_epp_processes(cluster: Cluster, kube: TestKube, namespace: str, tmp_path: Path) -> None:
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.ready_pod(ns, "p", APP, "10.7.0.1")
    args = [
        "--kubeconfig", str(cluster.kubeconfig), "--pool-name", POOL, "--pool-namespace", ns,
        "--ha-enable-leader-election", "--ha-lease-duration", f"{LEASE}s", "--ha-renew-deadline", f"{RENEW}s",
        "--ha-retry-period", f"{RETRY}s", "--drain-timeout", "2s",
    ]  # fmt: skip
    a, b, c = (Epp(name, args, tmp_path) for name in ("epp-a", "epp-b", "epp-c"))
    try:
        await a.start()
        await readiness_eventually(a, SERVING, within=20)
        await b.start()
        await asyncio.sleep(2 * RETRY + 0.5)  # b has tried to acquire a few times
        assert await b.health("readiness") == NOT_SERVING
        assert await a.health("readiness") == SERVING
        assert (await holder(kube, ns)).startswith("epp-a_")

        # The leader dies without a word: b may take over only once the lease has expired.
        a.signal(signal.SIGKILL)
        took = await readiness_eventually(b, SERVING, within=LEASE + 4)
        assert 1.0 <= took <= LEASE + 2 * RETRY * 1.2, took
        assert (await holder(kube, ns)).startswith("epp-b_")

        await c.start()
        await asyncio.sleep(2 * RETRY + 0.5)
        assert await c.health("readiness") == NOT_SERVING

        # Graceful stop: b is NOT_SERVING at once and hands the lease over; c does not wait for expiry.
        b.signal(signal.SIGTERM)
        assert await readiness_eventually(b, NOT_SERVING, within=2) < 0.5
        took = await readiness_eventually(c, SERVING, within=LEASE + 4)
        assert took < LEASE / 2, f"follower waited {took:.1f}s: the lease was not released"
        assert await b.wait(within=10) == 0
    finally:
        for epp in (a, b, c):
            await epp.stop()


async def test_followers_keep_their_datastore_warm(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000, 8001])
    await kube.ready_pod(ns, "p", APP, "10.8.0.1")
    ha: dict[str, Any] = {
        "ha_enable_leader_election": True,
        "ha_lease_duration": LEASE,
        "ha_renew_deadline": RENEW,
        "ha_retry_period": RETRY,
    }
    async with running_app(kube_settings(cluster.kubeconfig, ns, **ha)) as first:
        await eventually(first.ready, within=10)
        async with running_app(kube_settings(cluster.kubeconfig, ns, **ha)) as second:
            await eventually(lambda: second.datastore.synced, within=10)
            await asyncio.sleep(2 * RETRY)
            assert first.ready() and not second.ready()
            assert endpoints(second.datastore) == {"p-rank-0": "10.8.0.1:8000", "p-rank-1": "10.8.0.1:8001"}
            await kube.ready_pod(ns, "q", APP, "10.8.0.2")  # a follower follows changes too
            await eventually(lambda: "q-rank-1" in endpoints(second.datastore))
        # `second` shut down gracefully as a follower: the leader is unaffected.
        assert first.ready()


async def test_with_ha_populate_non_leader_datastore_false_only_the_leader_populates(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    """featureGates haPopulateNonLeaderDatastore=false (reference §2: the reconcilers run on non-leaders only
    while it is true): a follower watches nothing and holds no endpoints; leading, it fills its datastore; a
    leader that gives up its lease on SIGTERM keeps its endpoints for the drain."""
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.ready_pod(ns, "p", APP, "10.8.1.1")
    ha: dict[str, Any] = {
        "config_text": LEADER_ONLY_CONFIG,
        "ha_enable_leader_election": True,
        "ha_lease_duration": LEASE,
        "ha_renew_deadline": RENEW,
        "ha_retry_period": RETRY,
    }
    async with running_app(kube_settings(cluster.kubeconfig, ns, **ha)) as first:
        await eventually(first.ready, within=10)
        assert endpoints(first.datastore) == {"p-rank-0": "10.8.1.1:8000"}
        async with running_app(kube_settings(cluster.kubeconfig, ns, **ha)) as second:
            await asyncio.sleep(3 * RETRY)
            assert first.ready() and not second.ready()
            assert endpoints(second.datastore) == {}
            # SIGTERM: the leader first gives up the lease, then drains, routing what the gateway still sends
            # it with the endpoints it has (they were all forgotten at once, as if the lease were lost: 503s).
            assert first.kube is not None
            await first.kube.release()
            await asyncio.sleep(3 * RETRY)
            assert endpoints(first.datastore) == {"p-rank-0": "10.8.1.1:8000"}
            await first.shutdown()  # the follower leads and fills up
            await eventually(second.ready, within=10)
            assert endpoints(second.datastore) == {"p-rank-0": "10.8.1.1:8000"}
            assert second.kube is not None
            second.kube._leadership(False)  # as the elector reports a lost lease: stop watching, forget
            await eventually(lambda: endpoints(second.datastore) == {}, within=5)
            assert second.kube.discovery is None and not second.ready()


@contextlib.asynccontextmanager
async def running_elector(cluster: Cluster, config: LeaseConfig) -> AsyncIterator[LeaderElector]:
    client = await KubeClient.connect(str(cluster.kubeconfig))
    elector = LeaderElector(client, config)
    task = asyncio.create_task(elector.run())
    try:
        yield elector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


async def test_a_leader_that_sees_another_holder_steps_down_at_once(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    """The lease is deleted (kubectl, a namespace cleanup script) and another candidate recreates it first.
    Our next renewal reads a lease someone else holds and renewed just now: we cannot be leader any more.
    Before, the elector kept `is_leader` until its renew deadline ran out (10 s by default): two ready
    leaders for that long."""
    ns = namespace
    lease, renew, retry = 15.0, 10.0, 0.3  # the default ratio; a long deadline makes the overlap visible
    name = f"epp-{ns}-{POOL}.llm-d.ai"
    path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
    config = LeaseConfig(name, ns, "epp-a", lease_duration=lease, renew_deadline=renew, retry_period=retry)
    async with running_elector(cluster, config) as a:
        await eventually(lambda: a.is_leader, within=10)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        intruder = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
            "spec": {"holderIdentity": "epp-b", "leaseDurationSeconds": 15, "acquireTime": now, "renewTime": now},
        }  # fmt: skip
        for _ in range(20):  # `a` may recreate it between our delete and our create: again
            with contextlib.suppress(ApiError):
                await kube.request("DELETE", f"{path}/{name}")
            try:
                await kube.request("POST", path, intruder)
                break
            except ApiError as e:
                if e.status != 409:
                    raise
        took = await eventually(lambda: not a.is_leader, within=renew + 3)
        assert took < 5 * retry, f"still leader {took:.1f}s after another candidate took the lease"
        assert (await holder(kube, ns)) == "epp-b"
