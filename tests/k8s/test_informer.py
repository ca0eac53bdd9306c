"""The generic informer against the real API server: paged lists, bookmarks, watch renewal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from llmepp.k8s.client import KubeClient
from llmepp.k8s.informer import Informer, InformerOptions
from llmepp.k8s.models import InferenceObjective
from llmepp.k8s.resources import INFERENCE_OBJECTIVES

from .cluster import Cluster
from .kubeapi import TestKube, eventually


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int | None]] = []

    def upsert(self, obj: InferenceObjective) -> None:
        self.seen.append(("upsert", obj.metadata.name, obj.spec.priority))

    def delete(self, obj: InferenceObjective) -> None:
        self.seen.append(("delete", obj.metadata.name, obj.spec.priority))


@contextlib.asynccontextmanager
async def informer(
    cluster: Cluster, ns: str, options: InformerOptions
) -> AsyncIterator[tuple[Informer[InferenceObjective], Recorder]]:
    client = await KubeClient.connect(str(cluster.kubeconfig))
    recorder = Recorder()
    inf = Informer(client, INFERENCE_OBJECTIVES, ns, InferenceObjective, recorder, options)
    task = asyncio.create_task(inf.run())
    try:
        yield inf, recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


async def test_initial_list_is_paged(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    for i in range(5):
        await kube.apply_objective(namespace, f"o{i}", "pool", i)
    async with informer(cluster, namespace, InformerOptions(page_size=2)) as (inf, rec):
        await asyncio.wait_for(inf.synced.wait(), 10)
        assert sorted(rec.seen) == [("upsert", f"o{i}", i) for i in range(5)]
        assert len(inf) == 5 and inf.stats.lists == 1
        await kube.apply_objective(namespace, "o1", "pool", 42)
        await eventually(lambda: ("upsert", "o1", 42) in rec.seen)
        await kube.delete_llmd(namespace, "inferenceobjectives", "o3")
        await eventually(lambda: ("delete", "o3", 3) in rec.seen)
        assert inf.get("o3") is None and inf.get("o1") is not None


async def test_bookmarks_advance_the_resource_version_and_watches_renew(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    """A 1.20 API server sends a bookmark 2 s before a watch's timeout. Writes in another namespace
    move the resource's version without events for us: only the bookmark can tell us."""
    elsewhere = f"{namespace}-other"
    await kube.create_namespace(elsewhere)
    async with informer(cluster, namespace, InformerOptions(watch_timeout=3)) as (inf, rec):
        await asyncio.wait_for(inf.synced.wait(), 10)
        listed = int(inf.resource_version)
        # The server's watch cache sends bookmarks only once it has dispatched an event of the resource
        # (cacher.go: "never send a bookmark event if we did not see an event here"). In about one run of
        # seven our first write never reached it that way and every watch stayed silent; a second write
        # always brought the bookmark. So: write elsewhere, wait, and write again if none came.
        for attempt in range(3):
            await kube.apply_objective(elsewhere, "not-ours", "pool", attempt + 1)
            other = await kube.request(
                "GET", f"/apis/llm-d.ai/v1alpha2/namespaces/{elsewhere}/inferenceobjectives/not-ours"
            )
            written = int(other["metadata"]["resourceVersion"])
            assert written > listed

            def caught_up(written: int = written) -> bool:
                return inf.stats.bookmarks >= 1 and int(inf.resource_version) >= written

            try:
                await eventually(caught_up, within=15)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        assert inf.stats.events == 0 and rec.seen == []
        # The server ended the watch at its timeout; the informer watches again, without a relist.
        await eventually(lambda: inf.stats.watches >= 2, within=15)
        await kube.apply_objective(namespace, "ours", "pool", 7)
        await eventually(lambda: ("upsert", "ours", 7) in rec.seen)
        assert inf.stats.lists == 1 and inf.stats.gone == 0
