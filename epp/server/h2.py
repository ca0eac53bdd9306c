"""ext_proc over a minimal asyncio HTTP/2 gRPC server (TLS or h2c) — the default, fast transport.

Why: with grpc.aio every ext_proc message costs ~50-70 µs of CPU on this class of machine,
almost all of it thread hand-offs between gRPC's event-engine threads, its completion-queue
poller and the asyncio loop (see benchmarks/EXTPROC.md). Envoy sends ~6 messages per small
request and one per response chunk, so that runtime, not the EPP's logic, sets the floor.
This server speaks just enough HTTP/2 + gRPC framing for the single bidi method Envoy calls
(`/envoy.service.ext_proc.v3.ExternalProcessor/Process`), all on the event loop thread:
frames are parsed in `data_received`, answers are written in one `transport.write` per
batch (routing runs eagerly within the batch; it becomes a task only when it has to wait),
and the per-stream protocol is the same `ExtProcStream` the grpc.aio servicer runs.

What it implements: the connection preface and SETTINGS (peer INITIAL_WINDOW_SIZE and
MAX_FRAME_SIZE honoured; the handshake bounded by HANDSHAKE_TIMEOUT), PING (answered; sent
as keepalive on a silent connection, which is dropped if the peer stays silent), GOAWAY (both
ways; graceful stop in two steps, RFC 9113 §6.8), RST_STREAM (= the client went away), WINDOW_UPDATE with flow control
in both directions (queued sends, receive windows replenished as data is consumed: not while
a stream's routing is pending), RFC 9113's stream states and frame rules, closed streams
included (a breach is GOAWAY or RST_STREAM with its code),
DATA padding, gRPC length-prefixed messages across frames, trailers-only and normal
responses, transport back-pressure; TLS with ALPN h2 through the event loop's own (an
`ssl.SSLContext` from tls.py), or h2c.

What it deliberately does not: request header blocks are never decoded (HPACK state is
only needed to read them, and every stream on this port is `Process`), so the port must
serve ext_proc only (health stays on its own grpc.aio port); no compression
(a compressed message ends the stream with UNIMPLEMENTED), no server push.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import struct
from collections.abc import Callable
from ssl import SSLContext
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.datalayer.endpoint import join_hostport, split_hostport
from llmepp.server.listen import any_address_socket
from llmepp.server.stream import ExtProcStream, Pending, StreamContext
from llmepp.settings import Settings

log = logging.getLogger(__name__)

# A new stream's protocol object, given the stream's push (answers sent outside a message handler).
StreamFactory = Callable[[Callable[[Any], None] | None], ExtProcStream]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Settings ids.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 1, 2, 3, 4, 5
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT = 0, 1, 2, 3, 4
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 5, 6, 7
ENHANCE_YOUR_CALM = 0xB
# SETTINGS frames a client may send on one connection (Envoy sends one, gRPC clients a few): a change of
# INITIAL_WINDOW_SIZE must adjust every open stream's window (RFC 9113 §6.9.2), so a flood of them would
# cost O(frames x streams) of event loop.
MAX_PEER_SETTINGS = 1000
# What a stream may queue while its routing step runs: trailers, and body chunks (a handful when the body was read,
# but an unread body keeps streaming in while the request is routed on its headers, e.g. queued by flow control).
# Bounded in bytes, each message costing its size plus its decoded object's overhead: a client sending chunks of
# BACKLOG_MESSAGE_COST bytes or more is bounded by the stream window alone, and a flood of empty messages holds
# little more than the window would.
BACKLOG_MESSAGE_COST = 512
# gRPC status codes used here.
GRPC_OK, GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_RESOURCE_EXHAUSTED = 0, 12, 13, 8

MAX_WINDOW = 2**31 - 1
MIN_MAX_FRAME, MAX_MAX_FRAME = 2**14, 2**24 - 1  # SETTINGS_MAX_FRAME_SIZE bounds (RFC 9113 §6.5.2)
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
# What we advertise: big receive windows (we consume every byte at once) and frames.
OUR_STREAM_WINDOW = 16 * 1024 * 1024
MAX_BACKLOG_COST = 2 * OUR_STREAM_WINDOW  # no WINDOW_UPDATE while a backlog waits: the window bounds its bytes
OUR_MAX_FRAME = 1024 * 1024
OUR_MAX_STREAMS = 1_000_000
# Connection timers (seconds; one timer per connection, never per frame). The handshake — the client's
# preface and SETTINGS, and its ACK of ours (RFC 9113 §3.4, §6.5.3) — must be over within
# HANDSHAKE_TIMEOUT, else GOAWAY(SETTINGS_TIMEOUT). After that a connection on which nothing has
# arrived for KEEPALIVE_TIME gets a PING; if still nothing arrives within KEEPALIVE_TIMEOUT the peer is
# gone (no FIN: a dead node, a partition) and the connection is dropped, releasing its streams. A live
# idle connection is never closed: Envoy pools it and closes it itself (its cluster idle_timeout), and
# the PINGs also keep NAT / load-balancer state along the path from expiring. grpc.aio does the same
# with a 2 h keepalive time; Envoy's own http2 connection_keepalive PINGs are answered (and count as
# traffic, so then we send none).
HANDSHAKE_TIMEOUT = 10.0
KEEPALIVE_TIME = 60.0
KEEPALIVE_TIMEOUT = 20.0
# Ids of streams we reset, on which the client may still have frames in flight (ignored, RFC 9113
# §5.1), are remembered until a PING sent after the resets is acknowledged: one PING per this many.
RESET_IDS_SWEEP = 1024
_KEEPALIVE_PING = b"epp-live"
# A graceful stop (RFC 9113 §6.8) is two GOAWAYs: the first (last-stream-id 2^31-1) with a PING; the
# PING's ACK says every stream the peer opened before it saw that GOAWAY has arrived (those are served),
# and the second GOAWAY names the real last stream id. A peer that does not ACK within this gets the
# second GOAWAY anyway.
GOAWAY_PING_TIMEOUT = 1.0
_GOAWAY_PING = b"eppgoawy"  # (not "epp-" + 4 bytes, the form of the reset-sweep PINGs)

_U32 = struct.Struct(">I")
_U16_U32 = struct.Struct(">HI")
_FromString = pb.ProcessingRequest.FromString


# A frame's payload or a message: a view of a read, or a copy.
_Bytes = bytes | bytearray | memoryview


_FRAME_HEADER = struct.Struct(">IBI")  # length (24 bits) and type, flags, stream id (RFC 9113 §4.1)
# A DATA frame's header followed by the gRPC prefix of the one message it holds whole (flag 0: uncompressed).
_DATA_MESSAGE_HEADER = struct.Struct(">IBIBI")


def _frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEADER.pack(length << 8 | kind, flags, stream_id)


def _grpc_prefix(size: int) -> bytes:
    """A gRPC message's 5-byte prefix: not compressed, its length."""
    return b"\x00" + _U32.pack(size)


