"""A minimal HTTP/2 prior-knowledge (h2c) client: one POST, response DATA collected.

Enough to exercise Envoy's h2 downstream path, where the last DATA frame carries
END_STREAM (no separate empty end-of-stream chunk as with HTTP/1.1). Request headers are
HPACK literals without Huffman coding; response headers are not decoded (only the body and
whether the stream ended are returned). Bodies must fit the peer's initial windows.
"""

from __future__ import annotations

import asyncio
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
MAX_FRAME = 16384


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


async def post(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[bytes, bool]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        block = b"".join(
            _literal(k, v)
            for k, v in {
                ":method": "POST",
                ":scheme": "http",
                ":path": path,
                ":authority": f"{host}:{port}",
                "content-type": "application/json",
                **(headers or {}),
            }.items()
        )
        out = PREFACE + _frame(SETTINGS, 0, 0, b"") + _frame(HEADERS, END_HEADERS, 1, block)
        pieces = [body[i : i + MAX_FRAME] for i in range(0, len(body), MAX_FRAME)] or [b""]
        for i, piece in enumerate(pieces):
            out += _frame(DATA, END_STREAM if i == len(pieces) - 1 else 0, 1, piece)
        writer.write(out)
        await writer.drain()
        data = bytearray()
        while True:
            head = await reader.readexactly(9)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = await reader.readexactly(length)
            if kind == SETTINGS and not flags & ACK:
                writer.write(_frame(SETTINGS, ACK, 0, b""))
            elif kind == PING and not flags & ACK:
                writer.write(_frame(PING, ACK, 0, payload))
            elif kind == DATA and stream == 1:
                data += payload
                if payload:
                    # Keep both windows open for larger responses.
                    inc = struct.pack(">I", len(payload))
                    writer.write(_frame(WINDOW_UPDATE, 0, 0, inc) + _frame(WINDOW_UPDATE, 0, 1, inc))
            elif kind in (RST_STREAM, GOAWAY):
                return bytes(data), False
            if stream == 1 and kind in (DATA, HEADERS) and flags & END_STREAM:
                return bytes(data), True
    finally:
        writer.close()
