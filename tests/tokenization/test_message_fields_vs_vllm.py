"""The message dicts a chat template sees, as vLLM builds them (vllm/renderers/chat_utils/
parse_chat_message_content.py, `_parse_chat_message_content`):

* an assistant's `tool_calls` is passed whenever it is present and not null (`result_msg["tool_calls"] =
  list(parsed_msg["tool_calls"])`), so `"tool_calls": []` reaches the template as an empty list. vLLM's own
  chat responses carry `"tool_calls": []` (ChatMessage.tool_calls defaults to a list), so every client that
  appends the previous answer to `messages` sends it on the next turn.
* `tool_call_id` is passed for `tool` messages only, `name` only when it is a string.

Templates that test the key (Mistral's `message.tool_calls is defined and message.tool_calls is not none`,
DeepSeek-V3's `'tool_calls' in message`) render such a turn differently, so the EPP's prompt (and every
block after that turn) would differ from the engine's.
"""

from __future__ import annotations

import json
from typing import Any

from llmepp.request.parsers import parse_request
from llmepp.tokenization.chat import JinjaTemplate

# The shape of Mistral's (Mistral-7B-Instruct-v0.3 / Nemo) assistant branch.
MISTRAL_STYLE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}[INST]{{ message.content }}[/INST]"
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}[TOOL_CALLS]["
    "{%- for call in message.tool_calls %}{{ call.function.name }}{% if not loop.last %},{% endif %}{% endfor %}]</s>"
    "{%- elif message.role == 'assistant' %}{{ message.content }}</s>"
    "{%- endif %}"
    "{%- endfor %}"
)
# The shape of DeepSeek-V3's.
DEEPSEEK_STYLE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}<User>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' and 'tool_calls' in message %}<tool_calls_end><eos>"
    "{%- elif message['role'] == 'assistant' %}<Assistant>{{ message['content'] }}<eos>"
    "{%- endif %}"
    "{%- endfor %}"
)
# A template that prints whatever fields a message has (what vLLM would pass: role, content, and only the
# fields listed above).
KEYS = "{%- for message in messages %}{{ message | dictsort | map('first') | join(',') }};{%- endfor %}"


def render(source: str, messages: list[dict[str, Any]]) -> str:
    body = json.dumps({"model": "m", "messages": messages, "add_generation_prompt": False}).encode()
    req = parse_request({":path": "/v1/chat/completions"}, body, request_id="r")
    return JinjaTemplate(source, special_tokens={}, origin="test").render(req)


# The assistant turn exactly as vLLM answered it (then echoed back by the client).
ECHOED: dict[str, Any] = {"role": "assistant", "content": "Paris.", "tool_calls": [], "refusal": None}
TURNS: list[dict[str, Any]] = [
    {"role": "user", "content": "Capital of France?"},
    ECHOED,
    {"role": "user", "content": "And Spain?"},
]


def test_an_echoed_empty_tool_calls_list_reaches_a_mistral_style_template() -> None:
    # vLLM: tool_calls == [] is defined and not none -> the tool-calls branch.
    assert render(MISTRAL_STYLE, TURNS) == "[INST]Capital of France?[/INST][TOOL_CALLS][]</s>[INST]And Spain?[/INST]"


def test_an_echoed_empty_tool_calls_list_reaches_a_deepseek_style_template() -> None:
    assert render(DEEPSEEK_STYLE, TURNS) == "<User>Capital of France?<tool_calls_end><eos><User>And Spain?"


def test_message_fields_are_passed_as_vllm_passes_them() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hi", "tool_call_id": "x", "name": None},
        {"role": "assistant", "content": "ok", "tool_calls": []},
        {"role": "tool", "content": "r", "tool_call_id": "c1", "name": "get"},
    ]
    # vLLM: no tool_call_id on a user message, no null name; the assistant's empty tool_calls kept.
    assert render(KEYS, messages) == "content,role;content,role,tool_calls;content,name,role,tool_call_id;"


# -- the tools of Responses and Anthropic Messages requests ---------------------------------------------------
# vLLM renders a Responses request's function tools (construct_tool_dicts: {type, name, ...} as a chat function
# tool) and an Anthropic request's tools ({name, description, input_schema} as a function whose parameters are
# the input_schema) into the template's `tools`, which most templates write at the very start of the prompt.
TOOLS_FIRST = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function | tojson }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
)
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}


def _render(path: str, body: dict[str, Any]) -> str:
    req = parse_request({":path": path}, json.dumps(body).encode(), request_id="r")
    return JinjaTemplate(TOOLS_FIRST, special_tokens={}, origin="test").render(req)


def _chat_with_tools() -> str:
    tool = {"type": "function", "function": {"name": "read_file", "description": "read a file", "parameters": SCHEMA}}
    return _render(
        "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "fix it"}], "tools": [tool]}
    )


def test_a_responses_requests_tools_render_as_the_same_chat_requests() -> None:
    chat = _chat_with_tools()
    assert chat.startswith('<tools>{"name": "read_file", "description": "read a file", "parameters": {')
    responses = {
        "model": "m",
        "input": [{"type": "message", "role": "user", "content": "fix it"}],
        "tools": [
            {"type": "function", "name": "read_file", "description": "read a file", "parameters": SCHEMA},
            {"type": "web_search_preview"},  # a built-in tool: vLLM renders it only with a tool server
        ],
    }
    assert _render("/v1/responses", responses) == chat


def test_an_anthropic_requests_tools_render_as_the_same_chat_requests() -> None:
    messages = {
        "model": "m",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "fix it"}],
        "tools": [{"name": "read_file", "description": "read a file", "input_schema": SCHEMA}],
    }
    assert _render("/v1/messages", messages) == _chat_with_tools()


def test_the_vllm_render_backend_sends_a_responses_requests_tools_as_chat_tools() -> None:
    from llmepp.plugins.producers.token import VllmTokenProducer

    body = {
        "model": "m",
        "input": "fix it",
        "tools": [{"type": "function", "name": "read_file", "description": "read a file", "parameters": SCHEMA}],
    }
    req = parse_request({":path": "/v1/responses"}, json.dumps(body).encode(), request_id="r")
    _path, sent = VllmTokenProducer._render_request(req, "m")
    assert sent["tools"] == [
        {"type": "function", "function": {"name": "read_file", "description": "read a file", "parameters": SCHEMA}}
    ]
