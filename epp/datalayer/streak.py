"""How every poller of model servers logs a target that fails and recovers: once, not per poll."""

from __future__ import annotations

import logging
from typing import Protocol


class _Target(Protocol):
    @property
    def url(self) -> str: ...


class FailureStreak:
    """Consecutive failed polls of one endpoint: WARNING with the reason on the first, DEBUG while it
    keeps failing, INFO with the count when a poll succeeds again."""

    __slots__ = ("count", "endpoint", "log")

    def __init__(self, log: logging.Logger, endpoint: str) -> None:
        self.log = log
        self.endpoint = endpoint
        self.count = 0  # 0 = healthy

    def failed(self, what: str, reason: Exception | None, target: _Target) -> None:
        self.count += 1
        extra = {"endpoint": self.endpoint, "address": target.url}
        if self.count == 1:
            self.log.warning("%s: %s", what, reason, extra=extra)
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
