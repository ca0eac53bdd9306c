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

Counts written as JSON floats: an integral one (`12.0`) is read as its int. The reference's Go decoder
rejects it and so loses the whole usage; an operator whose server writes `12.0` means 12. A usage object
with a count that is no count (a fraction, a negative, or past `MAX_COUNT`) is ignored, as a malformed
one is, and a rate-limited warning says so.

SGLang's native `/generate` has no `usage`: each output carries a `meta_info` with `prompt_tokens`,
`completion_tokens` and `cached_tokens` (read when no `usage` is found). A batch answer (a list of
prompts, or n > 1) is a JSON list, one object per output: their counts are summed. A stream's chunks
carry each output's running totals (SGLang repeats the text so far in every chunk): per output (its
`meta_info.id`), the last chunk in the kept tail counts, and the outputs are summed; an output that
finished more than `SSE_TAIL_BYTES` before the end of the stream is not counted.

The result depends only on the bytes, never on how they were split into chunks: the
collector may keep more than the bound between chunks, but always evaluates exactly the
last N bytes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec

from llmepp.decoding import DECODE_ERRORS
from llmepp.observability.logging import LogLimiter
from llmepp.request.types import Usage

log = logging.getLogger(__name__)

SSE_TAIL_BYTES = 64 * 1024
HEAD_BYTES = 8 * 1024  # a stream's first events: where message_start is
JSON_BODY_LIMIT = 4 * 1024 * 1024
# Past 2**53 a float is no longer an exact integer; no response comes near it, so a larger count is garbage.
MAX_COUNT = 2**53

# A token count as written: JSON has one number type (ints beyond 64 bits decode as Python ints).
_Count = int | float | None


class _BadCount(ValueError):
    """A usage field that is not a token count."""


class _Details(msgspec.Struct):
    cached_tokens: _Count = None


class _UsageBody(msgspec.Struct):
    prompt_tokens: _Count = None
    completion_tokens: _Count = None
    total_tokens: _Count = None
    input_tokens: _Count = None
    output_tokens: _Count = None
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    cache_read_input_tokens: _Count = None


class _Inner(msgspec.Struct):
    usage: _UsageBody | None = None


class _MetaInfo(msgspec.Struct):
    """SGLang /generate: {"text": ..., "output_ids": [...], "meta_info": {"id": ..., "prompt_tokens": ...}}"""

    id: Any = None
    prompt_tokens: _Count = None
    completion_tokens: _Count = None
    cached_tokens: _Count = None


class _Envelope(msgspec.Struct):
    usage: _UsageBody | None = None
    # Responses API: {"type": "response.completed", "response": {..., "usage": {...}}}
    response: _Inner | None = None
    # Anthropic: {"type": "message_start", "message": {..., "usage": {...}}}
    message: _Inner | None = None
    # SGLang /generate
    meta_info: _MetaInfo | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ENVELOPES = msgspec.json.Decoder(list[_Envelope])  # an SGLang batch answer
_USAGE = msgspec.json.Decoder(_UsageBody)
_META = msgspec.json.Decoder(_MetaInfo)
_USAGE_KEY = b'"usage"'
_META_KEY = b'"meta_info"'
_ARRAY = re.compile(rb"[ \t\r\n]*\[")
# The id SGLang writes first in meta_info, as its raw JSON value (a string or a bare scalar), read from the end
# of `"meta_info"`.
_META_ID = re.compile(rb'[ \t]*:[ \t]*\{[ \t]*"id"[ \t]*:[ \t]*("(?:[^"\\\n]|\\.)*"|[^,}\s]+)')
_DONE = b"[DONE]"
_LONE_CR = re.compile(rb"\r(?!\n)")
# A `data:` line followed by another of the same event (no blank line between them).
_MULTI_DATA = re.compile(rb"(?:^|\n)data:[^\n]*+\n(?:[^\n]++\n)*?data:")
# Events naming "usage" without one (OpenAI-style `"usage": null` in every chunk of a stream that never
# reports it) decoded from the end before giving up: a stream reports its usage in (or near) its last
# event, and decoding every event of a 64 KB tail cost ~1 ms per response.
_USAGE_MISSES = 16
_bad_count_log = LogLimiter(log, 300.0)  # once per response from a misbehaving server: keep it quiet


def _count(v: _Count) -> int | None:
    """A token count as an int (an integral float too); _BadCount for anything else."""
    if v is None:
        return None
    n = int(v) if isinstance(v, float) and v.is_integer() else v
    if not isinstance(n, int) or not 0 <= n <= MAX_COUNT:
        raise _BadCount(v)
    return n


