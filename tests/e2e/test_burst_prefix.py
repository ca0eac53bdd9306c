"""`burst-prefix-cache-producer` end to end: a real Envoy, the `epp` program, four simulated pods.
A burst of RL rollouts (N samples of one prompt, sent at once, every pod's cache cold) lands on one
pod per prompt, and the groups of different prompts are spread over the pods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4"]
# A 500 ms window: longer than the director's default 400 ms producer budget (the producer extends
# its own), and wide enough that a burst sent at once lands in one window on a loaded machine.
CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: burst-prefix-cache-producer
  parameters: {windowDurationMs: 500}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: burst-prefix-cache-producer}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 5}
  - {pluginRef: queue-scorer, weight: 1}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=4, first_host=236, sim_args=SIM, epp_config=CONFIG)) as st:
        yield st


async def rollout(stack: Stack, http: aiohttp.ClientSession, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 1.0}
    async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["x-inference-pod"]


def task_prompt(i: int) -> str:
    return f"Problem {i}: " + f"prove that the sum of the first {i} odd numbers is a square. " * 40


async def test_each_prompts_rollouts_land_on_one_pod_and_prompts_spread(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    n = 8
    prompts = [task_prompt(1), task_prompt(2)]
    pods = await asyncio.gather(*(rollout(stack, http, p) for p in prompts for _ in range(n)))
    first, second = set(pods[:n]), set(pods[n:])
    assert len(first) == 1 and len(second) == 1, pods
    assert first != second, pods


async def test_four_groups_take_the_four_pods(stack: Stack, http: aiohttp.ClientSession) -> None:
    n = 4
    prompts = [task_prompt(10 + i) for i in range(4)]
    pods = await asyncio.gather(*(rollout(stack, http, p) for p in prompts for _ in range(n)))
    groups = [set(pods[i * n : (i + 1) * n]) for i in range(4)]
    assert all(len(g) == 1 for g in groups), pods
    assert len(set.union(*groups)) == 4, pods
