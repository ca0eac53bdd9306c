"""The Anthropic Messages API (`POST /v1/messages`), as vLLM serves it, on the same engine.

A Messages body becomes a chat body (`system` first as a system message; content blocks to
their text: `text` blocks, and the text inside `tool_result` blocks, joined by "\\n"; images
and tool calls add nothing) and is rendered with the pod's chat template like any chat
request. `max_tokens` is required, as in the API. Usage: `input_tokens` is the prompt's
tokens, `cache_read_input_tokens` those served from the prefix cache, `output_tokens` the
generated ones. Streams are Anthropic's events: message_start (input usage), one
content_block_delta per token, message_delta (stop reason, output usage), message_stop.
"""

from __future__ import annotations

import uuid
from typing import Any

from llmepp_sim.errors import ApiError, bad_request
from llmepp_sim.protocol import encode_json, lax_int

# vLLM maps these; any other finish reason (``abort``) has no stop_reason (null).
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


class AnthropicError(ApiError):
    """An error of the Messages handler, in Anthropic's shape as vLLM's router translates it
    (``{"type": "error", "error": {"type": <the OpenAI error type>, "message": ...}}``). Refusals of the
    request model's validation keep the OpenAI shape: vLLM's app-wide validation handler answers them."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.status, error.message, param=error.param, err_type=error.err_type)

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.err_type, "message": self.message}}


def no_render(body: dict[str, Any]) -> str:
    """A chat renderer that renders nothing: ``parse_inference_request`` with it only validates the fields."""
    return ""


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The equivalent chat-completions body (validated as one by the caller)."""
    if body.get("max_tokens") is None or lax_int(body["max_tokens"]) is None:  # pydantic lax, as vLLM
        raise bad_request("`max_tokens` is required and must be an integer.", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list.", param="messages")
    chat: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        chat.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad_request(f"messages[{i}].role must be `user` or `assistant`.", param="messages")
        chat.append({"role": message["role"], "content": _text(message.get("content"), f"messages[{i}].content")})
    out = {"model": body.get("model"), "messages": chat, "max_tokens": body["max_tokens"]}
    if body.get("stream") is not None:
        out["stream"] = body["stream"]
    return out


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"`{where}` must be a string or a list of content blocks.", param=where)
    parts: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            raise bad_request(f"`{where}` blocks must be objects.", param=where)
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                parts.append(inner)
            elif isinstance(inner, list):
                parts += [b["text"] for b in inner if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return "\n".join(parts)


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": completion_tokens, "cache_read_input_tokens": cached_tokens}


def full_response(message_id: str, model: str, text: str, finish_reason: str, usage_body: dict[str, int]) -> bytes:
    return encode_json(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": STOP_REASONS.get(finish_reason),
            "stop_sequence": None,
            "usage": usage_body,
        }
    )


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + encode_json(data) + b"\n\n"


def error_event(error: AnthropicError) -> bytes:
    """The `error` event that ends a stream the engine cut short (Anthropic's streaming error shape)."""
    return _event("error", error.body())


class MessagesStream:
    """The events of one streamed Messages response."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model

    def start(self, usage_body: dict[str, int]) -> bytes:
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_body,
        }
        return _event("message_start", {"type": "message_start", "message": message}) + _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )

    @staticmethod
    def token(text: str) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        return _event("content_block_delta", delta)

    @staticmethod
    def end(finish_reason: str, output_tokens: int) -> bytes:
        delta: dict[str, Any] = {"stop_reason": STOP_REASONS.get(finish_reason), "stop_sequence": None}
        return (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event(
                "message_delta", {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}}
            )
            + _event("message_stop", {"type": "message_stop"})
        )
