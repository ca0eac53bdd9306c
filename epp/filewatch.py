"""Polled files: change detection shared by the endpoints file and the config file.

Polling instead of inotify: no dependency, works on every filesystem (including overlay/NFS
mounts where inotify misses changes), and costs one stat per poll. `os.stat` follows
symlinks, so a Kubernetes ConfigMap swap (`..data` retargeted) and an atomic rename both
show up as a new inode.
"""

from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod

from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Signature = tuple[int, int, int, int]


def stat_signature(path: str) -> Signature | None:
    """(device, inode, size, mtime_ns) of what `path` resolves to; None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SettledChanges:
    """Reports a file's changes once each has held still for one poll, so a file caught
    mid-write is not read.

        changes = SettledChanges(path, stat_signature(path))   # taken before the first read
        every poll:  if changes.settled(): read it; if changes.moved(): changes.retry()
    """

    __slots__ = ("_pending", "path", "reported")

    def __init__(self, path: str, loaded: Signature | None) -> None:
        self.path = path
        # Last state read (or complained about), and the state seen on the previous poll.
        self.reported = self._pending = loaded

    def settled(self) -> bool:
        """True once per change: the file differs from the last reported state and has not
        changed since the previous poll. A missing file is a change too (`missing`)."""
        sig = stat_signature(self.path)
        if sig == self.reported or sig != self._pending:
            self._pending = sig
            return False
        self.reported = sig
        return True

    @property
    def missing(self) -> bool:
        return self.reported is None

    def moved(self) -> bool:
        """The file changed again after `settled()` said it held still (while it was being read)."""
        return stat_signature(self.path) != self.reported

    def retry(self) -> None:
        """Read the file again once it settles (after `moved()`), or report it missing if it goes."""
        self.reported = _UNREAD


# A state no file has: after `retry()` the next settled state is reported, a missing file included.
_UNREAD: Signature = (-1, -1, -1, -1)


class FilePoller(ABC):
    """Calls `check()` every `interval` seconds on the event loop from `start()` to `aclose()`;
    a check that raises is logged and the polling goes on."""

    name = "file-poller"  # the task's name, for logs and debugging

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    def check(self) -> bool:
        """Look at the file once; True when it was (re)loaded."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a bug here must not end the polling (nor the EPP)
                log.exception("%s failed", self.name)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