def _frame(kind: int, flags: int, stream_id: int, payload: _Bytes = b"") -> bytes:
    return _frame_header(len(payload), kind, flags, stream_id) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (names/values < 127)."""
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


# Every header block we send starts with an HPACK dynamic table size update to 0 (RFC 7541 §6.3): we never
# index, and a peer that shrinks its table (SETTINGS_HEADER_TABLE_SIZE below 4096: Envoy's `hpack_table_size`,
# at the start or mid-connection) requires one at the start of the next block it decodes (§4.2) — nghttp2
# fails the whole connection without it. One byte per block; no state to track which block comes first.
_TABLE_SIZE_0 = b"\x20"
# Response header block: `:status: 200` (static index 8) + content-type literal (index 31).
_RESPONSE_HEADERS = _TABLE_SIZE_0 + b"\x88" + b"\x0f\x10" + bytes((16,)) + b"application/grpc"


def _trailers(status: int, message: str = "") -> bytes:
    """A trailers block's fields (after _TABLE_SIZE_0 as a block of its own, after _RESPONSE_HEADERS as a
    trailers-only answer)."""
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", message.encode()[:120])
    return block


_TRAILERS_OK = _trailers(GRPC_OK)
_TRAILERS_OK_BLOCK = _TABLE_SIZE_0 + _TRAILERS_OK


def _headers_fields_error(flags: int, payload: _Bytes, length: int) -> int:
    """0, or the connection error of a HEADERS frame whose Pad Length, priority or padding do not fit
    in it (RFC 9113 §4.2, §6.2)."""
    fixed = (1 if flags & PADDED else 0) + (5 if flags & PRIORITY_FLAG else 0)
    if length < fixed:
        return FRAME_SIZE_ERROR
    if flags & PADDED and payload[0] > length - fixed:
        return PROTOCOL_ERROR
    return 0


class _Stream:
    __slots__ = (
        "backlog",
        "backlog_cost",
        "ext",
        "have",
        "headers_sent",
        "local_closed",
        "need",
        "parts",
        "pending",
        "recv_unacked",
        "remote_closed",
        "reset_queued",
        "send_window",
        "sid",
        "task",
    )

    def __init__(self, sid: int, ext: ExtProcStream, send_window: int) -> None:
        self.sid = sid
        self.ext = ext
        # A gRPC message spanning frames: its pieces, their length, and the whole message's (0: not known yet).
        self.parts: list[_Bytes] = []
        self.have = 0
        self.need = 0
        self.headers_sent = False
        self.local_closed = False  # our END_STREAM went out (or is queued)
        self.remote_closed = False  # the client half-closed
        self.reset_queued = False  # our RST_STREAM waits in `pending` (noted as a reset once it is out)
        self.send_window = send_window
        # Frames waiting for flow-control window: (is_data, bytes).
        self.pending: collections.deque[tuple[bool, bytes | memoryview]] = collections.deque()
        self.recv_unacked = 0
        self.task: asyncio.Task[None] | None = None  # routing in progress
        self.backlog: collections.deque[pb.ProcessingRequest] = collections.deque()
        self.backlog_cost = 0


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2ExtProcServer) -> None:
        self.server = server
        self.ctx = server.context
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # a partial frame
        self.preface = False
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        # The last-stream-id of our final GOAWAY: a later one may not name a higher id (RFC 9113 §6.8), though
        # streams refused after it still raise last_stream_id (their frames are then no idle-stream errors).
        self.goaway_last_id: int | None = None
        self.out: list[bytes | memoryview] = []  # frames for the next write (views: no copy before the join)
        self.conn_send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.conn_recv_unacked = 0
        self.blocked: set[int] = set()
        self.continuation = 0  # the stream whose header block continues in CONTINUATION frames
        self.goaway_sent = False  # the final GOAWAY: new streams are refused
        self.goaway_timer: asyncio.TimerHandle | None = None  # the first GOAWAY is out, its PING unanswered
        self.closed = False
        self.max_message = server.max_message
        self.settings_acked = False  # the client acknowledged our SETTINGS: the handshake is over
        self.peer_settings = 0  # SETTINGS frames received (not ACKs)
        self.heard = False  # bytes arrived since the timer last looked
        self.pinged = False  # a keepalive PING is out, unanswered
        self.paused = False  # the peer is not reading what we write (so we do not read either)
        self.timer: asyncio.TimerHandle | None = None
        # Streams we reset (RST_STREAM sent): what the client sent before it saw that is ignored. The ids
        # in `swept` were reset before the PING `sweep_ping` went out, and are forgotten on its ACK.
        self.reset_ids: set[int] = set()
        self.swept: set[int] | None = None
        self.sweep_ping = b""
        self.sweeps = 0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        settings = (
            _U16_U32.pack(S_MAX_CONCURRENT_STREAMS, OUR_MAX_STREAMS)
            + _U16_U32.pack(S_INITIAL_WINDOW_SIZE, OUR_STREAM_WINDOW)
            + _U16_U32.pack(S_MAX_FRAME_SIZE, OUR_MAX_FRAME)
            + _U16_U32.pack(S_ENABLE_PUSH, 0)
        )
        conn_update = _frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - DEFAULT_WINDOW))
        transport.write(_frame(SETTINGS, 0, 0, settings) + conn_update)  # type: ignore[attr-defined]
        self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.goaway_timer is not None:
            self.goaway_timer.cancel()
            self.goaway_timer = None
        self.server.connections.discard(self)
        for st in list(self.streams.values()):
            self._abort(st)
        self.server._connection_closed()

    def pause_writing(self) -> None:
        # Envoy is not reading: stop reading from it too, so nothing piles up here.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _on_timer(self) -> None:
        """The handshake deadline, then the keepalive (see KEEPALIVE_TIME)."""
        self.timer = None
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        if not self.settings_acked:
            self.ctx.protocol_error("h2_handshake_timeout")
            reason = "SETTINGS not acknowledged" if self.preface else "no connection preface"
            self._fatal(SETTINGS_TIMEOUT, f"{reason} within {HANDSHAKE_TIMEOUT:g} s", abort=True)
            return
        loop = asyncio.get_running_loop()
        if self.heard or self.paused:
            # Traffic (or a peer we wait on: with our data unacknowledged, TCP itself notices a dead one).
            self.heard = self.pinged = False
            self.timer = loop.call_later(KEEPALIVE_TIME, self._on_timer)
        elif not self.pinged:
            self.pinged = True
            self.out.append(_frame(PING, 0, 0, _KEEPALIVE_PING))
            self._flush()
            self.timer = loop.call_later(KEEPALIVE_TIMEOUT, self._on_timer)
        else:
            self.ctx.protocol_error("h2_keepalive_timeout")
            log.info("h2 ext_proc: no answer to a keepalive PING in %g s: dropping the connection (%d streams)",
                     KEEPALIVE_TIMEOUT, len(self.streams))  # fmt: skip
            self._fatal(NO_ERROR, f"keepalive PING not answered within {KEEPALIVE_TIMEOUT:g} s", abort=True)

    def data_received(self, data: bytes) -> None:
        # Common case: the read holds whole frames and nothing is left over — parse `data`
        # itself, no copy. A partial frame is kept in a bytearray (amortised appends).
        self.heard = True
        pending = self.buf
        if pending:
            pending += data
            buf: bytes | bytearray = pending
        else:
            buf = data
        pos = 0
        if not self.preface:
            # The preface, then a SETTINGS frame (RFC 9113 §3.4): anything else is an invalid preface.
            n = len(buf)
            if buf[: min(n, 24)] != PREFACE[:n]:
                self._fatal(PROTOCOL_ERROR, "bad connection preface")
                return
            if n < 28:
                if not pending:
                    self.buf = bytearray(buf)
                return
            if buf[27] != SETTINGS:
                self._fatal(PROTOCOL_ERROR, "the connection preface is not followed by SETTINGS")
                return
            pos = 24
            self.preface = True
        end = len(buf)
        # Frame payloads: views of an immutable read (no copy), copies of the pending buffer (it is resized below).
        frames: _Bytes = buf if pending else memoryview(buf)
        unpack = _U32.unpack_from
        continuation = self.continuation
        try:
            while end - pos >= 9:
                (len_type,) = unpack(buf, pos)
                length = len_type >> 8
                if length > OUR_MAX_FRAME:
                    self._malformed(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                    return
                if end - pos < 9 + length:
                    break
                kind = len_type & 0xFF
                flags = buf[pos + 4]
                sid = unpack(buf, pos + 5)[0] & 0x7FFFFFFF
                payload = frames[pos + 9 : pos + 9 + length]
                pos += 9 + length
                if continuation:
                    # A header block is a contiguous run of frames (RFC 9113 §6.10): nothing else in between.
                    if kind != CONTINUATION or sid != continuation:
                        self._malformed(PROTOCOL_ERROR, "frame inside a header block")
                        return
                    if flags & END_HEADERS:
                        continuation = 0
                    continue
                if kind == DATA:
                    if sid == 0 or (flags & PADDED and (length == 0 or payload[0] >= length)):
                        self._malformed(PROTOCOL_ERROR, "DATA on stream 0 or with padding past its end")
                        return
                    self._on_data(sid, flags, payload, length)
                elif kind == HEADERS:
                    if not sid & 1:
                        self._malformed(PROTOCOL_ERROR, "HEADERS on stream 0 or a server stream id")
                        return
                    if flags & (PADDED | PRIORITY_FLAG):
                        code = _headers_fields_error(flags, payload, length)
                        if code:
                            self._malformed(code, "HEADERS padding or priority past its end")
                            return
                    if not flags & END_HEADERS:
                        continuation = sid
                    self._on_headers(sid, flags)
                elif kind == WINDOW_UPDATE:
                    if length != 4:
                        self._malformed(FRAME_SIZE_ERROR, "WINDOW_UPDATE of length other than 4")
                        return
                    self._on_window_update(sid, payload)
                elif kind == SETTINGS:
                    if sid != 0 or length % 6 or (flags & ACK and length):
                        self._malformed(FRAME_SIZE_ERROR if sid == 0 else PROTOCOL_ERROR, "malformed SETTINGS")
                        return
                    self._on_settings(flags, payload)
                elif kind == PING:
                    if sid != 0 or length != 8:
                        self._malformed(FRAME_SIZE_ERROR if sid == 0 else PROTOCOL_ERROR, "malformed PING")
                        return
                    if not flags & ACK:
                        self.out.append(_frame(PING, ACK, 0, payload))
                    elif payload == self.sweep_ping:
                        self.swept = None  # the client has seen those RST_STREAMs: nothing more in flight
                    elif payload == _GOAWAY_PING and self.goaway_timer is not None:
                        self.final_goaway()  # every stream opened before our first GOAWAY has arrived
                elif kind == RST_STREAM:
                    if sid == 0 or length != 4:
                        self._malformed(FRAME_SIZE_ERROR if sid else PROTOCOL_ERROR, "malformed RST_STREAM")
                        return
                    st = self.streams.get(sid)
                    if st is not None:
                        self._abort(st)
                    elif self._idle_stream(sid):
                        self._malformed(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
                        return
                elif kind == GOAWAY:
                    if sid != 0 or length < 8:
                        self._malformed(FRAME_SIZE_ERROR if sid == 0 else PROTOCOL_ERROR, "malformed GOAWAY")
                        return
                    # The client opens no new streams; the open ones finish normally.
                elif kind == PUSH_PROMISE:
                    self._malformed(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                    return
                elif kind == CONTINUATION:
                    self._malformed(PROTOCOL_ERROR, "CONTINUATION without a header block")
                    return
                elif kind == PRIORITY and (sid == 0 or length != 5):
                    self._malformed(FRAME_SIZE_ERROR if sid else PROTOCOL_ERROR, "malformed PRIORITY")
                    return
                # Other PRIORITY (no scheduling here), unknown: ignored.
                if self.closed:
                    return
        except Exception:
            log.exception("h2 ext_proc: connection error")
            self._fatal(INTERNAL_ERROR, "internal error")
            return
        self.continuation = continuation
        if pending:
            del pending[:pos]
        elif pos < end:
            self.buf = bytearray(buf[pos:])
        self._flush()

    # -- frames ------------------------------------------------------------------------------
    def _on_headers(self, sid: int, flags: int) -> None:
        st = self.streams.get(sid)
        if st is None:
            if sid <= self.last_stream_id:
                # A closed stream. Trailers the client sent before it saw our RST_STREAM: ignored. Else it
                # reuses an id (RFC 9113 §5.1.1: a new stream's id exceeds all earlier ones), or sends
                # after its own END_STREAM or RST_STREAM: nothing would ever answer it.
                if not self._was_reset(sid):
                    self._malformed(PROTOCOL_ERROR, "HEADERS on a closed stream")
                return
            self.last_stream_id = sid
            if self.goaway_sent or len(self.streams) >= OUR_MAX_STREAMS:
                # Not processed: the client may retry it elsewhere (RFC 9113 §8.7).
                self.out.append(_frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
                self._note_reset(sid)
                return
            push = functools.partial(self._push, sid) if self.ctx.out_of_band else None
            st = _Stream(sid, self.server.new_stream(push), self.peer_initial_window)
            self.streams[sid] = st
            self.ctx.stream_opened()
        elif st.local_closed:
            return  # we ended it (RST_STREAM queued or sent): what the client still sends is ignored
        elif st.remote_closed:
            self._reset(st, STREAM_CLOSED)  # a frame after the client's END_STREAM (RFC 9113 §5.1)
            return
        elif not flags & END_STREAM:
            self._reset(st, PROTOCOL_ERROR)  # a second header block that is not trailers (RFC 9113 §8.1)
            return
        if flags & END_STREAM:
            self._on_remote_close(st)

    def _on_data(self, sid: int, flags: int, payload: _Bytes, length: int) -> None:
        # Flow control counts the whole frame, padding included.
        self.conn_recv_unacked += length
        if self.conn_recv_unacked >= MAX_WINDOW // 2:
            self.out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.conn_recv_unacked)))
            self.conn_recv_unacked = 0
        st = self.streams.get(sid)
        if st is None or st.local_closed or st.remote_closed:
            if st is None:
                if self._idle_stream(sid):
                    self._malformed(PROTOCOL_ERROR, "DATA on an idle stream")
                elif not self._was_reset(sid):
                    # Closed by both END_STREAMs or the client's RST_STREAM (RFC 9113 §6.1); once: what
                    # follows before the client sees our RST_STREAM is ignored like any reset stream's.
                    self.out.append(_frame(RST_STREAM, 0, sid, _U32.pack(STREAM_CLOSED)))
                    self._note_reset(sid)
            elif not st.local_closed:
                self._reset(st, STREAM_CLOSED)  # DATA after the client's END_STREAM (RFC 9113 §5.1)
            return  # else a stream we ended: ignored
        if flags & PADDED:
            pad = payload[0]
            payload = payload[1 : len(payload) - pad]
        st.recv_unacked += length
        if st.recv_unacked >= OUR_STREAM_WINDOW // 2:
            if st.recv_unacked > OUR_STREAM_WINDOW:
                self._reset(st, FLOW_CONTROL_ERROR)  # past the window we advertised (RFC 9113 §6.9.1)
                return
            if st.task is None and not st.backlog and not st.pending:
                # While routing is pending, messages wait in the backlog: so does the client's window. So too
                # while our answers wait for the client's window: a client that sends but does not read would
                # otherwise queue answers here without bound (each response chunk is echoed).
                self.out.append(_frame(WINDOW_UPDATE, 0, sid, _U32.pack(st.recv_unacked)))
                st.recv_unacked = 0
        if flags & END_STREAM:
            # Noted before the frame's messages are handled: one of them may end the stream, and then the
            # client, already closed, must get no RST_STREAM after our END_STREAM (RFC 9113 §5.1).
            st.remote_closed = True
        if payload:
            self._on_stream_bytes(st, payload)
            if st.local_closed:
                return
        if flags & END_STREAM:
            self._on_remote_close(st)

    def _on_stream_bytes(self, st: _Stream, payload: _Bytes) -> None:
        """The gRPC messages in a stream's DATA. A message spanning frames (a long body's chunks) is kept as its
        pieces and copied once, when whole: appending each piece to a buffer and slicing the message out of it
        copied a long prompt three more times."""
        parts = st.parts
        if parts:
            parts.append(payload)
            st.have += len(payload)
            if st.have < st.need:
                return
            data: _Bytes = b"".join(parts)
            parts.clear()
        else:
            data = payload
        start = 0
        n = len(data)
        while n - start >= 5:
            size = _U32.unpack_from(data, start + 1)[0]
            if size > self.max_message:
                self._end(st, GRPC_RESOURCE_EXHAUSTED, f"message larger than {self.max_message} bytes")
                return
            if n - start < 5 + size:
                break
            if data[start]:
                self._end(st, GRPC_UNIMPLEMENTED, "compressed messages are not supported")
                return
            self._on_message(st, data[start + 5 : start + 5 + size])
            start += 5 + size
            if st.local_closed:
                return
        if start < n:
            parts.append(data[start:])
            st.have = n - start
            st.need = 5 + _U32.unpack_from(data, start + 1)[0] if n - start >= 5 else 0

    def _on_window_update(self, sid: int, payload: _Bytes) -> None:
        inc = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if inc == 0:
            self._malformed(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        if sid == 0:
            self.conn_send_window += inc
            if self.conn_send_window > MAX_WINDOW:
                self._malformed(FLOW_CONTROL_ERROR, "connection window past 2^31-1")
                return
            if self.blocked:
                for blocked_sid in list(self.blocked):
                    st = self.streams.get(blocked_sid)
                    if st is not None:
                        self._drain(st)
                    else:
                        self.blocked.discard(blocked_sid)
            return
        st = self.streams.get(sid)
        if st is not None:
            st.send_window += inc
            if st.send_window > MAX_WINDOW:
                self._reset(st, FLOW_CONTROL_ERROR)
            elif st.pending:
                self._drain(st)
        elif self._idle_stream(sid):
            self._malformed(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")

    def _on_settings(self, flags: int, payload: _Bytes) -> None:
        if flags & ACK:
            self.settings_acked = True  # (we send SETTINGS once)
            return
        self.peer_settings += 1
        if self.peer_settings > MAX_PEER_SETTINGS:
            self.ctx.protocol_error("h2_settings_flood")
            self._fatal(ENHANCE_YOUR_CALM, f"more than {MAX_PEER_SETTINGS} SETTINGS frames")
            return
        # Streams are walked only for a change that can unblock them: a SETTINGS frame re-sent unchanged
        # (or empty) walked every open stream, twice for INITIAL_WINDOW_SIZE, an O(streams) cost per frame.
        unblocked = False
        for off in range(0, len(payload) - 5, 6):
            ident, value = _U16_U32.unpack_from(payload, off)
            if (
                (ident == S_INITIAL_WINDOW_SIZE and value > MAX_WINDOW)
                or (ident == S_MAX_FRAME_SIZE and not MIN_MAX_FRAME <= value <= MAX_MAX_FRAME)
                or (ident == S_ENABLE_PUSH and value > 1)
            ):
                self._malformed(FLOW_CONTROL_ERROR if ident == S_INITIAL_WINDOW_SIZE else PROTOCOL_ERROR,
                                f"SETTINGS {ident} = {value} is out of range")  # fmt: skip
                return
            if ident == S_INITIAL_WINDOW_SIZE and value != self.peer_initial_window:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        self._malformed(FLOW_CONTROL_ERROR, "a stream window past 2^31-1")
                        return
                unblocked = unblocked or delta > 0
            elif ident == S_MAX_FRAME_SIZE and value != self.peer_max_frame:
                self.peer_max_frame = value
                unblocked = True
        self.out.append(_frame(SETTINGS, ACK, 0))
        if unblocked:
            for st in list(self.streams.values()):
                if st.pending:
                    self._drain(st)

    # -- messages --------------------------------------------------------------------------------
    def _on_message(self, st: _Stream, raw: _Bytes) -> None:
        try:
            msg = _FromString(raw)
        except Exception:
            self.ctx.protocol_error("undecodable_message")
            self._end(st, GRPC_INTERNAL, "cannot decode ProcessingRequest")
            return
        if st.task is not None or st.backlog:
            st.backlog_cost += len(raw) + BACKLOG_MESSAGE_COST
            if st.backlog_cost > MAX_BACKLOG_COST:
                # 5-byte empty messages filling the 16 MiB window would hold ~24x that in decoded messages.
                self.ctx.protocol_error("h2_backlog_overflow")
                self._end(st, GRPC_RESOURCE_EXHAUSTED, f"more than {MAX_BACKLOG_COST} bytes of messages while routing")
                return
            st.backlog.append(msg)  # keep order behind the routing step in progress
            return
        self._process(st, msg)

    def _process(self, st: _Stream, msg: pb.ProcessingRequest) -> None:
        ext = st.ext
        try:
            try:
                out: Any = ext.handle(msg.WhichOneof("request"), msg)
            except Exception:
                out = ext.fallback(msg)
            if out.__class__ is Pending:
                # Eagerly: routing that does not wait answers within this batch, no task.
                try:
                    done, out = out.step()
                except Exception:
                    done, out = True, ext.fallback(msg)
                if not done:
                    st.task = asyncio.get_running_loop().create_task(self._await_pending(st, out, msg))
                    return
            self._emit(st, out)
        except Exception:
            # As in _await_pending: one stream's failure (its fallback's included) must not end the connection
            # with every other request on it.
            log.exception("h2 ext_proc: stream %d failed", st.sid)
            self._end(st, GRPC_INTERNAL, "internal error")

    async def _await_pending(self, st: _Stream, step: Any, msg: pb.ProcessingRequest) -> None:
        failed = False
        try:
            out = await step
        except asyncio.CancelledError:
            raise
        except Exception:
            failed = True
        st.task = None
        if self.closed or st.local_closed:
            return
        try:
            if failed:
                out = st.ext.fallback(msg)
            self._emit(st, out)
            while st.backlog and st.task is None and not st.local_closed:
                self._process(st, st.backlog.popleft())
            if not st.backlog:
                st.backlog_cost = 0
            if st.task is None and not st.local_closed:
                if st.remote_closed:
                    self._end(st, GRPC_OK)
                elif st.recv_unacked >= OUR_STREAM_WINDOW // 2 and not st.pending:  # withheld while routing
                    self.out.append(_frame(WINDOW_UPDATE, 0, st.sid, _U32.pack(st.recv_unacked)))
                    st.recv_unacked = 0
        except Exception:
            # A transport bug must not strand the stream: fail it, keep the connection.
            log.exception("h2 ext_proc: stream %d failed", st.sid)
            self._end(st, GRPC_INTERNAL, "internal error")
        self._flush()

    def _emit(self, st: _Stream, out: Any) -> None:
        if out is not None:
            if out.__class__ is list:
                for answer in out:
                    self._send_message(st, answer)
            else:
                self._send_message(st, out)
        if st.ext.closed:
            self._end(st, GRPC_OK)

    def _push(self, sid: int, out: Any) -> None:
        """Answers a stream sends on its own, outside any message of Envoy's (in-flight eviction)."""
        st = self.streams.get(sid)
        if st is None or st.local_closed or st.task is not None or self.closed:
            return
        self._emit(st, out)
        self._flush()

    def _on_remote_close(self, st: _Stream) -> None:
        st.remote_closed = True
        if st.parts:
            # Half-closed inside a length-prefixed message: it can never be whole (gRPC fails such a call).
            self._end(st, GRPC_INTERNAL, "the client half-closed inside a message")
            return
        if st.task is None and not st.backlog and not st.local_closed:
            self._end(st, GRPC_OK)

    # -- sending -----------------------------------------------------------------------------------
    def _send_message(self, st: _Stream, answer: Any) -> None:
        data = answer if answer.__class__ is bytes else answer.SerializeToString()
        if not st.headers_sent:
            st.headers_sent = True
            self._queue(st, False, _frame(HEADERS, END_HEADERS, st.sid, _RESPONSE_HEADERS))
        n = len(data) + 5
        if not st.pending and n <= st.send_window and n <= self.conn_send_window:
            st.send_window -= n
            self.conn_send_window -= n
            out = self.out
            max_frame = self.peer_max_frame
            if n <= max_frame:
                out.append(_DATA_MESSAGE_HEADER.pack(n << 8 | DATA, 0, st.sid, 0, len(data)))
                out.append(data)
                return
            # A long body's answers span frames: the frames are views of `data`, copied once by the flush's join
            # (copying each piece, and the rest after it, cost a long prompt milliseconds).
            prefix = _grpc_prefix(len(data))
            view = memoryview(data)
            first = max_frame - 5
            out.append(_frame_header(max_frame, DATA, 0, st.sid) + prefix)
            out.append(view[:first])
            for start in range(first, len(data), max_frame):
                piece = view[start : start + max_frame]
                out.append(_frame_header(len(piece), DATA, 0, st.sid))
                out.append(piece)
            return
        self._queue(st, True, _grpc_prefix(len(data)) + data)
        self._drain(st)

    def _queue(self, st: _Stream, is_data: bool, payload: bytes) -> None:
        """Frames of one stream leave in order: behind queued data, or at once."""
        if st.pending or is_data:
            st.pending.append((is_data, payload))
        else:
            self.out.append(payload)

    def _drain(self, st: _Stream) -> None:
        """Send queued frames of `st` as far as the windows allow."""
        out = self.out
        pending = st.pending
        while pending:
            is_data, payload = pending[0]
            if not is_data:
                out.append(payload)
                pending.popleft()
                continue
            room = min(st.send_window, self.conn_send_window, self.peer_max_frame)
            if room <= 0:
                self.blocked.add(st.sid)
                return
            if len(payload) <= room:
                pending.popleft()
                piece = payload
            else:
                view = payload if payload.__class__ is memoryview else memoryview(payload)
                piece = view[:room]
                pending[0] = (True, view[room:])
            st.send_window -= len(piece)
            self.conn_send_window -= len(piece)
            out.append(_frame_header(len(piece), DATA, 0, st.sid))
            out.append(piece)
        self.blocked.discard(st.sid)
        if st.local_closed:
            if st.reset_queued:
                self._note_reset(st.sid)
            self._forget(st)
        elif st.recv_unacked >= OUR_STREAM_WINDOW // 2 and st.task is None and not st.backlog:
            # The receive window withheld while answers were queued (see _on_data).
            out.append(_frame(WINDOW_UPDATE, 0, st.sid, _U32.pack(st.recv_unacked)))
            st.recv_unacked = 0

    def _end(self, st: _Stream, status: int, message: str = "") -> None:
        """End our side with grpc-status; release the stream's state."""
        if st.local_closed:
            return
        st.local_closed = True
        ok = status == GRPC_OK and not message
        trailers = _TRAILERS_OK if ok else _trailers(status, message)
        if st.headers_sent:
            block = _TRAILERS_OK_BLOCK if ok else _TABLE_SIZE_0 + trailers
            frame = _frame(HEADERS, END_HEADERS | END_STREAM, st.sid, block)
        else:  # trailers-only response
            frame = _frame(HEADERS, END_HEADERS | END_STREAM, st.sid, _RESPONSE_HEADERS + trailers)
        if st.pending:
            st.pending.append((False, frame))
        else:
            self.out.append(frame)
        if not st.remote_closed:
            # Tell the client to stop sending; everything it sends now is ignored.
            if st.pending:
                # Noted when it goes out (`_drain`): a sweep PING sent now would overtake it, and its ACK
                # end the grace for frames the client sends before it sees the reset.
                st.pending.append((False, _frame(RST_STREAM, 0, st.sid, _U32.pack(NO_ERROR))))
                st.reset_queued = True
            else:
                self.out.append(_frame(RST_STREAM, 0, st.sid, _U32.pack(NO_ERROR)))
                self._note_reset(st.sid)
        st.ext.cancelled = st.ext.cancelled or status != GRPC_OK
        self._release(st)
        if not st.pending:
            self._forget(st)

    def _release(self, st: _Stream) -> None:
        task = st.task
        if task is not None:
            st.task = None
            if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:  # type: ignore[arg-type]
                # Created in this same read: cancelled now, it would never run, and the routing step it
                # continues would only be dropped (an async producer's task orphaned, its timeout gone).
                # Cancelled once it has taken the step over, the step gets the CancelledError.
                asyncio.get_running_loop().call_soon(task.cancel)
            else:
                task.cancel()
        st.backlog.clear()
        st.ext.finish()

    def _forget(self, st: _Stream) -> None:
        """Drop a stream whose last frame is out (its state was released by `_end`)."""
        if self.streams.pop(st.sid, None) is not None:
            self.ctx.stream_closed(st.ext)
        self.blocked.discard(st.sid)
        if self.goaway_sent and not self.streams:
            self.server._connection_idle(self)

    def _reset(self, st: _Stream, code: int) -> None:
        """A stream error (RFC 9113 §5.4.2): RST_STREAM with `code`, the stream released."""
        self.out.append(_frame(RST_STREAM, 0, st.sid, _U32.pack(code)))
        self._note_reset(st.sid)
        self._abort(st)

    def _note_reset(self, sid: int) -> None:
        """We sent (or queued) RST_STREAM on `sid`: the client may have sent frames on it before it sees
        that, which RFC 9113 §5.1 says to ignore. Remembered until a PING sent after the reset comes
        back (the signal §5.1 suggests; no timer): one PING per RESET_IDS_SWEEP resets."""
        ids = self.reset_ids
        ids.add(sid)
        if len(ids) >= RESET_IDS_SWEEP and (self.swept is None or len(ids) >= 16 * RESET_IDS_SWEEP):
            # (The second case: a peer that does not answer PINGs. The oldest ids go unconfirmed: a late
            # frame on one of them is then a stream error, or a connection error for HEADERS.)
            self.swept = ids
            self.reset_ids = set()
            self.sweeps += 1
            self.sweep_ping = b"epp-" + _U32.pack(self.sweeps)
            self.out.append(_frame(PING, 0, 0, self.sweep_ping))

    def _was_reset(self, sid: int) -> bool:
        return sid in self.reset_ids or (self.swept is not None and sid in self.swept)

    def _idle_stream(self, sid: int) -> bool:
        """No HEADERS opened `sid` (RFC 9113 §5.1: only HEADERS and PRIORITY may name an idle stream)."""
        return sid > self.last_stream_id or not sid & 1

    def _abort(self, st: _Stream) -> None:
        """The client reset the stream (or the connection died): release, send nothing."""
        st.ext.cancelled = True
        st.pending.clear()
        if not st.local_closed:
            st.local_closed = True
            self._release(st)
        self._forget(st)

    def _flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _malformed(self, code: int, reason: str) -> None:
        """A frame RFC 9113 §6 makes a connection error: counted, GOAWAY with the reason, closed."""
        self.ctx.protocol_error("h2_malformed_frame")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("h2 ext_proc: %s: closing the connection", reason)
        self._fatal(code, reason)

    def _fatal(self, code: int, reason: str, abort: bool = False) -> None:
        """GOAWAY, then close; with `abort`, at once, without waiting for the peer to read what is buffered
        (a peer that does not answer may not read either)."""
        self.closed = True
        last = self.last_stream_id if self.goaway_last_id is None else self.goaway_last_id
        self.out.append(_frame(GOAWAY, 0, 0, _U32.pack(last) + _U32.pack(code) + reason.encode()))
        self._flush()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def goaway(self) -> None:
        """The first step of a graceful stop (RFC 9113 §6.8): GOAWAY with last-stream-id 2^31-1 and a
        PING. Streams keep being accepted until the PING's ACK (or GOAWAY_PING_TIMEOUT), then
        `final_goaway`."""
        if self.goaway_sent or self.closed or self.goaway_timer is not None:
            return
        self.out.append(_frame(GOAWAY, 0, 0, _U32.pack(MAX_WINDOW) + _U32.pack(NO_ERROR)))
        self.out.append(_frame(PING, 0, 0, _GOAWAY_PING))
        self._flush()
        self.goaway_timer = asyncio.get_running_loop().call_later(GOAWAY_PING_TIMEOUT, self.final_goaway)

    def final_goaway(self) -> None:
        """GOAWAY with the real last stream id: streams up to it are served, later ones refused; once
        none is open, the connection is closed."""
        if self.goaway_timer is not None:
            self.goaway_timer.cancel()
            self.goaway_timer = None
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        self.goaway_last_id = self.last_stream_id
        self.out.append(_frame(GOAWAY, 0, 0, _U32.pack(self.last_stream_id) + _U32.pack(NO_ERROR)))
        self._flush()
        if not self.streams:
            self.server._connection_idle(self)

    def abort(self) -> None:
        """The end of a stop's grace: the final GOAWAY (if not out yet), then drop the connection at once,
        whatever is still buffered (a peer that does not read would keep a closing one open)."""
        self.final_goaway()
        if self.transport is not None:
            self.closed = True
            self.transport.abort()


