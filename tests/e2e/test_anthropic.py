"""Anthropic Messages API requests end to end: a real Envoy, the `epp` program with its default
profile and parsers, and four simulated pods serving `/v1/messages`. A conversation that grows
turn by turn stays on the pod that holds its prefix (so the EPP read the Messages body: a raw
body carries no prompt and cold requests rotate over the pods), and the EPP's token metrics come
from Anthropic usage, split over a stream's message_start and message_delta events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions, epp_metric

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--kv-cache-size", "4096"]
SYSTEM = "You are a careful assistant. " + " ".join(["cache", "request", "server", "model"] * 150)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=4, first_host=180, sim_args=SIM)) as st:
        yield st


async def turn(http: aiohttp.ClientSession, stack: Stack, history: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    body = {"model": MODEL, "system": SYSTEM, "messages": history, "max_tokens": 8}
    async with http.post(f"{stack.url}/v1/messages", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        return resp.headers["x-inference-pod"], answer


async def test_a_growing_conversation_stays_where_its_prefix_is_cached(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    history: list[dict[str, Any]] = [{"role": "user", "content": "first question"}]
    pods = []
    for i in range(5):
        pod, answer = await turn(http, stack, history)
        pods.append(pod)
        if i:
            assert answer["usage"]["cache_read_input_tokens"] > 600, answer["usage"]
        history += [
            {"role": "assistant", "content": answer["content"]},
            {"role": "user", "content": [{"type": "text", "text": f"follow-up {i}"}]},
        ]
    assert len(set(pods)) == 1, pods


async def test_streamed_usage_reaches_the_token_metrics(stack: Stack, http: aiohttp.ClientSession) -> None:
    labels = {"model_name": MODEL, "target_model_name": MODEL}
    before_in = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_input_tokens_sum", **labels)
    before_out = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
    body = {"model": MODEL, "system": "be brief", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    async with http.post(f"{stack.url}/v1/messages", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    start = json.loads(next(ln for ln in text.splitlines() if '"message_start"' in ln)[len("data: ") :])
    prompt_tokens = start["message"]["usage"]["input_tokens"]
    for _ in range(50):  # the EPP accounts right after its last answer
        if await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels) > before_out:
            break
        await asyncio.sleep(0.02)
    after_in = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_input_tokens_sum", **labels)
    after_out = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
    assert (after_in - before_in, after_out - before_out) == (prompt_tokens, 6)


async def test_claude_code_turns_stay_together_though_their_billing_header_varies(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Claude Code's first system block carries a per-request hash (x-anthropic-billing-header: ...;
    cch=...): the EPP, like vLLM, leaves it out of the prompt, so the turns of one session share their
    prefix and stay on one pod (before, every turn's prompt differed from its ~40th byte on)."""
    history: list[dict[str, Any]] = [{"role": "user", "content": "claude code question"}]
    pods = []
    for i in range(5):
        header = f"x-anthropic-billing-header: cc_version=2.1.117.48f; cc_entrypoint=cli; cch={i:05x};"
        system = [
            {"type": "text", "text": header},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": " " + SYSTEM},
        ]
        body = {"model": MODEL, "system": system, "messages": history, "max_tokens": 8}
        async with http.post(f"{stack.url}/v1/messages", json=body) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            pods.append(resp.headers["x-inference-pod"])
        history += [
            {"role": "assistant", "content": answer["content"]},
            {"role": "user", "content": f"follow-up {i}"},
        ]
    assert len(set(pods)) == 1, pods
