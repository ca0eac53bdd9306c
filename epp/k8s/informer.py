"""A generic informer: list, then watch from the list's resourceVersion, forever.

    run()
      list      paged (`limit` / `continue`); the result replaces the cache: objects gone
                since the last list are deleted, new or changed ones (resourceVersion) upserted
      watch     from the last resourceVersion with `allowWatchBookmarks`; ADDED / MODIFIED →
                upsert, DELETED → delete, BOOKMARK → only advances the resourceVersion
      410 Gone  (HTTP status or ERROR event: our resourceVersion left the watch cache) →
                relist at once; the replace step makes the cache converge
      other     connection errors, 5xx, 403 (RBAC not there yet) → exponential backoff with
                jitter, then resume the watch from the last resourceVersion

The handler sees each change once, in order, on the event loop; its exceptions are logged
and do not stop the informer. Watches end server-side after `watch_timeout`·(1..2)
seconds (client-go's spread), so a silently dead connection is noticed within that time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import aiohttp
import msgspec

from llmepp.k8s.backoff import Backoff
from llmepp.k8s.client import KubeClient, KubeError
from llmepp.k8s.models import Metadata, ObjectMeta, RawList, Status, WatchEvent
from llmepp.k8s.resources import Resource

log = logging.getLogger(__name__)


class KubeObject(Protocol):
    @property
    def metadata(self) -> ObjectMeta: ...


T = TypeVar("T", bound=KubeObject)
T_contra = TypeVar("T_contra", contravariant=True)


class Handler(Protocol[T_contra]):
    def upsert(self, obj: T_contra) -> None: ...

    def delete(self, obj: T_contra) -> None: ...


@dataclass(frozen=True, slots=True)
class InformerOptions:
    label_selector: str = ""
    field_selector: str = ""
    page_size: int = 500
    watch_timeout: float = 300.0  # seconds; each watch lasts 1-2x this (server-side timeoutSeconds)
    backoff_initial: float = 0.2
    backoff_max: float = 30.0


@dataclass(slots=True)
class InformerStats:
    lists: int = 0
    gone: int = 0  # 410 answers that forced a relist
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    errors: int = 0


class Informer(Generic[T]):
    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        namespace: str,
        kind: type[T],
        handler: Handler[T],
        options: InformerOptions | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.kind = kind
        self.handler = handler
        self.options = options or InformerOptions()
        self.name = f"{resource.plural}/{namespace}"
        self._path = resource.collection(namespace)
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(kind)
        self._events = msgspec.json.Decoder(WatchEvent)
        self._cache: dict[str, T] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.stats = InformerStats()
        self._backoff = Backoff(self.options.backoff_initial, self.options.backoff_max)
        self._rng = random.Random()

    # -- the cache (read-only for callers) ---------------------------------------------
    def get(self, name: str) -> T | None:
        return self._cache.get(name)

    def __len__(self) -> int:
        return len(self._cache)

    # -- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                if not self.resource_version:
                    await self._list()
                started = time.monotonic()
                await self._watch()
                # A watch the server ended early and empty-handed is a failure in disguise
                # (e.g. a proxy that cuts streams): do not spin on it.
                if time.monotonic() - started < 1.0:
                    await asyncio.sleep(self._backoff.next_delay())
                else:
                    self._backoff.reset()
            except KubeError as e:
                if e.gone:
                    self.stats.gone += 1
                    log.info("watch expired (410), relisting", extra={"informer": self.name, "detail": e.message})
                    self.resource_version = ""
                    continue
                await self._failed(e)
            except (aiohttp.ClientError, TimeoutError, OSError, msgspec.DecodeError) as e:
                await self._failed(e)

    async def _failed(self, error: Exception) -> None:
        self.stats.errors += 1
        delay = self._backoff.next_delay()
        # The first failure of a streak is worth a warning; repeats only at debug level.
        level = (
            logging.WARNING if self._backoff.failures in (1, 10) or self._backoff.failures % 50 == 0 else logging.DEBUG
        )
        log.log(
            level,
            "kubernetes %s failed (%s: %s); retrying in %.1fs",
            self.name,
            type(error).__name__,
            error,
            delay,
            extra={"informer": self.name, "failures": self._backoff.failures},
        )
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        params: dict[str, str | int] = {"limit": self.options.page_size}
        if self.options.label_selector:
            params["labelSelector"] = self.options.label_selector
        if self.options.field_selector:
            params["fieldSelector"] = self.options.field_selector
        fresh: dict[str, T] = {}
        version = ""
        while True:
            page = msgspec.json.decode(await self.client.get(self._path, params), type=RawList)
            if not page.metadata.resource_version:
                # Every list has one; without it this is not a list (a proxy's `{}`), not "everything is gone".
                raise msgspec.ValidationError("list answer without metadata.resourceVersion")
            for raw in page.items:
                obj = self._decode(raw)
                if obj is not None:
                    fresh[obj.metadata.name] = obj
            version = page.metadata.resource_version
            if not page.metadata.continue_:
                break
            params["continue"] = page.metadata.continue_
        self.stats.lists += 1
        self._replace(fresh)
        self.resource_version = version
        if not self.synced.is_set():
            log.info("kubernetes %s synced", self.name, extra={"informer": self.name, "objects": len(fresh)})
            self.synced.set()

    def _replace(self, fresh: dict[str, T]) -> None:
        old = self._cache
        self._cache = fresh
        for name, obj in old.items():
            if name not in fresh:
                self._notify_delete(obj)
        for name, obj in fresh.items():
            prev = old.get(name)
            if prev is None or prev.metadata.resource_version != obj.metadata.resource_version:
                self._notify_upsert(obj)

    async def _watch(self) -> None:
        o = self.options
        timeout = int(o.watch_timeout * (1 + self._rng.random()))
        params: dict[str, str | int] = {
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout,
        }
        if o.label_selector:
            params["labelSelector"] = o.label_selector
        if o.field_selector:
            params["fieldSelector"] = o.field_selector
        self.stats.watches += 1
        # Silence longer than the server-side timeout (+ margin) means the connection is dead.
        async for line in self.client.stream_lines(self._path, params, read_timeout=timeout + 30):
            self._backoff.reset()
            self._on_event(self._events.decode(line))

    def _on_event(self, event: WatchEvent) -> None:
        kind = event.type
        if kind == "BOOKMARK":
            # Progress without a change: resuming from here avoids replaying (or a 410 for) old history.
            self.stats.bookmarks += 1
            self.resource_version = msgspec.json.decode(event.object, type=Metadata).metadata.resource_version
            return
        if kind == "ERROR":
            status = msgspec.json.decode(event.object, type=Status)
            raise KubeError(status.code, status.reason, status.message)
        obj = self._decode(event.object)
        if obj is None:
            return
        self.stats.events += 1
        name = obj.metadata.name
        if kind == "DELETED":
            self._cache.pop(name, None)
            self._notify_delete(obj)
        else:  # ADDED / MODIFIED
            self._cache[name] = obj
            self._notify_upsert(obj)
        self.resource_version = obj.metadata.resource_version

    def _decode(self, raw: msgspec.Raw) -> T | None:
        try:
            return self._decoder.decode(raw)
        except msgspec.ValidationError as e:
            # The schema we expect disagrees with the server's object: skip it, keep the rest.
            log.warning("kubernetes %s: skipping an object that does not decode: %s", self.name, e)
            return None

    def _notify_upsert(self, obj: T) -> None:
        try:
            self.handler.upsert(obj)
        except Exception:
            log.exception("kubernetes %s: handler failed on %s", self.name, obj.metadata.name)

    def _notify_delete(self, obj: T) -> None:
        try:
            self.handler.delete(obj)
        except Exception:
            log.exception("kubernetes %s: handler failed on delete of %s", self.name, obj.metadata.name)
