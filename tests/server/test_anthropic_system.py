"""The system prompt of an Anthropic Messages request as vLLM's Anthropic endpoint builds it
(vllm/entrypoints/anthropic/inline_system.py, serving.py): Claude Code's per-request
`x-anthropic-billing-header` text blocks are dropped, system text blocks are joined without separator,
system messages leading `messages` are appended to the system prompt ("\\n\\n"), later ones stay in place; Claude
Code's non-standard `ctx` / `msg` roles are user turns (vLLM's AnthropicMessage.normalize_role)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmepp.framework.datakeys import TOKENIZED_PROMPT
from llmepp.framework.plugin import registry
from llmepp.plugins.producers.prefix_index import block_hashes, prefix_seed
from llmepp.plugins.producers.token import estimate_tokens
from llmepp.request.parsers import parse_request
from llmepp_sim.tokenizer import TOKENIZER_PATH


def parse(body: dict[str, Any]) -> Any:
    return parse_request({":path": "/v1/messages"}, json.dumps(body).encode(), request_id="r")


AGENT_PROMPT = "You are an interactive agent that helps users with software engineering tasks. " * 40


def claude_code(cch: str, version: str = "2.1.117.48f") -> dict[str, Any]:
    """A request as Claude Code sends it: the billing header is the first system block, its hash varies."""
    header = f"x-anthropic-billing-header: cc_version={version}; cc_entrypoint=cli; cch={cch};"
    return {
        "model": "claude-sonnet",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": header},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": AGENT_PROMPT},
        ],
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "fix the failing test"}]}],
    }  # fmt: skip


def test_requests_differing_only_in_the_billing_header_share_prompt_and_prefix_hashes() -> None:
    # Before: the header (its cch= hash changes every request) was the prompt's first system text, so every
    # Claude Code request had a different prefix from ~40 bytes on: no prefix affinity for that traffic.
    a, b = parse(claude_code("71fea")), parse(claude_code("ad80e", version="2.1.118.0a1"))
    assert a.prompt == b.prompt and a.messages == b.messages
    assert b"x-anthropic-billing-header" not in a.prompt
    seed = prefix_seed(a.model, a.cache_salt)
    ha, hb = (block_hashes(estimate_tokens(r.prompt), 16, seed) for r in (a, b))
    assert ha == hb and len(ha) > 10


def test_system_text_blocks_join_as_vllm_joins_them() -> None:
    r = parse(claude_code("x"))
    system = r.messages[0]
    assert system[0] == "system"
    assert system[1] == "You are Claude Code, Anthropic's official CLI for Claude." + AGENT_PROMPT


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        # vLLM keeps a string system prompt as sent, header or not.
        ("x-anthropic-billing-header: cch=1;\nbe brief", "x-anthropic-billing-header: cch=1;\nbe brief"),
        # A block is dropped when its text starts with the header (no colon needed), whatever follows.
        ([{"type": "text", "text": "x-anthropic-billing-header"}, {"type": "text", "text": "be brief"}], "be brief"),
        ([{"type": "text", "text": "x-anthropic-billing-header: a\nmore"}, {"type": "text", "text": "b"}], "b"),
        # Only at the start: a block mentioning it later is kept.
        ([{"type": "text", "text": "see x-anthropic-billing-header"}], "see x-anthropic-billing-header"),
        ([{"type": "text", "text": " x-anthropic-billing-header: a"}], " x-anthropic-billing-header: a"),
        # Only text blocks make the system prompt; empty ones add nothing.
        ([{"type": "text", "text": "a"}, {"type": "text", "text": ""}, {"type": "image", "source": {}},
          {"type": "text", "text": "b"}], "ab"),
    ],
)  # fmt: skip
def test_the_top_level_system_prompt(system: Any, expected: str) -> None:
    r = parse({"model": "m", "max_tokens": 5, "system": system, "messages": [{"role": "user", "content": "hi"}]})
    assert r.messages == [("system", expected), ("user", "hi")]


def test_a_system_of_only_the_billing_header_gives_no_system_message() -> None:
    system = [{"type": "text", "text": "x-anthropic-billing-header: cch=9;"}]
    r = parse({"model": "m", "max_tokens": 5, "system": system, "messages": [{"role": "user", "content": "hi"}]})
    assert r.messages == [("user", "hi")] and r.prompt == b"userhi"


def test_leading_system_messages_join_the_system_prompt_later_ones_stay_in_place() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cch=1;"}, {"type": "text", "text": "top"}],
        "messages": [
            {"role": "system", "content": "x-anthropic-billing-header: cch=2;"},
            {"role": "system", "content": [{"type": "text", "text": "lead"}, {"type": "text", "text": "ing"}]},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "x-anthropic-billing-header: cch=3;"},
                                           {"type": "text", "text": "note"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "system", "content": "x-anthropic-billing-header: cch=4;"},
            {"role": "user", "content": "more"},
        ],
    }  # fmt: skip
    r = parse(body)
    assert r.messages == [
        ("system", "top\n\nleading"),
        ("user", "hi"),
        ("system", "note"),
        ("assistant", "ok"),
        ("user", "more"),
    ]
    # Without a top-level system, the leading system messages are the system prompt.
    r = parse({**body, "system": None})
    assert r.messages[0] == ("system", "leading")


def test_user_and_assistant_text_keep_their_blocks_joined_by_newline() -> None:
    # Unchanged: only system text is read as vLLM's system conversion reads it.
    content = [
        {"type": "text", "text": "x-anthropic-billing-header: kept in a user turn"},
        {"type": "text", "text": "b"},
    ]
    r = parse({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": content}]})
    assert r.messages == [("user", "x-anthropic-billing-header: kept in a user turn\nb")]


# -- Claude Code's non-standard roles -----------------------------------------------------
# vLLM's AnthropicMessage (vllm/entrypoints/anthropic/protocol.py) normalizes the roles Claude Code >= 2.1.154 sends:
#     @field_validator("role", mode="before")
#     def normalize_role(cls, v): return {"ctx": "user", "msg": "user"}.get(v, v)
# so `ctx` / `msg` messages are user turns for the chat template and for inline-system placement.
def test_claude_code_ctx_and_msg_roles_are_user_turns_as_vllm_reads_them() -> None:
    body = {
        "model": "claude",
        "max_tokens": 64,
        "messages": [
            {"role": "ctx", "content": "<env>cwd=/repo</env>"},
            {"role": "msg", "content": "fix the test"},
        ],
    }
    req = parse(body)
    assert req.messages == [("user", "<env>cwd=/repo</env>"), ("user", "fix the test")]


def test_a_system_note_held_past_a_tool_use_is_placed_after_the_ctx_turn_that_answers_it() -> None:
    # vLLM (inline_system._move_out_of_tool_runs, on normalized roles): a system message between an assistant's
    # tool_use and its tool_result goes right after the user turn carrying the result.
    body = {
        "model": "claude",
        "max_tokens": 64,
        "system": "You are Claude Code.",
        "messages": [
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]},
            {"role": "system", "content": "note: sandboxed"},
            {"role": "ctx", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.py"}]},
            {"role": "user", "content": "now open a.py"},
        ],
    }
    req = parse(body)
    assert req.messages == [
        ("system", "You are Claude Code."),
        ("user", "list files"),
        ("assistant", ""),
        ("user", "a.py"),
        ("system", "note: sandboxed"),
        ("user", "now open a.py"),
    ]


# ... and so the hf token producer renders what vLLM renders ---------------------------------------------
async def test_a_ctx_turn_is_tokenized_as_the_user_turn_vllm_renders() -> None:
    chatml = Path(__file__).parents[1] / "tokenization" / "templates" / "chatml" / "tokenizer_config.json"
    plugin: Any = registry.build(
        "token-producer",
        "t",
        {"tokenizer": {"backend": "hf", "path": str(TOKENIZER_PATH), "chatTemplate": str(chatml)}},
    )

    async def tokens(role: str) -> bytes:
        body = {"model": "claude", "max_tokens": 8, "messages": [{"role": role, "content": "fix the failing test"}]}
        req = parse(body)
        await plugin.produce(req, [])
        return req.data[TOKENIZED_PROMPT].token_bytes

    # vLLM normalizes ctx to user before rendering: the engine prefills the "user" rendering.
    assert await tokens("ctx") == await tokens("user")
