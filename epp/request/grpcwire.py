"""gRPC's length-prefixed messages, as they cross Envoy in a request or response body.

A gRPC body over HTTP/2 is a sequence of messages, each `flag (1 byte) | length (4 bytes, big
endian) | message`; flag 1 means the message is compressed with the `grpc-encoding` of that
direction (gzip and deflate are read here; identity needs nothing). The parsers of gRPC APIs
(vllmgrpc-parser, vertexai-parser) read a unary request's one message; their response readers
take messages from chunks split anywhere.

Errors the EPP answers to a gRPC client are a gRPC status (`GRPC_STATUS`), not an HTTP one:
Envoy turns an ImmediateResponse with `grpc_status` into a trailers-only gRPC answer.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from llmepp.errors import BadRequest

CONTENT_TYPE = "application/grpc"
_PREFIX = 5
# What a request side accepts: one unary request message (the EPP's --max-body-size bounds it too).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# HTTP status of an EPP error → the gRPC status code a gRPC client gets (grpc/doc/statuscodes.md).
GRPC_STATUS = {
    400: 3,  # INVALID_ARGUMENT
    404: 5,  # NOT_FOUND
    412: 9,  # FAILED_PRECONDITION (conditional decode: nothing cached)
    413: 8,  # RESOURCE_EXHAUSTED (a message over the limit)
    429: 8,  # RESOURCE_EXHAUSTED (saturated, evicted)
    500: 13,  # INTERNAL
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}
GRPC_UNKNOWN = 2


def is_grpc(headers: Mapping[str, str]) -> bool:
    """The request speaks gRPC (content-type application/grpc, +proto and friends included)."""
    return headers.get("content-type", "").startswith(CONTENT_TYPE)


def grpc_status(http_status: int) -> int:
    return GRPC_STATUS.get(http_status, GRPC_UNKNOWN)


def frame(message: bytes) -> bytes:
    """One uncompressed length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _decompress(data: bytes, encoding: str, max_bytes: int) -> bytes:
    """A compressed message, refused once it grows past `max_bytes` (a few KB may inflate to GBs)."""
    if encoding == "gzip":
        inflater = zlib.decompressobj(wbits=31)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise BadRequest(f"gRPC message compressed with unsupported grpc-encoding {encoding or '(none)'!r}")
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise BadRequest(f"gRPC message compressed with {encoding} does not decompress: {e}") from None
    if len(out) > max_bytes:
        raise BadRequest(f"gRPC message decompresses to more than {max_bytes} bytes")
    if not inflater.eof:
        raise BadRequest(f"gRPC message compressed with {encoding} does not decompress: incomplete or truncated stream")
    return out


def messages(body: bytes, encoding: str = "identity") -> list[bytes]:
    """Every message of a complete body; a truncated one or an unreadable compression is a BadRequest."""
    out: list[bytes] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < _PREFIX:
            raise BadRequest(f"gRPC body ends inside a message prefix ({end - pos} of 5 bytes)")
        flag = body[pos]
        size = int.from_bytes(body[pos + 1 : pos + _PREFIX], "big")
        if flag > 1:
            raise BadRequest(f"gRPC message has an invalid compressed flag {flag}")
        if size > MAX_MESSAGE_BYTES:
            raise BadRequest(f"gRPC message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
        start = pos + _PREFIX
        if end - start < size:
            raise BadRequest(f"gRPC message truncated: {end - start} of {size} bytes")
        data = body[start : start + size]
        out.append(_decompress(data, encoding, MAX_MESSAGE_BYTES) if flag else data)
        pos = start + size
    return out


def unary_message(body: bytes, encoding: str, method: str) -> bytes:
    """The one message of a unary request."""
    found = messages(body, encoding)
    if len(found) != 1:
        raise BadRequest(f"{method} takes exactly one request message, got {len(found)}")
    return found[0]


class MessageReader:
    """Reassembles messages from response chunks split anywhere.

    `feed` returns the messages completed by the chunk. A message that cannot be read (bad flag,
    over `max_bytes` before or after decompression, an encoding it cannot undo) stops the reader:
    it reports no more, and `broken` says why, so usage accounting skips that response instead of
    failing it.
    """

    __slots__ = ("_buf", "broken", "encoding", "max_bytes")

    def __init__(self, encoding: str = "identity", max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.encoding = encoding
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self.broken = ""

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.broken:
            return []
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        while len(buf) >= _PREFIX:
            flag = buf[0]
            size = int.from_bytes(buf[1:_PREFIX], "big")
            if flag > 1 or size > self.max_bytes:
                self.broken = f"unreadable gRPC message prefix (flag {flag}, length {size})"
                buf.clear()
                return out
            if len(buf) < _PREFIX + size:
                break
            data = bytes(buf[_PREFIX : _PREFIX + size])
            del buf[: _PREFIX + size]
            if flag:
                try:
                    data = _decompress(data, self.encoding, self.max_bytes)
                except BadRequest as e:
                    self.broken = e.message
                    buf.clear()
                    return out
            out.append(data)
        return out
