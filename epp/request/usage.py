"""Token usage from a model server's response, with bounded memory (reference §1.5).

Two shapes:

- streaming (`text/event-stream`): usage comes in the last `data: {...}` event carrying a
  non-null `usage` (OpenAI `stream_options.include_usage`, vLLM continuous usage stats, or a
  Responses-API `response.completed` event with `response.usage`), before `data: [DONE]`.
  Only the last `SSE_TAIL_BYTES` of the stream are kept; an event longer than that (a
  `response.completed` repeats the whole output) gives the last `"usage"` object of its kept part.
- non-streaming JSON: the body is kept up to `JSON_BODY_LIMIT` and decoded once at the end.
  A larger body is not kept whole: its last `SSE_TAIL_BYTES` are, and the last `"usage"`
  object in them is decoded (servers put usage after the choices).

Field variants: `prompt_tokens`/`input_tokens`, `completion_tokens`/`output_tokens`,
`prompt_tokens_details.cached_tokens`/`input_tokens_details.cached_tokens`/
`cache_read_input_tokens` (Anthropic), `total_tokens` (recomputed as prompt + completion when
absent). An Anthropic Messages stream splits its usage: `message_start` carries the input
tokens (in `message.usage`), the last `message_delta` the output tokens; the first
`HEAD_BYTES` of a stream are kept too, and the two are merged (as the reference does).

The result depends only on the bytes, never on how they were split into chunks: the
collector may keep more than the bound between chunks, but always evaluates exactly the
last N bytes.
"""

from __future__ import annotations

import msgspec

from llmepp.request.types import Usage

SSE_TAIL_BYTES = 64 * 1024
HEAD_BYTES = 8 * 1024  # a stream's first events: where message_start is
JSON_BODY_LIMIT = 4 * 1024 * 1024


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _UsageBody(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    cache_read_input_tokens: int | None = None


class _Inner(msgspec.Struct):
    usage: _UsageBody | None = None


class _Envelope(msgspec.Struct):
    usage: _UsageBody | None = None
    # Responses API: {"type": "response.completed", "response": {..., "usage": {...}}}
    response: _Inner | None = None
    # Anthropic: {"type": "message_start", "message": {..., "usage": {...}}}
    message: _Inner | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_USAGE = msgspec.json.Decoder(_UsageBody)
_USAGE_KEY = b'"usage"'
_DONE = b"[DONE]"


def _to_usage(u: _UsageBody) -> Usage | None:
    prompt = u.prompt_tokens if u.prompt_tokens is not None else u.input_tokens
    completion = u.completion_tokens if u.completion_tokens is not None else u.output_tokens
    details = u.prompt_tokens_details or u.input_tokens_details
    cached = details.cached_tokens if details is not None else u.cache_read_input_tokens
    if prompt is None and completion is None and u.total_tokens is None:
        return None
    p = prompt or 0
    c = completion or 0
    total = u.total_tokens if u.total_tokens is not None else p + c
    return Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=cached or 0, total_tokens=total)


def _from_envelope(doc: bytes) -> Usage | None:
    try:
        env = _ENVELOPE.decode(doc)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    u = env.usage
    if u is None:
        inner = env.response or env.message
        u = inner.usage if inner is not None else None
    return _to_usage(u) if u is not None else None


def usage_from_json(body: bytes) -> Usage | None:
    """Usage of a complete non-streaming JSON response body, or None."""
    if _USAGE_KEY not in body:
        return None
    return _from_envelope(body)


def usage_from_sse(tail: bytes) -> Usage | None:
    """Usage from the last SSE `data:` event that carries one (the tail may start mid-event: then the last
    `"usage"` object of that partial first line, as a Responses-API `response.completed` event repeating a
    long output outgrows the tail)."""
    end = len(tail)
    while end > 0:
        start = tail.rfind(b"\n", 0, end) + 1
        line = tail[start:end]
        end = start - 1
        if _USAGE_KEY not in line:
            continue
        if not line.startswith(b"data:"):
            if start == 0:
                return usage_from_fragment(line)
            continue
        payload = line[5:].strip()
        if payload == _DONE:
            continue
        usage = _from_envelope(payload)
        if usage is not None:
            return usage
    return None


