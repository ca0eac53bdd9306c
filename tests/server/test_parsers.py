"""Request parsing: paths and parser tables, the OpenAI and Anthropic shapes, passthrough, precise 400s,
properties."""

from __future__ import annotations

import contextlib
import gzip
import json
import struct
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.errors import BadRequest
from llmepp.framework.plugin import registry
from llmepp.request.parsers import RequestParsers, default_parsers, parse_request, request_path
from llmepp.request.types import RequestKind


def parse(body: Any, path: str = "/v1/completions", **headers: str) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {":path": path, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return parse_request(h, raw, request_id="rid")


def bad(body: Any, path: str = "/v1/completions") -> str:
    with pytest.raises(BadRequest) as e:
        parse(body, path)
    assert e.value.status == 400
    return e.value.message


# -- paths -----------------------------------------------------------------------------------------
def test_path_header_precedence_and_query() -> None:
    assert request_path({":path": "/v1/chat/completions?x=1", "x-original-path": "/v1/embeddings"}) == (
        "/v1/chat/completions"
    )
    assert request_path({"x-original-path": "/a/v1/embeddings", "x-forwarded-path": "/b"}) == "/a/v1/embeddings"
    assert request_path({"x-forwarded-path": "/b?q"}) == "/b"
    assert request_path({}) == "/v1/completions"


@pytest.mark.parametrize(
    ("path", "parser", "suffix"),
    [
        ("/v1/chat/completions", "openai-parser", "chat/completions"),
        ("/openai/v1/chat/completions/", "openai-parser", "chat/completions"),
        ("/v1/completions", "openai-parser", "completions"),
        ("completions", "openai-parser", "completions"),
        ("/v1/embeddings", "openai-parser", "embeddings"),
        ("/v1/responses", "openai-parser", "responses"),
        ("/v1/messages", "anthropic-parser", "messages"),
        ("/v1/messages/count_tokens", "anthropic-parser", "messages/count_tokens"),
        ("/v1/completions/render", "openai-parser", "completions/render"),
        ("/v1/chat/completions/render", "openai-parser", "chat/completions/render"),
        ("/v1/conversations", "openai-parser", "conversations"),
        ("/v1/images/generations", "openai-parser", "images/generations"),
        ("/v1/conversations/c1/items", "passthrough-parser", ""),
        ("/v1/foocompletions", "passthrough-parser", ""),
        ("/inference/v1/generate", "vllmhttp-parser", "inference/v1/generate"),
        ("/generate", "passthrough-parser", ""),  # SGLang's, when sglanghttp-parser is listed
        ("/", "passthrough-parser", ""),
    ],
)
def test_longest_suffix_on_segment_boundary(path: str, parser: str, suffix: str) -> None:
    found, claimed = default_parsers().match(path)
    assert found is not None and (found.type, claimed) == (parser, suffix)


def built(*types: str) -> RequestParsers:
    return RequestParsers([registry.build(t, t, None) for t in types])  # type: ignore[misc]


def test_a_configured_list_without_fallback_answers_unclaimed_paths_400() -> None:
    table = built("openai-parser")
    assert table.parse({":path": "/v1/completions"}, b'{"model": "m", "prompt": "x"}', request_id="r").prompt == b"x"
    with pytest.raises(BadRequest, match="no request parser claims the path '/v1/messages'"):
        table.parse({":path": "/v1/messages"}, b"{}", request_id="r")


def test_the_first_fallback_ends_the_list_and_repeated_types_are_skipped() -> None:
    table = built("openai-parser", "openai-parser", "passthrough-parser", "anthropic-parser")
    assert [p.type for p in table.parsers] == ["openai-parser", "passthrough-parser"]
    found, _ = table.match("/v1/messages")
    assert found is not None and found.type == "passthrough-parser"


# -- completions -----------------------------------------------------------------------------------
def test_completions_fields() -> None:
    r = parse({"model": "m", "prompt": "héllo", "stream": True, "max_tokens": 9, "cache_salt": "s"})
    assert r.kind is RequestKind.COMPLETIONS
    assert (r.model, r.target_model, r.prompt, r.stream, r.max_tokens, r.cache_salt) == (
        "m",
        "m",
        "héllo".encode(),
        True,
        9,
        "s",
    )
    assert r.payload is None  # no rewrite → payload not kept
    assert r.fairness_id == "default-flow" and r.objective == ""


def test_completions_prompt_lists_and_token_ids() -> None:
    assert parse({"model": "m", "prompt": ["ab", "cd"]}).prompt == b"abcd"
    assert parse({"model": "m", "prompt": [1, 2, 70000]}).prompt == struct.pack("<3I", 1, 2, 70000)
    assert parse({"model": "m", "prompt": [[1], [2, 3]]}).prompt == struct.pack("<3I", 1, 2, 3)
    assert parse({"model": "m", "prompt": ""}).prompt == b""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m"}, 'missing required field "prompt"'),
        ({"model": "m", "prompt": None}, 'missing required field "prompt"'),
        ({"model": "m", "prompt": 3}, '"prompt" must be a string or list'),
        ({"model": "m", "prompt": []}, '"prompt" must not be an empty list'),
        ({"model": "m", "prompt": ["a", 1]}, '"prompt" list must contain only strings'),
        ({"model": "m", "prompt": [1, -1]}, '"prompt" token ids must be integers'),
        ({"model": "m", "prompt": [None]}, '"prompt" must be a string, a list of strings or a list of token ids'),
        ({"model": "m", "prompt": [[1], []]}, '"prompt" must be a list of non-empty token-id lists'),
        ({"prompt": "x"}, 'missing required field "model"'),
        ({"model": 1, "prompt": "x"}, '"model" must be a string'),
        ({"model": "", "prompt": "x"}, '"model" must not be empty'),
        ({"model": "m", "prompt": "x", "stream": "maybe"}, '"stream" must be a boolean, got string'),  # "yes": true
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, '"max_tokens" must be an integer, got number'),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, '"max_tokens" must not be negative'),
        (["m"], "request body must be a JSON object"),
        (b"", "request body is empty"),
        (b'{"model": "m",', "invalid JSON at byte 14: unexpected end of input"),
        (b'{"model": "m"} x', "invalid JSON at byte 16: trailing characters"),
        (b"\xff", "invalid JSON at byte 0: invalid character"),
    ],
)
def test_completions_errors(body: Any, message: str) -> None:
    assert bad(body).startswith(message)


