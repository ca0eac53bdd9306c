"""How every poller of model servers logs a target that fails and recovers: once, not per poll."""

from __future__ import annotations

import logging
import time
from typing import Protocol


class _Target(Protocol):
    @property
    def url(self) -> str: ...


class FailureStreak:
    """Consecutive failed polls of one endpoint: WARNING with the reason on the first, DEBUG while it
    keeps failing, INFO with the count when a poll succeeds again. With `remind_every` (seconds), a
    streak that lasts is logged at WARNING again once per that interval (with its count)."""

    __slots__ = ("count", "endpoint", "log", "remind_every", "warned_at")

    def __init__(self, log: logging.Logger, endpoint: str, remind_every: float = 0.0) -> None:
        self.log = log
        self.endpoint = endpoint
        self.count = 0  # 0 = healthy
        self.remind_every = remind_every
        self.warned_at = 0.0

    def failed(self, what: str, reason: Exception | None, target: _Target) -> None:
        self.count += 1
        extra = {"endpoint": self.endpoint, "address": target.url}
        if self.count == 1:
            self.log.warning("%s: %s", what, reason, extra=extra)
            if self.remind_every:
                self.warned_at = time.monotonic()
        elif self.remind_every and (now := time.monotonic()) - self.warned_at >= self.remind_every:
            self.warned_at = now
            self.log.warning("%s (%d in a row): %s", what, self.count, reason, extra=extra)
        elif self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s (%d in a row): %s", what, self.count, reason, extra=extra)

    def succeeded(self, what: str, target: _Target) -> None:
        if self.count:  # the common case costs this test only
            self.log.info(
                "%s recovered after %d failed attempts",
                what,
                self.count,
                extra={"endpoint": self.endpoint, "address": target.url},
            )
            self.count = 0
