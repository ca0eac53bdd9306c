"""Chats the EPP tokenizes must be the chats vLLM renders, or precise-prefix block keys never match the engine's.

* Anthropic Messages and Responses tool turns: vLLM renders tool calls as the assistant's `tool_calls` and tool
  results as `tool` messages (vllm/entrypoints/anthropic/serving.py _convert_block / _convert_user_tool_result;
  responses/utils.py construct_chat_messages_with_tool_call), for the hf backend and for the chat sent to the
  vllm backend's render API.
* The vllm backend's /tokenize path forwards the request's own `add_special_tokens`.
* Template inputs are read leniently, as vLLM's pydantic request model reads them.
* A chat is sized for the tokenizer's long-prompt lane by its text, not its body (an inline image).
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from aiohttp import web
from helpers import serving

from llmepp.framework.datakeys import TOKENIZED_PROMPT
from llmepp.framework.plugin import registry
from llmepp.plugins.producers.token import HFTokenProducer, VllmTokenProducer
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.tokenization import hf
from llmepp.tokenization.chat import api_chat_messages, load_chat_template
from llmepp_sim.tokenizer import TOKENIZER_PATH

ROOT = Path(__file__).resolve().parents[2]
CHATML = ROOT / "tests" / "tokenization" / "templates" / "chatml" / "tokenizer_config.json"


def parsed(path: str, body: dict[str, Any]) -> InferenceRequest:
    return parse_request({":path": path}, json.dumps(body).encode(), request_id="r")


def render(req: InferenceRequest) -> str:
    return load_chat_template(str(CHATML), str(CHATML.parent / "tokenizer.json")).render(req)


SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}}
CHAT_TOOLS = [{"type": "function", "function": {"name": "ls", "description": "list", "parameters": SCHEMA}}]
# The chat vLLM builds from ANTHROPIC / RESPONSES below, and renders.
CONVERTED = {
    "model": "m",
    "tools": CHAT_TOOLS,
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "ls", "arguments": json.dumps({"path": "."})}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "a.txt"},
        {"role": "user", "content": "thanks"},
    ],
}  # fmt: skip
ANTHROPIC: dict[str, Any] = {
    "model": "m",
    "max_tokens": 10,
    "system": "S",
    "tools": [{"name": "ls", "description": "list", "input_schema": SCHEMA}],
    "messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure."},
                                          {"type": "tool_use", "id": "t1", "name": "ls", "input": {"path": "."}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]},
        {"role": "user", "content": "thanks"},
    ],
}  # fmt: skip
RESPONSES: dict[str, Any] = {
    "model": "m",
    "instructions": "S",
    "tools": [{"type": "function", "name": "ls", "description": "list", "parameters": SCHEMA}],
    "input": [
        {"role": "user", "content": "list files"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure."}]},
        {"type": "function_call", "call_id": "t1", "name": "ls", "arguments": json.dumps({"path": "."})},
        {"type": "function_call_output", "call_id": "t1", "output": "a.txt"},
        {"role": "user", "content": "thanks"},
    ],
}


def test_anthropic_tool_turns_render_as_vllm_renders_them() -> None:
    expected = render(parsed("/v1/chat/completions", CONVERTED))
    assert "<tool_call>" in expected and "<tool_response>" in expected
    assert render(parsed("/v1/messages", ANTHROPIC)) == expected


def test_responses_tool_items_render_as_vllm_renders_them() -> None:
    # vLLM (responses/utils.py construct_chat_messages_with_tool_call): the function_call joins the preceding
    # assistant message as its tool call; the function_call_output is a `tool` message with its call_id.
    expected = render(parsed("/v1/chat/completions", CONVERTED))
    assert render(parsed("/v1/responses", RESPONSES)) == expected


def test_the_vllm_backend_sends_anthropic_tool_turns_as_vllm_converts_them() -> None:
    """vLLM has no render route for /v1/messages: the EPP must send the chat vLLM's Anthropic endpoint builds."""
    _, body = VllmTokenProducer._render_request(parsed("/v1/messages", ANTHROPIC), "m")
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert body["messages"][2].get("tool_calls"), body["messages"][2]