# -- chat ------------------------------------------------------------------------------------------
def test_chat_prompt_tools_then_role_and_content() -> None:
    body = (
        b'{"model": "m", "tools": [{"type": "function", "function": {"name": "f"}}], "messages": ['
        b'{"role": "system", "content": "be brief"},'
        b'{"role": "user", "content": [{"type": "text", "text": "look "}, '
        b'{"type": "image_url", "image_url": {"url": "http://x"}}, {"type": "text", "text": "here"}]},'
        b'{"role": "assistant", "content": null, "tool_calls": []}],'
        b'"max_tokens": 3, "max_completion_tokens": 7, "stream": false}'
    )
    r = parse(body, "/v1/chat/completions")
    assert r.kind is RequestKind.CHAT_COMPLETIONS
    tools = b'[{"type": "function", "function": {"name": "f"}}]'
    assert r.prompt == tools + b"systembe briefuserlook hereassistant"
    assert r.max_tokens == 7 and r.stream is False


def test_chat_max_tokens_fallback_and_no_tools() -> None:
    r = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, "/v1/chat/completions")
    assert r.prompt == b"userhi" and r.max_tokens == 4
    # vLLM's to_sampling_params reads `max_completion_tokens or max_tokens`: a zero one defers (it won before).
    zero = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0, "max_tokens": 5}
    assert parse(zero, "/v1/chat/completions").max_tokens == 5


def test_completions_without_max_tokens_generate_at_most_16() -> None:
    """vLLM's CompletionRequest has `max_tokens: int | None = 16`; read as no limit, the in-flight load charged
    1.5x the prompt as output."""
    assert parse({"model": "m", "prompt": "hi"}).max_tokens == 16
    assert parse({"model": "m", "prompt": "hi", "max_tokens": None}).max_tokens is None  # explicit: no limit