def _ignored(e: _BadCount) -> None:
    _bad_count_log.warning("count", "response usage ignored: token count %s is not a whole number in [0, 2**53]", e)


def _to_usage(u: _UsageBody) -> Usage | None:
    try:
        prompt = _count(u.prompt_tokens if u.prompt_tokens is not None else u.input_tokens)
        completion = _count(u.completion_tokens if u.completion_tokens is not None else u.output_tokens)
        details = u.prompt_tokens_details or u.input_tokens_details
        cached = _count(details.cached_tokens if details is not None else u.cache_read_input_tokens)
        total_tokens = _count(u.total_tokens)
    except _BadCount as e:
        _ignored(e)
        return None
    if prompt is None and completion is None and total_tokens is None:
        return None
    p = prompt or 0
    c = completion or 0
    total = total_tokens if total_tokens is not None else p + c
    return Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=cached or 0, total_tokens=total)


def _meta_usage(m: _MetaInfo) -> Usage | None:
    try:
        prompt, completion, cached = _count(m.prompt_tokens), _count(m.completion_tokens), _count(m.cached_tokens)
    except _BadCount as e:
        _ignored(e)
        return None
    if prompt is None and completion is None:
        return None
    p = prompt or 0
    c = completion or 0
    return Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=cached or 0, total_tokens=p + c)


def _envelope_usage(env: _Envelope) -> Usage | None:
    u = env.usage
    if u is None:
        inner = env.response or env.message
        u = inner.usage if inner is not None else None
    if u is not None:
        return _to_usage(u)
    return _meta_usage(env.meta_info) if env.meta_info is not None else None


def _from_envelope(doc: bytes | bytearray) -> Usage | None:
    try:
        env = _ENVELOPE.decode(doc)
    except DECODE_ERRORS:
        return None
    return _envelope_usage(env)


def _summed(usages: Iterable[Usage | None]) -> Usage | None:
    found = [u for u in usages if u is not None]
    if not found:
        return None
    p = sum(u.prompt_tokens for u in found)
    c = sum(u.completion_tokens for u in found)
    cached = sum(u.cached_tokens for u in found)
    return Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=cached, total_tokens=p + c)


def usage_from_json(body: bytes | bytearray) -> Usage | None:
    """Usage of a complete non-streaming JSON response body (an SGLang batch: a list), or None. A bytearray
    is read in place (a collected body of up to JSON_BODY_LIMIT is not copied)."""
    if _USAGE_KEY not in body and _META_KEY not in body:
        return None
    if _ARRAY.match(body) is None:
        return _from_envelope(body)
    try:
        envs = _ENVELOPES.decode(body)
    except DECODE_ERRORS:
        return None
    return _summed(_envelope_usage(env) for env in envs)


class _Malformed(Exception):
    """A `data:` line naming a usage is no JSON: perhaps one line of an event's several."""


def _read_sse(read: Callable[[bytes, bool], Usage | None], sse: bytes, warn: bool) -> Usage | None:
    """`read` of SSE bytes with one `\n` ending each line (SSE ends a line with CR, LF or CRLF; a raw CR in
    valid JSON is never inside a string), each event's data in one `data:` line. A CRLF line is read as it
    is (its CR is stripped): only a lone CR costs a rewrite of the bytes. An event whose data is in several
    `data:` lines is rare: the bytes are scanned for one only when a usage line is no JSON. A usage that is
    not read for that is a rate-limited warning when `warn` (not for a head: its last line is cut)."""
    if b"\r" in sse and _LONE_CR.search(sse) is not None:
        sse = _lf(sse)
    try:
        return read(sse, True)
    except _Malformed:
        pass
    if b"\r" in sse:  # CRLF: the blank line ending an event is no `\r` line here
        sse = _lf(sse)
    usage = read(_joined_data(sse) if _MULTI_DATA.search(sse) is not None else sse, False)
    if usage is None and warn:
        _bad_count_log.warning("sse", "response usage ignored: an SSE event naming a usage is malformed")
    return usage


def _lf(sse: bytes) -> bytes:
    if b"\r\n" in sse:
        sse = sse.replace(b"\r\n", b"\n")
    return sse.replace(b"\r", b"\n")


def _data_usage(payload: bytes, strict: bool) -> Usage | None:
    """The usage of a `data:` line's payload; when strict, _Malformed if it is no envelope (a part of one,
    as `"usage":{...` is, may still be JSON: a string, a number)."""
    try:
        env = _ENVELOPE.decode(payload)
    except DECODE_ERRORS:
        if strict:
            raise _Malformed from None
        return None
    return _envelope_usage(env)


