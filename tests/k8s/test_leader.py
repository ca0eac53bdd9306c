"""Leader election on the Lease epp-<ns>-<pool>.llm-d.ai: only the leader is ready, a follower takes
over when the leader dies (after the lease expires) or shuts down (at once: the lease is released)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from .cluster import Cluster
from .eppproc import NOT_SERVING, SERVING, Epp
from .harness import endpoints, kube_settings, running_app
from .kubeapi import TestKube, eventually

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
    ha = {
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