@pytest.mark.parametrize(
    "part",
    [
        {"image_url": "https://example.com/cat.png"},
        {"image_url": {"url": "https://example.com/cat.png"}},
        {"audio_url": "https://example.com/a.wav"},
        {"video_url": "https://example.com/v.mp4"},
    ],
)
def test_a_media_part_without_type_is_media(part: dict[str, Any]) -> None:
    """vLLM's chat_utils reads these "simple" parts as media (an encoder runs); they counted as text, so E/P/D and
    the multimodal cache affinity missed them. A type-less part naming no media stays no media."""

    def chat(*content: dict[str, Any]) -> dict[str, Any]:
        return {"model": "m", "messages": [{"role": "user", "content": list(content)}]}

    r = parse(chat({"type": "text", "text": "what is it?"}, part), "/v1/chat/completions")
    assert r.multimodal and len(r.mm_items) == 1
    assert not parse(chat({"text": "hi"}), "/v1/chat/completions").multimodal


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m"}, 'missing required field "messages"'),
        ({"model": "m", "messages": []}, '"messages" must contain at least one message'),
        ({"model": "m", "messages": "hi"}, '"messages" must be an array, got string'),
        ({"model": "m", "messages": ["hi"]}, '"messages[0]" must be an object, got string'),
        (
            {"model": "m", "messages": [{"role": "u", "content": 5}]},
            '"messages[0].content" must be a string or array, got integer',
        ),
    ],
)
def test_chat_errors(body: Any, message: str) -> None:
    assert bad(body, "/v1/chat/completions").startswith(message)


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(max_size=8), min_size=1, max_size=4))
def test_chat_plain_string_content_parts_read_as_text_parts(texts: list[str]) -> None:
    # vLLM's chat content parts include plain strings (chat_utils.ChatCompletionContentPartParam: `| str`),
    # rendered as text parts are: such a body is served, and routed like its text-part twin.
    image = {"type": "image_url", "image_url": {"url": "http://x"}}

    def body(parts: list[Any]) -> dict[str, Any]:
        return {"model": "m", "messages": [{"role": "user", "content": [*parts, image]}]}

    plain = parse(body(list(texts)), "/v1/chat/completions")
    typed = parse(body([{"type": "text", "text": t} for t in texts]), "/v1/chat/completions")
    assert (plain.prompt, plain.messages, plain.mm_items) == (typed.prompt, typed.messages, typed.mm_items)
    # Empty texts are skipped, as vLLM skips a falsy part (chat_utils._parse_chat_message_content_parts).
    assert plain.messages == [("user", "\n".join(t for t in texts if t))] and len(plain.mm_items) == 1


def test_chat_input_text_output_text_refusal_and_thinking_parts_read_as_text() -> None:
    # vLLM's chat_utils reads these part types as text parts (a refusal part's text is its `refusal`, a
    # thinking part's its `thinking`); one without its text is skipped, as vLLM skips it.
    parts = [
        {"type": "input_text", "text": "a"},
        {"type": "refusal", "refusal": "no"},
        {"type": "output_text", "text": "b"},
        {"type": "thinking", "thinking": "hm"},
        {"type": "refusal", "refusal": None},
        {"type": "image_url", "image_url": {"url": "u"}, "text": "x"},
    ]
    r = parse({"model": "m", "messages": [{"role": "assistant", "content": parts}]}, "/v1/chat/completions")
    assert r.messages == [("assistant", "a\nno\nb\nhm")]
    assert r.prompt == b"assistantanobhm"  # the image part's stray `text` is no text part
    said = [{"type": "output_text", "text": "a"}, {"type": "refusal", "refusal": "no"}]
    items = [{"role": "assistant", "content": said}]
    r = parse({"model": "m", "input": items}, "/v1/responses")
    assert r.messages == [("assistant", "a\nno")] and r.prompt == b"assistanta\nno"


# -- embeddings / passthrough ----------------------------------------------------------------------
def test_embeddings() -> None:
    r = parse({"model": "e", "input": ["a", "b"]}, "/v1/embeddings")
    assert r.kind is RequestKind.EMBEDDINGS and r.prompt == b"ab" and r.model == "e" and r.messages is None
    assert bad({"model": "e"}, "/v1/embeddings") == 'missing required field "input" (or "messages")'
    assert bad({"model": "e", "input": None}, "/v1/embeddings") == 'missing required field "input" (or "messages")'


