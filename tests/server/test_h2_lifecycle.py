"""The HTTP/2 transport's connection lifecycle, over real loopback sockets: the handshake is bounded
(connection preface, the client's SETTINGS, its ACK of ours), a silent peer is probed with PING and
dropped if it stays silent (its streams released), a live idle connection is kept, and frames on
streams that are already closed are answered as RFC 9113 §5.1 / §6.1 say."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import TerminationCause
from llmepp.server import h2
from llmepp.server.extproc import ExtProcServicer
from llmepp.server.h2 import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    WINDOW_UPDATE,
    H2ExtProcServer,
    create_h2_server,
)
from llmepp.server.tls import ServingCert
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, request_body, request_headers, response_body, response_headers
from .test_h2 import RawClient, frame, grpc_msg, open_stream

NO_ERROR, PROTOCOL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED = 0, 1, 4, 5
BODY = b'{"model": "m", "prompt": "hello"}'
Frames = list[tuple[int, int, int, bytes]]


@pytest.fixture
async def server() -> AsyncIterator[tuple[H2ExtProcServer, FakeDirector, EppMetrics]]:
    director = FakeDirector(list(ENDPOINTS))
    metrics = EppMetrics()
    settings = Settings()
    srv = create_h2_server(ExtProcServicer(director, metrics, settings), settings, address="127.0.0.1:0")
    await srv.start()
    yield srv, director, metrics
    await srv.stop(None)


@pytest.fixture
def short_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2, "HANDSHAKE_TIMEOUT", 0.3, raising=False)


@pytest.fixture
def short_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2, "HANDSHAKE_TIMEOUT", 0.2, raising=False)
    monkeypatch.setattr(h2, "KEEPALIVE_TIME", 0.3, raising=False)
    monkeypatch.setattr(h2, "KEEPALIVE_TIMEOUT", 1.0, raising=False)  # generous: a loaded test machine


def parse(data: bytes) -> Frames:
    out = []
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + n]))
        data = data[9 + n :]
    return out


def goaway_code(frames: Frames) -> int | None:
    codes = [struct.unpack(">I", p[4:8])[0] for kind, _, _, p in frames if kind == GOAWAY]
    return codes[-1] if codes else None


async def until_closed(reader: asyncio.StreamReader, within: float = 5.0) -> Frames:
    """Everything the server sends until it closes the connection (fails if it does not `within` seconds)."""
    return parse(await asyncio.wait_for(reader.read(), within))


async def drain(c: RawClient, seconds: float) -> Frames:
    """The frames that arrive within `seconds` (PINGs answered, like any live client)."""
    out: Frames = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            f = await asyncio.wait_for(c.frame(), left)
        except TimeoutError:
            break
        out.append(f)
        if f[0] == PING and not f[1] & 1:
            c.send(frame(PING, 1, 0, f[3]))
    return out


async def answered(c: RawClient) -> None:
    """A PING round trip: everything sent before it has been processed."""
    c.send(frame(PING, 0, 0, b"probe---"))
    while True:
        kind, flags, _, payload = await c.frame()
        assert kind != GOAWAY, payload
        if kind == PING and flags & 1 and payload == b"probe---":
            return


async def released(director: FakeDirector) -> None:
    for _ in range(200):
        if not director.inflight:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still in flight: {director.inflight}")


# -- 1 and 2: the handshake is bounded --------------------------------------------------------------------------
@pytest.mark.parametrize("sent", [b"", PREFACE[:10]], ids=["nothing", "half-a-preface"])
async def test_a_connection_without_a_preface_is_closed_after_the_handshake_timeout(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], short_handshake: None, sent: bytes
) -> None:
    srv, _, metrics = server
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(sent)
    started = asyncio.get_running_loop().time()
    out = await until_closed(reader)
    assert asyncio.get_running_loop().time() - started >= 0.25
    assert goaway_code(out) == SETTINGS_TIMEOUT
    assert not srv.connections
    kinds = {"kind": "h2_handshake_timeout"}
    assert metrics.registry.get_sample_value("llm_d_epp_extproc_protocol_errors_total", kinds) == 1
    writer.close()


async def test_settings_never_acknowledged_is_settings_timeout(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], short_handshake: None
) -> None:
    """RFC 9113 §6.5.3: the client sent its preface and SETTINGS, even a stream, but never ACKs ours."""
    srv, director, _ = server
    c = await RawClient.connect(srv.port, ack=False)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    out = await until_closed(c.reader)
    assert goaway_code(out) == SETTINGS_TIMEOUT
    await released(director)
    assert not srv.connections
    c.close()


async def test_a_preface_not_followed_by_settings_is_a_protocol_error(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """RFC 9113 §3.4: the preface MUST be followed by a SETTINGS frame; anything else is an invalid preface."""
    srv, _, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(PREFACE + open_stream(1, request_headers()))
    out = await until_closed(reader, 2)
    assert goaway_code(out) == PROTOCOL_ERROR
    writer.close()


async def test_a_client_that_completes_the_handshake_stays_connected(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], short_handshake: None
) -> None:
    srv, _, _ = server
    c = await RawClient.connect(srv.port)  # preface, SETTINGS, ACK of ours
    out = await drain(c, 0.8)
    assert goaway_code(out) is None and len(srv.connections) == 1
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    while len(c.messages(1)) < 2:
        await c.frame()
    c.close()


async def test_tls_handshake_is_bounded_too(short_handshake: None) -> None:
    """On the TLS port a TCP connection that never starts the TLS handshake is dropped as soon."""
    cert = ServingCert.from_settings(Settings())
    settings = Settings()
    srv = create_h2_server(ExtProcServicer(FakeDirector(list(ENDPOINTS)), EppMetrics(), settings), settings,
                           address="127.0.0.1:0", ssl=cert.ssl_context())  # fmt: skip
    await srv.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
    finally:
        await srv.stop(None)
        cert.close()


# -- 3: idle connections: kept while the peer answers, dropped when it is gone --------------------------------
async def test_a_silent_live_connection_is_pinged_and_kept(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], short_keepalive: None
) -> None:
    srv, _, _ = server
    c = await RawClient.connect(srv.port)
    out = await drain(c, 3.0)  # the client answers PINGs and sends nothing else
    pings = [f for f in out if f[0] == PING and not f[1] & 1]
    assert len(pings) >= 2  # probed again and again: nothing closed it in between
    assert goaway_code(out) is None and len(srv.connections) == 1
    await answered(c)
    c.close()


async def test_a_busy_connection_is_not_pinged(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], short_keepalive: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h2, "KEEPALIVE_TIME", 0.5, raising=False)
    srv, _, _ = server
    c = await RawClient.connect(srv.port)
    out: Frames = []
    for _ in range(20):  # 2 s of a frame every 0.1 s (keepalive time 0.5 s)
        c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)))
        out += await drain(c, 0.1)
    assert [f for f in out if f[0] == PING] == []
    c.close()


async def test_a_peer_that_stops_answering_is_dropped_and_its_streams_released(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], short_keepalive: None
) -> None:
    srv, director, metrics = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True), response_headers(200)))
    while len(c.messages(1)) < 3:
        await c.frame()
    assert director.inflight
    out = await until_closed(c.reader, 5)  # the client is gone: it reads, but never answers
    assert any(kind == PING and not flags & 1 for kind, flags, _, _ in out)
    assert goaway_code(out) == NO_ERROR
    await released(director)
    assert director.completions[0].response.cause is TerminationCause.CLIENT_DISCONNECT
    assert not srv.connections
    kinds = {"kind": "h2_keepalive_timeout"}
    assert metrics.registry.get_sample_value("llm_d_epp_extproc_protocol_errors_total", kinds) == 1
    c.close()


# -- 4: frames on closed streams (RFC 9113 §5.1) ---------------------------------------------------------------
async def _closed_both_ways(c: RawClient, sid: int) -> None:
    """A whole exchange on `sid`: the client's END_STREAM, then our trailers (END_STREAM): closed."""
    msgs = (request_headers(), request_body(BODY, eos=True), response_headers(200), response_body(b"{}", eos=True))
    c.send(open_stream(sid, *msgs, end=True))
    while True:
        kind, flags, got, _ = await c.frame()
        assert kind not in (RST_STREAM, GOAWAY)
        if kind == HEADERS and got == sid and flags & END_STREAM:
            return


