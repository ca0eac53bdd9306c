"""The HTTP/2 transport against RFC 9113, driven directly (no socket): a `_Connection` on a recording
transport. Connection errors are GOAWAY with the RFC's code, stream errors RST_STREAM, and whatever a
peer sends, nothing the server writes breaks the protocol and every stream is released exactly once."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmepp.observability.metrics import EppMetrics
from llmepp.server import h2
from llmepp.server.extproc import ExtProcServicer
from llmepp.server.h2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    OUR_MAX_FRAME,
    OUR_STREAM_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    H2ExtProcServer,
)
from llmepp.server.stream import ExtProcStream
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, request_body, request_headers, response_body, response_headers
from .test_h2 import frame, grpc_msg, open_stream

PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 1, 3, 5, 6, 7
BODY = b'{"model": "m", "prompt": "hello"}'
SLOW = {"x-test-delay-ms": "1"}  # routing that waits (FakeDirector): the stream's task is pending


class Transport(asyncio.Transport):
    """Records what the server writes; closing it ends the connection as asyncio would."""

    def __init__(self, conn: h2._Connection) -> None:
        super().__init__()
        self.conn = conn
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        assert not self.closing, "write after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Peer:
    """One connection, the client side written by hand; `frames()` parses what the server sent."""

    def __init__(self, max_body_bytes: int = 16 * 1024 * 1024) -> None:
        self.director = FakeDirector(list(ENDPOINTS))
        settings_ = Settings(max_body_bytes=max_body_bytes)
        servicer = ExtProcServicer(self.director, EppMetrics(), settings_)
        self.finished: list[int] = []
        self.opened: list[ExtProcStream] = []

        def new_stream(push: Any) -> ExtProcStream:
            stream = Counted(servicer, push)
            stream.finish_log = self.finished
            self.opened.append(stream)
            return stream

        self.server = H2ExtProcServer(servicer, settings_, host="127.0.0.1", port=0, stream_factory=new_stream)
        self.conn = h2._Connection(self.server)
        self.transport = Transport(self.conn)
        self.conn.connection_made(self.transport)
        self.read = 0

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """The frames written since the last call: (type, flags, stream, payload)."""
        out, buf = [], bytes(self.transport.written[self.read :])
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            out.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9 : 9 + n]))
            self.read += 9 + n
            buf = buf[9 + n :]
        return out

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0.001)
            if not any(s.task for s in self.conn.streams.values()):
                return


class Counted(ExtProcStream):
    """A stream that records its finish() calls in its connection's shared `finish_log` (its own name: the
    stream reads and sets `finished`, so a shared list there made every stream look finished once one was)."""

    __slots__ = ("finish_log",)
    finish_log: list[int]

    def finish(self) -> None:
        self.finish_log.append(id(self))
        super().finish()


def goaway_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    for kind, _, _, payload in frames:
        if kind == GOAWAY:
            return int(struct.unpack(">I", payload[4:8])[0])
    return None


def resets(frames: list[tuple[int, int, int, bytes]]) -> dict[int, int]:
    return {sid: struct.unpack(">I", p)[0] for kind, _, sid, p in frames if kind == RST_STREAM}


def messages(frames: list[tuple[int, int, int, bytes]], sid: int) -> list[pb.ProcessingResponse]:
    buf, out = b"".join(p for kind, _, s, p in frames if kind == DATA and s == sid), []
    while len(buf) >= 5:
        n = struct.unpack(">I", buf[1:5])[0]
        if len(buf) < 5 + n:
            break
        out.append(pb.ProcessingResponse.FromString(buf[5 : 5 + n]))
        buf = buf[5 + n :]
    return out


def connected(**kw: Any) -> Peer:
    peer = Peer(**kw)
    peer.send(PREFACE + frame(SETTINGS, 0, 0, b""))
    peer.frames()
    return peer


def window_update(sid: int, inc: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", inc))


def settings_frame(ident: int, value: int) -> bytes:
    return frame(SETTINGS, 0, 0, struct.pack(">HI", ident, value))


def raw_header(length: int, kind: int, flags: int, sid: int) -> bytes:
    return struct.pack(">I", length << 8 | kind) + bytes((flags,)) + struct.pack(">I", sid)


# -- connection errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "code"),
    [
        # A header block is contiguous: any other frame, or another stream's, inside it.
        (frame(HEADERS, 0, 1, b"\x83") + frame(PING, 0, 0, b"12345678"), PROTOCOL_ERROR),
        (frame(HEADERS, 0, 1, b"\x83") + frame(HEADERS, END_HEADERS, 3, b"\x83"), PROTOCOL_ERROR),
        (frame(HEADERS, 0, 1, b"\x83") + frame(CONTINUATION, END_HEADERS, 3, b"\x86"), PROTOCOL_ERROR),
        (frame(CONTINUATION, END_HEADERS, 1, b"\x86"), PROTOCOL_ERROR),  # no header block open
        # Past our SETTINGS_MAX_FRAME_SIZE: refused on the frame header, its payload never buffered.
        (raw_header(OUR_MAX_FRAME + 1, DATA, 0, 1), FRAME_SIZE_ERROR),
        (window_update(0, 2**31 - 1), FLOW_CONTROL_ERROR),  # connection window past 2^31-1
        (settings_frame(2, 2), PROTOCOL_ERROR),  # ENABLE_PUSH neither 0 nor 1
        # A new INITIAL_WINDOW_SIZE that takes an open stream's window past 2^31-1.
        (window_update(1, 2**31 - 1 - 65_535) + settings_frame(4, 2**31 - 1), FLOW_CONTROL_ERROR),
        (frame(HEADERS, END_HEADERS, 2, b"\x83"), PROTOCOL_ERROR),  # even: a server-initiated id
        (frame(RST_STREAM, 0, 7, struct.pack(">I", 8)), PROTOCOL_ERROR),  # idle stream
        (window_update(7, 1), PROTOCOL_ERROR),
        (frame(DATA, 0, 7, grpc_msg(request_headers())), PROTOCOL_ERROR),
        (frame(DATA, 0, 4, b""), PROTOCOL_ERROR),
        (frame(PRIORITY, 0, 0, b"\x00\x00\x00\x01\x10"), PROTOCOL_ERROR),
        (frame(PRIORITY, 0, 3, b"\x00\x00\x00\x01"), FRAME_SIZE_ERROR),
        (frame(HEADERS, END_HEADERS | PADDED, 3, b"\x05\x83"), PROTOCOL_ERROR),  # padding past the end
        (frame(HEADERS, END_HEADERS | PADDED, 3, b""), FRAME_SIZE_ERROR),  # no room for Pad Length
        (frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 3, b"\x00\x00"), FRAME_SIZE_ERROR),  # nor for priority
        (frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 3, b"\x01\x00\x00\x00\x01\x10"), PROTOCOL_ERROR),
    ],
    ids=[
        "ping-in-header-block",
        "headers-in-header-block",
        "other-stream-continuation",
        "stray-continuation",
        "frame-too-large",
        "connection-window-overflow",
        "enable-push-2",
        "initial-window-overflows-stream",
        "even-stream-headers",
        "rst-idle",
        "window-update-idle",
        "data-idle",
        "data-even-stream",
        "priority-stream-0",
        "priority-length-4",
        "headers-padding-past-end",
        "headers-padded-empty",
        "headers-priority-short",
        "headers-padded-priority-past-end",
    ],
)
async def test_connection_errors(bad: bytes, code: int) -> None:
    peer = connected()
    peer.send(open_stream(1, request_headers(SLOW)) + bad)
    assert goaway_code(peer.frames()) == code
    assert peer.conn.closed and peer.transport.closing
    await peer.settle()
    assert not peer.conn.streams and peer.server.context.active_streams == 0
    assert len(peer.finished) == len(set(peer.finished)) == 1


@pytest.mark.parametrize(
    "good",
    [
        frame(PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10"),  # priority of an idle stream: allowed, ignored
        frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 3, b"\x02\x00\x00\x00\x01\x10\x83\x00\x00"),
        frame(HEADERS, END_HEADERS | PADDED, 3, b"\x00"),  # an empty block, no padding
        frame(RST_STREAM, 0, 1, struct.pack(">I", 8)) + window_update(1, 1),  # a closed stream: ignored
    ],
    ids=[
        "priority-idle-stream",
        "headers-padded-priority",
        "headers-padded-empty-block",
        "window-update-closed-stream",
    ],
)
async def test_frames_that_are_not_errors(good: bytes) -> None:
    peer = connected()
    peer.send(open_stream(1, request_headers()) + good + frame(PING, 0, 0, b"12345678"))
    out = peer.frames()
    assert goaway_code(out) is None and out[-1][0] == PING


async def test_header_block_in_continuation_frames_split_anywhere() -> None:
    block = b"\x83\x86\x84\x41\x02gw"
    wire = (
        frame(HEADERS, 0, 1, block[:2])
        + frame(CONTINUATION, 0, 1, block[2:4])
        + frame(CONTINUATION, END_HEADERS, 1, block[4:])
        + frame(DATA, 0, 1, grpc_msg(request_headers()) + grpc_msg(request_body(BODY, eos=True)))
        # END_STREAM on a HEADERS frame whose block continues: the trailers.
        + frame(HEADERS, END_STREAM, 1, b"\x40")
        + frame(CONTINUATION, END_HEADERS, 1, b"\x01a\x01b")
    )
    for cut in range(1, len(wire)):
        peer = connected()
        peer.send(wire[:cut])
        peer.send(wire[cut:])
        await peer.settle()
        out = peer.frames()
        assert goaway_code(out) is None, cut
        assert [m.WhichOneof("response") for m in messages(out, 1)] == ["request_headers", "request_body"], cut
        assert out[-1][:3] == (HEADERS, END_HEADERS | END_STREAM, 1), cut  # grpc-status trailers
        assert peer.conn.continuation == 0 and not peer.conn.streams


# -- stream errors -----------------------------------------------------------------------------------------
async def test_data_after_end_stream_is_stream_closed_and_releases_the_request() -> None:
    peer = connected()
    peer.send(open_stream(1, request_headers(SLOW), request_body(BODY, eos=True), end=True))
    peer.send(open_stream(3, request_headers()))
    assert peer.conn.streams[1].task is not None  # routing pending: the stream is still open on our side
    peer.send(frame(DATA, 0, 1, grpc_msg(response_headers(200))))
    out = peer.frames()
    assert resets(out) == {1: STREAM_CLOSED} and goaway_code(out) is None
    await peer.settle()
    assert messages(peer.frames(), 1) == []  # nothing answered on the reset stream, routing cancelled
    assert peer.director.inflight == {} and len(peer.finished) == 1
    assert list(peer.conn.streams) == [3]  # the neighbour is untouched


@pytest.mark.parametrize(
    ("second", "code"),
    [
        (frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x40"), STREAM_CLOSED),  # after the client's END_STREAM
        (frame(HEADERS, END_HEADERS, 3, b"\x83"), PROTOCOL_ERROR),  # a second block that is not trailers
    ],
    ids=["after-end-stream", "not-trailers"],
)
async def test_headers_on_an_open_stream_that_are_not_trailers(second: bytes, code: int) -> None:
    peer = connected()
    peer.send(open_stream(1, request_headers(SLOW), request_body(BODY, eos=True), end=True))
    peer.send(open_stream(3, request_headers()))
    peer.send(second)
    sid = struct.unpack(">I", second[5:9])[0]
    out = peer.frames()
    assert resets(out) == {sid: code} and goaway_code(out) is None
    assert sid not in peer.conn.streams and len(peer.finished) == 1
    await peer.settle()
    assert peer.director.inflight == {}


async def test_nothing_is_sent_after_our_end_of_stream() -> None:
    # A 413 ends stream 1 while its answer waits for window; the client, not knowing yet, sends on.
    peer = Peer(max_body_bytes=100)
    peer.send(PREFACE + settings_frame(4, 10))
    peer.send(open_stream(1, request_headers(), request_body(b"x" * 200)))
    peer.send(frame(DATA, 0, 1, grpc_msg(response_headers(200)) + grpc_msg(response_body(b"{}", eos=True))))
    peer.send(window_update(1, 1_000_000))
    out = [f for f in peer.frames() if f[2] == 1]
    assert [(kind, flags) for kind, flags, _, _ in out][-2:] == [(HEADERS, END_HEADERS | END_STREAM), (RST_STREAM, 0)]
    (answer,) = messages(out, 1)
    assert answer.immediate_response.status.code == 413
    assert not peer.conn.streams and len(peer.finished) == 1


async def test_stream_window_past_the_limit_is_a_stream_error() -> None:
    peer = connected()
    peer.send(open_stream(1, request_headers()) + open_stream(3, request_headers()))
    peer.send(window_update(3, 2**31 - 1))
    out = peer.frames()
    assert resets(out) == {3: FLOW_CONTROL_ERROR} and goaway_code(out) is None
    assert list(peer.conn.streams) == [1]


async def test_streams_past_the_advertised_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2, "OUR_MAX_STREAMS", 2)
    peer = connected()
    peer.send(open_stream(1, request_headers()) + open_stream(3, request_headers()) + open_stream(5, request_headers()))
    out = peer.frames()
    assert resets(out) == {5: REFUSED_STREAM} and goaway_code(out) is None
    assert sorted(peer.conn.streams) == [1, 3] and len(peer.opened) == 2
    peer.send(frame(DATA, 0, 5, grpc_msg(request_body(BODY))))  # in flight before our reset: ignored
    assert goaway_code(peer.frames()) is None


class _CountedStreams(dict[int, Any]):
    walks = 0

    def values(self) -> Any:
        _CountedStreams.walks += 1
        return super().values()


async def test_settings_walk_the_streams_only_when_a_change_can_unblock_them() -> None:
    """An empty or unchanged SETTINGS frame walked (and copied) every open stream: O(streams) per 9-byte
    frame, 0.55 s of event loop for 18 KB of them over 20,000 streams."""
    peer = connected()
    peer.send(open_stream(1, request_headers()) + open_stream(3, request_headers()))
    counted = _CountedStreams(peer.conn.streams)
    peer.conn.streams = counted
    _CountedStreams.walks = 0
    peer.send(frame(SETTINGS, 0, 0, b"") * 10 + settings_frame(4, 65_535) * 10 + settings_frame(5, 16_384) * 10)
    assert _CountedStreams.walks == 0 and goaway_code(peer.frames()) is None
    peer.send(settings_frame(4, 70_000))  # a bigger window: every stream's grows, and may send again
    assert _CountedStreams.walks == 2 and all(st.send_window == 70_000 for st in counted.values())


async def test_a_settings_flood_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alternating INITIAL_WINDOW_SIZE values must each adjust every stream (RFC 9113 §6.9.2): past
    MAX_PEER_SETTINGS frames the connection is closed with ENHANCE_YOUR_CALM."""
    monkeypatch.setattr(h2, "MAX_PEER_SETTINGS", 5)
    peer = connected()  # its handshake SETTINGS is the first
    peer.send(b"".join(settings_frame(4, 65_535 + (i & 1)) for i in range(4)))
    assert goaway_code(peer.frames()) is None
    peer.send(settings_frame(4, 65_535))
    assert goaway_code(peer.frames()) == h2.ENHANCE_YOUR_CALM