def test_embeddings_of_chat_messages() -> None:
    # vLLM's EmbeddingChatRequest: `messages` instead of `input`, read like a chat's (without tools: vLLM
    # renders none for an embedding); with both, vLLM's request union takes the `input` one.
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "input_text", "text": "a"}, image, "b"]}]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = {"model": "e", "messages": msgs, "tools": tools, "cache_salt": "s"}
    r = parse(body, "/v1/embeddings")
    assert r.kind is RequestKind.EMBEDDINGS and (r.model, r.cache_salt, r.prompt_is_token_ids) == ("e", "s", False)
    assert r.messages == [("system", "be brief"), ("user", "a\nb")] and r.prompt == b"systembe briefuserab"
    assert len(r.mm_items) == 1 and r.multimodal
    assert parse({**body, "input": None}, "/v1/embeddings").messages == r.messages
    both = parse({**body, "input": "x", "messages": "not even a list"}, "/v1/embeddings")
    assert (both.prompt, both.messages, both.mm_items) == (b"x", None, ())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "e", "messages": []}, '"messages" must contain at least one message'),
        ({"model": "e", "messages": None}, '"messages" must be an array, got null'),
        ({"model": "e", "messages": "hi"}, '"messages" must be an array, got string'),
        ({"model": "e", "messages": ["hi"]}, '"messages[0]" must be an object, got string'),
        ({"model": "e", "messages": [{"role": "u", "content": 5}]}, '"messages[0].content" must be a string or array'),
        ({"messages": [{"role": "user", "content": "hi"}]}, 'missing required field "model"'),
    ],
)
def test_embeddings_of_chat_messages_errors(body: Any, message: str) -> None:
    assert bad(body, "/v1/embeddings").startswith(message)


def test_passthrough_keeps_the_body_raw() -> None:
    r = parse(b"not json at all", "/v1/audio/transcriptions")
    assert r.kind is RequestKind.PASSTHROUGH and r.body == b"not json at all" and r.prompt is None
    assert parse(b"", "/x").body == b""


# -- responses (OpenAI) ----------------------------------------------------------------------------
def test_responses_instructions_then_input() -> None:
    r = parse({"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 7}, "/v1/responses")
    assert r.kind is RequestKind.RESPONSES and r.messages == [("system", "be brief"), ("user", "hi")]
    assert (r.prompt, r.max_tokens, r.stream) == (b"systembe briefuserhi", 7, False)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_image"}]},
             {"role": "assistant", "content": "b"}]  # fmt: skip
    r = parse({"model": "m", "input": items, "stream": True}, "/v1/responses")
    assert r.messages == [("user", "a"), ("assistant", "b")] and r.stream
    assert bad({"model": "m"}, "/v1/responses") == 'missing required field "input"'
    assert bad({"model": "m", "input": []}, "/v1/responses") == '"input" must not be an empty list'


# -- messages (Anthropic) --------------------------------------------------------------------------
def test_anthropic_messages_system_blocks_tools_and_tool_results() -> None:
    body: dict[str, Any] = {
        "model": "claude-like",
        "system": [{"type": "text", "text": "You are terse."}],
        "tools": [{"name": "ls", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"},
                                         {"type": "image", "source": {}}, {"type": "text", "text": "and?"}]},
            {"role": "user", "content": [{"type": "tool_result", "content": [{"type": "text", "text": "b.txt"}]}]},
        ],
        "max_tokens": 64,
        "stream": True,
    }  # fmt: skip
    r = parse(body, "/v1/messages")
    assert r.kind is RequestKind.MESSAGES and (r.model, r.max_tokens, r.stream) == ("claude-like", 64, True)
    assert r.messages == [
        ("system", "You are terse."),
        ("user", "list files"),
        ("assistant", ""),
        ("user", "a.txt\nand?"),
        ("user", "b.txt"),
    ]
    tools = json.dumps(body["tools"]).encode()
    assert r.prompt == tools + b"systemYou are terse.userlist filesassistantusera.txt\nand?userb.txt"
    # The same conversation one turn longer shares the prompt's beginning: prefix affinity works.
    longer = {**body, "messages": [*body["messages"], {"role": "assistant", "content": "done"}]}
    assert parse(longer, "/v1/messages").prompt.startswith(r.prompt)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "max_tokens": 5}, 'missing required field "messages"'),
        ({"model": "m", "messages": []}, '"messages" must contain at least one message'),
        ({"messages": [{"role": "user", "content": "x"}]}, 'missing required field "model"'),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, '"messages[0].content" must be'),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "must not be negative"),
    ],
)
def test_anthropic_errors(body: Any, message: str) -> None:
    assert message in bad(body, "/v1/messages")


