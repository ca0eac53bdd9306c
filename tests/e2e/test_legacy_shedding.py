"""README, Flow control: "Off by default (then the reference's legacy rule applies: a sheddable request —
priority < 0 — is answered 429 while the pool is saturated)." End to end: real Envoy + `epp` (no flowControl
gate) + two simulated pods; saturation = concurrency-detector, one request per pod.

Also: `anthropic-parser` "`messages/count_tokens` stays raw" and "`count_tokens` responses go through the EPP
like any other": a count_tokens body the messages rules would refuse is still routed to a pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions, epp_metric

from .answers import Answer, completion

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "2"]
PIN = 4000

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: active-request-scorer}]
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
"""

OBJECTIVES = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: epp}}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    opts = StackOptions(pods=2, first_host=31, sim_args=SIM, epp_config=CONFIG, objectives=OBJECTIVES)
    async with Stack(opts) as st:
        yield st


async def send(
    http: aiohttp.ClientSession, stack: Stack, prompt: str, tokens: int, headers: dict[str, str] | None = None
) -> Answer:
    return await completion(http, stack.url, MODEL, prompt, tokens, headers)


SHED = {"x-llm-d-inference-objective": "batch"}


async def test_sheddable_is_429_only_while_saturated(stack: Stack, http: aiohttp.ClientSession) -> None:
    # Idle pool: a sheddable request is served.
    status, headers, text = await send(http, stack, "idle sheddable", 2, SHED)
    assert status == 200, text
    before = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_total")
    pins = [asyncio.create_task(send(http, stack, f"pin {i}", PIN)) for i in range(2)]
    try:
        for _ in range(300):
            if await epp_metric(http, stack.metrics_url, "llm_d_epp_request_total") >= before + 2:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("pins never routed")
        # Saturated: sheddable → 429 (without a dropped-reason header: the reference's legacy rule sets none, only
        # flow control's outcomes do); a normal request still goes through.
        status, headers, text = await asyncio.wait_for(send(http, stack, "shed me", 2, SHED), 10)
        assert status == 429, (status, text)
        assert "x-llm-d-request-dropped-reason" not in headers, dict(headers)
        assert "x-inference-pod" not in headers
        status, headers, text = await asyncio.wait_for(send(http, stack, "normal", 2), 10)
        assert status == 200, (status, text)
    finally:
        for t in pins:
            t.cancel()
        await asyncio.gather(*pins, return_exceptions=True)
    # The pins gone, the pool is not saturated any more.
    for _ in range(100):
        status, headers, text = await send(http, stack, "after", 2, SHED)
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200, text


async def test_count_tokens_stays_raw_and_is_routed(stack: Stack, http: aiohttp.ClientSession) -> None:
    # `messages` as a string would be a 400 on /v1/messages; count_tokens is not read, only routed.
    body = {"model": MODEL, "messages": "not a list"}
    async with http.post(f"{stack.url}/v1/messages/count_tokens", json=body) as resp:
        await resp.read()
        assert resp.headers.get("x-inference-pod") in {p.name for p in stack.pods}, (resp.status, dict(resp.headers))
    async with http.post(f"{stack.url}/v1/messages", json={**body, "max_tokens": 2}) as resp:
        assert resp.status == 400, await resp.text()
