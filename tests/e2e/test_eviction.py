"""In-flight eviction end to end (`flowControl.enableEviction`): a real Envoy, the `epp` program and a
simulated pod. Two sheddable (priority -1) streams fill the pod's two slots; an interactive request
arrives and is held back by saturation; the EPP revokes the newest sheddable stream, whose client
sees its stream cut, the pod stops generating for it, and the interactive request runs at once. A
victim whose response has not started (not streamed) gets Envoy's reply of the EPP's 429 instead.
Both ext_proc transports (h2, grpc.aio)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions, epp_metric

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "2"]
LONG = 4000  # output tokens: ~24 s of streaming, far longer than the test

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 2}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: concurrency-detector}, {pluginRef: queue-scorer}]
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
  enableEviction: true
"""

OBJECTIVES = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: epp}}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["h2", "grpc"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    options = StackOptions(
        pods=1, first_host=175, sim_args=SIM, epp_config=CONFIG, objectives=OBJECTIVES,
        epp_args=["--extproc-transport", request.param],
    )  # fmt: skip
    async with Stack(options) as st:
        yield st


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


class Batch:
    """A sheddable streaming completion; `started` once its first token arrived."""

    def __init__(self, http: aiohttp.ClientSession, stack: Stack, name: str, stream: bool = True) -> None:
        self.started = asyncio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.received = b""
        self.error: BaseException | None = None
        prompt = f"batch job {name}"
        self.task = asyncio.get_running_loop().create_task(self._run(http, stack, prompt, stream))

    async def _run(self, http: aiohttp.ClientSession, stack: Stack, prompt: str, stream: bool) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": LONG, "stream": stream}
        headers = {"x-gateway-inference-objective": "batch"}
        try:
            async with http.post(f"{stack.url}/v1/completions", json=body, headers=headers) as resp:
                self.status, self.headers = resp.status, dict(resp.headers)
                async for chunk in resp.content.iter_any():
                    self.received += chunk
                    self.started.set()
        except (aiohttp.ClientError, ConnectionError) as e:
            self.error = e

    @property
    def finished(self) -> bool:
        return b"[DONE]" in self.received


async def running_on_pod(http: aiohttp.ClientSession, stack: Stack) -> float:
    async with http.get(stack.pods[0].url + "/metrics") as resp:
        text = await resp.text()
    line = next(ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


async def test_a_blocked_request_evicts_the_newest_sheddable_stream(stack: Stack, http: aiohttp.ClientSession) -> None:
    first = Batch(http, stack, "first")
    await asyncio.wait_for(first.started.wait(), 20)
    second = Batch(http, stack, "second")
    await asyncio.wait_for(second.started.wait(), 20)

    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": "an interactive question", "max_tokens": 10}
    async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    waited = time.monotonic() - t0
    assert waited < 10, waited  # without eviction it would wait ~24 s for a slot (or its 60 s TTL)

    # The newest sheddable stream was cut mid-response (Envoy resets it: the 429 cannot be sent once
    # the response has started); the older one streams on.
    await asyncio.wait_for(second.task, 20)
    assert second.status == 200 and not second.finished and second.received
    assert not first.task.done()
    # Issued for the blocked band (the interactive request's, priority 0), and confirmed, as the reference counts.
    issued = "llm_d_epp_flow_control_revocations_issued_total"
    assert await epp_metric(http, stack.metrics_url, issued, priority="0") == 1
    revoked = await epp_metric(http, stack.metrics_url, "llm_d_epp_flow_control_revocations_total", outcome="confirmed")
    assert revoked == 1
    # The pod stopped generating for it: only the first stream runs there now.
    for _ in range(100):
        if await running_on_pod(http, stack) == 1:
            break
        await asyncio.sleep(0.05)
    assert await running_on_pod(http, stack) == 1
    first.task.cancel()
    await asyncio.gather(first.task, return_exceptions=True)


async def test_a_request_evicted_before_its_response_starts_gets_429(stack: Stack, http: aiohttp.ClientSession) -> None:
    first = Batch(http, stack, "streaming")
    await asyncio.wait_for(first.started.wait(), 20)
    # Not streamed (a stream's 200 goes out at once), so no response has started when it is evicted.
    waiting = Batch(http, stack, "waiting", stream=False)
    for _ in range(200):
        if await running_on_pod(http, stack) == 2:
            break
        await asyncio.sleep(0.01)
    body = {"model": MODEL, "prompt": "another interactive question", "max_tokens": 5}
    async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
    await asyncio.wait_for(waiting.task, 20)
    assert waiting.status == 429, (waiting.status, waiting.received[:300])
    assert waiting.headers.get("x-llm-d-request-dropped-reason") == "evicted"
    assert json.loads(waiting.received)["error"]["message"] == "request evicted by flow control"
    first.task.cancel()
    await asyncio.gather(first.task, return_exceptions=True)
