"""Watching the objects of any kind (GVK) and delivering their changes to notification extractors.

    resolve_kind    API discovery (`GET /api/<v>` or `/apis/<group>/<v>`): kind → plural resource and
                    scope; KindNotFound when the group/version is not served or lists no such kind
    ObjectInformer  the generic informer (list + watch with resourceVersion, bookmarks, relist on 410,
                    reconnect with jittered backoff) decoding any object: its metadata + the JSON
    NotificationWatch  resolve, then run the informer; its handler turns upserts into ADD / UPDATE by
                    what it has seen, queues every event, and one dispatcher task hands them to the
                    extractors in order, off the request path (an extractor's exception is logged and
                    counted, never stops the watch)

Namespaced kinds are watched in the EPP's namespace; cluster-scoped kinds (Node, ...) cluster-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from llmepp.framework.datalayer import (
    GroupVersionKind,
    NotificationEvent,
    NotificationEventType,
    NotificationExtractor,
)
from llmepp.k8s.backoff import Backoff
from llmepp.k8s.client import KubeClient, KubeError
from llmepp.k8s.informer import Informer, InformerOptions
from llmepp.k8s.models import ObjectMeta
from llmepp.k8s.resources import Resource
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# How long start-up waits for API discovery before going on in the background (API server down).
STARTUP_RESOLVE_TIMEOUT = 5.0


class KindNotFound(Exception):
    """The API server answered: it serves no such kind (a wrong GVK, or a CRD not installed)."""


class _ApiResource(msgspec.Struct, kw_only=True):
    name: str = ""
    kind: str = ""
    namespaced: bool = False
    verbs: list[str] = []


class _ApiResourceList(msgspec.Struct, kw_only=True):
    resources: list[_ApiResource] = []


@dataclass(frozen=True, slots=True)
class ClusterResource(Resource):
    """A cluster-scoped kind: one collection for the whole cluster, whatever the namespace."""

    def collection(self, namespace: str) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{base}/{self.plural}"


async def resolve_kind(client: KubeClient, gvk: GroupVersionKind) -> Resource:
    """The resource serving `gvk`. KindNotFound (naming the GVK) when the API server serves no such
    kind or it cannot be listed and watched; KubeError / connection errors when it could not be asked."""
    path = f"/api/{gvk.version}" if not gvk.group else f"/apis/{gvk.group}/{gvk.version}"
    try:
        body = await client.get(path)
    except KubeError as e:
        if e.not_found:
            raise KindNotFound(
                f"kind {gvk.kind!r} ({gvk}) does not exist: the API server does not serve {gvk.api_version}"
            ) from None
        raise
    listing = msgspec.json.decode(body, type=_ApiResourceList)
    top = [r for r in listing.resources if "/" not in r.name]  # not subresources (pods/status)
    for r in top:
        if r.kind == gvk.kind:
            missing = [v for v in ("list", "watch") if v not in r.verbs]
            if missing:
                raise KindNotFound(f"kind {gvk.kind!r} ({gvk}) cannot be watched: no {' / '.join(missing)} verb")
            cls = Resource if r.namespaced else ClusterResource
            return cls(gvk.group, gvk.version, r.name, gvk.kind)
    near = [r.kind for r in top if r.kind.lower() == gvk.kind.lower()]
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise KindNotFound(f"kind {gvk.kind!r} ({gvk}) does not exist: {gvk.api_version} has no such kind{hint}")


@dataclass(frozen=True, slots=True)
class RawObject:
    """Any Kubernetes object: its metadata decoded, and the whole object as JSON."""

    metadata: ObjectMeta
    body: dict[str, Any]


class ObjectInformer(Informer[RawObject]):
    """The generic informer for objects of a kind we have no Struct for."""

    def _decode(self, raw: msgspec.Raw) -> RawObject | None:
        try:
            body = msgspec.json.decode(raw)
            if not isinstance(body, dict):
                raise msgspec.ValidationError("not a JSON object")
            meta = msgspec.convert(body.get("metadata") or {}, ObjectMeta)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.warning("kubernetes %s: skipping an object that does not decode: %s", self.name, e)
            return None
        return RawObject(meta, body)


@dataclass(slots=True)
class NotificationStats:
    events: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in NotificationEventType})
    errors: dict[str, int] = field(default_factory=dict)  # extractor name → exceptions raised


_INITIAL_DONE = object()  # queued after the initial list: everything before it has been delivered


class NotificationWatch:
    """Watches one kind for one source and feeds its extractors (see the module docstring)."""

    def __init__(
        self,
        source: str,
        gvk: GroupVersionKind,
        extractors: Sequence[NotificationExtractor],
        client: KubeClient,
        namespace: str,
        options: InformerOptions | None = None,
        stats: NotificationStats | None = None,
    ) -> None:
        self.source = source
        self.gvk = gvk
        self.extractors = list(extractors)
        self.client = client
        self.namespace = namespace
        self.options = options or InformerOptions()
        self.stats = stats or NotificationStats()
        self.resource: Resource | None = None
        self.informer: ObjectInformer | None = None
        self.error = ""  # why not ready, for logs
        self.delivered_initial = asyncio.Event()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._seen: dict[str, RawObject] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return self.delivered_initial.is_set()

    async def start(self) -> None:
        """Resolve the kind (KindNotFound when the API server says it does not exist), then watch in the
        background. An API server that cannot be asked now is retried in the background."""
        try:
            async with asyncio.timeout(STARTUP_RESOLVE_TIMEOUT):
                self.resource = await resolve_kind(self.client, self.gvk)
        except KindNotFound:
            raise
        except (KubeError, aiohttp.ClientError, TimeoutError, OSError, msgspec.DecodeError) as e:
            self.error = f"API discovery of {self.gvk} failed: {type(e).__name__}: {e}"
            log.warning("%s: %s; retrying in the background", self.source, self.error)
        self._tasks = [
            asyncio.create_task(self._run(), name=f"notifications-{self.source}"),
            asyncio.create_task(self._dispatch(), name=f"notifications-dispatch-{self.source}"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_crash)

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        with contextlib.suppress(Exception):  # a crash was logged when it happened (_report_crash)
            await cancel_and_wait(*tasks)

    # -- watching ----------------------------------------------------------------------------
    async def _run(self) -> None:
        if self.resource is None:
            self.resource = await self._resolve_with_retry()
        self.error = ""
        informer = self.informer = ObjectInformer(
            self.client, self.resource, self.namespace, RawObject, self, self.options, owner=self.source
        )
        task = asyncio.create_task(informer.run(), name=f"informer-{self.source}")
        try:
            await informer.synced.wait()
            self._queue.put_nowait(_INITIAL_DONE)
            await task
        finally:
            await cancel_and_wait(task)

    async def _resolve_with_retry(self) -> Resource:
        backoff = Backoff(self.options.backoff_initial, self.options.backoff_max)
        while True:
            try:
                return await resolve_kind(self.client, self.gvk)
            except KindNotFound as e:
                # A CRD may be installed later: keep asking, unready, loudly.
                self.error = str(e)
                level = logging.ERROR if backoff.failures % 10 == 0 else logging.DEBUG
            except (KubeError, aiohttp.ClientError, TimeoutError, OSError, msgspec.DecodeError) as e:
                self.error = f"API discovery of {self.gvk} failed: {type(e).__name__}: {e}"
                level = logging.WARNING if backoff.failures in (0, 9) else logging.DEBUG
            delay = backoff.next_delay()
            log.log(level, "%s: %s; retrying in %.1fs", self.source, self.error, delay)
            await asyncio.sleep(delay)

    # -- informer handler: called in order on the event loop ---------------------------------
    def upsert(self, obj: RawObject) -> None:
        key = obj.metadata.namespace + "/" + obj.metadata.name
        old = self._seen.get(key)
        self._seen[key] = obj
        if old is None:
            self._queue.put_nowait(NotificationEvent(NotificationEventType.ADD, self.gvk, obj.body))
        else:
            self._queue.put_nowait(NotificationEvent(NotificationEventType.UPDATE, self.gvk, obj.body, old.body))

    def delete(self, obj: RawObject) -> None:
        key = obj.metadata.namespace + "/" + obj.metadata.name
        self._seen.pop(key, None)
        self._queue.put_nowait(NotificationEvent(NotificationEventType.DELETE, self.gvk, obj.body))

    # -- delivery ------------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            event = await self._queue.get()
            if event is _INITIAL_DONE:
                if not self.delivered_initial.is_set():
                    log.info(
                        "%s: watching %s", self.source, self.gvk,
                        extra={"objects": len(self._seen), "namespace": self.namespace},
                    )  # fmt: skip
                    self.delivered_initial.set()
                continue
            self.stats.events[event.type.value] += 1
            for extractor in self.extractors:
                await self._deliver(extractor, event)

    async def _deliver(self, extractor: NotificationExtractor, event: NotificationEvent) -> None:
        # Each extractor its own copy: one that edits the object cannot change what the next one sees.
        mine = NotificationEvent(
            event.type, event.gvk, copy.deepcopy(event.object), None if event.old is None else copy.deepcopy(event.old)
        )
        try:
            result = extractor.extract_notification(mine)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.errors[extractor.name] = self.stats.errors.get(extractor.name, 0) + 1
            log.exception(
                "%s: extractor %s failed on %s of %s", self.source, extractor.name, event.type.value, event.name
            )


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("notification task %s stopped", task.get_name(), exc_info=task.exception())