def test_anthropic_count_tokens_stays_raw() -> None:
    r = parse({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "/v1/messages/count_tokens")
    assert r.kind is RequestKind.PASSTHROUGH and r.prompt is None


# -- headers ---------------------------------------------------------------------------------------
def test_control_headers_and_aliases() -> None:
    r = parse(
        {"model": "m", "prompt": "x"},
        x_llm_d_inference_objective="gold",
        x_gateway_inference_objective="ignored",
        x_gateway_inference_fairness_id="tenant",
        x_gateway_model_name_rewrite="t",
    )
    assert (r.objective, r.fairness_id, r.target_model) == ("gold", "tenant", "t")
    assert r.payload == {"model": "m", "prompt": "x"}  # kept: the body must be rewritten
    r2 = parse({"model": "m", "prompt": "x"}, x_llm_d_model_name_rewrite="m")
    assert r2.payload is None


# -- properties ------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(
    ["model", "prompt", "messages", "input", "stream", "max_tokens", "tools", "cache_salt", "system", "instructions"]
)
bodies = st.one_of(
    json_values,
    st.dictionaries(keys, json_values, max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(
    body=bodies,
    path=st.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"]
    ),
)
def test_any_json_value_parses_or_is_bad_request(body: Any, path: str) -> None:
    raw = msgspec.json.encode(body)
    with contextlib.suppress(BadRequest):
        parse_request({":path": path}, raw, request_id="r")


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_parse_or_bad_request(raw: bytes) -> None:
    with contextlib.suppress(BadRequest):
        parse_request({":path": "/v1/chat/completions"}, raw, request_id="r")


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=16),
    field=st.sampled_from(["model", "prompt", "input", "content", "key"]),
    path=st.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"]
    ),
)
def test_any_bytes_inside_a_json_string_parse_or_bad_request(raw: bytes, field: str, path: str) -> None:
    # msgspec raises UnicodeDecodeError, not its DecodeError, for a string whose bytes are not UTF-8.
    strings = {"model": b"m", "prompt": b"p", "input": b"i", "content": b"c", "key": b"k"}
    strings[field] = raw
    body = b'{"model":"%s","prompt":"%s","input":"%s","messages":[{"role":"user","content":"%s"}],"%s":1}' % (
        strings["model"], strings["prompt"], strings["input"], strings["content"], strings["key"]
    )  # fmt: skip
    with contextlib.suppress(BadRequest):
        parse_request({":path": path}, body, request_id="r")


def test_a_string_that_is_not_utf8_is_a_bad_request_naming_the_byte() -> None:
    with pytest.raises(BadRequest, match="a string holds byte 0xff, not UTF-8") as e:
        parse_request({":path": "/v1/completions"}, b'{"model":"m","prompt":"a\xff\xfeb"}', request_id="r")
    assert e.value.status == 400


texts = st.text(max_size=30)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant"]),
            "content": st.one_of(texts, st.lists(texts, max_size=3)),
        }
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(
    model=st.text(min_size=1, max_size=20),
    msgs=messages,
    stream=st.booleans(),
    max_tokens=st.none() | st.integers(0, 10_000),
)
def test_chat_round_trip(model: str, msgs: list[dict[str, Any]], stream: bool, max_tokens: int | None) -> None:
    wire_msgs = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else [{"type": "text", "text": t} for t in m["content"]],
        }
        for m in msgs
    ]
    body: dict[str, Any] = {"model": model, "messages": wire_msgs, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    r = parse_request({":path": "/v1/chat/completions"}, msgspec.json.encode(body), request_id="r")
    expected = "".join(
        m["role"] + (m["content"] if isinstance(m["content"], str) else "".join(m["content"])) for m in msgs
    )
    assert (r.model, r.stream, r.max_tokens, r.prompt) == (model, stream, max_tokens, expected.encode())


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.one_of(texts, st.lists(texts, min_size=1, max_size=4), st.lists(st.integers(0, 2**32 - 1), min_size=1)),
    salt=st.text(max_size=5),
)
def test_completions_round_trip(prompt: Any, salt: str) -> None:
    r = parse_request(
        {":path": "/v1/completions"},
        msgspec.json.encode({"model": "m", "prompt": prompt, "cache_salt": salt}),
        request_id="r",
    )
    if isinstance(prompt, str):
        expected = prompt.encode()
    elif isinstance(prompt[0], str):
        expected = "".join(prompt).encode()
    else:
        expected = struct.pack(f"<{len(prompt)}I", *prompt)
    assert r.prompt == expected and r.cache_salt == salt


