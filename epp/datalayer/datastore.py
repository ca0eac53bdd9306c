"""The pool's current endpoints, as discovery reports them.

Discovery calls `upsert` / `delete` (the `DiscoveryNotifier` protocol); everything on the
request path reads `datastore.endpoints`, a list rebuilt only when membership changes, so
reading it costs nothing per request. Listeners (the metrics collector, plugins with
per-endpoint state) hear about additions and removals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from llmepp.datalayer.endpoint import Endpoint, EndpointSpec

log = logging.getLogger(__name__)


class DiscoveryNotifier(Protocol):
    """What an EndpointDiscovery plugin drives. Calls must come from the event loop thread."""

    def upsert(self, spec: EndpointSpec) -> None: ...

    def delete(self, name: str, namespace: str = "default") -> None: ...

    def mark_synced(self) -> None: ...


class DatastoreListener(Protocol):
    def endpoint_added(self, endpoint: Endpoint) -> None: ...

    def endpoint_removed(self, endpoint: Endpoint) -> None: ...


class Datastore:
    """Endpoints keyed by (namespace, name); implements DiscoveryNotifier."""

    def __init__(self, pool_name: str = "epp", pool_namespace: str = "default") -> None:
        self.pool_name = pool_name
        self.pool_namespace = pool_namespace
        self._by_key: dict[tuple[str, str], Endpoint] = {}
        self._listeners: list[DatastoreListener] = []
        self._on_change: list[Callable[[], None]] = []
        # Immutable snapshot for readers; replaced (never mutated) on membership change.
        self.endpoints: tuple[Endpoint, ...] = ()
        self.by_hostport: dict[str, Endpoint] = {}
        self.synced = False
        self.unreachable = 0  # endpoints of the pool marked unreachable: 0 is the request path's fast case

    def add_listener(self, listener: DatastoreListener) -> None:
        self._listeners.append(listener)
        for ep in self.endpoints:
            listener.endpoint_added(ep)

    def remove_listener(self, listener: DatastoreListener) -> None:
        self._listeners.remove(listener)

    # -- DiscoveryNotifier -------------------------------------------------------------
    def upsert(self, spec: EndpointSpec) -> None:
        key = (spec.namespace, spec.name)
        existing = self._by_key.get(key)
        if existing is not None:
            if existing.spec == spec:
                return
            # Labels etc. changed: keep metrics and in-flight counts. A new data-parallel rank is another
            # engine behind the same port (its KV events come from another socket): listeners must hear it.
            if existing.spec.hostport == spec.hostport and existing.spec.rank == spec.rank:
                existing.spec = spec
                self._rebuild()
                return
            # Same name, new address: a different server. Replace it.
            self._remove(key)
        ep = Endpoint(spec=spec)
        self._by_key[key] = ep
        self._rebuild()
        log.info("endpoint added", extra={"endpoint": spec.name, "address": spec.hostport})
        for listener in self._listeners:
            listener.endpoint_added(ep)

    def delete(self, name: str, namespace: str = "default") -> None:
        if (namespace, name) in self._by_key:
            self._remove((namespace, name))
            self._rebuild()

    def mark_synced(self) -> None:
        self.synced = True

    def set_unreachable(self, ep: Endpoint, unreachable: bool) -> None:
        """The metrics collector's verdict on `ep`'s server (see llmepp.datalayer.collector)."""
        if ep.unreachable == unreachable:
            return
        ep.unreachable = unreachable
        if not ep.removed:
            self.unreachable += 1 if unreachable else -1

    def reachable(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """`endpoints` less the unreachable ones, unless that leaves none: a pod whose server is down fails
        every request at once, so it looks idle and would draw the traffic; with all down, try them anyway."""
        if not self.unreachable:
            return endpoints
        return tuple(ep for ep in endpoints if not ep.unreachable) or endpoints

    # -- queries -----------------------------------------------------------------------
    def get(self, name: str, namespace: str = "default") -> Endpoint | None:
        return self._by_key.get((namespace, name))

    def names(self) -> set[tuple[str, str]]:
        return set(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    # -- internals ---------------------------------------------------------------------
    def _remove(self, key: tuple[str, str]) -> None:
        ep = self._by_key.pop(key)
        ep.removed = True
        if ep.unreachable:
            self.unreachable -= 1
        log.info("endpoint removed", extra={"endpoint": ep.name, "address": ep.hostport})
        for listener in self._listeners:
            listener.endpoint_removed(ep)

    def _rebuild(self) -> None:
        self.endpoints = tuple(self._by_key.values())
        self.by_hostport = {ep.hostport: ep for ep in self.endpoints}
        for cb in self._on_change:
            cb()

    def on_change(self, callback: Callable[[], None]) -> None:
        self._on_change.append(callback)
