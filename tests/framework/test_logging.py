"""JSON logs: every record is one line of strict JSON, whatever was logged."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from llmepp.observability.logging import JsonFormatter


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")  # NaN / Infinity: what strict parsers (Go, jq, Loki) refuse


def record(msg: str, args: tuple[Any, ...] = (), **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("llmepp.test", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def line(rec: logging.LogRecord) -> dict[str, Any]:
    text = JsonFormatter().format(rec)
    assert "\n" not in text
    parsed: dict[str, Any] = json.loads(text, parse_constant=_reject_constant)
    return parsed


def test_user_input_with_newlines_quotes_and_unicode_stays_on_one_line() -> None:
    out = line(record("model %s", ('a"b\nc\u2028é',), request_id="r\n1"))
    assert out["msg"] == 'model a"b\nc\u2028é' and out["request_id"] == "r\n1"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("boom")


@pytest.mark.parametrize(("msg", "args"), [("bad %d", ("x",)), ("bad %s", (Unprintable(),)), ("%s %s", ("one",))])
def test_a_message_that_cannot_be_formatted_is_still_logged(msg: str, args: tuple[Any, ...]) -> None:
    out = line(record(msg, args))
    assert msg in out["msg"] and out["level"] == "info"


@pytest.mark.parametrize(
    "extra",
    [{"score": float("nan")}, {"limit": float("inf")}, {"by": {("a", 1): 2}}, {"obj": Unprintable()}],
)
def test_extra_fields_json_cannot_hold_still_give_a_strict_json_line(extra: dict[str, Any]) -> None:
    out = line(record("scored", **extra))
    assert out["msg"] == "scored" and set(extra) <= set(out)


def test_log_limiter_says_how_many_were_held_back_per_key(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmepp.observability import logging as epp_logging

    now = [100.0]
    monkeypatch.setattr(epp_logging.time, "monotonic", lambda: now[0])
    limited = epp_logging.LogLimiter(logging.getLogger("test.ratelimit"), interval=10.0)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for _ in range(5):
            limited.warning("down", "pod %s down", "a")
        limited.warning("slow", "pod %s slow", "b")  # another key: not held back by the first
        now[0] += 10.0
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            limited.error("down", "cycle failed", exc_info=True)
    messages = [(r.levelno, r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    assert messages == [
        (logging.WARNING, "pod a down", False),
        (logging.WARNING, "pod b slow", False),
        (logging.ERROR, "cycle failed (4 similar messages suppressed)", True),
    ]


def test_extra_fields_named_like_the_lines_own_keys_do_not_replace_them() -> None:
    """logging refuses `extra` keys that clash with LogRecord attributes, not "ts", "level" or "logger": they
    replaced the line's own time, level and logger (a KV replay line carried a batch's epoch float as its ts)."""
    logger = logging.getLogger("llmepp.test")
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        __file__,
        1,
        "m",
        (),
        None,
        extra={"ts": 1700000000.25, "level": "debug", "logger": "x"},
    )
    line = json.loads(JsonFormatter().format(record))
    assert isinstance(line["ts"], str) and line["ts"].endswith("Z")
    assert line["level"] == "info" and line["logger"] == "llmepp.test"
    assert line["extra_ts"] == 1700000000.25 and line["extra_level"] == "debug" and line["extra_logger"] == "x"
