"""The keep-alive HTTP/1.1 scrape client against real servers, plus framing under random splits."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.datalayer.httpscrape import (
    MAX_BODY,
    BadStatus,
    ConnectFailed,
    ConnectionClosed,
    ProtocolViolation,
    ScrapeClient,
    ScrapeError,
    ScrapeTarget,
    ScrapeTimeout,
    _Wire,
)
from llmepp.plugins.datasources.metrics_source import MetricsDataSource

from .fakes import TEST_CERT, TEST_KEY, MetricsServer, RawServer, ok_response
from .vllm_page import vllm_page

HOST = "127.0.0.41"
PAGE = vllm_page()


def client(port: int, path: str = "/metrics", timeout: float = 1.0, host: str = HOST) -> ScrapeClient:
    return ScrapeClient(ScrapeTarget(host, port, path), lambda body, err: None, timeout)


async def test_keep_alive_reuses_one_connection() -> None:
    server = await RawServer(HOST, lambda c, r: ([ok_response(PAGE)], False)).start()
    try:
        c = client(server.port)
        for _ in range(5):
            assert await c.fetch() == PAGE
        assert (server.connections, server.requests) == (1, 5)
    finally:
        await server.stop()


async def test_aiohttp_server_content_length_and_chunked() -> None:
    server = await MetricsServer(HOST).start()
    try:
        c = client(server.port)
        assert await c.fetch() == server.page
        server.mode = "chunked"
        assert await c.fetch() == server.page
        assert await c.fetch() == server.page
        server.mode = "status"
        with pytest.raises(BadStatus, match="503"):
            await c.fetch()
        server.mode = "ok"
        assert await c.fetch() == server.page  # the connection survived the 503
    finally:
        await server.stop()


async def test_chunked_with_extensions_and_trailers() -> None:
    body = b"vllm:num_requests_waiting 3\n" * 50
    parts = [body[:7], body[7:700], body[700:]]
    chunked = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in parts)
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\nX-Trailer: y\r\n\r\n"
    server = await RawServer(HOST, lambda c, r: ([resp[i : i + 11] for i in range(0, len(resp), 11)], False)).start()
    try:
        c = client(server.port)
        assert await c.fetch() == body
        assert await c.fetch() == body
        assert server.connections == 1
    finally:
        await server.stop()


async def test_body_until_close_and_connection_close_header() -> None:
    def respond(conn: int, req: int) -> tuple[list[bytes], bool]:
        if conn == 0:
            return [b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n", PAGE[:1000], PAGE[1000:]], True
        return [ok_response(PAGE, "Connection: close\r\n")], True

    server = await RawServer(HOST, respond).start()
    try:
        c = client(server.port)
        assert await c.fetch() == PAGE
        assert await c.fetch() == PAGE
        assert await c.fetch() == PAGE
        assert server.connections == 3
    finally:
        await server.stop()


async def test_interim_100_and_gzip() -> None:
    zipped = gzip.compress(PAGE)

    def respond(conn: int, req: int) -> tuple[list[bytes], bool]:
        if req == 0:
            return [b"HTTP/1.1 100 Continue\r\n\r\n" + ok_response(PAGE)], False
        if req == 1:
            return [ok_response(zipped, "Content-Encoding: gzip\r\n")], False
        return [ok_response(b"not gzip at all", "Content-Encoding: gzip\r\n")], False

    server = await RawServer(HOST, respond).start()
    try:
        c = client(server.port)
        assert await c.fetch() == PAGE
        assert await c.fetch() == PAGE
        with pytest.raises(ProtocolViolation, match="gzip"):
            await c.fetch()
    finally:
        await server.stop()


async def test_server_closing_a_reused_connection_is_retried_once() -> None:
    # Connection 0 answers once, then closes on the next request without answering (its
    # keep-alive timer fired just as the request arrived). The client retries once.
    def respond(conn: int, req: int) -> tuple[list[bytes], bool]:
        if conn == 0 and req == 1:
            return [], True
        return [ok_response(PAGE)], False

    server = await RawServer(HOST, respond).start()
    try:
        c = client(server.port)
        assert await c.fetch() == PAGE
        assert await c.fetch() == PAGE
        assert server.connections == 2
    finally:
        await server.stop()


async def test_fresh_connection_closed_without_answer_is_an_error() -> None:
    server = await RawServer(HOST, lambda c, r: ([], True)).start()
    try:
        with pytest.raises(ConnectionClosed):
            await client(server.port).fetch()
        assert server.connections == 1  # no retry on a connection that never served
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("response", "error", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", ConnectionClosed, "before the response ended"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", ProtocolViolation, "bad status line"),
        (b"HTTP/1.1 2xx OK\r\nContent-Length: 0\r\n\r\n", ProtocolViolation, "bad status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", ProtocolViolation, "content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ProtocolViolation, "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", ProtocolViolation, "CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 0\r\n\r\n", ProtocolViolation, "br"),
    ],
)
async def test_broken_responses(response: bytes, error: type[ScrapeError], message: str) -> None:
    server = await RawServer(HOST, lambda c, r: ([response], True)).start()
    try:
        with pytest.raises(error, match=message):
            await client(server.port).fetch()
    finally:
        await server.stop()


async def test_extra_bytes_after_the_body_drop_the_connection() -> None:
    server = await RawServer(HOST, lambda c, r: ([ok_response(b"a 1\n") + b"GARBAGE"], False)).start()
    try:
        c = client(server.port)
        assert await c.fetch() == b"a 1\n"
        assert await c.fetch() == b"a 1\n"
        assert server.connections == 2
    finally:
        await server.stop()


async def test_refused() -> None:
    server = await RawServer(HOST, lambda c, r: ([], True)).start()
    port = server.port
    await server.stop()
    with pytest.raises(ConnectFailed, match=f"{HOST}:{port}"):
        await client(port).fetch()


async def test_hung_server_times_out_without_blocking_the_loop() -> None:
    server = await MetricsServer(HOST).start()
    server.mode = "hang"
    try:
        c = client(server.port, timeout=0.2)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(ScrapeTimeout):
            await c.fetch()
        elapsed = time.monotonic() - started
        t.cancel()
        assert 0.19 <= elapsed < 1.0
        assert ticks >= 5  # the loop kept running while the scrape hung (~20 ticks expected)
        server.mode = "ok"
        assert await c.fetch() == server.page  # fresh connection after the timeout
    finally:
        await server.stop()


async def test_callback_api_reports_exactly_once_and_close_silences() -> None:
    server = await MetricsServer(HOST).start()
    results: list[tuple[bytes | None, ScrapeError | None]] = []
    try:
        c = ScrapeClient(ScrapeTarget(HOST, server.port), lambda b, e: results.append((b, e)), 1.0)
        c.start()
        assert c.busy
        with pytest.raises(RuntimeError):
            c.start()  # never two at once
        for _ in range(200):
            if results:
                break
            await asyncio.sleep(0.005)
        assert results == [(server.page, None)] and not c.busy
        server.mode = "hang"
        c.start()
        c.close()
        await asyncio.sleep(0.1)
        assert len(results) == 1
        with pytest.raises(RuntimeError):
            c.start()
    finally:
        await server.stop()


async def test_cancelled_fetch_abandons_the_scrape() -> None:
    server = await MetricsServer(HOST).start()
    server.mode = "hang"
    try:
        c = client(server.port)
        task = asyncio.create_task(c.fetch())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not c.busy
        server.mode = "ok"
        assert await c.fetch() == server.page
    finally:
        await server.stop()


# -- TLS ----------------------------------------------------------------------------------
def server_tls() -> ssl.SSLContext:
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_text(TEST_CERT)
        (Path(d) / "k.pem").write_text(TEST_KEY)
        ctx.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))
    return ctx


async def test_https_insecure_and_verified(tmp_path: Path) -> None:
    host = "127.0.0.43"
    server = await MetricsServer(host, ssl_context=server_tls()).start()
    ca = tmp_path / "ca.pem"
    ca.write_text(TEST_CERT)
    try:
        from llmepp.datalayer.endpoint import EndpointSpec

        spec = EndpointSpec(name="e", address=host, port=server.port)
        insecure = MetricsDataSource("s", MetricsDataSource.Params(scheme="https"))
        verified = MetricsDataSource(
            "s", MetricsDataSource.Params(scheme="https", insecure_skip_verify=False, ca_cert_path=str(ca))
        )
        strict = MetricsDataSource("s", MetricsDataSource.Params(scheme="https", insecure_skip_verify=False))
        for source in (insecure, verified):
            target = source.target_for(spec)
            assert target.url == f"https://{host}:{server.port}/metrics"
            assert await ScrapeClient(target, lambda b, e: None).fetch() == server.page
        with pytest.raises(ConnectFailed, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await ScrapeClient(strict.target_for(spec), lambda b, e: None).fetch()
        plain = ScrapeClient(ScrapeTarget(host, server.port), lambda b, e: None, 0.5)
        with pytest.raises(ScrapeError):
            await plain.fetch()  # http to an https port: never a crash
    finally:
        await server.stop()


# -- framing under arbitrary packet boundaries (pure logic) --------------------------------
class _FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _FakeClient:
    def __init__(self) -> None:
        self.results: list[tuple[bytes | None, ScrapeError | None, bool]] = []

    def _wire_done(self, wire: Any, body: bytes | None, err: ScrapeError | None, keep: bool) -> None:
        self.results.append((body, err, keep))

    def _wire_lost(self, wire: Any, exc: Exception | None) -> None:
        self.results.append((None, ConnectionClosed("lost"), False))


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    body = draw(st.binary(max_size=3000))
    gz = draw(st.booleans())
    wire_body = gzip.compress(body) if gz else body
    headers = "Content-Encoding: gzip\r\n" if gz else ""
    if draw(st.booleans()):
        sizes = draw(st.lists(st.integers(1, 500), max_size=20))
        chunks, pos = [], 0
        for n in sizes:
            if pos >= len(wire_body):
                break
            chunks.append(wire_body[pos : pos + n])
            pos += n
        if pos < len(wire_body):
            chunks.append(wire_body[pos:])
        encoded = b"".join(f"{len(c):X}\r\n".encode() + c + b"\r\n" for c in chunks)
        trailer = draw(st.sampled_from([b"\r\n", b"X-A: b\r\n\r\n"]))
        raw = f"HTTP/1.1 200 OK\r\n{headers}Transfer-Encoding: chunked\r\n\r\n".encode() + encoded + b"0\r\n" + trailer
    else:
        raw = ok_response(wire_body, headers)
    return raw, body


@settings(max_examples=200, deadline=None)
@given(responses(), st.lists(st.integers(1, 400), max_size=40))
def test_wire_frames_any_split(resp: tuple[bytes, bytes], cuts: list[int]) -> None:
    raw, body = resp
    fake = _FakeClient()
    wire = _Wire(fake)  # type: ignore[arg-type]
    wire.connection_made(_FakeTransport())  # type: ignore[arg-type]
    for _ in range(2):  # two responses on one connection
        wire.waiting = True
        pos = 0
        for n in [*cuts, len(raw)]:
            if pos >= len(raw):
                break
            wire.data_received(raw[pos : pos + n])
            pos += n
    assert fake.results == [(body, None, True), (body, None, True)]


def _frame(raw: bytes, split: int) -> list[tuple[bytes | None, ScrapeError | None, bool]]:
    """`raw` fed to one connection in `split`-byte pieces: what the client is told."""
    fake = _FakeClient()
    wire = _Wire(fake)  # type: ignore[arg-type]
    wire.connection_made(_FakeTransport())  # type: ignore[arg-type]
    wire.waiting = True
    for i in range(0, len(raw), split):
        wire.data_received(raw[i : i + split])
    return fake.results


def test_gzip_body_is_held_to_the_size_limit_once_decompressed() -> None:
    # 16 KiB on the wire that inflate past MAX_BODY: the limit applies to the page, not to its
    # compressed form (a gzip bomb was decompressed whole: 1 GiB of memory from a 1 MiB response).
    bomb = gzip.compress(b"0" * (MAX_BODY + 1), 9)
    assert len(bomb) < 64 * 1024
    [(body, err, _)] = _frame(ok_response(bomb, "Content-Encoding: gzip\r\n"), 1 << 16)
    assert body is None and isinstance(err, ProtocolViolation) and "larger than" in str(err)
    at_limit = b"a 1\n" * (MAX_BODY // 4)
    [(body, err, keep)] = _frame(ok_response(gzip.compress(at_limit, 1), "Content-Encoding: gzip\r\n"), 1 << 16)
    assert (body, err, keep) == (at_limit, None, True)
    truncated = gzip.compress(PAGE)[:-12]
    [(body, err, _)] = _frame(ok_response(truncated, "Content-Encoding: gzip\r\n"), 1 << 16)
    assert body is None and isinstance(err, ProtocolViolation) and "corrupt gzip" in str(err)


@pytest.mark.parametrize("gz", [False, True])
def test_chunked_split_at_every_byte(gz: bool) -> None:
    body = PAGE[:3000]
    wire_body = gzip.compress(body) if gz else body
    parts = [wire_body[:1], wire_body[1:700], wire_body[700:]]
    raw = (
        b"HTTP/1.1 200 OK\r\n" + (b"Content-Encoding: gzip\r\n" if gz else b"") + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(f"{len(p):x};x=y\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\nX-T: 1\r\n\r\n"
    )  # fmt: skip
    assert _frame(raw, 1) == [(body, None, True)]


@pytest.mark.parametrize(
    ("head", "body", "message"),
    [
        (f"Content-Length: {MAX_BODY + 1}\r\n", b"", "bad content-length"),
        (
            "Transfer-Encoding: chunked\r\n",
            f"{MAX_BODY:x}\r\n".encode() + b"a" * MAX_BODY + b"\r\n1\r\n",
            "larger than",
        ),
        ("", b"a" * (MAX_BODY + 1), "larger than"),  # HTTP/1.0-style: until the connection closes
    ],
)
def test_a_page_over_the_size_limit_is_refused_in_every_framing(head: str, body: bytes, message: str) -> None:
    raw = f"HTTP/1.1 200 OK\r\n{head}\r\n".encode() + body
    [(page, err, keep)] = _frame(raw, 1 << 20)
    assert page is None and isinstance(err, ProtocolViolation) and message in str(err)
    assert not keep


def test_any_number_of_interim_responses() -> None:
    # Each interim 1xx head was parsed by a recursive data_received call: 50 KB of them in one read
    # raised RecursionError out of the protocol callback (asyncio logs a fatal error, drops the connection).
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" * 2000 + ok_response(b"a 1\n")
    assert _frame(raw, 1 << 18) == [(b"a 1\n", None, True)]
    assert _frame(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" * 3 + ok_response(b"a 1\n"), 1) == [
        (b"a 1\n", None, True)
    ]


async def test_endless_chunked_trailers_are_refused_not_buffered() -> None:
    # After the last chunk ("0\r\n") a server kept sending trailer bytes with no blank line: every
    # read was appended to the chunk buffer (20 MB held, past MAX_BODY, rescanned on each read) until
    # the scrape timed out. Trailers are held to the head limit, as a response head is.
    trailer = b"X-Filler: " + b"y" * (20 * 1024 * 1024)
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na 1\n\r\n0\r\n" + trailer
    server = await RawServer(HOST, lambda c, r: ([resp], False)).start()
    try:
        started = time.monotonic()
        with pytest.raises(ProtocolViolation, match="trailer"):
            await client(server.port, timeout=5.0).fetch()
        assert time.monotonic() - started < 2.0
    finally:
        await server.stop()
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na 1\n\r\n0\r\n" + b"y" * (MAX_BODY + 1)
    (page, err, keep), *_ = _frame(raw, 1 << 16)  # (the fake transport keeps feeding after the close)
    assert page is None and isinstance(err, ProtocolViolation) and "trailer" in str(err) and not keep


async def test_a_gzip_body_of_several_members_is_read_whole() -> None:
    # A gzip body may be several members back to back (RFC 1952; a compressor flushing per write
    # emits one per flush; Go's reader reads them all). Only the first member was inflated: the page
    # was silently cut short and the families after the cut read as missing (their old values kept).
    cut = PAGE.index(b"vllm:num_requests_waiting")
    multi = gzip.compress(PAGE[:cut]) + gzip.compress(PAGE[cut:]) + gzip.compress(b"")
    server = await RawServer(HOST, lambda c, r: ([ok_response(multi, "Content-Encoding: gzip\r\n")], False)).start()
    try:
        assert await client(server.port).fetch() == PAGE
    finally:
        await server.stop()
    # Bytes after a member that are no gzip member are a corrupt body, not ignored.
    [(body, err, _)] = _frame(ok_response(gzip.compress(PAGE) + b"garbage!", "Content-Encoding: gzip\r\n"), 1 << 16)
    assert body is None and isinstance(err, ProtocolViolation) and "corrupt gzip" in str(err)
    # The size limit holds over all the members together.
    half = b"0" * (MAX_BODY // 2 + 1)
    [(body, err, _)] = _frame(ok_response(gzip.compress(half) * 2, "Content-Encoding: gzip\r\n"), 1 << 16)
    assert body is None and isinstance(err, ProtocolViolation) and "larger than" in str(err)
