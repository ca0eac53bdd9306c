"""Precise prefix routing of Claude Code traffic: the chat template renders an Anthropic request's system
prompt as vLLM's Anthropic endpoint does, without the per-request `x-anthropic-billing-header` block, so
two turns of one conversation tokenize to the same prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.tokenization.chat import load_chat_template
from llmepp_sim.tokenizer import TOKENIZER_PATH

CHATML = Path(__file__).parent / "templates" / "chatml" / "tokenizer_config.json"


def messages_request(cch: str, turns: list[dict[str, Any]]) -> InferenceRequest:
    header = f"x-anthropic-billing-header: cc_version=2.1.117.48f; cc_entrypoint=cli; cch={cch};"
    body = {
        "model": "m",
        "max_tokens": 100,
        "system": [
            {"type": "text", "text": header},
            {"type": "text", "text": "You are Claude Code."},
            {"type": "text", "text": " Be terse."},
        ],
        "messages": turns,
    }
    return parse_request({":path": "/v1/messages"}, json.dumps(body).encode(), request_id="r")


def test_the_next_turn_renders_as_an_extension_of_the_previous_one() -> None:
    t = load_chat_template(str(CHATML), str(TOKENIZER_PATH))
    first = [{"role": "user", "content": "hi"}]
    second = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    a = t.render(messages_request("71fea", first))
    b = t.render(messages_request("ad80e", second))
    assert "billing-header" not in a
    # The system message as vLLM builds it: its text blocks joined without separator.
    assert "You are Claude Code. Be terse." in a
    prefix = a.rsplit("<|im_start|>assistant", 1)[0]  # less the generation prompt
    assert b.startswith(prefix)
