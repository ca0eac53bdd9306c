"""What routing reads from a request and an answer, as vLLM / the reference read it: Responses-API tool items,
lone surrogate escapes, usage placed before large fields of a non-streamed answer."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from google.api import httpbody_pb2
from prometheus_client import CollectorRegistry

from llmepp.director import Director
from llmepp.errors import BadRequest
from llmepp.framework.plugin import registry
from llmepp.k8s.modelrewrite import ModelRewriter, ModelRewriteStore, RewriteSync
from llmepp.k8s.models import InferenceModelRewrite
from llmepp.protocols import vertexai_prediction_pb2 as vx
from llmepp.request import grpcwire
from llmepp.request.parsers import RequestParsers, parse_request
from llmepp.request.types import InferenceRequest, RequestKind
from llmepp.tokenization.chat import JinjaTemplate


def _parse(path: str, body: dict[str, Any] | bytes) -> InferenceRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request({":path": path}, raw, request_id="r1")


# -- Responses API tool-call items ----------------------------------------------------------------
# An agent on the Responses API (Codex CLI against vLLM, the OpenAI Agents SDK, ...) sends its history as
# `input` items: the user's message, then `function_call` items (the model's tool calls) and
# `function_call_output` items (the tool results, often file contents or command output: the bulk of the
# prompt). vLLM turns them into chat messages (entrypoints/responses_utils.py,
# construct_chat_message_with_tool_call): a function_call is an assistant turn with tool_calls, a
# function_call_output a `tool` message whose content is the item's `output`.
TOOL_OUTPUT = "def main():\n    return 42\n" * 200  # ~5 KB of a file the agent read


def _agent_turn() -> dict[str, Any]:
    return {
        "model": "m",
        "input": [
            {"type": "message", "role": "user", "content": "fix the bug in main.py"},
            {"type": "function_call", "call_id": "c1", "name": "read_file", "arguments": '{"path":"main.py"}'},
            {"type": "function_call_output", "call_id": "c1", "output": TOOL_OUTPUT},
        ],
    }


def test_responses_function_call_output_is_part_of_the_prompt() -> None:
    r = _parse("/v1/responses", _agent_turn())
    assert r.kind is RequestKind.RESPONSES
    # The tool result is what vLLM prefills; the EPP's prompt (prefix hashes, token estimate, the chat render
    # of the token producers) must hold it, as it does for the same conversation sent to chat/completions.
    assert TOOL_OUTPUT.encode() in (r.prompt or b""), r.messages
    assert r.estimated_prompt_tokens >= len(TOOL_OUTPUT) // 4


def test_responses_tool_items_read_like_the_same_chat_conversation() -> None:
    r = _parse("/v1/responses", _agent_turn())
    chat = _parse(
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "fix the bug in main.py"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "read_file", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": TOOL_OUTPUT},
            ],
        },
    )  # fmt: skip
    # No invented empty *user* turns (vLLM renders an assistant turn and a tool turn there).
    assert r.messages == chat.messages


# -- a lone surrogate escape ----------------------------------------------------------------------
# JSON's grammar allows "\ud83d" on its own (RFC 8259 §7/§8.2); JavaScript's JSON.stringify writes exactly
# that for a string cut inside a surrogate pair (a chat UI truncating a history with emoji). Python's
# json.loads (vLLM's FastAPI) and Go's encoding/json (the reference router, which replaces it with U+FFFD)
# read it. msgspec refuses it ("Input data was truncated"), so the parser reads it as Go does rather than
# answer a 400 naming no real problem, even when the string is in a field the router never reads.
BODY_WITH_LONE_SURROGATE_IN_USER = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"alice \\ud83d"}'


def test_a_lone_surrogate_escape_in_a_field_the_router_does_not_read_is_routed() -> None:
    r = _parse("/v1/chat/completions", BODY_WITH_LONE_SURROGATE_IN_USER)
    assert r.model == "m" and r.messages == [("user", "hi")]


def test_a_lone_surrogate_in_a_read_field_is_not_reported_as_a_truncated_body() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi \\ud83d"}]}'
    try:
        r = _parse("/v1/chat/completions", body)
    except BadRequest as e:
        # If refused at all, the message must be precise: the body is complete JSON text.
        assert "unexpected end of input" not in e.message, e.message
    else:
        assert r.messages is not None and r.messages[0][1].startswith("hi ")


# -- usage of a large non-streamed answer with fields after `usage` -------------------------------
# A non-streamed answer past JSON_BODY_LIMIT (4 MB) keeps only its last 64 KB, plus the last "usage" object of
# what it drops: servers mostly put usage after the choices, but vLLM's ChatCompletionResponse
# writes `usage` *before* its vLLM-only fields: `prompt_logprobs` (and `prompt_token_ids`,
# `kv_transfer_params`). A chat request with `"prompt_logprobs": 1` over a long prompt answers several MB of
# prompt logprobs after the usage, which must not be lost (token accounting, the request-attribute-reporter's
# rate-limit / billing metadata, the latency predictor).
def _vllm_chat_answer_with_prompt_logprobs(prompt_tokens: int) -> bytes:
    logprobs = [None] + [
        {str(1000 + i): {"logprob": -1.2345678, "rank": 1, "decoded_token": f"tok{i}"}}
        for i in range(prompt_tokens - 1)
    ]
    doc = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + 1, "completion_tokens": 1},
        "prompt_logprobs": logprobs,
        "kv_transfer_params": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def test_usage_of_a_large_answer_with_prompt_logprobs_after_the_usage_is_read() -> None:
    from llmepp.request.types import Usage
    from llmepp.request.usage import JSON_BODY_LIMIT, UsageCollector

    body = _vllm_chat_answer_with_prompt_logprobs(80_000)
    assert len(body) > JSON_BODY_LIMIT
    collector = UsageCollector(streaming=False)
    for i in range(0, len(body), 16 * 1024):  # as Envoy hands it over
        collector.feed(body[i : i + 16 * 1024])
    assert collector.result() == Usage(prompt_tokens=80_000, completion_tokens=1, cached_tokens=0, total_tokens=80_001)


# -- a lone surrogate escape is read the same by every reader of the body -------------------------------------
# The parser reads a lone "\ud83d" (a chat UI cutting a history inside an emoji pair) as U+FFFD, as Go's
# encoding/json and Python's json do; the readers after it (an InferenceModelRewrite, Vertex RawPredict's
# shape check, the chat-template render) refused the same body: a 400 once a rewrite rule matched, a chat routed
# as an opaque prediction, no tokenized prompt.
LONE_SURROGATE_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"alice \\ud83d"}'


def test_a_lone_surrogate_body_is_rewritten_by_an_inference_model_rewrite() -> None:
    req = _parse("/v1/chat/completions", LONE_SURROGATE_BODY)
    doc = {
        "metadata": {"name": "canary", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"poolRef": {"name": "p"},
                 "rules": [{"matches": [{"model": {"value": "m"}}], "targets": [{"modelRewrite": "m2"}]}]},
    }  # fmt: skip
    store = ModelRewriteStore()
    RewriteSync(store, "p", "inference.networking.k8s.io").upsert(msgspec.convert(doc, InferenceModelRewrite))
    ModelRewriter(store, CollectorRegistry()).rewrite(req)
    assert req.target_model == "m2"
    assert json.loads(Director._rewritten_body(req) or b"")["model"] == "m2"


def test_a_lone_surrogate_raw_predict_body_is_read_as_the_chat_it_is() -> None:
    http = httpbody_pb2.HttpBody(content_type="application/json", data=LONE_SURROGATE_BODY)
    body = grpcwire.frame(vx.RawPredictRequest(endpoint="e", http_body=http).SerializeToString())
    table = RequestParsers([registry.build(t, t, None) for t in ("vertexai-parser", "passthrough-parser")])  # type: ignore[misc]
    headers = {":path": "/google.cloud.aiplatform.v1.PredictionService/RawPredict", "content-type": "application/grpc"}
    req = table.parse(headers, body, request_id="r")
    assert req.kind is RequestKind.CHAT_COMPLETIONS and req.model == "m"


def test_a_lone_surrogate_chat_is_rendered_by_the_chat_template() -> None:
    req = _parse("/v1/chat/completions", LONE_SURROGATE_BODY)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert JinjaTemplate(template, special_tokens={}, origin="test").render(req) == "<user>hi"