def test_path_matches_are_remembered_within_a_bound() -> None:
    table = built("openai-parser", "passthrough-parser")
    for i in range(3000):  # e.g. a client scanning paths
        found, suffix = table.match(f"/v{i}/completions" if i % 2 else f"/scan/{i}")
        assert found is not None and found.type == ("openai-parser" if i % 2 else "passthrough-parser")
        assert suffix == ("completions" if i % 2 else "")
    assert len(table._matched) <= 1024


# -- generate (SGLang) -----------------------------------------------------------------------------
def sglang(body: Any) -> Any:
    return built("sglanghttp-parser").parse({":path": "/generate"}, json.dumps(body).encode(), request_id="r")


def test_sglang_generate_text_ids_batches_and_salt() -> None:
    r = sglang({"text": "hello", "sampling_params": {"max_new_tokens": 7}, "stream": True, "extra_key": "t1"})
    assert r.kind is RequestKind.GENERATE and (r.prompt, r.max_tokens, r.stream, r.cache_salt) == (
        b"hello",
        7,
        True,
        "t1",
    )
    assert r.model == "" and r.target_model == ""  # one model per SGLang server: none in the body
    ids = sglang({"input_ids": [[1, 2], [3]], "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 9}]})
    assert ids.prompt == struct.pack("<3I", 1, 2, 3) and ids.prompt_is_token_ids and ids.max_tokens == 2
    assert ids.prompts() == [struct.pack("<2I", 1, 2), struct.pack("<I", 3)]  # a batch: each prompt on its own
    texts = sglang({"text": ["a", "b"], "model": "m"})
    assert texts.prompt == b"ab" and texts.prompts() == [b"a", b"b"]
    # null is absent, as in SGLang (a client serialising every field sends the unused one so); before, a 400.
    nulls = sglang({"text": None, "input_ids": [1, 2]})
    assert nulls.prompt == struct.pack("<2I", 1, 2) and nulls.prompt_is_token_ids
    assert sglang({"text": "hello", "input_ids": None}).prompt == b"hello"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sampling_params": {}}, 'exactly one of "text" and "input_ids" is required'),
        ({"text": "a", "input_ids": [1]}, 'exactly one of "text" and "input_ids" is required'),
        ({"text": None, "input_ids": None}, 'exactly one of "text" and "input_ids" is required'),
        ({"text": [1, 2]}, '"text" must be a string or a list of strings'),
        ({"input_ids": "abc"}, '"input_ids" must be a list of token ids'),
        ({"input_ids": [-1]}, "token ids must be integers in [0, 4294967295]"),
        ({"text": "a", "sampling_params": {"max_new_tokens": -2}}, "must not be negative"),
    ],
)
def test_sglang_errors(body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        sglang(body)
    assert message in e.value.message


sglang_keys = st.sampled_from(["text", "input_ids", "sampling_params", "stream", "extra_key", "model"])


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(json_values, st.dictionaries(sglang_keys, json_values, max_size=5)))
def test_any_generate_body_parses_or_is_bad_request(body: Any) -> None:
    with contextlib.suppress(BadRequest):
        built("sglanghttp-parser").parse({":path": "/generate"}, msgspec.json.encode(body), request_id="r")


# -- inference/v1/generate (vLLM) --------------------------------------------------------------------
def vllm_generate(body: Any) -> Any:
    return default_parsers().parse({":path": "/inference/v1/generate"}, json.dumps(body).encode(), request_id="r")