def _joined_data(sse: bytes) -> bytes:
    """Each event's `data:` lines in one: SSE joins them with a newline, joined with a tab here, which JSON
    reads exactly as it reads a newline (whitespace between tokens, malformed inside a string)."""
    out: list[bytes] = []
    data: list[bytes] = []  # the current event's data lines
    for line in sse.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line if not data else line[6:] if line[5:6] == b" " else line[5:])
            continue
        if not line and data:  # a blank line ends the event
            out.append(b"\t".join(data))
            data = []
        out.append(line)  # event:, id:, comments: kept (before the event's data)
    if data:
        out.append(b"\t".join(data))
    return b"\n".join(out)


def usage_from_sse(tail: bytes) -> Usage | None:
    """Usage from the last SSE `data:` event that carries one (the tail may start mid-event: then the last
    `"usage"` object of that partial first line, as a Responses-API `response.completed` event repeating a
    long output outgrows the tail). An SGLang stream (its last event has a `meta_info`, no `usage`): the
    outputs' last running totals, summed."""
    if _USAGE_KEY not in tail and _META_KEY not in tail:  # no line can give one: skip the Python line walk
        return None
    return _read_sse(_usage_from_sse_lines, tail, True)


def _usage_from_sse_lines(tail: bytes, strict: bool) -> Usage | None:
    end = len(tail)
    last_event = True
    misses = 0
    while end > 0:
        start = tail.rfind(b"\n", 0, end) + 1
        line = tail[start:end]
        end = start - 1
        if last_event and line.startswith(b"data:") and line[5:].strip() != _DONE:
            last_event = False
            if _USAGE_KEY not in line and _META_KEY in line:
                return _meta_from_sse(tail)
        if _USAGE_KEY not in line:
            if start == 0 and last_event and _META_KEY in line:  # only a part of SGLang's last chunk is kept
                return _meta_from_sse(tail)
            continue
        if not line.startswith(b"data:"):
            if start == 0:
                return usage_from_fragment(line)
            continue
        payload = line[5:].strip()
        if payload == _DONE:
            continue
        usage = _data_usage(payload, strict)
        if usage is not None:
            return usage
        misses += 1
        if misses >= _USAGE_MISSES:
            return None
    return None


def _meta_from_sse(tail: bytes) -> Usage | None:
    """An SGLang stream's usage: the last `meta_info` of each output (by id) in the tail, summed."""
    last: dict[Any, Usage | None] = {}
    # The raw id of each output counted: an earlier chunk of it is skipped undecoded (one set lookup a line;
    # an id written otherwise than msgspec encodes it is decoded, and then skipped by `last`).
    counted: set[bytes] = set()
    end = len(tail)
    while end > 0:
        start = tail.rfind(b"\n", 0, end) + 1
        line = tail[start:end]
        end = start - 1
        key = line.rfind(_META_KEY)
        if key < 0:
            continue
        raw = _META_ID.match(line, key + len(_META_KEY))
        if raw is not None and raw.group(1) in counted:
            continue
        if line.startswith(b"data:"):
            meta = _meta_of(line[5:].strip())
        elif start == 0:  # the tail starts inside a (long) chunk: its meta_info closes it
            meta = _last_meta_object(line)
        else:
            continue
        if meta is None or not isinstance(meta.id, str | int | float | None) or meta.id in last:
            continue
        last[meta.id] = _meta_usage(meta)
        if meta.id is not None:
            counted.add(msgspec.json.encode(meta.id))
    return _summed(last.values())


def _meta_of(payload: bytes) -> _MetaInfo | None:
    try:
        return _ENVELOPE.decode(payload).meta_info
    except DECODE_ERRORS:
        return None


def _last_meta_object(fragment: bytes) -> _MetaInfo | None:
    """The last `"meta_info": {...}` object in a fragment of a JSON document."""
    for obj in _objects_after(fragment, _META_KEY):
        try:
            return _META.decode(obj)
        except DECODE_ERRORS:
            pass
    return None


def usage_from_sse_head(head: bytes) -> Usage | None:
    """Usage from the first SSE `data:` event that carries one (Anthropic's message_start)."""
    if _USAGE_KEY not in head:  # only a line naming one is read
        return None
    return _read_sse(_head_usage, head, False)


