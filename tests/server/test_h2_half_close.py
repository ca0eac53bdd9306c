"""The h2 transport at a stream's half-close (RFC 9113 §5.1, gRPC over HTTP/2): driven like test_h2_rfc9113,
a `_Connection` on a recording transport, frames written by hand."""

from __future__ import annotations

from llmepp.server.h2 import DATA, END_HEADERS, END_STREAM, HEADERS, RST_STREAM

from .client import request_body, request_headers
from .test_h2 import frame, grpc_msg
from .test_h2_rfc9113 import connected, goaway_code, resets


def _grpc_status(payload: bytes) -> bytes | None:
    """grpc-status of a header block written by the server (its literals are never Huffman-coded)."""
    at = payload.find(b"grpc-status")
    if at < 0:
        return None
    n = payload[at + 11]
    return payload[at + 12 : at + 12 + n]


async def test_no_rst_stream_on_a_stream_closed_by_both_end_streams() -> None:
    """RFC 9113 §5.1 (closed): "An endpoint MUST NOT send frames other than PRIORITY on a closed stream".

    The client's last message and its half-close travel in one DATA frame (END_STREAM set: what an HTTP/2
    stack does when the message and the close are queued together, e.g. nghttp2's data provider in Envoy).
    That message ends the stream on our side (here a 413 immediate response: body past max_body_bytes). The
    stream is then closed on both sides once our trailers (END_STREAM) are out: no RST_STREAM may follow them
    (`_on_data` must record the END_STREAM before it handles the frame's messages)."""
    peer = connected(max_body_bytes=100)
    peer.send(frame(HEADERS, END_HEADERS, 1, b"\x83\x86"))
    peer.send(frame(DATA, END_STREAM, 1, grpc_msg(request_headers()) + grpc_msg(request_body(b"x" * 200, eos=True))))
    out = [f for f in peer.frames() if f[2] == 1]
    assert goaway_code(out) is None
    ends = [i for i, (kind, flags, _, _) in enumerate(out) if kind == HEADERS and flags & END_STREAM]
    assert ends, "the stream was answered with trailers"
    after = [kind for kind, _, _, _ in out[ends[0] + 1 :]]
    assert after == [], f"frames sent on stream 1 after both END_STREAMs: {after} (resets: {resets(out)})"
    assert not peer.conn.streams


async def test_the_same_answer_with_a_separate_half_close_sends_no_reset() -> None:
    """Control: the same request with the half-close in its own DATA frame is answered without RST_STREAM
    once the client has not half-closed (the difference is only where END_STREAM sits)."""
    peer = connected(max_body_bytes=100)
    peer.send(frame(HEADERS, END_HEADERS, 1, b"\x83\x86"))
    peer.send(frame(DATA, 0, 1, grpc_msg(request_headers()) + grpc_msg(request_body(b"x" * 200, eos=True))))
    out = [f for f in peer.frames() if f[2] == 1]
    # Here the client has not half-closed: trailers then RST_STREAM(NO_ERROR) is the RFC 9113 §8.1 pattern.
    assert [kind for kind, _, _, _ in out][-1] == RST_STREAM and resets(out) == {1: 0}


async def test_a_half_close_inside_a_grpc_message_is_not_ok() -> None:
    """A gRPC stream half-closed by the client in the middle of a length-prefixed message (its 5-byte prefix
    announces more bytes than ever arrive) is a truncated request: gRPC servers fail the call (grpc-go and
    grpc core: INTERNAL), they do not report success as if the request had been whole."""
    peer = connected()
    whole = grpc_msg(request_headers())
    truncated = grpc_msg(request_body(b'{"model": "m", "prompt": "hello"}', eos=True))[:-10]
    peer.send(frame(HEADERS, END_HEADERS, 1, b"\x83\x86"))
    peer.send(frame(DATA, 0, 1, whole))
    peer.send(frame(DATA, END_STREAM, 1, truncated))
    out = [f for f in peer.frames() if f[2] == 1]
    trailers = [p for kind, flags, _, p in out if kind == HEADERS and flags & END_STREAM]
    assert trailers, "the stream was ended"
    assert _grpc_status(trailers[-1]) not in (None, b"0"), "a truncated request stream ended with grpc-status OK"