def test_vllm_generate_token_ids_sampling_salt_and_media() -> None:
    r = vllm_generate(
        {
            "model": "llama",
            "token_ids": [5, 6, 7],
            "sampling_params": {"max_tokens": 9, "temperature": 0},
            "stream": True,
            "cache_salt": "tenant-1",
            "features": {"mm_hashes": {"image": ["h1", "h2"], "audio": ["a1"]}, "mm_placeholders": {}},
            "kv_transfer_params": None,
        }
    )
    assert r.kind is RequestKind.GENERATE and r.prompt_is_token_ids
    assert (r.model, r.prompt, r.max_tokens, r.stream, r.cache_salt) == (
        "llama",
        struct.pack("<3I", 5, 6, 7),
        9,
        True,
        "tenant-1",
    )
    assert len(r.mm_items) == 3 and r.multimodal  # audio's hash first (modalities sorted), then the images
    same = vllm_generate({"token_ids": [1], "features": {"mm_hashes": {"image": ["h1", "h2"]}}})
    assert same.mm_items == r.mm_items[1:] and same.model == "" and same.max_tokens is None


def test_both_generate_apis_side_by_side_pick_by_longest_suffix() -> None:
    table = built("vllmhttp-parser", "sglanghttp-parser", "passthrough-parser")
    assert table.parse({":path": "/generate"}, b'{"text": "hi"}', request_id="r").prompt == b"hi"
    vllm = table.parse({":path": "/inference/v1/generate"}, b'{"token_ids": [3]}', request_id="r")
    assert vllm.prompt == struct.pack("<I", 3)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sampling_params": {"max_tokens": 1}}, 'missing required field "token_ids"'),
        ({"token_ids": []}, '"token_ids" must be a non-empty list of token ids'),
        ({"token_ids": "hello"}, '"token_ids" must be a non-empty list of token ids'),
        ({"token_ids": [1, "a"]}, '"token_ids" token ids must be integers'),
        ({"token_ids": [1], "sampling_params": {"max_tokens": -1}}, "must not be negative"),
        ({"token_ids": [1], "features": {"mm_hashes": {"image": [1]}}}, 'mm_hashes[...][0]" must be a string'),
    ],
)
def test_vllm_generate_errors(body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        vllm_generate(body)
    assert message in e.value.message


vllm_keys = st.sampled_from(["token_ids", "sampling_params", "stream", "cache_salt", "model", "features"])


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(json_values, st.dictionaries(vllm_keys, json_values, max_size=5)))
def test_any_vllm_generate_body_parses_or_is_bad_request(body: Any) -> None:
    with contextlib.suppress(BadRequest):
        vllm_generate(body)


# -- the rest of openai-parser's claims (the reference's list) ---------------------------------------
def openai(path: str, body: Any) -> Any:
    return default_parsers().parse({":path": path}, json.dumps(body).encode(), request_id="r")


def test_render_paths_read_the_body_of_the_api_they_render() -> None:
    chat = openai("/v1/chat/completions/render", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.kind is RequestKind.CHAT_COMPLETIONS and chat.messages == [("user", "hi")]
    comp = openai("/v1/completions/render", {"model": "m", "prompt": "abc"})
    assert comp.kind is RequestKind.COMPLETIONS and comp.prompt == b"abc"


def test_conversations_read_their_items_and_images_their_prompt() -> None:
    items = [{"type": "message", "role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    conv = openai("/v1/conversations", {"items": items, "metadata": {"topic": "x"}})
    assert conv.kind is RequestKind.CONVERSATIONS and conv.model == ""
    assert conv.messages == [("user", "hello"), ("assistant", "hi")] and conv.prompt == b"userhelloassistanthi"
    assert openai("/v1/conversations", {"items": []}).prompt == b""
    img = openai("/v1/images/generations", {"model": "sd", "prompt": "a red fox", "n": 1})
    assert img.kind is RequestKind.IMAGES and (img.model, img.prompt) == ("sd", b"a red fox")


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/conversations", {"metadata": {}}, 'missing required field "items"'),
        ("/v1/conversations", {"items": "hello"}, "items"),
        ("/v1/images/generations", {"model": "sd"}, 'missing required field "prompt"'),
        ("/v1/images/generations", {"prompt": 3}, "prompt"),
    ],
)
def test_conversations_and_images_errors(path: str, body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        openai(path, body)
    assert message in e.value.message


# -- odd but valid JSON, compressed bodies ------------------------------------------------------------
def _at_stack_depth(depth: int, fn: Any) -> Any:
    return fn() if depth == 0 else _at_stack_depth(depth - 1, fn)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "m", "prompt": "x", "extra": "NEST"}),
        ("/v1/completions", {"model": "m", "prompt": "NEST"}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": "NEST"}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "u", "content": [{"image_url": "NEST"}]}]}),
        ("/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": "NEST"}),
        ("/inference/v1/generate", {"token_ids": "NEST"}),
    ],
)
@pytest.mark.parametrize("stack", [0, 400])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(path: str, body: Any, stack: int) -> None:
    # msgspec gives up nesting at Python's recursion limit (less the caller's stack depth) with a RecursionError,
    # which escaped the parser (a 500 "internal error" and a traceback per request).
    raw = json.dumps(body).encode().replace(b'"NEST"', b"[" * 5000 + b"]" * 5000)
    with pytest.raises(BadRequest) as e:
        _at_stack_depth(stack, lambda: parse_request({":path": path}, raw, request_id="r"))
    assert e.value.message == "request body nests JSON too deeply"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
