"""A payload-agnostic EPP (`requestHandler.parsers: [passthrough-parser]`, the reference Helm chart's
shape) end to end: a real Envoy, the `epp` program, three simulated pods. The EPP routes on the
request headers and streams the body through without buffering it, so a body far above
`--max-body-size` is served (buffered, it would be a 413), arrives intact (the pod counts the same
prompt tokens as when it is sent to the pod directly), and routing follows load."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SIM = ["--max-model-len", "16384", "--kv-cache-size", "4096"]
CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: passthrough-parser
- type: active-request-scorer
requestHandler:
  parsers:
  - pluginRef: passthrough-parser
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: active-request-scorer
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    options = StackOptions(
        pods=3, first_host=104, epp_config=CONFIG, epp_args=["--max-body-size", "4096"], sim_args=SIM
    )
    async with Stack(options) as st:
        yield st


async def prompt_tokens(http: aiohttp.ClientSession, url: str, body: dict[str, object]) -> tuple[int, str]:
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        return answer["usage"]["prompt_tokens"], resp.headers.get("x-inference-pod", "")


async def test_a_body_far_above_the_buffer_limit_streams_through_intact(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    body = {"model": "sim-model", "prompt": "streamed through the router unread " * 1200, "max_tokens": 2}
    through_envoy, _ = await prompt_tokens(http, stack.url, body)  # ~42 KB, limit 4 KB
    direct, _ = await prompt_tokens(http, f"http://{stack.pods[0].address}", body)
    assert through_envoy == direct > 8000


async def test_concurrent_requests_spread_by_load(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "prompt": "same prompt, no affinity without a parser " * 20, "max_tokens": 40}
    served = await asyncio.gather(*(prompt_tokens(http, stack.url, body) for _ in range(9)))
    assert len({pod for _, pod in served}) == 3  # active-request-scorer: in-flight requests spread them
