"""Watch bookmarks of built-in kinds as a kube-apiserver sends them.

A bookmark's object is an empty typed object with only metadata.resourceVersion set; for a built-in kind
(Pod, ConfigMap) the zero metav1.Time is marshalled as `"creationTimestamp": null` (CRD bookmarks have no
such field, which is why the real-apiserver bookmark test, watching a CRD, never saw it). Decoding that with
the full ObjectMeta failed: every bookmark (one a minute per watch) tore the watch down as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from aiohttp import web

from llmepp.k8s.informer import Informer
from llmepp.k8s.models import Pod
from llmepp.k8s.notifications import ObjectInformer, RawObject
from llmepp.k8s.resources import PODS, Resource

from .fakeapi import fake_api
from .kubeapi import eventually
from .test_informer_unit import FAST, Recorder

# A pod watch's bookmark exactly as a kube-apiserver sends it: the object is a typed, empty v1.Pod with only
# resourceVersion set, so metav1.Time's zero value is marshalled as `"creationTimestamp": null` (bytes quoted
# from a real API server in Arnavion/k8s-openapi#70; kube-rs models Bookmark separately for this reason).
POD_BOOKMARK = (
    b'{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"3845",'
    b'"creationTimestamp":null},"spec":{"containers":null},"status":{}}}\n'
)


async def test_a_pod_bookmark_as_the_api_server_sends_it_advances_the_resource_version(tmp_path: Path) -> None:
    """The bookmark moves the informer's resourceVersion and keeps the watch open (no error, no re-watch)."""
    watches: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch"):
            watches.append(request.query.get("resourceVersion", ""))
            response = web.StreamResponse()
            await response.prepare(request)
            if len(watches) == 1:
                await response.write(POD_BOOKMARK)
            await asyncio.sleep(3600)
            return response
        item = {"metadata": {"name": "a", "namespace": "ns", "resourceVersion": "10",
                             "creationTimestamp": "2026-11-20T23:40:00Z"}}  # fmt: skip
        return web.json_response({"kind": "PodList", "metadata": {"resourceVersion": "10"}, "items": [item]})

    async with fake_api(handler, tmp_path) as client:
        informer = Informer(client, PODS, "ns", Pod, Recorder(), FAST)
        task = asyncio.create_task(informer.run())
        try:
            await eventually(lambda: informer.stats.bookmarks + informer.stats.errors > 0, within=5)
            assert informer.stats.errors == 0, "the bookmark broke the watch"
            assert informer.stats.bookmarks == 1 and informer.resource_version == "3845"
            assert watches == ["10"]  # one watch, still open
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_notification_sources_bookmark_of_a_built_in_kind_advances_the_resource_version(
    tmp_path: Path,
) -> None:
    """The same for a k8s-notification-source watching a built-in kind (ConfigMap): its ObjectInformer shares
    the bookmark decoding."""
    bookmark = (
        b'{"type":"BOOKMARK","object":{"kind":"ConfigMap","apiVersion":"v1","metadata":{"resourceVersion":"77",'
        b'"creationTimestamp":null}}}\n'
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch"):
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(bookmark)
            await asyncio.sleep(3600)
            return response
        return web.json_response({"kind": "ConfigMapList", "metadata": {"resourceVersion": "5"}, "items": []})

    class Sink:
        def upsert(self, obj: RawObject) -> None: ...

        def delete(self, obj: RawObject) -> None: ...

    async with fake_api(handler, tmp_path) as client:
        informer = ObjectInformer(client, Resource("", "v1", "configmaps", "ConfigMap"), "ns", RawObject, Sink(), FAST)
        task = asyncio.create_task(informer.run())
        try:
            await eventually(lambda: informer.stats.bookmarks + informer.stats.errors > 0, within=5)
            assert informer.stats.errors == 0, "the bookmark broke the watch"
            assert informer.resource_version == "77"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