def _head_usage(head: bytes, strict: bool) -> Usage | None:
    misses = 0
    for line in head.split(b"\n"):
        if line.startswith(b"data:") and _USAGE_KEY in line:
            usage = _data_usage(line[5:].strip(), strict)
            if usage is not None:
                return usage
            misses += 1
            if misses >= _USAGE_MISSES:
                return None
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
    """Usage from the last `"usage": {...}` object in a fragment of a JSON document, else from its last
    SGLang `"meta_info": {...}` object."""
    for obj in _objects_after(tail, _USAGE_KEY):
        try:
            return _to_usage(_USAGE.decode(obj))
        except DECODE_ERRORS:
            pass
    meta = _last_meta_object(tail) if _META_KEY in tail else None
    return _meta_usage(meta) if meta is not None else None


# The last few `key:` occurrences are tried, no more: each scan runs in Python to the object's end (or the
# buffer's), so a pod answering `"usage":{` thousands of times over made it quadratic (9.5 s of event loop
# for a 64 KB tail). A real answer's usage is its last (or next to last) one.
_MAX_CANDIDATES = 8
_MAX_USAGE_OBJECT = 1024  # bytes of a `"usage": {...}` read in a dropped part of a large body


def _objects_after(buf: bytes, key: bytes) -> Iterator[bytes]:
    """The `{...}` objects following `key:` in `buf`, last first (of its last _MAX_CANDIDATES occurrences)."""
    pos = len(buf)
    for _ in range(_MAX_CANDIDATES):
        pos = buf.rfind(key, 0, pos)
        if pos < 0:
            return
        obj = _object_after_colon(buf, pos + len(key))
        if obj is not None:
            yield obj


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

    __slots__ = ("_buf", "_dropped_usage", "_head", "_head_open", "_overflow", "streaming")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self._buf = bytearray()
        self._head = bytearray()
        self._head_open = streaming  # still keeping a stream's first HEAD_BYTES
        self._overflow = False  # non-streaming body grew past JSON_BODY_LIMIT
        # The last "usage" object of the bytes an overflowing body dropped: vLLM writes fields after its usage
        # (prompt_logprobs, prompt_token_ids), which can push it out of the kept tail.
        self._dropped_usage: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        buf = self._buf
        buf += chunk
        if self._head_open:
            head = self._head
            head += chunk[: HEAD_BYTES - len(head)]
            self._head_open = len(head) < HEAD_BYTES
        if self.streaming or self._overflow:
            if len(buf) > 2 * SSE_TAIL_BYTES:
                if self._overflow:
                    self._keep_dropped_usage(buf)
                del buf[:-SSE_TAIL_BYTES]
        elif len(buf) > JSON_BODY_LIMIT:
            self._overflow = True
            self._keep_dropped_usage(buf)
            del buf[:-SSE_TAIL_BYTES]

    def _keep_dropped_usage(self, buf: bytearray) -> None:
        """Remember the last complete `"usage": {...}` whose key starts in the part of `buf` about to be
        dropped (its object may run on into the kept tail: the whole buffer is read)."""
        end = len(buf) - SSE_TAIL_BYTES + len(_USAGE_KEY) - 1  # a key found before `end` starts before the cut
        for _ in range(_MAX_CANDIDATES):
            pos = buf.rfind(_USAGE_KEY, 0, end)
            if pos < 0:
                return
            # A usage object is small: the scan (a Python loop) is bounded, whatever the pod sends.
            obj = _object_after_colon(bytes(buf[pos + len(_USAGE_KEY) : pos + _MAX_USAGE_OBJECT]), 0)
            if obj is not None:
                self._dropped_usage = obj
                return
            end = pos + len(_USAGE_KEY) - 1

    def result(self) -> Usage | None:
        if self.streaming:
            return _stream_usage(bytes(self._head), bytes(memoryview(self._buf)[-SSE_TAIL_BYTES:]))
        if self._overflow:
            usage = usage_from_fragment(bytes(memoryview(self._buf)[-SSE_TAIL_BYTES:]))
            if usage is None and self._dropped_usage is not None:
                try:
                    usage = _to_usage(_USAGE.decode(self._dropped_usage))
                except DECODE_ERRORS:
                    usage = None
            return usage
        body = self._buf
        usage = usage_from_json(body)
        if usage is None and b"data:" in body:
            # An SSE stream served without the event-stream content type: all of it is here.
            usage = _stream_usage(bytes(body[:HEAD_BYTES]), bytes(body[-SSE_TAIL_BYTES:]))
        return usage


def _stream_usage(head: bytes, tail: bytes) -> Usage | None:
    """A stream's usage: its last events', completed by its first (Anthropic sends the input tokens in
    message_start only)."""
    end = usage_from_sse(tail)
    if end is not None and end.prompt_tokens:
        return end
    return _merged(usage_from_sse_head(head), end)
