"""How a thing retried over and over (a pod's /metrics, a Kubernetes watch, the leader lease) logs a failure
that lasts or flaps: when it starts, now and then while it lasts, once when it ends; not per attempt."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

# A streak that starts failing the same way as one announced less than this many seconds ago (a target
# flapping between failing and answering) is logged at DEBUG, and so is its recovery.
REPEAT_QUIET = 60.0


class _Target(Protocol):
    @property
    def url(self) -> str: ...


class FailureStreak:
    """Consecutive failed attempts of one thing: `level` (WARNING) with the reason on the first, DEBUG while
    it keeps failing, INFO with the count and duration when an attempt succeeds again. With `remind_every`
    (seconds), a streak that lasts is logged at `level` again once per that interval (with its count). A
    target flapping (a new streak failing with the reason last announced, within `quiet_for` seconds of
    that line) is logged at DEBUG both ways until `quiet_for` seconds have passed since that line: then its
    next failure is logged at `level` again, however short its own streak, so a target that keeps flapping
    warns once per `quiet_for`; that line counts the quiet streaks.

    `extra` goes on every line; a `target` given to a call adds its `address`. `then` is said after the
    reason but is not part of it (e.g. the retry delay)."""

    __slots__ = (
        "announced", "clock", "count", "extra", "log", "quiet", "quiet_for", "reason", "remind_every", "started",
        "warned_at",
    )  # fmt: skip

    def __init__(
        self,
        log: logging.Logger,
        extra: dict[str, object],
        remind_every: float = 0.0,
        quiet_for: float = REPEAT_QUIET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.extra = extra
        self.remind_every = remind_every
        self.quiet_for = quiet_for
        self.clock = clock
        self.count = 0  # 0 = healthy
        self.started = 0.0  # when the current streak began
        self.warned_at = -float("inf")  # when a line at the failure's level was last logged
        self.announced = False  # the current streak was logged at that level (so its end is at INFO)
        self.reason = ""  # the reason of the last streak announced ...
        self.quiet = 0  # ... and how many streaks since were not, failing the same way

    def failed(
        self,
        what: str,
        reason: object,
        target: _Target | None = None,
        *,
        then: str = "",
        level: int = logging.WARNING,
        exc_info: BaseException | None = None,
    ) -> None:
        self.count += 1
        now = self.clock()
        # An exception without a message (TimeoutError()) is known by its type.
        text = str(reason) or type(reason).__name__
        if self.count == 1:
            self.started = now
            if text != self.reason or now - self.warned_at >= self.quiet_for:
                more = f" ({self.quiet} brief failures since the last warning)" if self.quiet else ""
                self._loud(now, level, "%s: %s%s%s", (what, text, then, more), target, exc_info)
                self.reason, self.quiet = text, 0
                return
            self.quiet += 1  # flapping: this streak is logged at DEBUG unless it lasts
        elif not self.announced or self.remind_every:
            # Announced: remind once per remind_every. Not (flapping): announce once it lasts.
            every = self.remind_every if self.announced else (self.remind_every or self.quiet_for)
            if now - self.warned_at >= every:
                args = (what, self.count, now - self.started, text, then)
                self._loud(now, level, "%s (%d in a row over %.0fs): %s%s", args, target, exc_info)
                self.quiet = 0
                return
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s (%d in a row): %s%s", what, self.count, text, then, extra=self._extra(target))

    def succeeded(self, what: str, target: _Target | None = None) -> None:
        if self.count:  # the common case costs this test only
            level = logging.INFO if self.announced else logging.DEBUG
            self.log.log(
                level,
                "%s recovered after %d failed attempts in %.0fs",
                what,
                self.count,
                self.clock() - self.started,
                extra=self._extra(target),
            )
            self.count = 0
            self.announced = False

    def _loud(
        self,
        now: float,
        level: int,
        msg: str,
        args: tuple[object, ...],
        target: _Target | None,
        exc_info: BaseException | None,
    ) -> None:
        self.log.log(level, msg, *args, extra=self._extra(target), exc_info=exc_info)
        self.announced, self.warned_at = True, now

    def _extra(self, target: _Target | None) -> dict[str, object]:
        return self.extra if target is None else {**self.extra, "address": target.url}
