"""FailureStreak: how a failing, flapping and recovering target is logged."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from llmepp.datalayer import streak as streak_mod
from llmepp.datalayer.streak import REPEAT_QUIET, FailureStreak

TARGET = SimpleNamespace(url="http://127.0.0.1:8000/metrics")


def test_flapping_is_quiet_but_a_streak_that_then_lasts_is_announced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(streak_mod, "time", SimpleNamespace(monotonic=lambda: clock.t))
    log = logging.getLogger("test.streak")
    caplog.set_level(logging.DEBUG, logger="test.streak")
    s = FailureStreak(log, "pod")
    boom = RuntimeError("HTTP status 503")

    def levels() -> list[tuple[int, str]]:
        out = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
        caplog.clear()
        return out

    s.failed("scrape failed", boom, TARGET)
    s.succeeded("scrape", TARGET)
    assert levels() == [
        (logging.WARNING, "scrape failed: HTTP status 503"),
        (logging.INFO, "scrape recovered after 1 failed attempts"),
    ]
    for _ in range(50):  # flapping, same reason: DEBUG only
        clock.t += 0.05
        s.failed("scrape failed", boom, TARGET)
        clock.t += 0.05
        s.succeeded("scrape", TARGET)
    assert levels() == []
    s.failed("scrape failed", RuntimeError("connect refused"), TARGET)  # another reason: announced
    assert levels() == [(logging.WARNING, "scrape failed: connect refused (50 brief failures since the last warning)")]
    s.succeeded("scrape", TARGET)
    levels()
    s.failed("scrape failed", RuntimeError("connect refused"), TARGET)  # quiet again ...
    assert levels() == []
    while clock.t < 1000.0 + 5.0 + REPEAT_QUIET + 1:  # ... until it has lasted
        clock.t += 0.05
        s.failed("scrape failed", RuntimeError("connect refused"), TARGET)
    [(level, message)] = levels()
    assert level == logging.WARNING and "in a row): connect refused" in message
    s.succeeded("scrape", TARGET)
    assert [lv for lv, _ in levels()] == [logging.INFO]
    clock.t += REPEAT_QUIET  # long after: the same reason is news again
    s.failed("scrape failed", RuntimeError("connect refused"), TARGET)
    assert levels() == [(logging.WARNING, "scrape failed: connect refused")]
