"""`file-discovery`: the pool's endpoints come from a YAML/JSON file (no Kubernetes).

Start-up: the file is read and validated; any problem raises ConfigError (the app stops
with that message). `notifier.mark_synced()` follows the first successful load.

`watchFile: true`: the path is stat()ed every `poll_interval` (250 ms). A change of
(device, inode, size, mtime) - an in-place write, an atomic rename, or a Kubernetes
ConfigMap symlink swap - triggers a reload once it has held still for one poll
(`llmepp.filewatch`: polling, no inotify, and why). A reload
deletes removed entries, then upserts new and changed ones. A bad or missing file on
reload is logged (once per distinct file state), counted in
`datalayer_poll_errors_total{source_type="file-discovery"}` and ignored: the previous
endpoint set stays in place.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from llmepp.datalayer.datastore import DiscoveryNotifier
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.datalayer.endpointsfile import EndpointsFileError, read_endpoints_file
from llmepp.filewatch import SettledChanges, Signature, stat_signature
from llmepp.framework.datalayer import EndpointDiscovery
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams

log = logging.getLogger(__name__)


class FileDiscovery(EndpointDiscovery):
    """Endpoints from a local YAML/JSON file, optionally reloaded when it changes."""

    type = "file-discovery"

    class Params(PluginParams):
        path: str
        watch_file: bool = False

    poll_interval: float = 0.25

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        if not params.path:
            raise ConfigError("parameters.path: required")
        self.path = params.path
        self.watch_file = params.watch_file
        self.current: dict[tuple[str, str], EndpointSpec] = {}
        self.reloads = 0
        self.reload_errors = 0
        self._error_counter: Any = None

    def setup(self, ctx: PluginContext) -> None:
        metrics = getattr(ctx, "metrics", None)
        if metrics is not None and hasattr(metrics, "poll_errors"):
            self._error_counter = metrics.poll_errors.labels(source_type=self.type)

    async def run(self, notifier: DiscoveryNotifier) -> None:
        signature = stat_signature(self.path)
        try:
            specs = await asyncio.to_thread(self.read)
        except EndpointsFileError as e:
            raise ConfigError(f"plugin {self.name!r} (type {self.type}): {e}") from None
        self._apply(notifier, specs)
        notifier.mark_synced()
        log.info("endpoints loaded from file", extra={"path": self.path, "endpoints": len(specs)})
        if not self.watch_file:
            await asyncio.Event().wait()  # discovery lives as long as the process
        await self._watch(notifier, signature)

    async def _watch(self, notifier: DiscoveryNotifier, loaded: Signature | None) -> None:
        changes = SettledChanges(self.path, loaded)
        while True:
            await asyncio.sleep(self.poll_interval)
            if not changes.settled():
                continue
            if changes.missing:
                self._reload_failed(f"{self.path}: file is missing")
                continue
            try:
                specs = await asyncio.to_thread(self.read)
            except EndpointsFileError as e:
                self._reload_failed(str(e))
                continue
            except Exception as e:  # a bug must not end the watch: the pool would freeze, unnoticed
                log.exception("endpoints file reload failed", extra={"path": self.path})
                self._reload_failed(f"{self.path}: {e!r}")
                continue
            if changes.moved():
                changes.retry()  # changed while we read it: read again once it settles
                continue
            self._apply(notifier, specs)
            self.reloads += 1
            log.info("endpoints reloaded from file", extra={"path": self.path, "endpoints": len(specs)})

    def read(self) -> list[EndpointSpec]:
        """Read and validate the file (blocking: runs in a thread); raises EndpointsFileError."""
        return read_endpoints_file(self.path)

    def _reload_failed(self, message: str) -> None:
        self.reload_errors += 1
        if self._error_counter is not None:
            self._error_counter.inc()
        log.warning("endpoints file reload failed, keeping the previous %d endpoints: %s", len(self.current), message)

    def _apply(self, notifier: DiscoveryNotifier, specs: list[EndpointSpec]) -> None:
        new = {(s.namespace, s.name): s for s in specs}
        # Deletes first: a renamed entry that keeps its address never coexists with its old self.
        for key in self.current.keys() - new.keys():
            notifier.delete(key[1], key[0])
        for key, spec in new.items():
            if self.current.get(key) != spec:
                notifier.upsert(spec)
        self.current = new
