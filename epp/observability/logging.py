"""Structured logs: one JSON object per line, carrying `extra` fields such as request_id."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else came from `extra=` and is emitted as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_OWN = frozenset({"ts", "level", "logger", "msg", "exc"})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            msg = record.getMessage()
        except Exception:  # arguments that do not fit the format: log what was given, not a traceback
            msg = f"{_text(record.msg)} {_text(record.args)}"
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                # An `extra` field named like one of the line's own keys (ts, level, logger) keeps them.
                out["extra_" + k if k in _OWN else k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return json.dumps(out, default=str, allow_nan=False)
        except Exception:  # NaN / infinity (not JSON), keys that are not strings, an unprintable value
            return json.dumps({k: _text(v) for k, v in out.items()})


_MAX_LIMITER_KEYS = 1024  # LogLimiter keys


class LogLimiter:
    """At most one log line per `interval` seconds per key; the next line says how many were held back. A
    failure on a hot path (per request, per dispatch cycle) must not flood the log; a site with one kind of
    failure uses one constant key."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: object, extra: dict[str, object] | None = None) -> None:
        self._emit(logging.WARNING, key, msg, args, extra, False)

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        """`exc_info`: the traceback of the exception being handled (call from its `except` block)."""
        self._emit(logging.ERROR, key, msg, args, None, exc_info)

    def _emit(
        self, level: int, key: str, msg: str, args: tuple[object, ...], extra: dict[str, object] | None, exc_info: bool
    ) -> None:
        now = time.monotonic()
        if len(self._last) >= _MAX_LIMITER_KEYS and key not in self._last:
            # Keys name pods that come and go, and topics an unknown publisher chooses: keep a bounded
            # few (forgetting them only lets a next line through).
            self._last.clear()
        last, held = self._last.get(key, (-1e18, 0))
        if now - last < self.interval:
            self._last[key] = (last, held + 1)
            return
        self._last[key] = (now, 0)
        if held:
            msg += " (%d similar messages suppressed)"
            args = (*args, held)
        self.logger.log(level, msg, *args, extra=extra, exc_info=exc_info)


class _MalformedHttpRequests(logging.Filter):
    """aiohttp logs each request it cannot parse (a bad header line, an over-long one) at ERROR with a traceback;
    on our HTTP ports (/metrics, the P/D sidecar, the latency predictor) that is a client's error, and a broken
    client or a scanner would flood the log. Such a line becomes one WARNING without the traceback per minute
    (the next one says how many were held back). What aiohttp logs below ERROR is left alone."""

    def __init__(self, errors: type[Exception]) -> None:
        super().__init__()
        self._errors = errors
        self._limiter = LogLimiter(logging.getLogger("llmepp.http"), 60.0)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or not isinstance(exc, self._errors):
            return True
        detail = " ".join(str(getattr(exc, "message", "") or type(exc).__name__).split())
        self._limiter.warning("malformed", "%s (a malformed HTTP request: %.200s)", record.getMessage(), detail)
        return False


def quiet_malformed_http_requests() -> None:
    """Install `_MalformedHttpRequests` on aiohttp's server logger (once per process; servers call it at start)."""
    from aiohttp.http_exceptions import HttpProcessingError

    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedHttpRequests) for f in logger.filters):
        logger.addFilter(_MalformedHttpRequests(HttpProcessingError))


def _text(value: object) -> str:
    try:
        return value if isinstance(value, str) else repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def level_for_verbosity(verbosity: int) -> int:
    """The reference's -v scale: 2 default (info), 3 verbose, 4 debug, 5 trace."""
    if verbosity <= 1:
        return logging.WARNING
    if verbosity <= 3:
        return logging.INFO
    return logging.DEBUG


def configure_logging(verbosity: int, json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_for_verbosity(verbosity))
    # grpc's own asyncio noise at info level is not ours to report.
    logging.getLogger("grpc").setLevel(logging.WARNING)
