"""README, Built-in plugins: `lora-affinity-scorer` | "adapter active 1 / room 0.8 / queued 0.6 / full 0".
End to end: real Envoy + `epp` + three simulated pods serving two adapters (vLLM's `vllm:lora_requests_info`
scraped every 50 ms): while one pod runs adapter `lora-a`, every `lora-a` request goes there; a pod
whose adapter slots are full of other adapters gets none.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions

from .answers import Answer, completion

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SIM = [
    "--latency-profile",
    "llama-8b-h100",
    "--time-scale",
    "2",
    "--max-loras",
    "1",
    "--lora-modules",
    "lora-a=/adapters/a",
    "lora-b=/adapters/b",
    "lora-c=/adapters/c",
]
PIN = 4000

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: lora-affinity-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: lora-affinity-scorer}, {pluginRef: max-score-picker}]
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=3, first_host=34, sim_args=SIM, epp_config=CONFIG)) as st:
        yield st


async def send(http: aiohttp.ClientSession, stack: Stack, model: str, tokens: int) -> Answer:
    return await completion(http, stack.url, model, f"adapter {model}", tokens)


async def test_requests_follow_the_running_adapter(stack: Stack, http: aiohttp.ClientSession) -> None:
    # The pod that runs a long lora-a request reports it active; which pod is it? Ask the pods themselves.
    pin = asyncio.create_task(send(http, stack, "lora-a", PIN))
    try:
        holder = ""
        for _ in range(200):
            for p in stack.pods:
                async with http.get(f"http://{p.address}/metrics") as r:
                    if 'running_lora_adapters="lora-a"' in await r.text():
                        holder = p.name
            if holder:
                break
            await asyncio.sleep(0.02)
        assert holder, "no pod runs lora-a"
        await asyncio.sleep(0.5)  # > several scrape intervals
        seen: Counter[str] = Counter()
        for _ in range(6):
            status, h, text = await send(http, stack, "lora-a", 2)
            assert status == 200, text
            seen[h["x-inference-pod"]] += 1
        assert seen == Counter({holder: 6}), (holder, seen)
        # max_loras=1: the holder is full (lora-a running), so lora-b scores 0 there and 0.8 elsewhere.
        seen = Counter()
        for _ in range(6):
            status, h, text = await send(http, stack, "lora-b", 2)
            assert status == 200, text
            seen[h["x-inference-pod"]] += 1
        assert holder not in seen, (holder, seen)
    finally:
        pin.cancel()
        await asyncio.gather(pin, return_exceptions=True)