def test_a_compressed_body_is_a_400_naming_its_content_encoding(encoding: str) -> None:
    raw = gzip.compress(json.dumps({"model": "m", "prompt": "x"}).encode())
    with pytest.raises(BadRequest) as e:
        parse_request({":path": "/v1/completions", "content-encoding": encoding}, raw, request_id="r")
    assert e.value.message == (
        f"request body has content-encoding {encoding!r}: the router reads JSON bodies uncompressed"
    )
    # Identity is no encoding; a body the parser does not read may be anything; valid JSON parses whatever the header.
    ok = json.dumps({"model": "m", "prompt": "x"}).encode()
    assert (
        parse_request({":path": "/v1/completions", "content-encoding": "identity"}, ok, request_id="r").prompt == b"x"
    )
    assert parse_request({":path": "/v1/completions", "content-encoding": "gzip"}, ok, request_id="r").prompt == b"x"
    assert parse_request({":path": "/v1/audio", "content-encoding": "gzip"}, raw, request_id="r").body == raw
    for identity in ("identity", ""):
        with pytest.raises(BadRequest, match=r"^invalid JSON at byte 1\b"):
            parse_request({":path": "/v1/completions", "content-encoding": identity}, b"{", request_id="r")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"content": "x"}], "max_tokens": -1}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"content": "x"}], "max_completion_tokens": -1},
            "max_completion_tokens",
        ),
        ("/v1/responses", {"model": "m", "input": "x", "max_output_tokens": -1}, "max_output_tokens"),
        ("/v1/messages", {"model": "m", "messages": [{"content": "x"}], "max_tokens": -1}, "max_tokens"),
        (
            "/inference/v1/generate",
            {"token_ids": [1], "sampling_params": {"max_tokens": -1}},
            "sampling_params.max_tokens",
        ),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
        ("/generate", {"text": "x", "sampling_params": [{"max_new_tokens": -1}]}, "sampling_params[0].max_new_tokens"),
    ],
)
def test_a_negative_max_tokens_is_a_400_naming_the_field_sent(path: str, body: Any, field: str) -> None:
    table = built("openai-parser", "anthropic-parser", "vllmhttp-parser", "sglanghttp-parser")
    with pytest.raises(BadRequest) as e:
        table.parse({":path": path}, json.dumps(body).encode(), request_id="r")
    assert e.value.message == f'"{field}" must not be negative'


def test_duplicate_keys_the_last_wins_as_in_vllm() -> None:
    # vLLM reads bodies with json.loads (the last duplicate wins): the router must route the model vLLM serves.
    raw = b'{"model": "a", "prompt": "x", "model": "b", "prompt": "y", "max_tokens": 1, "max_tokens": 2}'
    assert json.loads(raw)["model"] == "b"
    r = parse_request({":path": "/v1/completions"}, raw, request_id="r")
    assert (r.model, r.prompt, r.max_tokens) == ("b", b"y", 2)
    rewritten = parse_request({":path": "/v1/completions", "x-llm-d-model-name-rewrite": "t"}, raw, request_id="r")
    assert rewritten.payload == {"model": "b", "prompt": "y", "max_tokens": 2}