def usage_from_sse_head(head: bytes) -> Usage | None:
    """Usage from the first SSE `data:` event that carries one (Anthropic's message_start)."""
    for line in head.split(b"\n"):
        if line.startswith(b"data:") and _USAGE_KEY in line:
            usage = _from_envelope(line[5:].strip())
            if usage is not None:
                return usage
    return None


def _merged(start: Usage | None, end: Usage | None) -> Usage | None:
    """A stream's usage from its first and last usage events: input from the start unless the end
    has it, output from the end."""
    if start is None or end is None or end.prompt_tokens:
        return end or start
    prompt, completion = start.prompt_tokens, end.completion_tokens or start.completion_tokens
    cached = end.cached_tokens or start.cached_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, total_tokens=prompt + completion
    )


def usage_from_fragment(tail: bytes) -> Usage | None:
    """Usage from the last `"usage": {...}` object in a fragment of a JSON document."""
    pos = len(tail)
    while True:
        pos = tail.rfind(_USAGE_KEY, 0, pos)
        if pos < 0:
            return None
        obj = _object_after_colon(tail, pos + len(_USAGE_KEY))
        if obj is not None:
            try:
                return _to_usage(_USAGE.decode(obj))
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                pass


def _object_after_colon(buf: bytes, i: int) -> bytes | None:
    """The balanced `{...}` following `: ` at `i` (string-aware), or None."""
    n = len(buf)
    while i < n and buf[i] in b" \t\r\n":
        i += 1
    if i >= n or buf[i] != 0x3A:  # ':'
        return None
    i += 1
    while i < n and buf[i] in b" \t\r\n":
        i += 1
    if i >= n or buf[i] != 0x7B:  # '{'
        return None
    start = i
    depth = 0
    in_str = False
    while i < n:
        c = buf[i]
        if in_str:
            if c == 0x5C:  # backslash: skip the escaped byte
                i += 1
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return buf[start : i + 1]
        i += 1
    return None


class UsageCollector:
    """Feeds on response chunks; `result()` once at the end.

    Per-chunk cost is one bytearray append (and an occasional trim; a stream's first chunks are
    also copied into the head); parsing happens once.
    """

    __slots__ = ("_buf", "_head", "_head_open", "_overflow", "streaming")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self._buf = bytearray()
        self._head = bytearray()
        self._head_open = streaming  # still keeping a stream's first HEAD_BYTES
        self._overflow = False  # non-streaming body grew past JSON_BODY_LIMIT

    def feed(self, chunk: bytes) -> None:
        buf = self._buf
        buf += chunk
        if self._head_open:
            head = self._head
            head += chunk[: HEAD_BYTES - len(head)]
            self._head_open = len(head) < HEAD_BYTES
        if self.streaming or self._overflow:
            if len(buf) > 2 * SSE_TAIL_BYTES:
                del buf[:-SSE_TAIL_BYTES]
        elif len(buf) > JSON_BODY_LIMIT:
            self._overflow = True
            del buf[:-SSE_TAIL_BYTES]

    def result(self) -> Usage | None:
        if self.streaming:
            end = usage_from_sse(bytes(self._buf[-SSE_TAIL_BYTES:]))
            if end is not None and end.prompt_tokens:
                return end
            return _merged(usage_from_sse_head(bytes(self._head)), end)
        if self._overflow:
            return usage_from_fragment(bytes(self._buf[-SSE_TAIL_BYTES:]))
        body = bytes(self._buf)
        usage = usage_from_json(body)
        if usage is None and b"data:" in body:
            # An SSE stream served without the event-stream content type.
            usage = usage_from_sse(body[-SSE_TAIL_BYTES:])
        return usage