async def test_streams_after_goaway_are_refused() -> None:
    """RFC 9113 §6.8: GOAWAY(2^31-1) and a PING; streams the client opens before it ACKs are served; then
    GOAWAY with the last stream id, after which new streams are refused."""
    peer = connected()
    peer.send(open_stream(1, request_headers()))
    peer.conn.goaway()
    out = peer.frames()
    goaways = [struct.unpack(">I", p[:4])[0] for kind, _, _, p in out if kind == GOAWAY]
    pings = [p for kind, flags, _, p in out if kind == PING and not flags & 1]
    assert goaways == [2**31 - 1] and len(pings) == 1
    peer.send(open_stream(3, request_headers()))
    assert resets(peer.frames()) == {} and sorted(peer.conn.streams) == [1, 3]
    peer.send(frame(PING, 1, 0, pings[0]))
    out = peer.frames()
    assert [struct.unpack(">I", p[:4])[0] for kind, _, _, p in out if kind == GOAWAY] == [3]
    peer.send(open_stream(5, request_headers()))
    assert resets(peer.frames()) == {5: REFUSED_STREAM}
    # §6.8: a later GOAWAY may not name a higher last stream id. Before, the refused stream 5 raised it.
    peer.send(frame(PING, 0, 1, b"x" * 8))  # a PING on a stream: a connection error
    assert [struct.unpack(">I", p[:4])[0] for kind, _, _, p in peer.frames() if kind == GOAWAY] == [3]


