"""`--watch-config-file`: apply the config file's scheduling part when the file changes.

The file is polled (`llmepp.filewatch`: a change counts once it has held still for one poll,
so an editor's half-written file is not read; a ConfigMap symlink swap is a change). A
changed file is parsed and handed to `apply` (the app: `loader.rebuild_scheduling`, then the
director routes new requests with the new scheduler). A file that is empty (truncated, not yet
rewritten), cannot be read, parsed or applied is logged with the reason and counted, and the
running config stays in force: a typo never takes routing down. Only a change of content counts
(a `touch` reloads nothing).

Metrics, named as Prometheus names its own: `llm_d_epp_config_reloads_total{result=
"applied"|"rejected"}`, `llm_d_epp_config_last_reload_successful` (0 after a rejected file,
until one applies), `llm_d_epp_config_last_reload_success_timestamp_seconds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from llmepp.config.loader import load_config
from llmepp.config.schema import EndpointPickerConfig
from llmepp.filewatch import FilePoller, SettledChanges, Signature
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds; a ConfigMap edit takes the kubelet ~a minute to land anyway


class ConfigWatcher(FilePoller):
    name = "config-watcher"

    def __init__(
        self,
        path: str,
        loaded: Signature | None,
        text: str,
        apply: Callable[[EndpointPickerConfig], None],
        metrics: EppMetrics,
        *,
        interval: float = POLL_INTERVAL,
    ) -> None:
        """`loaded`: the file's signature taken before `text` (what is running) was read from it."""
        super().__init__(interval)
        self.path = path
        self._changes = SettledChanges(path, loaded)
        self._text = text
        self._apply = apply
        self._applied = metrics.config_reloads.labels(result="applied")
        self._rejected = metrics.config_reloads.labels(result="rejected")
        self._successful = metrics.config_last_reload_successful
        self._success_time = metrics.config_last_reload_success_timestamp

    def check(self) -> bool:
        """Apply the file if it changed since the last look; True when a new config was applied."""
        changes = self._changes
        if not changes.settled():
            return False
        if changes.missing:
            self._reject("the file is missing")
            return False
        try:
            text = Path(self.path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            self._reject(f"cannot read it: {e}")
            return False
        if changes.moved():
            changes.retry()  # changed while we read it: read again once it settles
            return False
        if text == self._text:
            self._successful.set(1)  # back to what runs (e.g. a bad edit reverted): nothing is wrong now
            return False
        if not text.strip():
            # Truncated and not written yet (or emptied by mistake): it would parse as a config with nothing
            # in it, i.e. random routing. Wait for content.
            self._reject("the file is empty")
            return False
        try:
            self._apply(load_config(text))
        except ConfigError as e:
            self._reject(str(e))
            return False
        except Exception as e:  # a plugin's bug: the same answer, with the traceback
            log.exception("config file %s: applying it failed", self.path)
            self._reject(f"internal error: {e!r}")
            return False
        self._text = text
        self._applied.inc()
        self._successful.set(1)
        self._success_time.set(time.time())
        log.info("config file %s reloaded", self.path)
        return True

    def _reject(self, reason: str) -> None:
        self._rejected.inc()
        self._successful.set(0)
        log.error("config file %s not applied, the running config stays: %s", self.path, reason)
