"""FailureStreak: how a failing, flapping and recovering target is logged."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from llmepp.observability.streak import REPEAT_QUIET, FailureStreak

TARGET = SimpleNamespace(url="http://127.0.0.1:8000/metrics")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def loud(caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG, logger="test.streak")

    def lines() -> list[tuple[int, str]]:
        out = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
        caplog.clear()
        return out

    return lines


def test_flapping_is_quiet_but_a_streak_that_then_lasts_is_announced(loud) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    s = FailureStreak(logging.getLogger("test.streak"), {"endpoint": "pod"}, clock=clock)
    boom = RuntimeError("HTTP status 503")

    s.failed("scrape failed", boom, TARGET)
    s.succeeded("scrape", TARGET)
    assert loud() == [
        (logging.WARNING, "scrape failed: HTTP status 503"),
        (logging.INFO, "scrape recovered after 1 failed attempts in 0s"),
    ]
    for _ in range(50):  # flapping, same reason: DEBUG only
        clock.t += 0.05
        s.failed("scrape failed", boom, TARGET)
        clock.t += 0.05
        s.succeeded("scrape", TARGET)
    assert loud() == []
    s.failed("scrape failed", RuntimeError("connect refused"), TARGET)  # another reason: announced
    assert loud() == [(logging.WARNING, "scrape failed: connect refused (50 brief failures since the last warning)")]
    s.succeeded("scrape", TARGET)
    loud()
    s.failed("scrape failed", RuntimeError("connect refused"), TARGET)  # quiet again ...
    assert loud() == []
    while clock.t < 1000.0 + 5.0 + REPEAT_QUIET + 1:  # ... until it has lasted
        clock.t += 0.05
        s.failed("scrape failed", RuntimeError("connect refused"), TARGET)
    [(level, message)] = loud()
    assert level == logging.WARNING and "in a row over 6" in message and message.endswith("): connect refused")
    s.succeeded("scrape", TARGET)
    assert [lv for lv, _ in loud()] == [logging.INFO]
    clock.t += REPEAT_QUIET  # long after: the same reason is news again
    s.failed("scrape failed", RuntimeError("connect refused"), TARGET)
    assert loud() == [(logging.WARNING, "scrape failed: connect refused")]


def test_a_lasting_streak_is_reminded_once_per_interval_with_its_count(loud) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    s = FailureStreak(logging.getLogger("test.streak"), {"lease": "l"}, remind_every=10.0, clock=clock)
    for _ in range(250):  # 25 s, an attempt per 0.1 s
        s.failed("leader election", TimeoutError())  # no message: known by its type
        clock.t += 0.1
    assert loud() == [
        (logging.WARNING, "leader election: TimeoutError"),
        (logging.WARNING, "leader election (101 in a row over 10s): TimeoutError"),
        (logging.WARNING, "leader election (201 in a row over 20s): TimeoutError"),
    ]
    s.succeeded("leader election")
    assert loud() == [(logging.INFO, "leader election recovered after 250 failed attempts in 25s")]


def test_level_exc_info_extra_and_a_suffix_outside_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    caplog.set_level(logging.DEBUG, logger="test.streak")
    s = FailureStreak(logging.getLogger("test.streak"), {"informer": "pods"}, clock=clock)
    try:
        raise ValueError("unforeseen")
    except ValueError as e:
        s.failed("list failed", e, TARGET, then="; retrying in 0.2s", level=logging.ERROR, exc_info=e)
    s.succeeded("pods")
    clock.t += 1.0
    # The retry delay grew, the reason is the same: still a flap, not news.
    s.failed("list failed", ValueError("unforeseen"), then="; retrying in 0.4s", level=logging.ERROR)
    first, recovered, flap = caplog.records
    assert (first.levelno, first.getMessage()) == (logging.ERROR, "list failed: unforeseen; retrying in 0.2s")
    assert first.exc_info is not None and first.informer == "pods" and first.address == TARGET.url  # type: ignore[attr-defined]
    assert recovered.levelno == logging.INFO and not hasattr(recovered, "address")
    assert flap.levelno == logging.DEBUG and flap.getMessage().endswith("retrying in 0.4s")
