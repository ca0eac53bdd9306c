"""Model-name rewrite of response bytes back to the client-facing name (reference §1.3).

When the request was sent upstream as `target_model`, the model server answers with
`"model":"<target>"`; the client must see the name it asked for. Like the reference, the
literal byte patterns `"model":"<target>"` and `"model": "<target>"` are replaced — no JSON
parsing per chunk. Unlike a per-chunk replace, a pattern split across two chunks is still
rewritten: a chunk tail that could be the start of a pattern is held back and prepended to
the next chunk (released at end of stream). Only bytes inside a partial `"model": "...`
are ever delayed, so SSE event timing is unaffected.
"""

from __future__ import annotations

import msgspec


class ModelNameRewriter:
    __slots__ = ("_carry", "_max_hold", "_pairs", "_patterns")

    def __init__(self, target_model: str, client_model: str) -> None:
        target = msgspec.json.encode(target_model)
        client = msgspec.json.encode(client_model)
        self._pairs = (
            (b'"model":' + target, b'"model":' + client),
            (b'"model": ' + target, b'"model": ' + client),
        )
        self._patterns = tuple(p for p, _ in self._pairs)
        self._max_hold = max(len(p) for p in self._patterns) - 1
        self._carry = b""

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        for pattern, replacement in self._pairs:
            if pattern in data:
                data = data.replace(pattern, replacement)
        if end_of_stream:
            self._carry = b""
            return data
        hold = self._partial_suffix(data)
        if hold:
            self._carry = data[-hold:]
            return data[:-hold]
        self._carry = b""
        return data

    def _partial_suffix(self, data: bytes) -> int:
        """Length of the longest data suffix that is a proper prefix of a pattern."""
        n = len(data)
        lo = max(0, n - self._max_hold)
        i = data.find(b'"', lo)
        while i >= 0:
            tail = data[i:]
            for p in self._patterns:
                if len(tail) < len(p) and p.startswith(tail):
                    return n - i
            i = data.find(b'"', i + 1)
        return 0
