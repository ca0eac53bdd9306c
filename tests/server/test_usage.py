"""Usage extraction from SSE tails and JSON bodies; chunking never changes the answer."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.observability.logging import LogLimiter
from llmepp.request import usage as usage_mod
from llmepp.request.rewrite import ModelNameRewriter
from llmepp.request.types import Usage
from llmepp.request.usage import (
    JSON_BODY_LIMIT,
    SSE_TAIL_BYTES,
    UsageCollector,
    usage_from_fragment,
    usage_from_json,
    usage_from_sse,
)


def collect(chunks: list[bytes], streaming: bool) -> Usage | None:
    c = UsageCollector(streaming)
    for ch in chunks:
        c.feed(ch)
    return c.result()


def sse_stream(n_events: int, usage: dict | None, done: bool = True, crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    parts = [f'data: {{"choices":[{{"delta":{{"content":"tok{i}"}}}}],"usage":null}}{nl}{nl}' for i in range(n_events)]
    if usage is not None:
        parts.append(f"data: {json.dumps({'choices': [], 'usage': usage})}{nl}{nl}")
    if done:
        parts.append(f"data: [DONE]{nl}{nl}")
    return "".join(parts).encode()


def test_json_usage_with_cached_tokens() -> None:
    body = (
        b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,'
        b'"prompt_tokens_details":{"cached_tokens":3}}}'
    )
    assert usage_from_json(body) == Usage(5, 2, 3, 7)


def test_json_usage_responses_api_variant_and_total_recomputed() -> None:
    body = b'{"usage":{"input_tokens":4,"output_tokens":6,"input_tokens_details":{"cached_tokens":1}}}'
    assert usage_from_json(body) == Usage(4, 6, 1, 10)


def test_json_without_usage_or_invalid() -> None:
    assert usage_from_json(b'{"choices":[]}') is None
    assert usage_from_json(b'{"usage": null}') is None
    assert usage_from_json(b'{"usage": {"prompt_tokens": "x"}}') is None
    assert usage_from_json(b"not json usage") is None
    # A string that is not UTF-8 where a field is read (msgspec's UnicodeDecodeError): no usage, not an error on
    # the response path; in a field that is skipped it does not matter.
    assert usage_from_json(b'{"meta_info":{"id":"\xff","prompt_tokens":1,"completion_tokens":1}}') is None
    assert usage_from_sse(b'data: {"meta_info":{"id":"\xff","prompt_tokens":1,"completion_tokens":1}}\n\n') is None
    text = b'{"choices":[{"text":"\xff"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    assert usage_from_json(text) == Usage(1, 1, 0, 2)


def test_sse_final_event_before_done() -> None:
    u = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    assert usage_from_sse(sse_stream(3, u)) == Usage(11, 4, 0, 15)
    assert usage_from_sse(sse_stream(3, u, crlf=True)) == Usage(11, 4, 0, 15)
    assert usage_from_sse(sse_stream(3, None)) is None


def test_a_stream_of_null_usages_is_given_up_on_after_a_bounded_number_of_decodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OpenAI-style chunks each carry "usage": null and no event reports it: decoding every event of the
    # tail cost ~1 ms per response.
    decoded = 0
    real = usage_mod._from_envelope

    def counting(doc: bytes) -> Usage | None:
        nonlocal decoded
        decoded += 1
        return real(doc)

    monkeypatch.setattr(usage_mod, "_from_envelope", counting)
    assert collect([sse_stream(500, None)], streaming=True) is None
    assert decoded <= 2 * usage_mod._USAGE_MISSES  # the tail, then the head (Anthropic's message_start)


def test_a_usage_event_a_few_null_usage_events_before_the_end_is_found() -> None:
    u = {"prompt_tokens": 9, "completion_tokens": 3}
    stream = sse_stream(50, u, done=False) + sse_stream(usage_mod._USAGE_MISSES - 1, None)
    assert usage_from_sse(stream) == Usage(9, 3, 0, 12)


def test_sse_continuous_usage_takes_the_last() -> None:
    stream = (
        b'data: {"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b'data: {"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_from_sse(stream) == Usage(3, 2, 0, 5)


def test_sse_responses_api_completed_event() -> None:
    stream = (
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"x"}\n\n'
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"id":"r",'
        b'"usage":{"input_tokens":8,"output_tokens":2,"total_tokens":10}}}\n\n'
    )
    assert usage_from_sse(stream) == Usage(8, 2, 0, 10)


def test_long_stream_keeps_only_a_tail() -> None:
    u = {"prompt_tokens": 1, "completion_tokens": 20000, "total_tokens": 20001}
    stream = sse_stream(20000, u)  # ~1.2 MB
    c = UsageCollector(True)
    for i in range(0, len(stream), 100):
        c.feed(stream[i : i + 100])
        assert len(c._buf) <= 2 * usage_mod.SSE_TAIL_BYTES
    assert c.result() == Usage(1, 20000, 0, 20001)


def anthropic_stream(n_deltas: int, start: dict, end: dict) -> bytes:
    """An Anthropic Messages stream: usage split over message_start and the last message_delta."""
    events = [("message_start", {"type": "message_start", "message": {"id": "m", "usage": start}})]
    events += [
        ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": f"t{i}"}})
        for i in range(n_deltas)
    ]
    events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": end})]
    events += [("message_stop", {"type": "message_stop"})]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def test_anthropic_json_usage_with_cache_reads() -> None:
    body = {
        "type": "message",
        "content": [],
        "usage": {"input_tokens": 30, "output_tokens": 5, "cache_read_input_tokens": 16},
    }
    assert usage_from_json(json.dumps(body).encode()) == Usage(30, 5, 16, 35)


def test_anthropic_stream_merges_message_start_and_the_last_delta() -> None:
    start = {"input_tokens": 40, "output_tokens": 1, "cache_read_input_tokens": 32}
    short = anthropic_stream(3, start, {"output_tokens": 9})
    assert collect([short], streaming=True) == Usage(40, 9, 32, 49)
    # Long enough that message_start is far outside the kept tail: the head has it.
    long = anthropic_stream(30000, start, {"output_tokens": 30000})
    assert len(long) > 4 * usage_mod.SSE_TAIL_BYTES
    chunks = [long[i : i + 150] for i in range(0, len(long), 150)]
    assert collect(chunks, streaming=True) == Usage(40, 30000, 32, 30040)
    # A final delta that reports the input itself (newer API versions) wins.
    both = anthropic_stream(3, start, {"input_tokens": 41, "output_tokens": 9})
    assert collect([both], streaming=True) == Usage(41, 9, 0, 50)
    # Served without the event-stream content type (read as a body that turns out to be SSE): the same
    # counts. Before, only the last events were read there: no input or cached tokens.
    assert collect([short], streaming=False) == Usage(40, 9, 32, 49)


def test_large_json_body_falls_back_to_the_tail() -> None:
    body = json.dumps(
        {
            "choices": [{"text": "x" * (usage_mod.JSON_BODY_LIMIT + 10)}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 9},
        }
    ).encode()
    c = UsageCollector(False)
    for i in range(0, len(body), 65536):
        c.feed(body[i : i + 65536])
    assert len(c._buf) <= 2 * usage_mod.SSE_TAIL_BYTES
    assert c.result() == Usage(2, 9, 0, 11)


def test_fragment_parser_handles_strings_with_braces() -> None:
    frag = b'"text": "a}b", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "x": "}{"}}'
    assert usage_from_fragment(frag) == Usage(1, 1, 0, 2)
    assert usage_from_fragment(b'"usage": {"prompt_tokens": 1') is None


def test_sse_served_as_json_content_type() -> None:
    stream = sse_stream(2, {"prompt_tokens": 1, "completion_tokens": 2})
    assert collect([stream], streaming=False) == Usage(1, 2, 0, 3)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


usage_dicts = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
    optional={"prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 1000)})},
)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 30), u=st.none() | usage_dicts, cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_sse_chunk_boundaries_do_not_matter(n: int, u: dict | None, cuts: list[int]) -> None:
    stream = sse_stream(n, u)
    whole = collect([stream], streaming=True)
    assert collect(_split(stream, cuts), streaming=True) == whole
    if u is not None:
        assert whole is not None and whole.prompt_tokens == u["prompt_tokens"]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 3000), cuts=st.lists(st.integers(0, 300_000), max_size=30))
def test_anthropic_head_and_tail_are_chunking_independent(n: int, cuts: list[int]) -> None:
    stream = anthropic_stream(n, {"input_tokens": 7}, {"output_tokens": n})
    assert collect(_split(stream, cuts), streaming=True) == collect([stream], streaming=True) == Usage(7, n, 0, 7 + n)


@settings(max_examples=30, deadline=None)
@given(
    pad=st.integers(0, 3 * usage_mod.SSE_TAIL_BYTES),
    cuts=st.lists(st.integers(0, 4 * usage_mod.SSE_TAIL_BYTES), max_size=30),
)
def test_tail_bound_is_chunking_independent(pad: int, cuts: list[int]) -> None:
    # A usage event that straddles the tail bound gives the same answer however it is cut.
    stream = b"data: " + b"x" * pad + b"\n\n" + sse_stream(1, {"prompt_tokens": 1, "completion_tokens": 1}) + b"y" * pad
    whole = collect([stream], streaming=True)
    assert collect(_split(stream, cuts), streaming=True) == whole


@settings(max_examples=200, deadline=None)
@given(u=usage_dicts, text=st.text(max_size=200), cuts=st.lists(st.integers(0, 600), max_size=10))
def test_json_chunk_boundaries_do_not_matter(u: dict, text: str, cuts: list[int]) -> None:
    body = json.dumps({"choices": [{"text": text}], "usage": u}).encode()
    got = collect(_split(body, cuts), streaming=False)
    assert got == collect([body], streaming=False)
    assert got is not None and got.completion_tokens == u["completion_tokens"]


# -- model-name rewrite ------------------------------------------------------------------------------
def rewrite_all(chunks: list[bytes], target: str = "tgt", client: str = "cli") -> bytes:
    rw = ModelNameRewriter(target, client)
    return b"".join(rw.feed(ch, i == len(chunks) - 1) for i, ch in enumerate(chunks))


def test_rewrite_patterns() -> None:
    src = b'{"model":"tgt","x":{"model": "tgt"},"y":"model:tgt","z":"tgt2","w":{"model":"tgt2"}}'
    assert rewrite_all([src]) == b'{"model":"cli","x":{"model": "cli"},"y":"model:tgt","z":"tgt2","w":{"model":"tgt2"}}'


def test_rewrite_escapes_names() -> None:
    rw = ModelNameRewriter('a"b', "c")
    assert rw.feed(b'{"model":"a\\"b"}', True) == b'{"model":"c"}'


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(
            [b'"model":"tgt"', b'"model": "tgt"', b'"model":"tg"', b"data: ", b'"', b"x", b"\n\n", b'"model"']
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(0, 200), max_size=10),
)
def test_rewrite_is_independent_of_chunking(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    expected = data.replace(b'"model":"tgt"', b'"model":"cli"').replace(b'"model": "tgt"', b'"model": "cli"')
    chunks = _split(data, cuts)
    assert rewrite_all(chunks) == expected


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from([b'"model":"tgt"', b'"model": "tgt"', b"data: ", b'"', b"x", b'"model"']), max_size=12
    ),
    cuts=st.lists(st.integers(0, 200), max_size=10),
)
def test_rewrite_without_held_tails_returns_every_byte_of_each_chunk(parts: list[bytes], cuts: list[int]) -> None:
    # hold_tails=False: each chunk is rewritten on its own and returned whole (nothing waits for a next chunk).
    rw = ModelNameRewriter("tgt", "cli", hold_tails=False)
    for chunk in _split(b"".join(parts), cuts):
        expected = chunk.replace(b'"model":"tgt"', b'"model":"cli"').replace(b'"model": "tgt"', b'"model": "cli"')
        assert rw.feed(chunk, False) == expected and rw.held == b""


# -- usage events longer than the kept tail, odd bodies ---------------------------------------------------
def responses_stream(output_chars: int, usage: dict | None) -> bytes:
    """A Responses-API stream: its response.completed event carries the whole output, then the usage."""
    resp: dict[str, object] = {"id": "r", "model": "m", "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str, dict[str, object]]] = [("response.created", {"type": "response.created", "response": resp})]
    events += [("response.output_text.delta", {"type": "response.output_text.delta", "delta": "w"})] * 20
    output = [{"type": "message", "content": [{"type": "output_text", "text": "w" * output_chars}]}]
    done = {**resp, "status": "completed", "output": output, "usage": usage}
    events += [("response.completed", {"type": "response.completed", "sequence_number": 9, "response": done})]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def test_a_usage_event_longer_than_the_kept_tail_still_gives_the_usage() -> None:
    # response.completed repeats the whole output: past ~16k tokens of text it outgrows SSE_TAIL_BYTES, and the
    # usage after the output was lost (the tail starts inside the event, so no line of it starts with "data:").
    u = {"input_tokens": 8, "output_tokens": 30000, "total_tokens": 30008, "input_tokens_details": {"cached_tokens": 2}}
    stream = responses_stream(3 * usage_mod.SSE_TAIL_BYTES, u)
    assert collect([stream], streaming=True) == Usage(8, 30000, 2, 30008)
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert collect(chunks, streaming=True) == Usage(8, 30000, 2, 30008)
    assert collect(chunks, streaming=False) == Usage(8, 30000, 2, 30008)  # served without the event-stream type
    assert collect([responses_stream(3 * usage_mod.SSE_TAIL_BYTES, None)], streaming=True) is None


def test_a_later_complete_usage_event_wins_over_a_partial_first_line() -> None:
    older = b'"x": "' + b"y" * 100 + b'", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
    newer = b'data: {"usage": {"prompt_tokens": 5, "completion_tokens": 7}}\n\ndata: [DONE]\n\n'
    assert usage_from_sse(older + newer) == Usage(5, 7, 0, 12)
    assert usage_from_sse(older) == Usage(1, 1, 0, 2)
    # A text that merely mentions usage is escaped JSON: no "usage" key in it.
    assert usage_from_sse(b'"text": "see \\"usage\\": {\\"prompt_tokens\\": 3}"}\n\n') is None


@settings(max_examples=30, deadline=None)
@given(
    chars=st.integers(0, 3 * usage_mod.SSE_TAIL_BYTES),
    cuts=st.lists(st.integers(0, 4 * usage_mod.SSE_TAIL_BYTES), max_size=20),
)
def test_long_usage_events_are_chunking_independent(chars: int, cuts: list[int]) -> None:
    u = {"input_tokens": 3, "output_tokens": chars}
    stream = responses_stream(chars, u)
    assert (
        collect(_split(stream, cuts), streaming=True)
        == collect([stream], streaming=True)
        == Usage(3, chars, 0, 3 + chars)
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_deeply_nested_responses_give_no_usage_and_raise_nothing(streaming: bool) -> None:
    nest = b"[" * 5000 + b"]" * 5000
    body = b'{"x": ' + nest + b', "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    collect([b"data: " + body + b"\n\n" if streaming else body], streaming=streaming)  # no RecursionError
    assert usage_from_json(body) is None
    assert usage_from_fragment(b'"usage": {"a": ' + nest + b"}") is None


# -- model-name rewrite: whole JSON / SSE documents -------------------------------------------------------
def _renamed(doc: object, target: str, client: str) -> object:
    """What the client must see: every "model" key whose value is the target name → the client name."""
    if isinstance(doc, dict):
        return {k: client if k == "model" and v == target else _renamed(v, target, client) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_renamed(v, target, client) for v in doc]
    return doc


special_names = ["tgt", "org/model-7b", 'q"uote', "back\\slash", "é 模型", " spaced ", "model"]
model_names = st.sampled_from(special_names) | st.text(min_size=1, max_size=8)
json_keys = st.sampled_from(["model", "content", "id", "text", "usage"]) | st.text(max_size=5)
json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | model_names,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(json_keys, kids, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    target=model_names,
    client=model_names,
    events=st.lists(json_docs, min_size=1, max_size=4),
    spaced=st.booleans(),
    crlf=st.booleans(),
    sse=st.booleans(),
    data=st.data(),
)
def test_rewrite_of_json_and_sse_documents_split_anywhere(
    target: str, client: str, events: list[object], spaced: bool, crlf: bool, sse: bool, data: st.DataObject
) -> None:
    """Every `"model"` key naming the target is renamed, nothing else (a model name inside a text is escaped
    JSON, never a key), and however the body is cut into chunks the output is the same bytes."""
    if target == client:
        return
    docs = [{"model": target, "content": f'"model":"{target}" {target}', "x": e} for e in events]

    def enc(d: object) -> bytes:
        separators = (", ", ": ") if spaced else (",", ":")
        return json.dumps(d, ensure_ascii=False, separators=separators).encode()

    nl = b"\r\n" if crlf else b"\n"
    if sse:
        body = b"".join(b"data: " + enc(d) + nl + nl for d in docs) + b"data: [DONE]" + nl + nl
    else:
        body = enc(docs[0])
    whole = rewrite_all([body], target, client)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    assert rewrite_all(_split(body, cuts), target, client) == whole
    if sse:
        lines = [ln for ln in whole.split(nl) if ln.startswith(b"data: {")]
        got = [json.loads(ln[6:]) for ln in lines]
    else:
        got = [json.loads(whole)]
    assert got == [_renamed(d, target, client) for d in (docs if sse else docs[:1])]


def test_rewrite_at_every_split_point() -> None:
    body = b'data: {"id":"x","model":"tgt","choices":[{"delta":{"content":"\\"model\\":\\"tgt\\""}}]}\r\n\r\n'
    body += b'data: {"model": "tgt", "usage": {"prompt_tokens": 1}}\r\n\r\ndata: [DONE]\r\n\r\n'
    expected = body.replace(b'"model":"tgt"', b'"model":"cli"').replace(b'"model": "tgt"', b'"model": "cli"')
    assert expected.count(b"cli") == 2
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1, 7):
            assert rewrite_all([body[:i], body[i:j], body[j:]]) == expected


# -- counts written as JSON floats ---------------------------------------------------------------


def test_integral_float_counts_are_read_as_ints() -> None:
    """JSON has one number type: a server writing `12.0` means 12 (the reference's Go decoder drops it)."""
    body = (
        b'{"choices":[],"usage":{"prompt_tokens":12.0,"completion_tokens":5.0,"total_tokens":17.0,'
        b'"prompt_tokens_details":{"cached_tokens":4.0}}}'
    )
    got = usage_from_json(body)
    assert got == Usage(12, 5, 4, 17)
    assert got is not None and all(type(v) is int for v in (got.prompt_tokens, got.completion_tokens))
    assert usage_from_json(b'{"usage":{"prompt_tokens":1.2e1,"completion_tokens":5}}') == Usage(12, 5, 0, 17)
    assert collect([body[:20], body[20:]], streaming=False) == Usage(12, 5, 4, 17)


def test_integral_float_counts_in_streams_fragments_and_other_shapes() -> None:
    assert usage_from_sse(sse_stream(3, {"prompt_tokens": 11.0, "completion_tokens": 4.0})) == Usage(11, 4, 0, 15)
    assert usage_from_fragment(b'...ignored"usage": {"input_tokens": 9.0, "output_tokens": 3.0}}') == Usage(9, 3, 0, 12)
    anthropic = b'{"usage":{"input_tokens":10.0,"output_tokens":2.0,"cache_read_input_tokens":6.0}}'
    assert usage_from_json(anthropic) == Usage(10, 2, 6, 12)
    sglang = b'{"text":"x","meta_info":{"id":"a","prompt_tokens":7.0,"completion_tokens":2.0,"cached_tokens":1.0}}'
    assert usage_from_json(sglang) == Usage(7, 2, 1, 9)


@pytest.mark.parametrize(
    "value",
    ["12.5", "-1", "-3.0", "1e300", str(2**60), "1e999"],
    ids=["fraction", "negative", "negative-float", "huge-float", "huge-int", "out-of-range"],
)
def test_a_usage_with_a_count_that_is_no_count_is_ignored(value: str) -> None:
    """A fraction, a negative or an absurd count is not a token count: that usage object is ignored, as a
    malformed one is (never a crash, never a made-up number)."""
    body = f'{{"usage":{{"prompt_tokens":{value},"completion_tokens":5}}}}'.encode()
    assert usage_from_json(body) is None
    assert usage_from_fragment(b"xx" + body[1:]) is None
    assert usage_from_sse(b"data: " + body + b"\n\ndata: [DONE]\n\n") is None
    sglang = f'{{"meta_info":{{"id":"a","prompt_tokens":{value},"completion_tokens":5}}}}'.encode()
    assert usage_from_json(sglang) is None


def test_an_ignored_count_is_logged_rate_limited(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fresh limiter: an earlier test's warning must not hold this one back.
    monkeypatch.setattr(usage_mod, "_bad_count_log", LogLimiter(usage_mod.log, 300.0))
    with caplog.at_level("WARNING", logger=usage_mod.log.name):
        for _ in range(3):
            usage_from_json(b'{"usage":{"prompt_tokens":1.5,"completion_tokens":5}}')
    assert len(caplog.records) == 1
    assert "1.5" in caplog.records[0].getMessage()


def test_a_tail_of_sglang_events_with_distinct_ids_costs_little_cpu() -> None:
    """Each line's id was looked for among every id counted so far: ~2,300 outputs in the kept tail cost
    0.6-0.8 s of CPU on the event loop (quadratic). One set lookup a line now."""
    distinct = b"".join(b'data:{"meta_info":{"id":%d}}\n' % i for i in range(3000))[-SSE_TAIL_BYTES:]
    collector = UsageCollector(True)
    collector.feed(distinct)
    started = time.process_time()
    assert collector.result() is None  # meta_info without token counts: no usage
    assert time.process_time() - started < 0.3  # linear: a few ms; it was 0.6-0.8 s here


@pytest.mark.parametrize("streaming", [True, False])
def test_a_tail_of_unclosed_usage_objects_costs_little_cpu(streaming: bool) -> None:
    """A pod answering `"usage":{` over and over: each occurrence was scanned to the end of the kept 64 KB tail,
    in Python, on the event loop: 9.5 s of CPU for one response. Only the last few are tried now."""
    unclosed = b'"usage":{' * (SSE_TAIL_BYTES // 9 + 1)
    collector = UsageCollector(streaming)
    collector.feed(b"data: {}\n\n" if streaming else b" " * (JSON_BODY_LIMIT + 1))
    collector.feed(unclosed)  # streamed: one chunk with no newline, so the tail starts mid-line
    started = time.process_time()
    assert collector.result() is None
    assert time.process_time() - started < 2.0