async def test_a_reset_queued_behind_data_is_noted_when_it_goes_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 9113 §5.1: frames the client sent before it saw our RST_STREAM are ignored, until the ACK of a PING
    sent after the reset. A reset queued behind DATA waiting for window goes out later: its sweep PING must
    follow it. Before, the PING left at once, its ACK ended the grace before the reset was even out, and the
    client's in-flight trailers then killed the connection (GOAWAY PROTOCOL_ERROR)."""
    monkeypatch.setattr(h2, "RESET_IDS_SWEEP", 1)  # a sweep PING per reset (1,024 in production)
    peer = Peer(max_body_bytes=100)
    peer.send(PREFACE + settings_frame(4, 10))  # a 10-byte stream window: our answers on stream 1 queue
    peer.frames()
    # A body past max_body_bytes: a 413 ends stream 1, its trailers and RST_STREAM queued behind the answer.
    peer.send(open_stream(1, request_headers(), request_body(b"x" * 200)))
    out = peer.frames()
    assert [k for k, _, sid, _ in out if k in (RST_STREAM, PING) and sid in (0, 1)] == []
    peer.send(window_update(1, 1_000_000))
    out = peer.frames()
    kinds = [kind for kind, flags, sid, _ in out if (kind, sid) == (RST_STREAM, 1) or (kind == PING and not flags & 1)]
    assert kinds == [RST_STREAM, PING]
    (ping,) = [p for kind, flags, _, p in out if kind == PING and not flags & 1]
    peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x40"))  # sent before the client saw the reset
    peer.send(frame(PING, 1, 0, ping))
    assert goaway_code(peer.frames()) is None and not peer.conn.closed


