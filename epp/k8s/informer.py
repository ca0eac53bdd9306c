"""A generic informer: list, then watch from the list's resourceVersion, forever.

    run()
      list      paged (`limit` / `continue`); the result replaces the cache: objects gone
                since the last list are deleted, new or changed ones (resourceVersion) upserted
      watch     from the last resourceVersion with `allowWatchBookmarks`; ADDED / MODIFIED →
                upsert, DELETED → delete, BOOKMARK → only advances the resourceVersion
      410 Gone  (HTTP status or ERROR event: our resourceVersion left the watch cache) →
                relist at once; the replace step makes the cache converge (a 410 for the version
                a list has just given is a failure: backoff, so a broken server cannot loop us on lists)
      other     connection errors, 5xx, 403 (RBAC not there yet), anything unforeseen → exponential
                backoff with jitter, then resume the watch from the last resourceVersion (relist
                after an event line too long to read)

The handler sees each change once, in order, on the event loop; its exceptions are logged
and do not stop the informer. Watches end server-side after `watch_timeout`·(1..2)
seconds (client-go's spread), so a silently dead connection is noticed within that time.

A streak of failures is logged when it starts and then once per FAILURE_LOG_INTERVAL while it
lasts (ERROR for answers retrying cannot fix: 400, 401, 403, 404..., with what to check), and
its end once. `InformerStats` counts; `InformerMetrics` exports every tracked informer's counts
on /metrics (`llm_d_epp_kubernetes_informer_*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Generic, Protocol, TypeVar

import aiohttp
import msgspec
from aiohttp.http_exceptions import LineTooLong
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmepp.k8s.backoff import Backoff
from llmepp.k8s.client import KubeClient, KubeError
from llmepp.k8s.models import Metadata, ObjectMeta, RawList, Status, WatchEvent
from llmepp.k8s.resources import Resource
from llmepp.observability.streak import FailureStreak

log = logging.getLogger(__name__)

# A failure streak is logged when it starts, then at most once per this many seconds while it lasts.
FAILURE_LOG_INTERVAL = 60.0


# What talking to an API server over a network may raise (KubeError: the answers).
_EXPECTED = (KubeError, aiohttp.ClientError, TimeoutError, OSError, msgspec.DecodeError)


class _Name(msgspec.Struct, rename="camel", frozen=True):
    name: str = ""
    resource_version: str = ""


class _Named(msgspec.Struct, frozen=True):
    """What identifies an object whose metadata may not decode as a whole (labels of the wrong type...)."""

    metadata: _Name = _Name()


class KubeObject(Protocol):
    @property
    def metadata(self) -> ObjectMeta: ...


T = TypeVar("T", bound=KubeObject)
T_contra = TypeVar("T_contra", contravariant=True)


class Handler(Protocol[T_contra]):
    def upsert(self, obj: T_contra) -> None: ...

    def delete(self, obj: T_contra) -> None: ...


def rejected_by(handler: object) -> int:
    """Objects (or parts of one) a handler left out because a value cannot apply, each logged with the
    reason: a handler that validates counts them in an int attribute `rejected` (none: 0)."""
    n = getattr(handler, "rejected", 0)
    return n if isinstance(n, int) else 0


@dataclass(frozen=True, slots=True)
class InformerOptions:
    label_selector: str = ""
    field_selector: str = ""
    page_size: int = 500
    watch_timeout: float = 300.0  # seconds; each watch lasts 1-2x this (server-side timeoutSeconds)
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    # Where informers built with these options report their counts (None: nowhere but `stats`).
    metrics: InformerMetrics | None = field(default=None, compare=False)


@dataclass(slots=True)
class InformerStats:
    lists: int = 0  # complete lists: the initial one and every relist
    gone: int = 0  # 410 answers that forced a relist
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    errors: int = 0  # failed list / watch attempts
    skipped: int = 0  # objects (in lists or events) that did not decode
    consecutive_errors: int = 0  # failed attempts since the last success


class Informer(Generic[T]):
    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        namespace: str,
        kind: type[T],
        handler: Handler[T],
        options: InformerOptions | None = None,
        *,
        owner: str = "epp",
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
        # Every FAILURE_LOG_INTERVAL at most, a connection failing and recovering over and over included.
        self._streak = FailureStreak(
            log, {"informer": self.name}, remind_every=FAILURE_LOG_INTERVAL, quiet_for=FAILURE_LOG_INTERVAL
        )
        self._listed_at = 0.0  # when the last complete list came in (monotonic)
        self.owner = owner  # who watches (metrics label): "epp", or a notification source's name
        if self.options.metrics is not None:
            self.options.metrics.track(self)

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
                    if self.resource_version and time.monotonic() - self._listed_at < 1.0:
                        # 410 for the version a list has just given: relisting at once would loop on full lists.
                        await self._failed(e)
                    else:
                        log.info("watch expired (410), relisting", extra={"informer": self.name, "detail": e.message})
                    self.resource_version = ""
                    continue
                await self._failed(e)
            except _EXPECTED as e:
                await self._failed(e)
            except Exception as e:  # none foreseen: a dead informer would keep stale objects, silently
                await self._failed(e)
                if isinstance(e, LineTooLong):
                    # An event too big for a line: every watch from here would meet it again; a list reads it.
                    self.resource_version = ""

    async def _failed(self, error: Exception) -> None:
        s = self.stats
        s.errors += 1
        s.consecutive_errors += 1
        delay = self._backoff.next_delay()
        # Logged when the streak starts, then once per interval: regular enough that a look at the recent log
        # of an EPP that never gets ready says why, without one line per attempt.
        fatal = isinstance(error, KubeError) and 400 <= error.status < 500 and error.status not in (408, 410, 429)
        self._streak.failed(
            f"kubernetes {self.name} {'watch' if self.resource_version else 'list'} failed",
            f"{type(error).__name__}: {error}{self._hint(error)}",
            then=f"; retrying in {delay:.1f}s",
            level=logging.ERROR if fatal else logging.WARNING,
            exc_info=None if isinstance(error, _EXPECTED) else error,  # the unforeseen: where it came from
        )
        await asyncio.sleep(delay)

    def _hint(self, error: Exception) -> str:
        """What to check, for the answers that retrying will not change."""
        if not isinstance(error, KubeError):
            return ""
        what = f"{self.resource.plural} ({self.resource.api_version})"
        if error.status == 400:
            selectors = [f"{name} {value!r}" for name, value in (("labelSelector", self.options.label_selector),
                         ("fieldSelector", self.options.field_selector)) if value]  # fmt: skip
            return f" — the API server refuses the request itself ({', '.join(selectors) or 'no selectors'})"
        if error.status == 401:
            return " — the API server does not accept the EPP's credentials"
        if error.status == 403:
            return (
                f" — RBAC: the EPP's service account may not list and watch {what} in namespace "
                f"{self.namespace} (deploy/kubernetes/rbac.yaml grants what the EPP needs)"
            )
        if error.status == 404:
            return f" — the API server does not serve {what}: is its CRD installed?"
        return ""

    def _recovered(self) -> None:
        self._streak.succeeded(f"kubernetes {self.name}")
        self.stats.consecutive_errors = 0

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
                else:
                    self.stats.skipped += 1
            version = page.metadata.resource_version
            if not page.metadata.continue_:
                break
            params["continue"] = page.metadata.continue_
        self.stats.lists += 1
        self._listed_at = time.monotonic()
        if self.stats.consecutive_errors:
            self._recovered()
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
        lines = self.client.stream_lines(self._path, params, read_timeout=timeout + 30, opened=self._watch_opened)
        # aclosing: a failed event closes the stream now, not when the exception (held through the backoff) goes.
        async with contextlib.aclosing(lines):
            async for line in lines:
                self._on_event(self._events.decode(line))
                self._backoff.reset()  # after the event: an ERROR event or garbage is no progress

    def _watch_opened(self) -> None:
        """The API server accepted the watch: a failure streak is over (an idle watch may send nothing for
        minutes; a 1.20 server sends its first bookmark only just before the watch times out)."""
        if self.stats.consecutive_errors:
            self._recovered()

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
            self.stats.skipped += 1
            self._forget(event.object)
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

    def _forget(self, raw: msgspec.Raw) -> None:
        """An event's object did not decode: its cached version (if any) is no longer true, and a relist would
        drop it too (so would its DELETED event, equally undecodable, never reach the handler)."""
        try:
            meta = msgspec.json.decode(raw, type=_Named).metadata
        except msgspec.DecodeError:
            return  # not even a name: nothing to go by
        old = self._cache.pop(meta.name, None)
        if old is not None:
            self._notify_delete(old)
        if meta.resource_version:
            self.resource_version = meta.resource_version

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


# -- metrics -------------------------------------------------------------------------------------------
_COUNTERS = {
    "lists": ("lists_total", "Complete lists of the informer's objects: the initial one and every relist."),
    "gone": ("watch_expired_total", "410 Gone answers (the resourceVersion left the watch cache), each followed "
             "by a relist."),
    "watches": ("watches_total", "Watch requests sent (a watch ends after 5-10 minutes and is renewed)."),
    "events": ("events_total", "Changes received on the watch (ADDED, MODIFIED, DELETED)."),
    "bookmarks": ("bookmarks_total", "Bookmarks received on the watch."),
    "errors": ("errors_total", "Failed list or watch attempts (each retried with backoff)."),
    "skipped": ("skipped_total", "Objects skipped (logged) because they do not decode: a shape the EPP does not "
                "accept, e.g. a CRD installed with another schema."),
}  # fmt: skip
assert set(_COUNTERS) | {"consecutive_errors"} == {f.name for f in fields(InformerStats)}
_REJECTED = ("rejected_total", "Objects or rules that decode but are left out (logged with the reason) because a "
             "value cannot apply: an InferenceObjective priority outside int32, an InferenceModelRewrite rule "
             "without targets or whose matches name no model.")  # fmt: skip
_LABELS = ["namespace", "owner", "resource"]
_PREFIX = "llm_d_epp_kubernetes_informer_"


class InformerMetrics(Collector):
    """Every tracked informer's counts, read at scrape time (nothing on the watch path but the ints of
    `InformerStats`). Labels: namespace ("" for a cluster-wide watch), owner ("epp", or the notification
    source watching), resource (`plural[.group]`, as kubectl names it)."""

    def __init__(self) -> None:
        self._informers: weakref.WeakSet[Informer[Any]] = weakref.WeakSet()

    def track(self, informer: Informer[Any]) -> None:
        self._informers.add(informer)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        rows: dict[tuple[str, str, str], list[float]] = {}
        for inf in list(self._informers):
            r = inf.resource
            resource = f"{r.plural}.{r.group}" if r.group else r.plural
            namespace = inf.namespace if f"/namespaces/{inf.namespace}/" in inf._path else ""
            s = inf.stats
            values = [getattr(s, name) for name in _COUNTERS]
            values += [rejected_by(inf.handler), len(inf), 1.0 if inf.synced.is_set() else 0.0, s.consecutive_errors]
            key = (namespace, inf.owner, resource)
            row = rows.get(key)
            # Two informers of one owner on one resource (not done today) make one series: counts and
            # objects added up, synced only if both are, the longer failure streak.
            rows[key] = values if row is None else [*(a + b for a, b in zip(row[:-2], values[:-2], strict=True)),
                                                    min(row[-2], values[-2]), max(row[-1], values[-1])]  # fmt: skip
        families: list[CounterMetricFamily | GaugeMetricFamily] = [
            CounterMetricFamily(_PREFIX + name, text, labels=_LABELS) for name, text in (*_COUNTERS.values(), _REJECTED)
        ]
        families += [
            GaugeMetricFamily(_PREFIX + "objects", "Objects in the informer's cache.", labels=_LABELS),
            GaugeMetricFamily(_PREFIX + "synced", "1 once the informer's initial list is in.", labels=_LABELS),
            GaugeMetricFamily(
                _PREFIX + "consecutive_errors",
                "Failed list or watch attempts since the last success (0: healthy).",
                labels=_LABELS,
            ),
        ]
        for labels, values in rows.items():
            for family, value in zip(families, values, strict=True):
                family.add_metric(list(labels), value)
        yield from families
