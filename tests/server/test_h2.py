"""The HTTP/2 transport at frame level: flow control, PING, GOAWAY, resets, bad input."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import TerminationCause
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
    SETTINGS,
    WINDOW_UPDATE,
    H2ExtProcServer,
    create_h2_server,
)
from llmepp.server.stream import ExtProcStream, Pending
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, request_body, request_headers, response_body, response_headers

BODY = json.dumps({"model": "m", "prompt": "x" * 3000}).encode()


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) << 8 | kind) + bytes((flags,)) + struct.pack(">I", sid) + payload


def grpc_msg(msg: pb.ProcessingRequest) -> bytes:
    raw = msg.SerializeToString()
    return b"\x00" + struct.pack(">I", len(raw)) + raw


class RawClient:
    """Frames in, frames out; request header blocks are opaque to the server anyway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.data: dict[int, bytearray] = {}
        self.seen: list[tuple[int, int, int, bytes]] = []  # every frame read, in order

    @classmethod
    async def connect(cls, port: int, window: int = 65_535, ack: bool = True) -> RawClient:
        """Preface and SETTINGS; with `ack`, the server's SETTINGS read and acknowledged, as a client must."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        c.send(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, window)))
        if ack:
            await c.until(SETTINGS)
            c.send(frame(SETTINGS, 0x1, 0, b""))
        return c

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), 5)
        sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        if head[3] == DATA:
            self.data.setdefault(sid, bytearray()).extend(payload)
        self.seen.append((head[3], head[4], sid, payload))
        return head[3], head[4], sid, payload

    async def until(self, kind: int, sid: int | None = None) -> tuple[int, int, int, bytes]:
        while True:
            f = await self.frame()
            if f[0] == kind and (sid is None or f[2] == sid):
                return f

    def messages(self, sid: int) -> list[pb.ProcessingResponse]:
        buf, out = bytes(self.data.get(sid, b"")), []
        while len(buf) >= 5:
            n = struct.unpack(">I", buf[1:5])[0]
            if len(buf) < 5 + n:
                break
            out.append(pb.ProcessingResponse.FromString(buf[5 : 5 + n]))
            buf = buf[5 + n :]
        return out

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def h2() -> AsyncIterator[tuple[H2ExtProcServer, FakeDirector, EppMetrics]]:
    director = FakeDirector(list(ENDPOINTS))
    metrics = EppMetrics()
    settings = Settings()
    server = create_h2_server(ExtProcServicer(director, metrics, settings), settings, address="127.0.0.1:0")
    await server.start()
    yield server, director, metrics
    await server.stop(None)


def open_stream(sid: int, *msgs: pb.ProcessingRequest, end: bool = False) -> bytes:
    # Any header block will do: the server never decodes it.
    out = frame(HEADERS, END_HEADERS, sid, b"\x83\x86")
    body = b"".join(grpc_msg(m) for m in msgs)
    return out + frame(DATA, END_STREAM if end else 0, sid, body)


async def test_send_side_flow_control_and_window_updates(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, _, _ = h2
    c = await RawClient.connect(server.port, window=100)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    sent = 0
    while sent < 100:
        kind, _, sid, payload = await c.frame()
        if kind == DATA:
            assert sid == 1
            sent += len(payload)
    assert sent == 100  # never more than the stream window
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 10_000_000)))
    while len(c.messages(1)) < 2:
        await c.frame()
    first, body = c.messages(1)
    assert first.WhichOneof("response") == "request_headers"
    assert body.request_body.response.body_mutation.streamed_response.body == BODY
    c.close()


async def test_connection_window_is_honoured(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, _, _ = h2
    c = await RawClient.connect(server.port, window=10_000_000)
    # The connection window stays at the 65,535 default: a 70 kB answer must stop there.
    big = json.dumps({"model": "m", "prompt": "y" * 70_000}).encode()
    c.send(open_stream(1, request_headers(), request_body(big, eos=True)))
    got = 0
    while got < 65_535:
        kind, _, _, payload = await c.frame()
        if kind == DATA:
            got += len(payload)
    assert got == 65_535
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1_000_000)))
    while len(c.messages(1)) < 3:
        await c.frame()
    chunks = [m.request_body.response.body_mutation.streamed_response.body for m in c.messages(1)[1:]]
    assert b"".join(chunks) == big
    c.close()


async def test_ping_is_acked(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, _, _ = h2
    c = await RawClient.connect(server.port)
    c.send(frame(PING, 0, 0, b"12345678"))
    _kind, flags, _, payload = await c.until(PING)
    assert flags & 0x1 and payload == b"12345678"
    c.close()


async def test_reset_stream_releases_the_request(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, director, metrics = h2
    c = await RawClient.connect(server.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True), response_headers(200)))
    while len(c.messages(1)) < 3:
        await c.frame()
    assert director.inflight
    c.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))  # CANCEL: the client went away
    for _ in range(100):
        if director.completions:
            break
        await asyncio.sleep(0.01)
    (done,) = director.completions
    assert done.response.cause is TerminationCause.CLIENT_DISCONNECT
    assert metrics.registry.get_sample_value("llm_d_epp_extproc_streams_inflight") == 0
    c.close()


async def test_connection_loss_releases_every_stream(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, director, metrics = h2
    c = await RawClient.connect(server.port, window=10_000_000)
    for sid in (1, 3, 5):
        c.send(open_stream(sid, request_headers(), request_body(BODY, eos=True)))
    while sum(len(c.messages(s)) for s in (1, 3, 5)) < 6:
        await c.frame()
    c.close()
    for _ in range(100):
        if len(director.completions) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(director.completions) == 3 and director.inflight == {}
    assert metrics.registry.get_sample_value("llm_d_epp_extproc_streams_inflight") == 0


async def test_half_close_ends_with_grpc_ok(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, director, _ = h2
    c = await RawClient.connect(server.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    c.send(frame(DATA, 0, 1, grpc_msg(response_headers(200)) + grpc_msg(response_body(b"{}", eos=True))))
    c.send(frame(DATA, END_STREAM, 1, b""))
    await c.until(HEADERS, 1)  # response headers
    _kind, flags, _, block = await c.until(HEADERS, 1)  # trailers
    assert flags & END_STREAM and b"grpc-status" in block and block.endswith(b"\x010")
    assert len(c.messages(1)) == 4
    assert director.completions[0].response.cause is TerminationCause.NATURAL
    c.close()


async def test_split_frames_and_partial_messages(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, _, _ = h2
    c = await RawClient.connect(server.port, window=10_000_000)
    payload = grpc_msg(request_headers()) + grpc_msg(request_body(BODY, eos=True))
    wire = frame(HEADERS, END_HEADERS, 1, b"\x83") + b"".join(
        frame(DATA, 0, 1, payload[i : i + 7]) for i in range(0, len(payload), 7)
    )
    for i in range(0, len(wire), 5):  # and TCP segments cut anywhere
        c.send(wire[i : i + 5])
        await c.writer.drain()
    while len(c.messages(1)) < 2:
        await c.frame()
    assert c.messages(1)[1].request_body.response.body_mutation.streamed_response.body == BODY
    c.close()


async def test_padded_data_frames(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, _, _ = h2
    c = await RawClient.connect(server.port, window=10_000_000)
    payload = grpc_msg(request_headers()) + grpc_msg(request_body(BODY, eos=True))
    c.send(frame(HEADERS, END_HEADERS, 1, b"\x83") + frame(DATA, 0x8, 1, bytes((3,)) + payload + b"\x00\x00\x00"))
    while len(c.messages(1)) < 2:
        await c.frame()
    c.close()


async def test_oversized_message_ends_the_stream(h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics]) -> None:
    server, _, _ = h2
    c = await RawClient.connect(server.port)
    too_big = server.max_message + 1
    c.send(frame(HEADERS, END_HEADERS, 1, b"\x83") + frame(DATA, 0, 1, b"\x00" + struct.pack(">I", too_big)))
    _, flags, _, block = await c.until(HEADERS, 1)
    assert flags & END_STREAM and b"grpc-status\x018" in block
    _, _, _, code = await c.until(RST_STREAM, 1)
    assert code == struct.pack(">I", 0)
    c.close()


async def test_bad_preface_is_goaway() -> None:
    settings = Settings()
    server = create_h2_server(ExtProcServicer(FakeDirector(list(ENDPOINTS)), EppMetrics(), settings), settings,
                              address="127.0.0.1:0")  # fmt: skip
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
    kinds = {}
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        kinds[data[3]] = data[9 : 9 + length]
        data = data[9 + length :]
    assert struct.unpack(">I", kinds[GOAWAY][4:8])[0] == 1  # PROTOCOL_ERROR
    writer.close()
    await server.stop(None)


async def test_graceful_stop_lets_open_streams_finish() -> None:
    settings = Settings()
    director = FakeDirector(list(ENDPOINTS))
    server = create_h2_server(ExtProcServicer(director, EppMetrics(), settings), settings, address="127.0.0.1:0")
    await server.start()
    c = await RawClient.connect(server.port, window=10_000_000)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
    while len(c.messages(1)) < 2:
        await c.frame()
    stopping = asyncio.create_task(server.stop(grace=5))
    _kind, _, _, payload = await c.until(GOAWAY)
    assert struct.unpack(">II", payload[:8]) == (2**31 - 1, 0)  # RFC 9113 §6.8: first, "stop opening"
    _, flags, _, opaque = await c.until(PING)
    assert not flags & 1
    c.send(frame(PING, 1, 0, opaque))
    _kind, _, _, payload = await c.until(GOAWAY)  # then the real last stream id
    assert struct.unpack(">II", payload[:8]) == (1, 0)
    # A new stream after the final GOAWAY is refused; the open one still completes.
    c.send(open_stream(3, request_headers()))
    _, _, _sid, _ = await c.until(RST_STREAM, 3)
    c.send(frame(DATA, 0, 1, grpc_msg(response_headers(200)) + grpc_msg(response_body(b"{}", eos=True))))
    c.send(frame(DATA, END_STREAM, 1, b""))
    await asyncio.wait_for(stopping, 5)
    assert director.completions[0].response.cause is TerminationCause.NATURAL
    c.close()


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(WINDOW_UPDATE, 0, 0, b""), 6),  # length other than 4: FRAME_SIZE_ERROR
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), 1),  # increment 0: PROTOCOL_ERROR
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 0)), 1),  # MAX_FRAME_SIZE below 16384
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31)), 3),  # window past 2^31-1: FLOW_CONTROL_ERROR
        (frame(PING, 0, 0, b"short"), 6),
        (frame(RST_STREAM, 0, 0, b"\x00\x00\x00\x00"), 1),  # on stream 0
        (frame(DATA, 0x08, 1, b"\x05ab"), 1),  # padding past the end
    ],
)
async def test_malformed_frames_are_connection_errors_that_are_counted(
    h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics], bad: bytes, code: int
) -> None:
    server, director, metrics = h2
    c = await RawClient.connect(server.port)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)) + bad)
    _, _, _, payload = await c.until(GOAWAY)
    assert struct.unpack(">I", payload[4:8])[0] == code
    for _ in range(100):  # the routed request is released with the connection
        if not director.inflight:
            break
        await asyncio.sleep(0.01)
    assert director.inflight == {}
    assert (
        metrics.registry.get_sample_value("llm_d_epp_extproc_protocol_errors_total", {"kind": "h2_malformed_frame"})
        == 1
    )
    c.close()


async def test_header_blocks_follow_a_smaller_peer_hpack_table(
    h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """A peer that shrinks its HPACK table (Envoy's `hpack_table_size: 0` on the epp cluster, at the
    start or mid-connection) requires a dynamic table size update at the start of the next header block
    it decodes (RFC 7541 §4.2); nghttp2 fails the whole connection (COMPRESSION_ERROR) without one."""
    server, _, _ = h2
    c = await RawClient.connect(server.port, window=10_000_000)
    c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 1, 0)))  # SETTINGS_HEADER_TABLE_SIZE = 0
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True), end=True))
    _, _, _, headers_block = await c.until(HEADERS, 1)
    _, flags, _, trailers_block = await c.until(HEADERS, 1)
    assert flags & END_STREAM
    # Every block the peer may decode first after the change starts with a size update (001xxxxx) to ≤ 0.
    assert headers_block[0] == 0x20, headers_block
    assert trailers_block[0] == 0x20, trailers_block
    # A trailers-only answer (a stream refused before any message) too, after a second change mid-connection.
    c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 1, 0)))
    c.send(frame(HEADERS, END_HEADERS, 3, b"\x83\x86") + frame(DATA, END_STREAM, 3, b"\x01\x00\x00\x00\x01x"))
    _, flags, _, only_block = await c.until(HEADERS, 3)
    assert flags & END_STREAM and only_block[0] == 0x20, only_block
    c.close()


async def test_a_stream_whose_answers_are_stuck_gets_no_more_receive_window(
    h2: tuple[H2ExtProcServer, FakeDirector, EppMetrics],
) -> None:
    """A peer that keeps sending on a stream but grants no window for its answers: the answers queue up
    here, so the stream's receive window is not replenished meanwhile (else the queue grows without bound:
    every response chunk is echoed). Once the peer reads, the queue drains and the window follows."""
    server, _, _ = h2
    c = await RawClient.connect(server.port, window=100)
    c.send(open_stream(1, request_headers(), request_body(BODY, eos=True), response_headers(200)))
    chunk = grpc_msg(response_body(b"x" * 60_000))
    sent = 0
    while sent < 12 * 1024 * 1024:  # past half the 16 MiB window the server advertises
        c.send(frame(DATA, 0, 1, chunk * 16))
        sent += len(chunk) * 16
    c.send(frame(PING, 0, 0, b"probe---"))  # its ACK: everything sent before it has been read
    while not (c.seen and c.seen[-1][0] == PING and c.seen[-1][1] & 1):
        await c.frame()
    assert not [f for f in c.seen if f[0] == WINDOW_UPDATE and f[2] == 1]
    (conn,) = server.connections
    queued = sum(len(p) for _, p in conn.streams[1].pending)
    assert queued > 10 * 1024 * 1024
    # The peer reads: everything queued goes out, and the stream's window is replenished.
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65_535)))
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2**31 - 1 - 100)))
    await c.until(WINDOW_UPDATE, 1)
    assert not conn.streams[1].pending
    c.close()


class _BuggyStream(ExtProcStream):
    """A stream whose message handling and its fallback both fail (a bug), on a marked request."""

    def handle(self, kind, msg):  # type: ignore[no-untyped-def]
        if kind == "request_headers":
            bug = {h.key: h.raw_value for h in msg.request_headers.headers.headers}.get("x-test-bug")
            if bug == b"late":  # after a routing wait
                return Pending(self._fail_later())
            if bug:
                raise RuntimeError("bug in handling")
        return super().handle(kind, msg)

    async def _fail_later(self) -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("bug in routing")

    def fallback(self, msg):  # type: ignore[no-untyped-def]
        raise RuntimeError("bug in the fallback")


@pytest.mark.parametrize("when", ["at-once", "late"])
async def test_a_failing_stream_fails_alone(when: str) -> None:
    """A stream whose handling fails past every fallback, answered eagerly within the read or after a
    routing wait, ends with grpc-status INTERNAL (not left unanswered); the connection, and the other
    requests Envoy multiplexes on it, go on."""
    director = FakeDirector(list(ENDPOINTS))
    settings = Settings()
    ctx = ExtProcServicer(director, EppMetrics(), settings)
    server = create_h2_server(ctx, settings, address="127.0.0.1:0", stream_factory=lambda push: _BuggyStream(ctx, push))
    await server.start()
    try:
        c = await RawClient.connect(server.port, window=10_000_000)
        c.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
        while len(c.messages(1)) < 2:
            await c.frame()
        c.send(open_stream(3, request_headers({"x-test-bug": when})))
        _, flags, _, block = await c.until(HEADERS, 3)
        assert flags & END_STREAM and b"grpc-status" in block and b"\x0213" in block  # INTERNAL
        # The routed request on the same connection still gets its response answered.
        c.send(frame(DATA, 0, 1, grpc_msg(response_headers(200)) + grpc_msg(response_body(b"{}", eos=True))))
        while len(c.messages(1)) < 4:
            kind, _, _, _ = await c.frame()
            assert kind != GOAWAY
        c.close()
    finally:
        await server.stop(None)
