"""The EPP's client of the latency predictor: bulk predictions on the request path, training samples
batched in the background (the reference's `latencypredictorclient`, environment variables included).

    PREDICTION_SERVER_URL        comma-separated prediction servers, used round robin (http://localhost:8001)
    TRAINING_SERVER_URL          the training server (http://localhost:8000)
    LATENCY_FLUSH_INTERVAL_SEC   seconds between training uploads (1)
    LATENCY_MAX_SAMPLE_SIZE      most samples per upload; a fuller buffer is sampled down at random (1000)
    LATENCY_HTTP_TIMEOUT_SEC     timeout of a training upload (10)

A prediction call is bounded by its own timeout (the producer's `predictionTimeout`): a predictor that
is slow, down or answering nonsense raises PredictorUnavailable and never anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import aiohttp
import msgspec

from llmepp.decoding import DECODE_ERRORS
from llmepp.httpclient import upstream_connector
from llmepp.observability.logging import LogLimiter
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_PREDICTION_URL = "http://localhost:8001"
DEFAULT_TRAINING_URL = "http://localhost:8000"
# The most bytes of a bulk answer read: a prediction is a few hundred bytes (the reference's carries bounds,
# timestamps, model type); a larger answer is refused before it is buffered whole.
ANSWER_BASE_BYTES, ANSWER_ROW_BYTES = 64 * 1024, 4 * 1024
BACKOFF_MIN, BACKOFF_MAX = 0.5, 5.0  # seconds a prediction server is not called after a failure (doubling)


class PredictorUnavailable(Exception):
    """No usable prediction: `reason` is "timeout", "error" (connection, status), "invalid" (body) or
    "skipped" (every prediction server is backing off after a failure; no call made)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Prediction(msgspec.Struct):
    ttft_ms: float
    tpot_ms: float


class _BulkAnswer(msgspec.Struct):
    predictions: list[_Prediction]


def urls_from_env(env: Mapping[str, str] | None = None) -> tuple[list[str], str]:
    """(prediction URLs, training URL) from PREDICTION_SERVER_URL / TRAINING_SERVER_URL, else the defaults;
    ValueError naming the variable when one is not an http(s) URL."""
    env = os.environ if env is None else env
    predict = [u.strip().rstrip("/") for u in env.get("PREDICTION_SERVER_URL", "").split(",") if u.strip()]
    train = env.get("TRAINING_SERVER_URL", "").strip().rstrip("/")
    for name, urls in (("PREDICTION_SERVER_URL", predict), ("TRAINING_SERVER_URL", [train] if train else [])):
        for url in urls:  # at start-up, not as an error count per request
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"environment variable {name}: {url[:200]!r} is not an http(s) URL")
    return predict or [DEFAULT_PREDICTION_URL], train or DEFAULT_TRAINING_URL


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None once it is known to be longer than `limit` bytes (by its Content-Length, else as read)."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    data = bytearray()
    async for chunk in resp.content.iter_any():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name, "") or default)
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, env.get(name), default)
        return default
    if not 0 < value < math.inf:
        log.warning("%s=%r is not a finite number > 0; using %s", name, env.get(name), default)
        return default
    return value