# -- flow control of what we receive -------------------------------------------------------------------------
async def test_window_is_withheld_while_routing_waits() -> None:
    """Messages that arrive while routing is pending wait in the backlog: the client's window must
    not be refilled for them (grpc.aio does not read then either), or memory grows without bound."""
    peer = connected()
    peer.send(open_stream(1, request_headers(SLOW), request_body(BODY, eos=True)))
    assert peer.conn.streams[1].task is not None
    chunk = grpc_msg(response_body(b"y" * 1_000_000))
    credit, sent = OUR_STREAM_WINDOW - peer.conn.streams[1].recv_unacked, 0
    while len(chunk) <= credit:  # a compliant client: never past the window
        peer.send(frame(DATA, 0, 1, chunk))
        sent += 1
        credit -= len(chunk)
        credit += sum(struct.unpack(">I", p)[0] for kind, _, s, p in peer.frames() if kind == WINDOW_UPDATE and s == 1)
        assert sent < 40, "the window keeps being refilled while nothing is consumed"
    assert len(peer.conn.streams[1].backlog) == sent
    await peer.settle()  # routed: the backlog is answered and the window given back
    peer.send(window_update(0, 2**30) + window_update(1, 2**30))
    out = peer.frames()
    assert len(messages(out, 1)) == 2 + sent
    assert sum(struct.unpack(">I", p)[0] for kind, _, s, p in out if kind == WINDOW_UPDATE and s == 1) > 0
    assert not peer.conn.streams[1].backlog


