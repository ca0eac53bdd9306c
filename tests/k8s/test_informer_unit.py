"""The generic informer against a scripted fake API server (fakeapi.py): the answers a real API
server does not give on cue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from llmepp.k8s import informer as informer_module
from llmepp.k8s.client import KubeClient
from llmepp.k8s.informer import Informer, InformerMetrics, InformerOptions
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
        # errors: the 410 right after the first list (a failed round, backed off), then the `{}`
        assert informer.resource_version == "43" and informer.stats.errors == 2


async def test_a_watch_the_server_accepts_ends_a_failure_streak_before_any_event(tmp_path: Path) -> None:
    """A 1.20 API server sends nothing on an idle watch until just before it times out (5-10 min): the
    streak (and llm_d_epp_kubernetes_informer_consecutive_errors) ends when the watch is accepted."""
    watches = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal watches
        if not request.query.get("watch"):
            return pod_list(50, "a")
        watches += 1
        if watches <= 2:
            return web.json_response({"kind": "Status", "code": 503, "message": "not now"}, status=503)
        return await quiet_watch(request)

    async with fake_api(handler, tmp_path) as client, running(client) as (informer, _, task):
        await eventually(lambda: watches >= 3 or task.done(), within=5)
        await eventually(lambda: informer.stats.consecutive_errors == 0, within=2)
        assert informer.stats.errors == 2 and informer.stats.events == 0 and not task.done()


async def test_a_watch_that_fails_after_every_open_is_logged_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each watch is accepted, then the stream breaks (a proxy's garbage): every attempt is a streak of
    one. Before, each was a warning (the backoff, reset by the line read, never passed its first step)."""
    monkeypatch.setattr(informer_module, "FAILURE_LOG_INTERVAL", 0.5)
    watches = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal watches
        if not request.query.get("watch"):
            return pod_list(60, "a")
        watches += 1
        return web.Response(body=b"<html>proxy error</html>\n")

    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.DEBUG, logger="llmepp.k8s.informer"):
        async with fake_api(handler, tmp_path) as client, running(client) as (_, _, task):
            start = loop.time()
            await asyncio.sleep(1.2)
            while watches < 8:  # a loaded machine attempts more slowly
                assert loop.time() - start < 20, watches
                await asyncio.sleep(0.05)
            elapsed = loop.time() - start
            assert not task.done()
    loud = [r for r in caplog.records if r.levelno >= logging.INFO and "synced" not in r.getMessage()]
    warnings = len([r for r in loud if r.levelno == logging.WARNING])
    # One warning per interval (the first at once), not one per attempt.
    assert 2 <= warnings <= elapsed / 0.5 + 1, ([r.getMessage() for r in loud], elapsed, watches)
    assert len(loud) <= 2 * warnings, [r.getMessage() for r in loud]