class PredictorClient:
    def __init__(
        self,
        prediction_urls: Sequence[str],
        training_url: str,
        *,
        timeout: float = 0.3,
        training_timeout: float | None = None,
        flush_interval: float | None = None,
        max_sample_size: int | None = None,
        env: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        env = os.environ if env is None else env
        if not prediction_urls:
            raise ValueError("no prediction server URL")
        self.prediction_urls = [u.rstrip("/") for u in prediction_urls]
        self.training_url = training_url.rstrip("/")
        self.timeout = timeout
        self.training_timeout = training_timeout or _env_number(env, "LATENCY_HTTP_TIMEOUT_SEC", 10.0)
        self.flush_interval = flush_interval or _env_number(env, "LATENCY_FLUSH_INTERVAL_SEC", 1.0)
        self.max_sample_size = max_sample_size or max(1, int(_env_number(env, "LATENCY_MAX_SAMPLE_SIZE", 1000)))
        self._rng = rng or random.Random()
        self._next = 0
        # Per prediction server: seconds of back-off after its last failure (0: healthy), and until when.
        self._backoff = [0.0] * len(self.prediction_urls)
        self._skip_until = [0.0] * len(self.prediction_urls)
        # When each was last marked failed: a call begun before then failing too is the same failure (a stall
        # with 100 calls in flight is one failure, not 100 doublings of the back-off).
        self._failed_at = [0.0] * len(self.prediction_urls)
        self._session: aiohttp.ClientSession | None = None
        self._buffer: list[dict[str, Any]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.sent = 0  # training samples accepted by the training server
        self.dropped = 0  # training samples lost (buffer sampled down, upload failed)
        # Told (outcome "sent" / "dropped", count) as samples leave the buffer: the owner's metrics.
        self.on_samples: Callable[[str, int], None] | None = None
        self._upload_log = LogLimiter(log, 30.0)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No session-wide timeout: each call bounds itself.
            self._session = aiohttp.ClientSession(
                connector=upstream_connector(), timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    # -- predictions -------------------------------------------------------------------------------
    async def predict_bulk(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
        """(TTFT ms, TPOT ms) per row from POST /predict/bulk/strict, within `timeout` seconds, from the next
        prediction server (round robin) that is not backing off: a server that failed is not called for 0.5 s,
        doubling to 5 s while it keeps failing, the others are (one dead replica must not cost every request
        its prediction). PredictorUnavailable("skipped") at once when every server is backing off."""
        if not rows:
            return []
        n, now = len(self.prediction_urls), time.monotonic()
        for i in range(n):
            k = (self._next + i) % n
            if self._skip_until[k] <= now:
                break
        else:
            raise PredictorUnavailable("skipped", "every prediction server is backing off after a failure")
        self._next = k + 1
        try:
            out = await self._predict_at(self.prediction_urls[k], rows)
        except PredictorUnavailable as e:
            if now >= self._failed_at[k]:
                self._backoff[k] = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff[k] * 2))
                self._failed_at[k] = failed = time.monotonic()
                self._skip_until[k] = failed + self._backoff[k]
            raise PredictorUnavailable(e.reason, f"{e.detail} (not called for {self._backoff[k]:.1f}s)") from None
        self._backoff[k] = 0.0
        return out

    def backing_off(self) -> bool:
        """Every prediction server is backing off after a failure: predict_bulk would raise "skipped"."""
        return min(self._skip_until) > time.monotonic()

    async def _predict_at(self, url: str, rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
        body = msgspec.json.encode({"requests": list(rows)})
        limit = ANSWER_BASE_BYTES + ANSWER_ROW_BYTES * len(rows)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client().post(
                    f"{url}/predict/bulk/strict", data=body, headers={"content-type": "application/json"}
                ) as resp:
                    payload = await _read_at_most(resp, limit)
                    if payload is None:
                        raise PredictorUnavailable("invalid", f"{url}: answer longer than {limit} bytes")
                    if resp.status != 200:
                        raise PredictorUnavailable("error", f"{url} answered {resp.status}: {payload[:200]!r}")
        except TimeoutError:
            raise PredictorUnavailable("timeout", f"{url} did not answer within {self.timeout * 1000:.0f} ms") from None
        except (aiohttp.ClientError, OSError) as e:
            raise PredictorUnavailable("error", f"{url}: {e or type(e).__name__}") from None
        try:
            answer = msgspec.json.decode(payload, type=_BulkAnswer)
        except DECODE_ERRORS as e:
            raise PredictorUnavailable("invalid", f"{url}: {e}") from None
        if len(answer.predictions) != len(rows):
            raise PredictorUnavailable("invalid", f"{url}: {len(answer.predictions)} predictions for {len(rows)} rows")
        out = []
        for p in answer.predictions:
            if not (p.ttft_ms >= 0.0 and p.tpot_ms >= 0.0) or p.ttft_ms == float("inf") or p.tpot_ms == float("inf"):
                raise PredictorUnavailable("invalid", f"{url}: prediction out of range ({p.ttft_ms}, {p.tpot_ms})")
            out.append((p.ttft_ms, p.tpot_ms))
        return out

    # -- training ----------------------------------------------------------------------------------
    def add_training(self, entries: Iterable[dict[str, Any]]) -> None:
        """Queue samples for the next upload (never blocks; the uploader starts on first use)."""
        if self._closed:
            return
        buffer, cap = self._buffer, self.max_sample_size * 10
        for entry in entries:
            if len(buffer) < cap:
                buffer.append(entry)
            else:  # the training server is down or slow: a new sample replaces a random one (O(1), not a resample)
                buffer[self._rng.randrange(cap)] = entry
                self._count("dropped", 1)
        if self._flusher is None or self._flusher.done():
            with contextlib.suppress(RuntimeError):  # no running loop (a unit test calling hooks directly)
                self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def _flush_loop(self) -> None:
        while self._buffer:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def flush(self) -> int:
        """Upload the buffered samples (at most `max_sample_size`, drawn at random); the number accepted."""
        batch, self._buffer = self._buffer, []
        if not batch:
            return 0
        if len(batch) > self.max_sample_size:
            self._count("dropped", len(batch) - self.max_sample_size)
            batch = self._rng.sample(batch, self.max_sample_size)
        url = f"{self.training_url}/add_training_data_bulk"
        try:
            async with asyncio.timeout(self.training_timeout):
                async with self._client().post(
                    url, data=msgspec.json.encode({"entries": batch}), headers={"content-type": "application/json"}
                ) as resp:
                    detail = await resp.read()
                    if resp.status >= 300:
                        raise PredictorUnavailable("error", f"answered {resp.status}: {detail[:300]!r}")
        except (TimeoutError, aiohttp.ClientError, OSError, PredictorUnavailable) as e:
            self._count("dropped", len(batch))
            self._upload_log.warning(
                "upload", "training samples not uploaded to %s (%d dropped): %s", url, len(batch), e
            )
            return 0
        self._count("sent", len(batch))
        return len(batch)

    def _count(self, outcome: str, n: int) -> None:
        if outcome == "sent":
            self.sent += n
        else:
            self.dropped += n
        if self.on_samples is not None:
            self.on_samples(outcome, n)

    async def aclose(self) -> None:
        self._closed = True
        flusher, self._flusher = self._flusher, None
        await cancel_and_wait(flusher)
        if self._buffer:  # a last upload, briefly: shutdown must not wait on a hung training server
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.flush()
        if self._session is not None:
            await self._session.close()
            self._session = None
