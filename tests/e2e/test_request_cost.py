"""`request-attribute-reporter` end to end (real Envoy, the `epp` program, two simulated pods): the
token cost the reference's example computes (`usage.prompt_tokens + usage.completion_tokens`) reaches
Envoy as `envoy.lb` dynamic metadata, where its access log (`%DYNAMIC_METADATA(...)%`), a rate-limit
or a billing filter can read it, for plain and for streamed answers."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

REPORTER = """\
- name: total-tokens-cost-reporter
  type: request-attribute-reporter
  parameters:
    attributes:
    - key: {namespace: envoy.lb, name: x-gateway-inference-request-cost}
      expression: usage.prompt_tokens + usage.completion_tokens
      condition: has(usage.prompt_tokens) && has(usage.completion_tokens)
"""
CONFIG = DEFAULT_CONFIG.replace("plugins:\n", "plugins:\n" + REPORTER, 1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=2, first_host=118, epp_config=CONFIG)) as st:
        yield st


async def logged_cost(stack: Stack, request_id: str) -> str:
    assert stack.envoy is not None
    for _ in range(100):  # Envoy flushes its access log every 200 ms
        for line in stack.envoy.access_log():
            if f"rid={request_id}" in line:
                found = re.search(r"cost=(\S+)", line)
                assert found is not None, line
                return found.group(1)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access log line for {request_id}")


async def test_a_plain_answer_reports_its_token_cost(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "prompt": "how much does this cost " * 10, "max_tokens": 7}
    async with http.post(f"{stack.url}/v1/completions", json=body, headers={"x-request-id": "cost-plain"}) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
    assert await logged_cost(stack, "cost-plain") == str(usage["prompt_tokens"] + usage["completion_tokens"])


async def test_a_streamed_answer_reports_its_token_cost(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "stream the cost"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"x-request-id": "cost-stream"}
    async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        events = [ln[6:] for ln in (await resp.read()).decode().splitlines() if ln.startswith("data: {")]
    usage = json.loads(events[-1])["usage"]
    assert await logged_cost(stack, "cost-stream") == str(usage["prompt_tokens"] + usage["completion_tokens"])


async def test_an_answer_without_usage_reports_nothing(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "no usage asked"}], "max_tokens": 3,
            "stream": True}  # fmt: skip
    async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers={"x-request-id": "cost-none"}) as r:
        assert r.status == 200
        await r.read()
    assert await logged_cost(stack, "cost-none") == "-"  # Envoy's placeholder for absent metadata