async def test_the_backlog_behind_a_pending_route_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty 5-byte gRPC messages while routing waits were decoded and queued up to the 16 MiB window:
    ~24x that held in message objects. Past MAX_BACKLOG_COST the stream ends (RESOURCE_EXHAUSTED), the routing
    step cancelled and the request released."""
    monkeypatch.setattr(h2, "MAX_BACKLOG_COST", 50 * h2.BACKLOG_MESSAGE_COST)
    peer = connected()
    peer.send(open_stream(1, request_headers(SLOW), request_body(BODY, eos=True)))
    assert peer.conn.streams[1].task is not None
    peer.send(frame(DATA, 0, 1, b"\x00\x00\x00\x00\x00" * 50))
    assert len(peer.conn.streams[1].backlog) == 50 and goaway_code(peer.frames()) is None
    peer.send(frame(DATA, 0, 1, b"\x00\x00\x00\x00\x00"))
    out = peer.frames()
    assert 1 not in peer.conn.streams and goaway_code(out) is None
    assert any(kind == HEADERS and s == 1 and b"bytes of messages while routing" in p for kind, _, s, p in out)
    await peer.settle()
    assert peer.director.inflight == {}


async def test_an_unread_upload_behind_a_pending_route_is_held_not_cut_off() -> None:
    """A body no parser reads (passthrough) streams in while the request is routed on its headers (e.g. queued
    by flow control). The backlog was capped at 4096 messages: 5,000 chunks of 1 KiB, a third of the stream
    window, ended the stream (RESOURCE_EXHAUSTED, a 500 for the client). Now the window bounds them."""
    peer = connected()
    peer.send(frame(HEADERS, END_HEADERS, 1, b"\x83\x86"))
    peer.send(frame(DATA, 0, 1, grpc_msg(request_headers(SLOW, path="/passthrough"))))
    assert peer.conn.streams[1].task is not None
    chunk = grpc_msg(request_body(b"a" * 1024))
    for _ in range(5000):
        peer.send(frame(DATA, 0, 1, chunk))
    assert len(peer.conn.streams[1].backlog) == 5000 and not resets(peer.frames())
    await peer.settle()  # routed: the chunks are echoed in order
    peer.send(window_update(0, 2**30) + window_update(1, 2**30))
    out = messages(peer.frames(), 1)
    assert len(out) == 1 + 5000
    assert all(m.request_body.response.body_mutation.streamed_response.body == b"a" * 1024 for m in out[1:])


async def test_data_past_the_stream_window_is_a_flow_control_error() -> None:
    peer = connected()
    peer.send(open_stream(1, request_headers(SLOW), request_body(BODY, eos=True)) + open_stream(3, request_headers()))
    chunk = frame(DATA, 0, 1, grpc_msg(response_body(b"y" * 1_000_000)))
    for _ in range(17):  # 17 MB into a 16 MiB window
        peer.send(chunk)
    out = peer.frames()
    assert resets(out) == {1: FLOW_CONTROL_ERROR} and goaway_code(out) is None
    assert 1 not in peer.conn.streams and 3 in peer.conn.streams
    await peer.settle()
    assert peer.director.inflight == {} and len(peer.finished) == 1


# -- any input ------------------------------------------------------------------------------------------------------
MESSAGES = [
    grpc_msg(request_headers()),
    grpc_msg(request_headers(SLOW)),
    grpc_msg(request_headers(eos=True)),
    grpc_msg(request_body(BODY, eos=True)),
    grpc_msg(request_body(b"z" * 300)),  # past max_body_bytes: a 413 ends the stream
    grpc_msg(response_headers(200)),
    grpc_msg(response_body(b"{}", eos=True)),
    grpc_msg(request_body(BODY, eos=True))[:7],  # a message cut short
    b"\x01\x00\x00\x00\x01x",  # a compressed message
    b"\x00\xff\xff\xff\xff",  # an impossible length
]
OPEN = st.sampled_from([1, 3, 5])  # streams a client may open, in any order
SIDS = st.sampled_from([1, 3, 5, 0, 2])
# Mostly what a client would send on its streams (so that streams get far: routed, answered, blocked on
# flow control, ended by us), with any frame at all mixed in.
stream_frames = st.one_of(
    st.builds(lambda sid, flags: frame(HEADERS, flags, sid, b"\x83\x86"), OPEN,
              st.sampled_from([END_HEADERS, END_HEADERS | END_STREAM])),
    st.builds(lambda sid, flags, msgs: frame(DATA, flags, sid, b"".join(msgs)), OPEN,
              st.sampled_from([0, 0, END_STREAM]), st.lists(st.sampled_from(MESSAGES[:7]), min_size=1, max_size=3)),
    st.builds(window_update, st.sampled_from([0, 1, 3, 5]), st.sampled_from([1, 100, 65_535])),
    st.builds(settings_frame, st.just(4), st.sampled_from([0, 10, 100, 70_000])),  # INITIAL_WINDOW_SIZE
    st.builds(lambda sid: frame(RST_STREAM, 0, sid, struct.pack(">I", 8)), OPEN),
)  # fmt: skip
garbage = st.one_of(
    st.builds(lambda sid, flags, p: frame(DATA, flags, sid, p), SIDS, st.sampled_from([0, END_STREAM]),
              st.sampled_from(MESSAGES)),
    st.builds(lambda sid, pad, p: frame(DATA, PADDED, sid, bytes((pad,)) + p + bytes(min(pad, 3))), SIDS,
              st.integers(0, 4), st.sampled_from(MESSAGES)),
    st.builds(lambda sid, flags: frame(HEADERS, flags, sid, b"\x83\x86"), SIDS,
              st.sampled_from([END_HEADERS, END_HEADERS | END_STREAM, 0, END_STREAM, PADDED | END_HEADERS,
                               PRIORITY_FLAG | END_HEADERS])),
    st.builds(lambda sid, flags: frame(CONTINUATION, flags, sid, b"\x84"), SIDS, st.sampled_from([0, END_HEADERS])),
    st.builds(lambda kind, flags, sid, p: frame(kind, flags, sid, p),
              st.sampled_from([RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, PRIORITY, 5, 0x20]),
              st.integers(0, 255), SIDS, st.binary(max_size=9)),
    st.builds(settings_frame, st.integers(1, 6), st.sampled_from([0, 1, 2, 16383, 16384, 65535, 2**31 - 1, 2**31])),
    st.builds(window_update, SIDS, st.sampled_from([0, 2**31 - 1])),
)  # fmt: skip
any_frame = st.integers(0, 9).flatmap(lambda i: garbage if i == 0 else stream_frames)


class Checker:
    """What the server wrote must itself be valid HTTP/2 towards a client that sent `sent`."""

    def __init__(self, sent: list[bytes]) -> None:
        self.ended: dict[int, str] = {}  # stream → "end" (our END_STREAM) or "reset"
        self.goaway_error = False
        self.data: dict[int, int] = {}
        self.conn_data = 0
        # Upper bounds of what the client allowed: the largest INITIAL_WINDOW_SIZE / MAX_FRAME_SIZE it
        # sent, the sum of its WINDOW_UPDATEs per stream (0: the connection).
        self.initial_window, self.max_frame = 65_535, 16_384
        self.credit: dict[int, int] = {}
        for f in sent:
            kind, sid = f[3], struct.unpack(">I", f[5:9])[0] & 0x7FFFFFFF
            if kind == SETTINGS and len(f) == 15 and not f[4] & 1:
                ident, value = struct.unpack(">HI", f[9:15])
                if ident == 4 and value <= 2**31 - 1:
                    self.initial_window = max(self.initial_window, value)
                elif ident == 5:
                    self.max_frame = max(self.max_frame, value)
            elif kind == WINDOW_UPDATE and len(f) == 13:
                self.credit[sid] = self.credit.get(sid, 0) + (struct.unpack(">I", f[9:13])[0] & 0x7FFFFFFF)

    def check(self, frames: list[tuple[int, int, int, bytes]]) -> None:
        for kind, flags, sid, payload in frames:
            assert not self.goaway_error, "a frame after a GOAWAY with an error"
            if sid:
                state = self.ended.get(sid)
                assert state != "reset", f"{kind} on stream {sid} after our RST_STREAM"
                assert state != "end" or kind == RST_STREAM, f"{kind} on stream {sid} after our END_STREAM"
                if kind == RST_STREAM:
                    self.ended[sid] = "reset"
                elif kind == HEADERS and flags & END_STREAM:
                    self.ended[sid] = "end"
            if kind == DATA:
                assert len(payload) <= self.max_frame
                self.data[sid] = self.data.get(sid, 0) + len(payload)
                self.conn_data += len(payload)
                assert self.data[sid] <= self.credit.get(sid, 0) + self.initial_window, "past the stream window"
                assert self.conn_data <= self.credit.get(0, 0) + 65_535, "past the connection window"
            elif kind == GOAWAY and struct.unpack(">I", payload[4:8])[0]:
                self.goaway_error = True


def with_openings(frames: list[bytes]) -> list[bytes]:
    """`frames`, with the HEADERS that opens a client stream before the first other frame naming it
    (else most sequences end at once with a frame on an idle stream)."""
    out, last = [], 0
    for f in frames:
        kind, sid = f[3], struct.unpack(">I", f[5:9])[0] & 0x7FFFFFFF
        if sid & 1 and sid > last:
            if kind in (DATA, WINDOW_UPDATE, RST_STREAM):
                out.append(frame(HEADERS, END_HEADERS, sid, b"\x83\x86"))
            if kind != PRIORITY:
                last = sid
        out.append(f)
    return out


async def _run(chunks: list[bytes], sent: list[bytes]) -> Peer:
    peer = Peer(max_body_bytes=256)
    checker = Checker(sent)
    for chunk in chunks:
        if peer.transport.closing:
            break
        peer.send(chunk)
        checker.check(peer.frames())
        await asyncio.sleep(0)
    await peer.settle()
    checker.check(peer.frames())
    peer.transport.close()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return peer


@pytest.fixture
def no_errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.ERROR, logger="llmepp"):
        yield caplog


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=st.lists(any_frame, max_size=16), data=st.data())
def test_any_input_split_anywhere(no_errors: pytest.LogCaptureFixture, sent: list[bytes], data: st.DataObject) -> None:
    sent = with_openings(sent)
    wire = PREFACE + frame(SETTINGS, 0, 0, b"") + b"".join(sent)  # the preface ends with SETTINGS (§3.4)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=6)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    no_errors.clear()
    peer = asyncio.run(_run(chunks, sent))
    assert not peer.conn.streams and peer.server.context.active_streams == 0
    assert len(peer.finished) == len(set(peer.finished)) == len(peer.opened)  # each stream released once
    assert peer.director.inflight == {}
    assert not [r for r in no_errors.records if r.levelno >= logging.ERROR], no_errors.text


# -- long bodies -------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 200_000),
    pieces=st.integers(1, 4),
    frame_size=st.sampled_from([1, 7, 5_000, 16_384, 70_000]),
    max_frame=st.sampled_from([16_384, 16_385, 65_536, 1 << 20]),
    window=st.sampled_from([100, 65_535, 1 << 24]),
    credit_first=st.booleans(),
    cuts=st.lists(st.integers(1, 10**6), max_size=5),
)
def test_long_bodies_cross_frames_both_ways_intact(
    size: int, pieces: int, frame_size: int, max_frame: int, window: int, credit_first: bool, cuts: list[int]
) -> None:
    """A long prompt arrives as messages cut across DATA frames and TCP reads anywhere, and goes back as answers
    wider than the client's MAX_FRAME_SIZE: every byte comes back, in order, in frames the client allows."""
    body = json.dumps({"model": "m", "prompt": "p" * size}).encode()
    step = -(-len(body) // pieces)
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    grpc = grpc_msg(request_headers()) + b"".join(
        grpc_msg(request_body(c, eos=i == len(chunks) - 1)) for i, c in enumerate(chunks)
    )
    # Window credit before the body (answers leave at once) or after it (answers wait for it, then leave).
    credit = window_update(0, 1 << 30) + window_update(1, 1 << 30)
    wire = (
        PREFACE
        + frame(SETTINGS, 0, 0, struct.pack(">HIHI", 4, window, 5, max_frame))
        + frame(HEADERS, END_HEADERS, 1, b"\x83\x86")
        + (credit if credit_first else b"")
        + b"".join(frame(DATA, 0, 1, grpc[i : i + frame_size]) for i in range(0, len(grpc), frame_size))
        + (b"" if credit_first else credit)
    )
    at = sorted({c % len(wire) for c in cuts} - {0})
    sent = [wire[a:b] for a, b in zip([0, *at], [*at, len(wire)], strict=True)]

    async def run() -> list[tuple[int, int, int, bytes]]:
        peer = Peer()
        got: list[tuple[int, int, int, bytes]] = []
        for part in sent:
            peer.send(part)
            got += peer.frames()
        await peer.settle()
        return got + peer.frames()

    got = asyncio.run(run())
    assert all(len(payload) <= max_frame for kind, _, _, payload in got if kind == DATA)
    answers = messages(got, 1)
    echoed = b"".join(a.request_body.response.body_mutation.streamed_response.body for a in answers[1:])
    assert echoed == body
    assert answers[-1].request_body.response.body_mutation.streamed_response.end_of_stream
