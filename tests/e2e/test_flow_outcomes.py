"""README's flow control outcomes, end to end (real Envoy + `epp` + two simulated pods):

  "Outcomes: capacity → 429 `rejected-saturated`, TTL → 429 `rejected-ttl-expired` (...), shutdown → 503
  `rejected-shutting-down`"
  "`request_total` counts routed requests (a refused one is only in `request_error_total{error_code}`)"

Saturation is the concurrency detector with one request per pod (as tests/e2e/test_flow_control.py): two long
requests pin both pods, the band holds at most one waiting request.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions, epp_metric

from .answers import Answer, completion

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "2"]
PIN = 4000  # ~24 s of output: always cut by the test

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: concurrency-detector}, {pluginRef: queue-scorer}]
flowControl:
  defaultRequestTTL: 60s
  defaultPriorityBand: {maxRequests: 1}
  priorityBands:
  - {priority: 0, maxRequests: 1}
  saturationDetector: {pluginRef: concurrency-detector}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=2, first_host=28, sim_args=SIM, epp_config=CONFIG)) as st:
        yield st


async def send(http: aiohttp.ClientSession, stack: Stack, prompt: str, tokens: int) -> Answer:
    return await completion(http, stack.url, MODEL, prompt, tokens)


async def metric(http: aiohttp.ClientSession, stack: Stack, name: str, **labels: str) -> float:
    return await epp_metric(http, stack.metrics_url, name, **labels)


async def until(http: aiohttp.ClientSession, stack: Stack, name: str, value: float, **labels: str) -> None:
    got = None
    for _ in range(300):
        got = await metric(http, stack, name, **labels)
        if got >= value:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name}{labels} never reached {value} (last {got})")


async def test_a_queued_client_that_disconnects_frees_its_place_at_once(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """README: "a client that disconnects frees its place at once" (the band holds one waiting request)."""
    dispatched = "llm_d_epp_flow_control_requests_total"
    before = await metric(http, stack, dispatched, outcome="Dispatched")
    pins = [asyncio.create_task(send(http, stack, f"pin {i}", PIN)) for i in range(2)]
    second: asyncio.Task | None = None
    try:
        await until(http, stack, dispatched, before + 2, outcome="Dispatched")
        first = asyncio.create_task(send(http, stack, "leaves", 4))
        await until(http, stack, "llm_d_epp_flow_control_queue_size", 1)
        first.cancel()  # the client goes away while queued
        await asyncio.gather(first, return_exceptions=True)
        for _ in range(200):
            if await metric(http, stack, "llm_d_epp_flow_control_queue_size") == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the queue kept the departed request")
        # Its place is free: the next request queues instead of 429.
        second = asyncio.create_task(send(http, stack, "takes the place", 4))
        await until(http, stack, "llm_d_epp_flow_control_queue_size", 1)
        await asyncio.sleep(0.2)
        assert not second.done(), second.result()
    finally:
        for t in [*pins, *([second] if second else [])]:
            t.cancel()
        await asyncio.gather(*pins, *([second] if second else []), return_exceptions=True)
        for _ in range(300):
            if await metric(http, stack, "llm_d_epp_flow_control_queue_size") == 0:
                break
            await asyncio.sleep(0.02)


async def test_capacity_is_429_then_shutdown_is_503(stack: Stack, http: aiohttp.ClientSession) -> None:
    dispatched = "llm_d_epp_flow_control_requests_total"
    before = await metric(http, stack, dispatched, outcome="Dispatched")
    pins = [asyncio.create_task(send(http, stack, f"pin {i}", PIN)) for i in range(2)]
    queued: asyncio.Task | None = None
    try:
        await until(http, stack, dispatched, before + 2, outcome="Dispatched")
        queued = asyncio.create_task(send(http, stack, "waits", 4))
        await until(http, stack, "llm_d_epp_flow_control_queue_size", 1)
        routed = await metric(http, stack, "llm_d_epp_request_total")
        errors = await metric(http, stack, "llm_d_epp_request_error_total", error_code="ResourceExhausted")

        # The band is full: the next request is refused at once with 429 rejected-saturated (JSON body).
        status, headers, text = await asyncio.wait_for(send(http, stack, "refused", 4), 10)
        assert status == 429, (status, text)
        assert headers.get("x-llm-d-request-dropped-reason") == "rejected-saturated", dict(headers)
        assert headers.get("content-type", "").startswith("application/json"), dict(headers)
        assert '"code":429' in text.replace(" ", ""), text
        assert "x-inference-pod" not in headers
        await until(http, stack, "llm_d_epp_request_error_total", errors + 1, error_code="ResourceExhausted")
        assert await metric(http, stack, "llm_d_epp_request_total") == routed  # a refused one is not routed
        assert not queued.done()

        # Shutdown: the queued request is answered 503 rejected-shutting-down within the drain (4 s).
        assert stack.epp is not None
        stack.epp.signal(signal.SIGTERM)
        status, headers, text = await asyncio.wait_for(queued, 15)
        assert status == 503, (status, text)
        assert headers.get("x-llm-d-request-dropped-reason") == "rejected-shutting-down", dict(headers)
        assert '"code":503' in text.replace(" ", ""), text
    finally:
        for t in [*pins, *([queued] if queued else [])]:
            t.cancel()
        await asyncio.gather(*pins, return_exceptions=True)
        assert stack.epp is not None
        await stack.epp.exit_code(10)
