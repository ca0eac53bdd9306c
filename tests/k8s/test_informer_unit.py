"""The generic informer against a scripted fake API server (fakeapi.py): the answers a real API
server does not give on cue."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from llmepp.k8s.client import KubeClient
from llmepp.k8s.informer import Informer, InformerOptions
from llmepp.k8s.models import Pod
from llmepp.k8s.resources import PODS

from .fakeapi import fake_api
from .kubeapi import eventually

FAST = InformerOptions(backoff_initial=0.05, backoff_max=0.2)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def upsert(self, obj: Pod) -> None:
        self.seen.append(("upsert", obj.metadata.name))

    def delete(self, obj: Pod) -> None:
        self.seen.append(("delete", obj.metadata.name))


def pod(name: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv)}}


def pod_list(rv: int, *names: str, cont: str = "") -> web.Response:
    meta = {"resourceVersion": str(rv), **({"continue": cont} if cont else {})}
    return web.json_response({"kind": "PodList", "metadata": meta, "items": [pod(n, rv) for n in names]})


async def quiet_watch(request: web.Request) -> web.StreamResponse:
    """A watch that stays open without events (until the client goes away)."""
    response = web.StreamResponse()
    await response.prepare(request)
    await asyncio.sleep(3600)
    return response


@contextlib.asynccontextmanager
async def running(client: KubeClient) -> AsyncIterator[tuple[Informer[Pod], Recorder, asyncio.Task[None]]]:
    recorder = Recorder()
    informer = Informer(client, PODS, "ns", Pod, recorder, FAST)
    task = asyncio.create_task(informer.run())
    try:
        yield informer, recorder, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def test_an_error_answer_with_a_non_numeric_code_is_retried(tmp_path: Path) -> None:
    """A proxy (or a broken server) answers 500 with JSON whose `code` is no number. That is one more
    failed attempt; before, building the KubeError raised ValueError and the informer died for good."""
    lists = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if request.query.get("watch"):
            return await quiet_watch(request)
        lists += 1
        if lists == 1:
            return web.json_response({"kind": "Status", "code": "InternalError", "message": "boom"}, status=500)
        return pod_list(10, "a")

    async with fake_api(handler, tmp_path) as client, running(client) as (informer, rec, task):
        await eventually(lambda: informer.synced.is_set() or task.done(), within=5)
        assert not task.done(), f"informer died: {task.exception()!r}"
        assert rec.seen == [("upsert", "a")] and informer.stats.errors == 1


async def test_paged_list_follows_continue_tokens_and_relists_when_one_expires(tmp_path: Path) -> None:
    """Pages are joined; a continue token that expired (410) restarts the list from the first page,
    and nothing of the abandoned pages is delivered twice or lost."""
    calls: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch"):
            return await quiet_watch(request)
        calls.append(dict(request.query))
        token = request.query.get("continue")
        if token is None:
            return pod_list(20, "a", "b", cont="page2")
        if token == "page2" and len(calls) == 2:
            body = {"kind": "Status", "code": 410, "reason": "Expired", "message": "continue token expired"}
            return web.json_response(body, status=410)
        return pod_list(20, "c")

    async with fake_api(handler, tmp_path) as client, running(client) as (informer, rec, task):
        await eventually(lambda: informer.synced.is_set() or task.done(), within=5)
        assert not task.done(), f"informer died: {task.exception()!r}"
        assert sorted(rec.seen) == [("upsert", "a"), ("upsert", "b"), ("upsert", "c")]
        assert informer.resource_version == "20" and informer.stats.gone == 1
        assert [c.get("continue") for c in calls] == [None, "page2", None, "page2"]


async def test_garbage_in_the_watch_stream_resumes_from_the_last_resource_version(tmp_path: Path) -> None:
    watches: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if not request.query.get("watch"):
            return pod_list(30, "a")
        watches.append(request.query["resourceVersion"])
        response = web.StreamResponse()
        await response.prepare(request)
        if len(watches) == 1:
            await response.write(json.dumps({"type": "ADDED", "object": pod("b", 31)}).encode() + b"\n")
            await response.write(b"<html>proxy error</html>\n")
            return response
        await asyncio.sleep(3600)
        return response

    async with fake_api(handler, tmp_path) as client, running(client) as (informer, rec, task):
        await eventually(lambda: len(watches) >= 2 or task.done(), within=5)
        assert not task.done(), f"informer died: {task.exception()!r}"
        assert watches == ["30", "31"] and informer.stats.lists == 1
        assert rec.seen == [("upsert", "a"), ("upsert", "b")]


async def test_a_list_answer_that_is_no_list_does_not_empty_the_cache(tmp_path: Path) -> None:
    """After a 410 the relist meets a broken proxy answering 200 `{}`: no items, no resourceVersion. A real
    API server never lists like that; taking it as "every object is gone" would empty the pool."""
    lists = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if request.query.get("watch"):
            if lists > 1:
                return await quiet_watch(request)
            gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
            return web.Response(body=json.dumps(gone).encode() + b"\n")
        lists += 1
        if lists == 2:
            return web.json_response({})
        return pod_list(40 + lists, "a", "b")

    async with fake_api(handler, tmp_path) as client, running(client) as (informer, rec, task):
        await eventually(lambda: lists >= 3 or ("delete", "a") in rec.seen or task.done(), within=5)
        await asyncio.sleep(0.1)
        assert not task.done(), f"informer died: {task.exception()!r}"
        assert ("delete", "a") not in rec.seen and len(informer) == 2
        assert informer.resource_version == "43" and informer.stats.errors == 1
