"""Model-name rewrite of response bytes back to the client-facing name (reference §1.3).

When the request was sent upstream as `target_model`, the model server answers with
`"model":"<target>"`; the client must see the name it asked for. Like the reference, the
literal byte patterns `"model":"<target>"` and `"model": "<target>"` are replaced — no JSON
parsing per chunk. Unlike a per-chunk replace, a pattern split across two chunks is still
rewritten: a chunk tail that could be the start of a pattern is held back and prepended to
the next chunk (released at end of stream). Only bytes inside a partial `"model": "...`
are ever delayed, so SSE event timing is unaffected.

`hold_tails=False` holds nothing back (a pattern split across chunks stays as sent): for a stream
whose end may leave no answer to release held bytes in (Envoy's STREAMED mode ending in trailers).
"""

from __future__ import annotations

import re

import msgspec

_KEY = b'"model":'


class ModelNameRewriter:
    __slots__ = ("_carry", "_hold_tails", "_max_hold", "_pattern_bytes", "_patterns", "_plain", "_re", "_spaced")

    def __init__(self, target_model: str, client_model: str, *, hold_tails: bool = True) -> None:
        target = msgspec.json.encode(target_model)
        client = msgspec.json.encode(client_model)
        # One left-to-right scan for either pattern (the result is that of the whole body, however it is cut).
        self._re = re.compile(re.escape(_KEY) + b"( ?)" + re.escape(target))
        self._plain, self._spaced = _KEY + client, _KEY + b" " + client
        self._patterns = (_KEY + target, _KEY + b" " + target)
        self._max_hold = max(len(p) for p in self._patterns) - 1
        self._pattern_bytes = frozenset(self._patterns[1])  # a held tail ends with one of them
        self._carry = b""
        self._hold_tails = hold_tails

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        # The held tail is raw bytes after the last match: a replaced name is never matched (nor held) again.
        # split: [before, " " or "", between, ..., after the last match] in one C call.
        parts = self._re.split(data) if _KEY in data else None
        pos = len(data) - len(parts[-1]) if parts else 0
        if end_of_stream or not self._hold_tails or not data or data[-1] not in self._pattern_bytes:
            hold = 0
        else:
            hold = self._partial(data, pos)
        self._carry = data[len(data) - hold :] if hold else b""
        if parts is None or len(parts) == 1:
            return data[: len(data) - hold] if hold else data
        parts[1::2] = [self._spaced if space else self._plain for space in parts[1::2]]
        if hold:
            parts[-1] = parts[-1][: len(parts[-1]) - hold]
        return b"".join(parts)

    @property
    def held(self) -> bytes:
        """Bytes fed but not returned yet (a possible start of the pattern, waiting for the next chunk)."""
        return self._carry

    def _partial(self, data: bytes, lo: int) -> int:
        """Length of the longest data suffix from `lo` on that is a proper prefix of a pattern."""
        n = len(data)
        lo = max(lo, n - self._max_hold)
        i = data.find(b'"', lo)
        while i >= 0:
            tail = data[i:]
            for p in self._patterns:
                if len(tail) < len(p) and p.startswith(tail):
                    return n - i
            i = data.find(b'"', i + 1)
        return 0