# -- 2: the tokenize API gets the request's add_special_tokens ----------------------------------------------
async def test_the_tokenize_api_gets_add_special_tokens() -> None:
    calls: list[dict[str, Any]] = []

    async def tokenize(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.json_response({"count": 1, "max_model_len": 8, "tokens": [3]})

    async with serving(tokenize, route=("POST", "/tokenize")) as url:
        plugin = registry.build("token-producer", "t", {"vllm": {"url": url, "path": "/tokenize"}})
        assert isinstance(plugin, VllmTokenProducer)
        try:
            comp = parsed("/v1/completions", {"model": "m", "prompt": "hi", "add_special_tokens": False})
            chat = parsed("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                   "add_special_tokens": True})  # fmt: skip
            for req in (comp, chat):
                await asyncio.wait_for(plugin.produce(req, []), 10)
                assert req.data.get(TOKENIZED_PROMPT) is not None
        finally:
            await plugin.aclose()
    assert calls[0].get("add_special_tokens") is False, calls[0]
    assert calls[1].get("add_special_tokens") is True, calls[1]


# -- 3: lax booleans, as vLLM's pydantic models read them ---------------------------------------------------
def test_a_lax_add_generation_prompt_renders_as_vllm_reads_it() -> None:
    messages = [{"role": "user", "content": "hi"}]
    strict = render(parsed("/v1/chat/completions", {"model": "m", "messages": messages,
                                                     "add_generation_prompt": False}))  # fmt: skip
    for lax in ("false", 0):
        body = {"model": "m", "messages": messages, "add_generation_prompt": lax}
        assert render(parsed("/v1/chat/completions", body)) == strict


# -- 4: a chat with an inline image is no long prompt ------------------------------------------------------
async def test_a_short_chat_with_an_inline_image_does_not_queue_on_the_long_prompt_lane() -> None:
    """The long lane (prompts of LONG_CHARS characters or more) is busy: a one-line question with a 300 KB inline
    image is still tokenized, on the ordinary lane."""
    plugin = registry.build("token-producer", "t", {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH),
                                                                  "chatTemplate": "role-tags"}})  # fmt: skip
    assert isinstance(plugin, HFTokenProducer)
    image = "data:image/png;base64," + "A" * 300_000
    parts = [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": image}}]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    req = parsed("/v1/chat/completions", body)
    release = threading.Event()
    # The long lane busy with huge prompts (its thread and both queue places), as after a few huge bodies.
    held = [
        asyncio.ensure_future(hf.in_worker(release.wait, 10, chars=hf.LONG_CHARS)) for _ in range(1 + hf.LONG_QUEUED)
    ]
    await asyncio.sleep(0)
    try:
        await asyncio.wait_for(plugin.produce(req, []), 10)
        assert TOKENIZED_PROMPT in req.data, "a 24-character question was refused as a long prompt"
    finally:
        release.set()
        await asyncio.wait_for(asyncio.gather(*held), 10)


def test_an_inline_system_message_waits_past_a_tool_use_for_its_results() -> None:
    """vLLM's "preserve" placement (inline_system.py _move_out_of_tool_runs), as the parser places it: nothing
    between an assistant's tool_use and the tool results answering it."""
    body = {**ANTHROPIC, "messages": [*ANTHROPIC["messages"][:2], {"role": "system", "content": "note"},
                                      *ANTHROPIC["messages"][2:]]}  # fmt: skip
    chat = api_chat_messages(parsed("/v1/messages", body))
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool", "system", "user"]
    assert chat[4]["content"] == "note"


def test_responses_reasoning_and_calls_merge_into_one_assistant_message() -> None:
    body = {**RESPONSES, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "list files"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
        {"type": "function_call", "call_id": "t1", "name": "ls", "arguments": "{}"},
        {"type": "function_call", "call_id": "t2", "name": "ls", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "t1", "output": [{"type": "input_text", "text": "a.txt"}]},
    ]}  # fmt: skip
    chat = api_chat_messages(parsed("/v1/responses", body))
    assert chat[:2] == [{"role": "system", "content": "S"}, {"role": "user", "content": "list files"}]
    assert chat[2]["reasoning"] == "think" and [c["id"] for c in chat[2]["tool_calls"]] == ["t1", "t2"]
    assert chat[3] == {"role": "tool", "content": "a.txt", "tool_call_id": "t1"}
    assert len(chat) == 4