@pytest.mark.parametrize(
    "again",
    [frame(HEADERS, END_HEADERS, 1, b"\x83\x86"), frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x83\x86")],
    ids=["new-request", "trailers"],
)
async def test_headers_on_a_closed_stream_is_a_connection_error(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], again: bytes
) -> None:
    """A client reusing a closed stream id must not be left waiting for an answer that never comes:
    RFC 9113 §5.1.1 (a new stream's id must exceed every earlier one) makes it PROTOCOL_ERROR."""
    srv, director, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    await _closed_both_ways(c, 1)
    c.send(open_stream(3, request_headers()))  # a neighbour, open: released with the connection
    c.send(again + frame(DATA, 0, 1, grpc_msg(request_headers())))
    out = await until_closed(c.reader, 3)
    assert goaway_code(out) == PROTOCOL_ERROR
    await released(director)
    c.close()


async def test_headers_on_a_skipped_stream_id_is_a_connection_error(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """Opening 5 closes the idle 3 (RFC 9113 §5.1.1): HEADERS on 3 afterwards is PROTOCOL_ERROR."""
    srv, _, _ = server
    c = await RawClient.connect(srv.port)
    c.send(open_stream(5, request_headers()))
    c.send(frame(HEADERS, END_HEADERS, 3, b"\x83\x86"))
    out = await until_closed(c.reader, 3)
    assert goaway_code(out) == PROTOCOL_ERROR
    c.close()


async def test_data_on_a_closed_stream_is_stream_closed_once(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """RFC 9113 §6.1: DATA on a stream neither open nor half-closed (local) is a stream error
    STREAM_CLOSED; what the client sends on it before it sees our RST_STREAM is then ignored."""
    srv, _, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    await _closed_both_ways(c, 1)
    late = frame(DATA, 0, 1, grpc_msg(response_body(b"late")))
    c.send(late + late)
    await answered(c)
    c.send(late)
    await answered(c)
    c.send(open_stream(3, request_headers(), request_body(BODY, eos=True)))  # the connection serves on
    out = await drain(c, 0.3)
    assert goaway_code(out) is None
    assert [(sid, p) for kind, _, sid, p in c.seen if kind == RST_STREAM] == [(1, struct.pack(">I", STREAM_CLOSED))]
    assert len(c.messages(3)) == 2
    c.close()


async def test_what_a_client_sends_on_a_stream_we_reset_is_ignored(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """We end a stream the client has not finished (an ImmediateResponse), with RST_STREAM(NO_ERROR):
    whatever the client had in flight on it (DATA, trailers, WINDOW_UPDATE) is ignored (RFC 9113 §5.1)."""
    srv, _, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    c.send(open_stream(1, request_headers({"x-test-error": "429"}), request_body(BODY, eos=True)))
    await c.until(RST_STREAM, 1)
    mark = len(c.seen)
    c.send(frame(DATA, 0, 1, grpc_msg(response_headers(200))))
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x40"))  # trailers
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 5)) + frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    await answered(c)
    assert [f for f in c.seen[mark:] if f[2] == 1 or f[0] == GOAWAY] == []
    c.close()


async def test_reset_stream_ids_are_forgotten_once_a_ping_confirms_the_client_saw_the_resets(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids of streams we reset are kept only until the client has seen our RST_STREAMs: after 3
    (patched) of them a PING goes out, and its ACK lets them go (RFC 9113 §5.1: PING as the signal,
    no timer). Memory stays bounded on a connection that lives for days."""
    monkeypatch.setattr(h2, "RESET_IDS_SWEEP", 3, raising=False)
    srv, _, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    for sid in (1, 3, 5):
        c.send(open_stream(sid, request_headers({"x-test-error": "429"}), request_body(BODY, eos=True)))
        await c.until(RST_STREAM, sid)
    _, flags, _, opaque = await c.until(PING)
    assert not flags & 1
    c.send(frame(DATA, 0, 1, grpc_msg(response_headers(200))))  # before the ACK: still ignored
    await answered(c)
    assert [f for f in c.seen if f[0] == RST_STREAM and struct.unpack(">I", f[3])[0] == STREAM_CLOSED] == []
    c.send(frame(PING, 1, 0, opaque))
    c.send(frame(DATA, 0, 1, grpc_msg(response_headers(200))))  # after: a closed stream like any other
    _, _, _, code = await c.until(RST_STREAM, 1)
    assert struct.unpack(">I", code)[0] == STREAM_CLOSED
    c.close()


# -- 5: a graceful stop is two GOAWAYs (RFC 9113 §6.8); what is left after the grace is aborted ---------------
MAX_ID = 2**31 - 1


def last_id(payload: bytes) -> int:
    return int(struct.unpack(">I", payload[:4])[0])


async def first_goaway(c: RawClient) -> bytes:
    """The first GOAWAY of a graceful stop (last-stream-id 2^31-1), then its PING: the PING's opaque data."""
    _, _, _, payload = await c.until(GOAWAY)
    assert last_id(payload) == MAX_ID and struct.unpack(">I", payload[4:8])[0] == NO_ERROR
    _, flags, _, opaque = await c.until(PING)
    assert not flags & 1
    return opaque


async def finish(c: RawClient, sid: int) -> None:
    """The rest of an exchange on `sid`, up to our trailers."""
    c.send(frame(DATA, 0, sid, grpc_msg(response_headers(200)) + grpc_msg(response_body(b"{}", eos=True))))
    c.send(frame(DATA, END_STREAM, sid, b""))
    while True:
        kind, flags, got, _ = await c.frame()
        assert kind != RST_STREAM or got != sid
        if kind == HEADERS and got == sid and flags & END_STREAM:
            return


async def test_a_stream_opened_before_the_client_saw_our_goaway_is_served(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """A stream the client opens after our first GOAWAY left, but before it acknowledges the PING that came
    with it (it crossed the GOAWAY in flight), is served, not refused (RFC 9113 §6.8)."""
    srv, director, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    while len(c.messages(1)) < 2:
        await c.frame()
    stopping = asyncio.create_task(srv.stop(grace=5))
    opaque = await first_goaway(c)
    c.send(open_stream(3, request_headers(), request_body(BODY, eos=True)))
    while len(c.messages(3)) < 2:
        await c.frame()
    assert [f for f in c.seen if f[0] == RST_STREAM] == []
    c.send(frame(PING, 1, 0, opaque))
    _, _, _, payload = await c.until(GOAWAY)
    assert last_id(payload) == 3
    await finish(c, 1)
    await finish(c, 3)
    await asyncio.wait_for(stopping, 5)
    assert [d.response.cause for d in director.completions] == [TerminationCause.NATURAL] * 2
    c.close()


async def test_after_the_final_goaway_a_new_stream_is_refused(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    srv, director, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    while len(c.messages(1)) < 2:
        await c.frame()
    stopping = asyncio.create_task(srv.stop(grace=5))
    c.send(frame(PING, 1, 0, await first_goaway(c)))
    _, _, _, payload = await c.until(GOAWAY)
    assert last_id(payload) == 1
    c.send(open_stream(3, request_headers(), request_body(BODY, eos=True)))
    _, _, _, code = await c.until(RST_STREAM, 3)
    assert struct.unpack(">I", code)[0] == 7  # REFUSED_STREAM: the client may retry it elsewhere
    assert len(c.messages(3)) == 0
    await finish(c, 1)  # the open one still completes
    await asyncio.wait_for(stopping, 5)
    assert len(director.completions) == 1
    c.close()


async def test_a_peer_that_never_acks_the_ping_gets_the_final_goaway_after_the_bound(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h2, "GOAWAY_PING_TIMEOUT", 0.3, raising=False)
    srv, _, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    while len(c.messages(1)) < 2:
        await c.frame()
    loop = asyncio.get_running_loop()
    stopping = asyncio.create_task(srv.stop(grace=5))
    await first_goaway(c)
    started = loop.time()
    _, _, _, payload = await c.until(GOAWAY)  # no ACK sent
    assert loop.time() - started >= 0.2
    assert last_id(payload) == 1
    c.send(open_stream(3, request_headers()))
    await c.until(RST_STREAM, 3)
    await finish(c, 1)
    await asyncio.wait_for(stopping, 5)
    assert await until_closed(c.reader, 2) == []  # and the idle connection is closed
    c.close()


async def test_an_idle_connection_is_closed_once_the_ping_is_acked(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    srv, _, _ = server
    c = await RawClient.connect(srv.port)
    stopping = asyncio.create_task(srv.stop(grace=5))
    c.send(frame(PING, 1, 0, await first_goaway(c)))
    out = await until_closed(c.reader, 2)
    assert [last_id(p) for kind, _, _, p in out if kind == GOAWAY] == [0]
    await asyncio.wait_for(stopping, 1)
    c.close()


async def test_a_peer_that_stops_reading_is_aborted_after_the_grace(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """Our writes pile up (the peer reads nothing): a close would wait for them to be flushed, for ever.
    At the end of the grace the connection is aborted, its streams released."""
    srv, director, _ = server
    c = await RawClient.connect(srv.port, window=MAX_ID)
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_ID - 65_535)))
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True), response_headers(200)))
    while len(c.messages(1)) < 3:
        await c.frame()
    chunk = grpc_msg(response_body(b"x" * 1_000_000))
    (conn,) = srv.connections
    assert conn.transport is not None
    for _ in range(200):  # echoed back (streamed), never read
        c.send(frame(DATA, 0, 1, chunk))
        await asyncio.sleep(0.01)
        if conn.transport.get_write_buffer_size() > 100_000:
            break
    assert conn.transport.get_write_buffer_size() > 100_000  # (then it stops reading: see pause_writing)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(srv.stop(grace=0.5), 5)
    assert 0.4 <= loop.time() - started < 3
    await asyncio.sleep(0.05)
    assert not srv.connections
    await released(director)
    assert director.completions[0].response.cause is TerminationCause.CLIENT_DISCONNECT
    c.close()


async def test_the_grace_bounds_the_whole_stop_even_before_the_ping_bound(
    server: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """A grace shorter than GOAWAY_PING_TIMEOUT, a peer that never ACKs: the stop ends with the grace, the
    final GOAWAY (real last stream id) sent just before the connection is dropped."""
    srv, director, _ = server
    c = await RawClient.connect(srv.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    while len(c.messages(1)) < 2:
        await c.frame()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(srv.stop(grace=0.3), 2)
    assert loop.time() - started < h2.GOAWAY_PING_TIMEOUT
    out = c.seen[2:] + await until_closed(c.reader, 2)
    assert [last_id(p) for kind, _, _, p in out if kind == GOAWAY] == [MAX_ID, 1]
    await released(director)
    c.close()
