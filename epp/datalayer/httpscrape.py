"""A minimal HTTP/1.1 keep-alive GET client for scraping /metrics, built on asyncio Protocols.

Why not aiohttp: scraping 100 servers every 50 ms is 2,000 requests/s, and a general
client's per-request machinery (tasks, stream readers, header multidicts, timers) costs
several times the budget (see benchmarks/SCRAPE_COST.md). Here one persistent connection
per endpoint carries one request at a time; the request bytes are built once; a response
is framed by Content-Length, chunked encoding or connection close, and handed back through
a plain callback, so a scrape allocates no Task, Future or timer.

`ScrapeClient.start(now)` sends the request (connecting first when needed) and the result
callback fires exactly once: with the body, or with a `ScrapeError`. Timeouts are driven
from outside: the owner calls `expire()` once `now >= client.deadline` (the collector's
ticker does this, so a hung server costs nothing until then). `fetch()` wraps all of this
in an awaitable for one-off use.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from llmepp.datalayer.endpoint import join_hostport

__all__ = [
    "BadStatus",
    "ConnectFailed",
    "ConnectionClosed",
    "HandshakeFailed",
    "ProtocolViolation",
    "ScrapeClient",
    "ScrapeError",
    "ScrapeTarget",
    "ScrapeTimeout",
]

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


class ScrapeError(Exception):
    """A scrape that produced no page. The message is short, stable text for logs."""


class ConnectFailed(ScrapeError):
    pass


class HandshakeFailed(ConnectFailed):
    """The TCP connection was made but the TLS handshake failed (certificate not trusted or not valid for
    the address, a plain-HTTP server, ...): unlike a refused connection, a server listens on the port."""


class ScrapeTimeout(ScrapeError):
    pass


class ConnectionClosed(ScrapeError):
    pass


class ProtocolViolation(ScrapeError):
    pass


class BadStatus(ScrapeError):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP status {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """Where and how to GET a metrics page."""

    host: str
    port: int
    path: str = "/metrics"
    ssl: ssl.SSLContext | None = None
    request: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        req = (
            f"GET {self.path} HTTP/1.1\r\nHost: {join_hostport(self.host, self.port)}\r\nUser-Agent: llm-epp\r\n"
            "Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n\r\n"
        )
        object.__setattr__(self, "request", req.encode("latin-1"))

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl is not None else "http"
        return f"{scheme}://{join_hostport(self.host, self.port)}{self.path}"


ResultCallback = Callable[[bytes | None, ScrapeError | None], None]

_NO_BODY_STATUS = frozenset((204, 304))


class _Wire(asyncio.Protocol):
    """One TCP (or TLS) connection: frames responses and reports them to its client."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_chunk_raw",
        "_crlf_left",
        "_gzip",
        "_keep_alive",
        "_mode",
        "_parts",
        "_remaining",
        "_status",
        "client",
        "got_bytes",
        "responses",
        "transport",
        "waiting",
    )

    def __init__(self, client: ScrapeClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.waiting = False  # a request was sent and its response is not complete
        self.responses = 0  # completed responses on this connection (reuse => retry once)
        self.got_bytes = False
        self._reset()

    def _reset(self) -> None:
        self._buf = b""  # head bytes until the blank line
        self._mode = 0  # 0 head, 1 content-length, 2 chunked, 3 until close
        self._parts: list[bytes] = []
        self._remaining = 0
        self._chunk_raw = bytearray()
        self._chunk_left = -1  # data bytes left in the current chunk; -1: expecting a size line
        self._crlf_left = 0  # bytes of the CRLF after a chunk's data still to come
        self._status = 0
        self._keep_alive = True
        self._gzip = False

    # -- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting and self._mode == 3 and exc is None:  # body framed by connection close
            self.waiting = False
            self._complete(b"".join(self._parts), keep_alive=False)
            return
        self.client._wire_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        if not self.waiting:
            self._fail(ProtocolViolation("data received with no request outstanding"))
            return
        self.got_bytes = True
        mode = self._mode
        if mode == 1:
            self._parts.append(data)
            self._remaining -= len(data)
            if self._remaining <= 0:
                self._finish_length()
            return
        while mode == 0:  # a head; after an interim 1xx one, the next (a loop: a server may send thousands)
            data = self._buf + data if self._buf else data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self._fail(ProtocolViolation("response head too large"))
                else:
                    self._buf = data
                return
            self._buf = b""
            if not self._parse_head(data[:end]):
                return
            data = data[end + 4 :]
            mode = self._mode
            if mode == 1:
                if data:
                    self._parts.append(data)
                    self._remaining -= len(data)
                if self._remaining <= 0:
                    self._finish_length()
                return
            if mode == 0 and not data:  # interim 1xx response: its successor has not arrived yet
                return
        if mode == 2:
            self._chunk_raw += data
            self._dechunk()
        elif mode == 3:
            self._parts.append(data)
            self._remaining -= len(data)
            if self._remaining < 0:
                self._fail(ProtocolViolation(f"body larger than {MAX_BODY} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    # -- framing -----------------------------------------------------------------------
    def _parse_head(self, head: bytes) -> bool:
        if not head.startswith(b"HTTP/1.") or len(head) < 12 or head[12:13] not in (b" ", b"\r", b""):
            self._fail(ProtocolViolation(f"bad status line {head[:40]!r}"))
            return False
        try:
            status = int(head[9:12])
        except ValueError:
            self._fail(ProtocolViolation(f"bad status line {head[:40]!r}"))
            return False
        if 100 <= status < 200:
            return True  # mode stays 0: the final response head follows
        self._status = status
        lower = head.lower()
        conn = _header(lower, b"connection")
        if head[7:8] == b"0":  # HTTP/1.0: close unless asked otherwise
            self._keep_alive = conn is not None and b"keep-alive" in conn
        else:
            self._keep_alive = conn is None or b"close" not in conn
        enc = _header(lower, b"content-encoding")
        if enc is not None and enc not in (b"identity", b""):
            if enc not in (b"gzip", b"x-gzip"):
                self._fail(ProtocolViolation(f"unsupported content-encoding {enc[:20]!r}"))
                return False
            self._gzip = True
        te = _header(lower, b"transfer-encoding")
        if status in _NO_BODY_STATUS:
            self._mode = 1
            self._remaining = 0
        elif te is not None and te.endswith(b"chunked"):
            self._mode = 2
        else:
            cl = _header(lower, b"content-length")
            if cl is None:
                self._mode = 3
                self._keep_alive = False
                self._remaining = MAX_BODY
            else:
                try:
                    n = int(cl)
                except ValueError:
                    n = -1
                if n < 0 or n > MAX_BODY:
                    self._fail(ProtocolViolation(f"bad content-length {cl[:20]!r}"))
                    return False
                self._mode = 1
                self._remaining = n
        return True

    def _finish_length(self) -> None:
        parts = self._parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        keep = self._keep_alive
        if self._remaining < 0:  # more bytes than announced: the stream is out of sync
            body = body[: len(body) + self._remaining]
            keep = False
        self.waiting = False
        self._complete(body, keep)

    def _dechunk(self) -> None:
        """Decode as much of the buffered chunked body as has arrived (any split is fine)."""
        raw = self._chunk_raw
        pos = 0
        total = self._remaining
        while True:
            if self._crlf_left:  # the CRLF that ends a chunk's data, possibly split across reads
                avail = len(raw) - pos
                if avail <= 0:
                    break
                need = self._crlf_left
                take = min(avail, need)
                if raw[pos : pos + take] != b"\r\n"[2 - need : 2 - need + take]:
                    self._fail(ProtocolViolation("chunk not followed by CRLF"))
                    return
                pos += take
                self._crlf_left -= take
                continue
            if self._chunk_left < 0:  # size line
                line_start = pos
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    if len(raw) - pos > 1024:
                        self._fail(ProtocolViolation("bad chunk size line"))
                        return
                    break
                try:
                    size = int(bytes(raw[pos:eol]).split(b";", 1)[0].strip(), 16)
                except ValueError:
                    size = -1
                if size < 0:
                    self._fail(ProtocolViolation("bad chunk size line"))
                    return
                pos = eol + 2
                if size == 0:
                    # Last chunk: skip optional trailers up to the blank line.
                    if raw[pos : pos + 2] == b"\r\n":
                        pos += 2
                    else:
                        end = raw.find(b"\r\n\r\n", pos)
                        if end < 0 and len(raw) - pos > MAX_HEAD:  # held to the limit of a head
                            self._fail(ProtocolViolation("chunked trailers too large"))
                            return
                        if end < 0 or len(raw) - pos < 2:
                            pos = line_start  # trailers incomplete: re-read the last-chunk line later
                            break
                        pos = end + 4
                    extra = len(raw) - pos
                    self.waiting = False
                    self._complete(b"".join(self._parts), self._keep_alive and extra == 0)
                    return
                total += size
                if total > MAX_BODY:
                    self._fail(ProtocolViolation(f"body larger than {MAX_BODY} bytes"))
                    return
                self._chunk_left = size
            avail = len(raw) - pos
            if avail <= 0:
                break
            take = min(avail, self._chunk_left)
            self._parts.append(bytes(raw[pos : pos + take]))
            pos += take
            self._chunk_left -= take
            if self._chunk_left:
                break
            self._chunk_left = -1
            self._crlf_left = 2
        self._remaining = total
        del raw[:pos]

    def _complete(self, body: bytes, keep_alive: bool) -> None:
        status, gz = self._status, self._gzip
        self._reset()
        self.responses += 1
        if not keep_alive and self.transport is not None:
            self.transport.close()
        if gz:
            body, problem = _gunzip(body)
            if problem:
                self.client._wire_done(self, None, ProtocolViolation(problem), keep_alive)
                return
        if status != 200:
            self.client._wire_done(self, None, BadStatus(status), keep_alive)
        else:
            self.client._wire_done(self, body, None, keep_alive)

    def _fail(self, err: ScrapeError) -> None:
        self.waiting = False
        self._reset()
        if self.transport is not None:
            self.transport.close()
        self.client._wire_done(self, None, err, False)


def _gunzip(data: bytes) -> tuple[bytes, str]:
    """Inflate a gzip body, every member of it (RFC 1952 allows several back to back), and what is
    wrong with it ("" if nothing). MAX_BODY holds for the page itself: a few KB of gzip can inflate
    to gigabytes."""
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            inflate = zlib.decompressobj(31)
            part = inflate.decompress(data, MAX_BODY + 1 - size)
            parts.append(part)
            size += len(part)
            if size > MAX_BODY:
                return b"", f"gzip body larger than {MAX_BODY} bytes decompressed"
            if not inflate.eof:
                return b"", "corrupt gzip body"  # truncated
            data = inflate.unused_data
            if not data:
                break
    except zlib.error:
        return b"", "corrupt gzip body"  # e.g. bytes after a member that start no member
    return parts[0] if len(parts) == 1 else b"".join(parts), ""


def _header(lower_head: bytes, name: bytes) -> bytes | None:
    """Value of header `name` in a lower-cased response head (status line first), stripped."""
    i = lower_head.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    end = lower_head.find(b"\r\n", start)
    return lower_head[start : end if end >= 0 else len(lower_head)].strip()


class ScrapeClient:
    """Scrapes one target over a persistent connection, one request at a time."""

    __slots__ = ("_connecting", "_retried", "_wire", "busy", "closed", "deadline", "on_result", "target", "timeout")

    def __init__(self, target: ScrapeTarget, on_result: ResultCallback, timeout: float = 1.0) -> None:
        self.target = target
        self.on_result = on_result
        self.timeout = timeout
        self.busy = False
        self.closed = False
        self.deadline = 0.0
        self._wire: _Wire | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._retried = False

    def start(self, now: float | None = None) -> None:
        """Begin one scrape. Must not be called while `busy`. Needs a running loop."""
        if self.busy or self.closed:
            raise RuntimeError("scrape already in progress" if self.busy else "client closed")
        self.busy = True
        self._retried = False
        self.deadline = (time.monotonic() if now is None else now) + self.timeout
        wire = self._wire
        if wire is None or wire.transport is None or wire.transport.is_closing():
            self._connect()
        else:
            self._send(wire)

    def expire(self) -> None:
        """Give up on the scrape in progress: report ScrapeTimeout and drop the connection."""
        if not self.busy:
            return
        self._drop_connection()
        self._report(None, ScrapeTimeout(f"no response within {self.timeout:g}s"))

    def close(self) -> None:
        """Stop for good: no further callbacks."""
        self.closed = True
        self.busy = False
        self._drop_connection()

    async def fetch(self) -> bytes:
        """One scrape as an awaitable (tests, one-off use); raises ScrapeError."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        saved = self.on_result

        def done(body: bytes | None, err: ScrapeError | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                assert body is not None
                fut.set_result(body)

        self.on_result = done
        timer = loop.call_later(self.timeout, self.expire)
        try:
            self.start()
            return await fut
        finally:
            timer.cancel()
            if self.busy:  # the awaiting task was cancelled: abandon the scrape silently
                self.busy = False
                self._drop_connection()
            self.on_result = saved

    # -- internals ---------------------------------------------------------------------
    def _send(self, wire: _Wire) -> None:
        assert wire.transport is not None
        wire.waiting = True
        wire.got_bytes = False
        wire.transport.write(self.target.request)

    def _connect(self) -> None:
        self._drop_connection()
        self._connecting = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        t = self.target
        loop = asyncio.get_running_loop()
        wire = _Wire(self)
        try:
            await loop.create_connection(
                lambda: wire, t.host, t.port, ssl=t.ssl, server_hostname=t.host if t.ssl else None
            )
        except asyncio.CancelledError:
            # expire() or close() already reported / silenced this scrape. The connection may
            # have completed just before the cancellation landed: don't leak it.
            if wire.transport is not None:
                wire.transport.close()
            raise
        except Exception as e:  # OSError, ssl.SSLError, gaierror...: never let a scrape crash
            self._connecting = None
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            # A TLS error comes after the TCP connection was accepted: something listens there.
            kind = HandshakeFailed if isinstance(e, ssl.SSLError) else ConnectFailed
            self._report(None, kind(f"connect to {join_hostport(t.host, t.port)} failed: {reason}"))
            return
        self._connecting = None
        if self.closed or not self.busy:
            assert wire.transport is not None
            wire.transport.close()
            return
        self._wire = wire
        self._send(wire)

    def _drop_connection(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        wire = self._wire
        if wire is not None:
            self._wire = None
            wire.waiting = False
            if wire.transport is not None:
                wire.transport.close()

    def _report(self, body: bytes | None, err: ScrapeError | None) -> None:
        if not self.busy:
            return
        self.busy = False
        if not self.closed:
            self.on_result(body, err)

    def _wire_done(self, wire: _Wire, body: bytes | None, err: ScrapeError | None, keep: bool) -> None:
        if wire is not self._wire:
            return  # a connection we already gave up on
        if not keep:
            self._wire = None
        self._report(body, err)

    def _wire_lost(self, wire: _Wire, exc: Exception | None) -> None:
        if wire is not self._wire:
            return
        self._wire = None
        if not wire.waiting or not self.busy:
            return  # an idle keep-alive connection closed by the server: reconnect next time
        wire.waiting = False
        # The server may close an idle keep-alive connection just as we reuse it: retry once
        # on a fresh connection if it had served before and this response never started.
        if wire.responses > 0 and not wire.got_bytes and not self._retried:
            self._retried = True
            self._connect()
            return
        reason = f": {exc}" if exc is not None else ""
        self._report(None, ConnectionClosed(f"connection closed before the response ended{reason}"))
