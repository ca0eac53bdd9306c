"""The response path fed by a hostile model server: SSE line endings, multi-line data fields, encoded bodies,
and the model-name rewrite's independence of chunking (the unsplit stream is the reference)."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.observability.logging import LogLimiter
from llmepp.request import usage as usage_mod
from llmepp.request.types import Usage

from .client import response_body, response_headers, serve, streamed
from .test_usage import _split, anthropic_stream, collect, responses_stream, rewrite_all, sse_stream

NEWLINES = [b"\n", b"\r\n", b"\r"]


def _relined(stream: bytes, nl: bytes) -> bytes:
    return stream.replace(b"\n", nl)


# -- SSE line endings (CR, LF and CRLF are all line ends) ---------------------------------------------------
@pytest.mark.parametrize("nl", NEWLINES)
def test_sse_usage_is_read_with_any_line_ending(nl: bytes) -> None:
    openai = _relined(sse_stream(5, {"prompt_tokens": 3, "completion_tokens": 4}), nl)
    assert collect([openai], streaming=True) == Usage(3, 4, 0, 7)
    assert collect([openai], streaming=False) == Usage(3, 4, 0, 7)  # SSE served as JSON
    anthropic = _relined(anthropic_stream(3, {"input_tokens": 7}, {"output_tokens": 9}), nl)
    assert collect([anthropic], streaming=True) == Usage(7, 9, 0, 16)
    responses = _relined(responses_stream(10, {"input_tokens": 2, "output_tokens": 5}), nl)
    assert collect([responses], streaming=True) == Usage(2, 5, 0, 7)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 20),
    ends=st.lists(st.sampled_from(NEWLINES), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 3000), max_size=20),
)
def test_mixed_line_endings_split_anywhere_give_the_lf_usage(n: int, ends: list[bytes], cuts: list[int]) -> None:
    lf = anthropic_stream(n, {"input_tokens": 11, "cache_read_input_tokens": 2}, {"output_tokens": n + 1})
    # One line ending per event (a CR ending a line then an LF ending the next, blank, one is a CRLF).
    events = lf.split(b"\n\n")
    mixed = b"".join(_relined(ev + b"\n\n", ends[i % len(ends)]) for i, ev in enumerate(events[:-1]))
    expected = collect([lf], streaming=True)
    assert expected == Usage(11, n + 1, 2, 12 + n)
    assert collect(_split(mixed, cuts), streaming=True) == expected


# -- an event's data in several `data:` lines (SSE joins them with a newline) -------------------------------
@pytest.mark.parametrize("nl", NEWLINES)
def test_a_usage_event_in_several_data_lines_is_read(nl: bytes) -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b'event: chunk\ndata: {"choices":[],\ndata:"usage":{"prompt_tokens":3,\n: a comment\n'
        b'data:  "completion_tokens":4}}\n\ndata: [DONE]\n\n'
    )
    stream = _relined(stream, nl)
    assert collect([stream], streaming=True) == Usage(3, 4, 0, 7)
    # Anthropic's message_start (read from the head) likewise.
    start = b'event: message_start\ndata: {"type":"message_start",\ndata: "message":{"usage":{"input_tokens":5}}}\n\n'
    delta = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":6}}\n\n'
    assert collect([_relined(start + delta, nl)], streaming=True) == Usage(5, 6, 0, 11)


def test_a_json_string_split_over_data_lines_is_no_usage_and_no_error() -> None:
    # SSE joins the lines with a newline: inside a JSON string that is malformed JSON, as the spec makes it.
    stream = b'data: {"x":"a\ndata: b","usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    assert collect([stream], streaming=True) is None


# -- the model-name rewrite: the output never depends on how the body was cut -------------------------------
@settings(max_examples=500, deadline=None)
@given(
    client=st.sampled_from(["cli", 'x"model', "tgt2", '"', "mo"]),
    parts=st.lists(
        st.sampled_from(
            [
                *(b'"model":"tgt"', b'model":"tgt"', b'"model": "tgt"', b'model": "tgt"', b':"tgt"', b'"model"'),
                *(b'"', b"x", b"\n", b" ", b'"tgt"'),
            ]
        ),
        max_size=10,
    ),
    cuts=st.lists(st.integers(0, 150), max_size=10),
)
def test_rewrite_output_is_that_of_the_unsplit_body(client: str, parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts)
    assert rewrite_all(_split(body, cuts), "tgt", client) == rewrite_all([body], "tgt", client)


def test_a_rewritten_name_is_never_rewritten_again_across_a_chunk_boundary() -> None:
    body = b'{"model":"tgt"model":"tgt"}'
    whole = rewrite_all([body])
    assert whole == b'{"model":"cli"model":"tgt"}'
    for i in range(len(body) + 1):
        assert rewrite_all([body[:i], body[i:]]) == whole, i
    body = b'{"model":"tgt":"tgt"}'
    whole = rewrite_all([body], client='x"model')
    for i in range(len(body) + 1):
        assert rewrite_all([body[:i], body[i:]], client='x"model') == whole, i


# -- an encoded body is never rewritten ------------------------------------------------------------------------
async def through_the_epp(chunks: list[bytes], encoding: str | None = None) -> bytes:
    """The response body the client gets when the pod answers `chunks` to a request routed with the model
    name rewritten to big-model-v2 (the client asked for "m")."""
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    extra: dict[str, Any] = {"content-encoding": encoding} if encoding is not None else {}
    async with serve() as h:
        s = h.open()
        await s.route(body, {"x-llm-d-model-name-rewrite": "big-model-v2"})
        await s.send(response_headers(200, "application/json", **extra))
        await s.recv()
        out = b""
        for i, chunk in enumerate(chunks):
            await s.send(response_body(chunk, eos=i == len(chunks) - 1))
            out += streamed(await s.recv(), "response_body")[0]
    return out


@pytest.mark.parametrize("encoding", ["gzip", "br", "GZIP"])
async def test_a_content_encoded_response_is_passed_through_unchanged(encoding: str) -> None:
    # gzip level 0 (stored blocks) carries the JSON bytes verbatim: a rewrite there changes the length and breaks
    # the stream's CRC; the EPP cannot read an encoded body, so it passes every byte as it came.
    plain = json.dumps({"model": "big-model-v2", "choices": [], "usage": {"prompt_tokens": 1}}).encode()
    encoded = gzip.compress(plain, compresslevel=0)
    assert b'"model": "big-model-v2"' in encoded
    out = await through_the_epp([encoded[i : i + 16] for i in range(0, len(encoded), 16)], encoding)
    assert out == encoded
    assert gzip.decompress(out) == plain


async def test_an_identity_encoded_response_is_still_rewritten() -> None:
    assert await through_the_epp([b'{"model":"big-model-v2"}'], "identity") == b'{"model":"m"}'


# -- a skipped usage is said (rate-limited) ---------------------------------------------------------------------
@pytest.mark.parametrize("nl", NEWLINES)
def test_a_malformed_usage_event_is_a_rate_limited_warning(
    nl: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(usage_mod, "_bad_count_log", LogLimiter(usage_mod.log, 300.0))
    bad = _relined(b'data: {"choices":[],"usage":{"prompt_tokens":3,\xff\n\ndata: [DONE]\n\n', nl)
    fine = sse_stream(3, None)  # a stream without usage is no malformed one
    with caplog.at_level("WARNING", logger=usage_mod.log.name):
        assert collect([fine], streaming=True) is None
        assert not caplog.records
        for _ in range(3):
            assert collect([bad], streaming=True) is None
    assert len(caplog.records) == 1
    assert "malformed" in caplog.records[0].getMessage()


def _event(kind: str, i: int, nl: bytes) -> bytes:
    usage = json.dumps({"prompt_tokens": i, "completion_tokens": i + 1}).encode()
    lines = {
        "delta": [b'data: {"choices":[{"delta":{"content":"t\\u00e9"}}],"usage":null}'],
        "comment": [b": keep-alive"],
        "usage": [b"event: chunk", b'data:{"choices":[],"usage":' + usage + b"}"],
        "split": [b'data: {"choices":[],', b": c", b'data: "usage":', b"id: 7", b"data:" + usage + b"}"],
        "big": [b'data: {"choices":[{"delta":{"content":"' + b"x" * 70_000 + b'"}}],"usage":null}'],
    }[kind]
    return nl.join(lines) + nl + nl


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["delta", "comment", "usage", "split", "big"]), st.sampled_from(NEWLINES)),
        max_size=12,
    ),
    done=st.booleans(),
    cuts=st.lists(st.integers(0, 200_000), max_size=25),
)
def test_hostile_streams_give_the_last_usage_however_split(
    events: list[tuple[str, bytes]], done: bool, cuts: list[int]
) -> None:
    stream = b"".join(_event(kind, i, nl) for i, (kind, nl) in enumerate(events)) + (b"data: [DONE]\n\n" * done)
    last = [i for i, (kind, _) in enumerate(events) if kind in ("usage", "split")]
    whole = collect([stream], streaming=True)
    assert collect(_split(stream, cuts), streaming=True) == whole
    if last and not any(kind == "big" for kind, _ in events[last[-1] + 1 :]):
        assert whole == Usage(last[-1], last[-1] + 1, 0, 2 * last[-1] + 1)


# -- a failure while handling a response chunk loses none of the bytes the rewriter held ----------------------
@pytest.mark.parametrize("failing_chunk", [1, 2], ids=["a middle chunk", "the last chunk"])
async def test_a_failure_handling_a_chunk_echoes_what_the_rewriter_held(
    monkeypatch: pytest.MonkeyPatch, failing_chunk: int
) -> None:
    """Chunk 0 ends in a possible start of the pattern (`"model":"big`): the rewriter holds it back for the next
    chunk. Before: a failure handling that chunk (here the usage reader's, inside the EPP) echoed the chunk raw
    and dropped the rewriter, and the held bytes with it; the client got a body with a hole."""
    from llmepp.request.usage import UsageCollector

    chunks = [b'{"id":"x","model":"big', b'-model-v2","choices":[],"more":"', b'tail"}']
    calls = {"n": 0}
    feed = UsageCollector.feed

    def failing_feed(self: UsageCollector, chunk: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == failing_chunk + 1:
            raise RuntimeError("usage reader bug")
        feed(self, chunk)

    monkeypatch.setattr(UsageCollector, "feed", failing_feed)
    out = await through_the_epp(chunks)
    assert calls["n"] == len(chunks)
    # Rewritten up to the failure, raw from there on: every byte there, once. (Failing at chunk 1, the name
    # was still held, so it goes out raw; failing at chunk 2, it had been rewritten with chunk 1.)
    raw = b"".join(chunks)
    assert out == (raw if failing_chunk == 1 else raw.replace(b"big-model-v2", b"m"))


async def test_a_failure_handling_the_last_chunk_after_its_feed_keeps_the_held_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last chunk's feed returns the held bytes; its answer is then completed (metadata, completion). A
    failure there answered the chunk raw without the bytes held before it."""
    from llmepp.server import stream as stream_mod

    def failing_end(self: object) -> None:
        raise RuntimeError("completion bug")

    monkeypatch.setattr(stream_mod.ExtProcStream, "_response_ended", failing_end)
    chunks = [b'{"id":"x","model":"big', b'-model-v2"}']
    out = await through_the_epp(chunks)
    assert out == b"".join(chunks)