class H2ExtProcServer:
    """The ext_proc service on its own port, served by `_Connection`s on the running loop.

    server = H2ExtProcServer(servicer, settings, host="0.0.0.0", port=9002)
    await server.start()        # server.port is the bound port
    ...
    await server.stop(grace=30)  # GOAWAY (two steps), wait for open streams, then abort what is left
    """

    def __init__(
        self,
        context: StreamContext,
        settings: Settings,
        *,
        host: str,
        port: int,
        stream_factory: StreamFactory | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self.context = context
        self.ssl = ssl
        # One protocol object per stream (benchmarks swap in a no-op with the same interface).
        self.new_stream: StreamFactory = stream_factory or (lambda push: ExtProcStream(context, push))
        self.host = host
        self.requested_port = port
        self.port = 0
        self.max_message = settings.grpc_max_recv_msg_size or settings.max_body_bytes + 1024 * 1024
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Every address: one dual-stack socket (asyncio would bind IPv4 and IPv6 apart, on two ports for 0).
        where: dict[str, Any] = (
            {"host": self.host, "port": self.requested_port, "reuse_address": True, "reuse_port": False}
            if self.host
            else {"sock": any_address_socket(self.requested_port)}
        )
        self._server = await loop.create_server(
            lambda: _Connection(self),
            **where,
            ssl=self.ssl,
            # The TLS handshake is bounded like ours (asyncio's default is 60 s).
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl is not None else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _connection_idle(self, conn: _Connection) -> None:
        if conn.transport is not None:
            conn._flush()  # the last stream's trailers may still be queued (called mid-read)
            conn.transport.close()

    def _connection_closed(self) -> None:
        if not self.connections:
            self._idle.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, ask clients to go away (RFC 9113 §6.8's two GOAWAYs), give open streams `grace`
        seconds in all; then abort the connections still open. Without a grace: the final GOAWAY, abort."""
        if self._server is not None:
            self._server.close()
        if grace and self.connections:
            self._idle.clear()
            for conn in list(self.connections):
                conn.goaway()
            if self.connections:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await self._idle.wait()
        for conn in list(self.connections):
            conn.abort()
        # Let connection_lost callbacks run.
        await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def create_h2_server(
    context: StreamContext,
    settings: Settings,
    *,
    address: str | None = None,
    stream_factory: StreamFactory | None = None,
    ssl: SSLContext | None = None,
) -> H2ExtProcServer:
    """Like extproc.create_server, for the HTTP/2 transport (call `await server.start()`); `ssl`
    (tls.ServingCert.ssl_context) makes it a TLS port with ALPN h2, else plaintext (h2c)."""
    addr = address or join_hostport(settings.bind_address, settings.grpc_port)
    host, port = split_hostport(addr)
    return H2ExtProcServer(context, settings, host=host, port=int(port), stream_factory=stream_factory, ssl=ssl)
