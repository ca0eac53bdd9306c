"""How every poller of model servers logs a target that fails and recovers: once, not per poll."""

from __future__ import annotations

import logging
import time
from typing import Protocol

# A streak that starts failing the same way as one announced less than this many seconds ago (a target
# flapping between failing and answering) is logged at DEBUG, and so is its recovery.
REPEAT_QUIET = 60.0


class _Target(Protocol):
    @property
    def url(self) -> str: ...


class FailureStreak:
    """Consecutive failed polls of one endpoint: WARNING with the reason on the first, DEBUG while it
    keeps failing, INFO with the count when a poll succeeds again. With `remind_every` (seconds), a
    streak that lasts is logged at WARNING again once per that interval (with its count). A target
    flapping (a new streak failing with the reason last announced, within REPEAT_QUIET seconds of that
    WARNING) is logged at DEBUG both ways, unless it lasts that long; the next WARNING counts them."""

    __slots__ = ("announced", "count", "endpoint", "log", "quiet", "reason", "remind_every", "warned_at")

    def __init__(self, log: logging.Logger, endpoint: str, remind_every: float = 0.0) -> None:
        self.log = log
        self.endpoint = endpoint
        self.count = 0  # 0 = healthy
        self.remind_every = remind_every
        self.warned_at = -float("inf")  # when a WARNING was last logged
        self.announced = False  # the current streak was logged at WARNING (so its end is at INFO)
        self.reason = ""  # the reason of the last streak announced ...
        self.quiet = 0  # ... and how many streaks since were not, failing the same way

    def failed(self, what: str, reason: Exception | None, target: _Target) -> None:
        self.count += 1
        extra = {"endpoint": self.endpoint, "address": target.url}
        if self.count == 1:
            now = time.monotonic()
            text = str(reason)
            if text != self.reason or now - self.warned_at >= REPEAT_QUIET:
                more = f" ({self.quiet} brief failures since the last warning)" if self.quiet else ""
                self.log.warning("%s: %s%s", what, reason, more, extra=extra)
                self.announced, self.reason, self.quiet, self.warned_at = True, text, 0, now
                return
            self.quiet += 1  # flapping: this streak is logged at DEBUG unless it lasts
        elif not self.announced or self.remind_every:
            now = time.monotonic()
            # Announced: remind once per remind_every. Not (flapping): announce once it lasts.
            every = self.remind_every if self.announced else (self.remind_every or REPEAT_QUIET)
            if now - self.warned_at >= every:
                self.log.warning("%s (%d in a row): %s", what, self.count, reason, extra=extra)
                self.announced, self.quiet, self.warned_at = True, 0, now
                return
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s (%d in a row): %s", what, self.count, reason, extra=extra)

    def succeeded(self, what: str, target: _Target) -> None:
        if self.count:  # the common case costs this test only
            level = logging.INFO if self.announced else logging.DEBUG
            self.log.log(
                level,
                "%s recovered after %d failed attempts",
                what,
                self.count,
                extra={"endpoint": self.endpoint, "address": target.url},
            )
            self.count = 0
            self.announced = False