async def test_a_watch_answered_410_right_after_every_list_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An API server (or an aggregated one, or a proxy caching answers) that answers every watch from the
    fresh list's resourceVersion with 410. Before, the informer relisted at once, every time: full lists of
    the namespace's pods back to back, and an INFO line each. client-go's reflector backs off between
    ListAndWatch rounds; so must we (a 410 after a watch that lasted is still relisted at once)."""
    lists = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if request.query.get("watch"):
            gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
            return web.Response(body=json.dumps(gone).encode() + b"\n")
        lists += 1
        return pod_list(70 + lists, "a")

    with caplog.at_level(logging.DEBUG, logger="llmepp.k8s.informer"):
        async with fake_api(handler, tmp_path) as client, running(client) as (_, rec, task):
            await asyncio.sleep(1.5)
            assert not task.done()
    # FAST: backoff 0.05 s doubling to 0.2 s → about 10 rounds in 1.5 s
    assert 3 <= lists <= 20, f"{lists} lists in 1.5 s"
    assert rec.seen == [("upsert", "a")] * lists
    loud = [r for r in caplog.records if r.levelno >= logging.INFO and "410" in r.getMessage()]
    assert len(loud) <= 3, f"{len(loud)} log lines at INFO or above"


async def test_objects_that_do_not_decode_are_skipped_counted_and_never_linger(tmp_path: Path) -> None:
    """Objects of a shape the EPP's schema does not accept (a CRD installed with a looser schema, a field of
    another type): each is skipped, logged and counted (informer_skipped_total), and the informer lives on.
    A cached object whose new version does not decode is dropped, as the next relist would drop it; before,
    its old version stayed, and when its (equally undecodable) DELETED event came it stayed for good."""
    bad = {"metadata": {"name": "a", "namespace": "ns", "resourceVersion": "81", "labels": "not-a-map"}}

    async def handler(request: web.Request) -> web.StreamResponse:
        if not request.query.get("watch"):
            items = [pod("a", 80), {"metadata": {"name": "b", "resourceVersion": "80", "labels": ["x"]}}]
            return web.json_response({"kind": "PodList", "metadata": {"resourceVersion": "80"}, "items": items})
        if request.query["resourceVersion"] != "80":
            return await quiet_watch(request)
        response = web.StreamResponse()
        await response.prepare(request)
        for event in ({"type": "MODIFIED", "object": bad}, {"type": "ADDED", "object": pod("c", 82)}):
            await response.write(json.dumps(event).encode() + b"\n")
        return response

    metrics = InformerMetrics()
    registry = CollectorRegistry()
    registry.register(metrics)
    async with fake_api(handler, tmp_path) as client:
        recorder = Recorder()
        informer = Informer(client, PODS, "ns", Pod, recorder, replace(FAST, metrics=metrics))
        task = asyncio.create_task(informer.run())
        try:
            await eventually(lambda: ("upsert", "c") in recorder.seen or task.done(), within=5)
            assert not task.done(), f"informer died: {task.exception()!r}"
            assert recorder.seen == [("upsert", "a"), ("delete", "a"), ("upsert", "c")]
            assert informer.get("a") is None and len(informer) == 1
            assert informer.stats.skipped == 2 and informer.stats.errors == 0
            assert informer.resource_version == "82"
            text = generate_latest(registry).decode()
            assert 'llm_d_epp_kubernetes_informer_skipped_total{namespace="ns",owner="epp",resource="pods"} 2.0' in text
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_failed_watch_is_closed_before_the_backoff_not_after(tmp_path: Path) -> None:
    """A watch that fails mid-stream (an ERROR event, garbage) while its connection stays open: the informer
    must close that stream at once. Before, the exception being handled held the stream's generator for the
    whole backoff (up to 30 s): an open watch on the API server nobody reads, next to the new one."""
    closed = asyncio.Event()
    watches = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal watches
        if not request.query.get("watch"):
            return pod_list(90, "a")
        watches += 1
        if watches > 1:
            return await quiet_watch(request)
        response = web.StreamResponse()
        await response.prepare(request)
        error = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError"}}
        await response.write(json.dumps(error).encode() + b"\n")
        # (wait_for_disconnection() does not notice once the response is prepared)
        while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        closed.set()
        return response

    slow = InformerOptions(backoff_initial=4.0, backoff_max=4.0)  # the retry waits 2-4 s
    async with fake_api(handler, tmp_path) as client:
        informer = Informer(client, PODS, "ns", Pod, Recorder(), slow)
        task = asyncio.create_task(informer.run())
        try:
            await eventually(lambda: informer.stats.errors == 1, within=5)
            await asyncio.wait_for(closed.wait(), 1.0)
            assert watches == 1  # still in the backoff: the stream was closed, not replaced
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_an_unexpected_error_is_a_failed_attempt_not_a_dead_informer(tmp_path: Path) -> None:
    """A watch event line over the client's limit (4 MiB) raises aiohttp's LineTooLong, an exception of none
    of the kinds the loop retried: before, the informer task died and discovery with it, silently keeping the
    last endpoints for good. It must count as a failed attempt; and since the same event would come again on
    every watch from that version, the informer relists (a list has no line limit) instead."""
    lists = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if not request.query.get("watch"):
            lists += 1
            return pod_list(100 + lists, "a")
        if request.query["resourceVersion"] != "101":
            return await quiet_watch(request)
        response = web.StreamResponse()
        await response.prepare(request)
        huge = {"type": "ADDED", "object": {**pod("b", 102), "spec": {"hostname": "x" * (5 << 20)}}}
        await response.write(json.dumps(huge).encode() + b"\n")
        return response

    async with fake_api(handler, tmp_path) as client, running(client) as (informer, _, task):
        await eventually(lambda: lists >= 2 or task.done(), within=5)
        assert not task.done(), f"informer died: {task.exception()!r}"
        assert informer.stats.errors == 1 and informer.resource_version == "102"
