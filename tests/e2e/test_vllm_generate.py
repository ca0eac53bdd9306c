"""vLLM's tokens-in / tokens-out `inference/v1/generate` end to end: a real Envoy, the `epp` program
with its default parsers, four simulated pods. A prompt that grows turn by turn (token ids, as a
client that renders its own prompts sends them) stays on the pod that holds its prefix: the EPP read
the token ids (unread, the body is routed by load and cold requests rotate over the pods), and the
EPP's token metrics come from the answers' usage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions, epp_metric

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--kv-cache-size", "4096"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=4, first_host=110, sim_args=SIM)) as st:
        yield st


async def test_a_growing_token_prompt_stays_where_its_prefix_is_cached(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    prompt = list(range(1000, 1800))
    pods = []
    for turn in range(5):
        body = {"model": MODEL, "token_ids": prompt, "sampling_params": {"max_tokens": 4}}
        async with http.post(f"{stack.url}/inference/v1/generate", json=body) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            pods.append(resp.headers["x-inference-pod"])
        if turn:
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= 700, answer["usage"]
        prompt = prompt + answer["choices"][0]["token_ids"] + list(range(2000 + turn * 10, 2010 + turn * 10))
    assert len(set(pods)) == 1, pods


async def test_usage_reaches_the_token_metrics(stack: Stack, http: aiohttp.ClientSession) -> None:
    labels = {"model_name": MODEL, "target_model_name": MODEL}
    before = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
    body = {"model": MODEL, "token_ids": list(range(50, 90)), "sampling_params": {"max_tokens": 6}, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with http.post(f"{stack.url}/inference/v1/generate", json=body) as resp:
        assert resp.status == 200
        await resp.read()
    for _ in range(50):  # the EPP accounts right after its last answer
        after = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
        if after > before:
            break
        await asyncio.sleep(0.02)
    assert after - before == 6
