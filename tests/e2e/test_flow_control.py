"""Flow control end to end: real Envoy, the `epp` program with the flowControl gate, and two
simulated pods (llmepp.testing.stack).

Saturation here is the concurrency detector with one request per pod, so "the pool is full"
is exact and independent of scrape timing on a busy machine; it is also the scheduling
filter, so a freed slot is where the next dispatched request goes. Both pods are pinned by
long requests, the queue is filled, then one pinned client disconnects: exactly one slot
frees, queued requests run strictly one after another through it, and their completion
order is the dispatcher's order.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.ports import free_port
from llmepp.testing.stack import Stack, StackOptions, epp_metric
from llmepp_sim.cluster import PodInfo

from .modelserver import ModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
# 8B/H100 profile at 2x: ~15 ms prefill overhead + ~6 ms per output token on the wall clock.
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "2"]
# Output tokens: a pin (~24 s, always disconnected long before) and a short request (~0.075 s).
PIN, SHORT = 4000, 10
TTL_S = 3.0  # far longer than any queue wait in the ordering tests, even on a loaded machine
TTL = f"{TTL_S}s"

CONFIG = f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {{maxConcurrency: 1}}
- type: queue-scorer
- type: round-robin-fairness-policy
- type: agent-identity
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: concurrency-detector}}, {{pluginRef: queue-scorer}}]
flowControl:
  defaultRequestTTL: {TTL}
  defaultPriorityBand: {{fairnessPolicyRef: round-robin-fairness-policy}}
  priorityBands:
  - {{priority: 10}}
  saturationDetector: {{pluginRef: concurrency-detector}}
"""

OBJECTIVES = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: premium}
spec: {priority: 10, poolRef: {name: epp}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: epp}}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    options = StackOptions(pods=2, first_host=80, sim_args=SIM, epp_config=CONFIG, objectives=OBJECTIVES)
    async with Stack(options) as st:
        yield st


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


_ACCESS = re.compile(r"^ACCESS \[(?P<start>[^\]]+)\] .* dur=(?P<dur>\d+)ms .* rid=(?P<rid>\S+)")


class Run:
    """Sends completions; records which finished, and the pod-side request id of each.

    The order requests *finished* is read from Envoy's access log (start time + duration,
    per request id), not from when this process happened to read each response: on a
    loaded machine the test process can stall longer than one short request.
    """

    def __init__(self, stack: Stack, client: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.client = client
        self.finished: list[str] = []
        self.rids: dict[str, str] = {}
        self.tasks: list[asyncio.Task[tuple[int, dict[str, str], float]]] = []

    async def order(self, names: list[str]) -> list[str]:
        """`names` sorted by the time Envoy finished them."""
        assert self.stack.envoy is not None
        ends: dict[str, float] = {}
        for _ in range(50):  # Envoy flushes its access log every 200 ms
            for line in self.stack.envoy.access_log():
                m = _ACCESS.match(line)
                if m:
                    start = datetime.fromisoformat(m["start"].replace("Z", "+00:00")).timestamp()
                    ends[m["rid"]] = start + int(m["dur"]) / 1000
            if all(self.rids.get(n) in ends for n in names):
                return sorted(names, key=lambda n: ends[self.rids[n]])
            await asyncio.sleep(0.1)
        raise AssertionError(f"access log lacks some of {names}")

    def send(self, name: str, tokens: int, headers: dict[str, str] | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(self._send(name, tokens, headers or {}))
        self.tasks.append(task)
        return task

    async def _send(self, name: str, tokens: int, headers: dict[str, str]) -> tuple[int, dict[str, str], float]:
        t0 = time.monotonic()
        body = {"model": MODEL, "prompt": f"request {name}", "max_tokens": tokens}
        async with self.client.post(f"{self.stack.url}/v1/completions", json=body, headers=headers) as resp:
            raw = await resp.read()
            if resp.status == 200:
                # The pod names its answer "cmpl-" + the x-request-id Envoy sent it (as vLLM does).
                self.rids[name] = json.loads(raw)["id"].removeprefix("cmpl-")
            self.finished.append(name)
            return resp.status, dict(resp.headers), time.monotonic() - t0

    async def wait(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        """Disconnect whatever still runs (the pins) and wait for the EPP to see it."""
        for task in self.tasks:
            task.cancel()
        await self.wait()


async def until_finished(run: Run, n: int) -> None:
    for _ in range(1000):
        if len(run.finished) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {run.finished} finished")


async def dispatched(client: aiohttp.ClientSession, stack: Stack) -> float:
    return await epp_metric(client, stack.metrics_url, "llm_d_epp_flow_control_requests_total", outcome="Dispatched")


async def until_dispatched(client: aiohttp.ClientSession, stack: Stack, n: float) -> None:
    for _ in range(200):
        if await dispatched(client, stack) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never dispatched {n}")


async def until_queued(client: aiohttp.ClientSession, stack: Stack, n: int, **labels: str) -> None:
    for _ in range(200):
        if await epp_metric(client, stack.metrics_url, "llm_d_epp_flow_control_queue_size", **labels) == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"queue never reached {n} ({labels})")


async def pin_both_pods(run: Run) -> asyncio.Task[Any]:
    """Two long requests take both slots; returns the one to disconnect to free one slot."""
    before = await dispatched(run.client, run.stack)
    run.send("pin", PIN)  # disconnected by run.close() at the end of the test
    unpin = run.send("unpin", PIN)
    await until_dispatched(run.client, run.stack, before + 2)
    return unpin


async def test_high_priority_overtakes_queued_low_priority(stack: Stack, client: aiohttp.ClientSession) -> None:
    run = Run(stack, client)
    unpin = await pin_both_pods(run)
    for i in range(3):
        run.send(f"low-{i}", SHORT)
        await until_queued(client, stack, i + 1, priority="0")  # distinct arrival order
    run.send("high", SHORT, {"x-llm-d-inference-objective": "premium"})
    await until_queued(client, stack, 1, priority="10")
    unpin.cancel()  # the client goes away: its slot frees, one queued request at a time follows
    await until_finished(run, 4)
    await run.close()
    assert sorted(run.finished) == ["high", "low-0", "low-1", "low-2"]
    assert all(t.result()[0] == 200 for t in run.tasks[2:])
    assert await run.order(run.finished) == ["high", "low-0", "low-1", "low-2"]


async def test_round_robin_serves_a_quiet_tenant_between_noisy_ones(
    stack: Stack, client: aiohttp.ClientSession
) -> None:
    run = Run(stack, client)
    unpin = await pin_both_pods(run)
    for i in range(6):
        run.send(f"noisy-{i}", SHORT, {"x-llm-d-inference-fairness-id": "noisy"})
        await until_queued(client, stack, i + 1, fairness_id="noisy")
    for i in range(2):
        run.send(f"quiet-{i}", SHORT, {"x-llm-d-inference-fairness-id": "quiet"})
        await until_queued(client, stack, i + 1, fairness_id="quiet")
    unpin.cancel()
    await until_finished(run, 8)
    await run.close()
    order = await run.order(run.finished)
    # Sorted flow ids alternate: the quiet tenant waits one noisy request per turn, not six.
    assert order[:4] == ["noisy-0", "quiet-0", "noisy-1", "quiet-1"]
    assert order[4:] == [f"noisy-{i}" for i in range(2, 6)]


async def test_agent_sessions_are_fairness_flows(stack: Stack, client: aiohttp.ClientSession) -> None:
    # agent-identity: without a fairness header, an agent's session id (here Claude Code's) is the flow.
    run = Run(stack, client)
    unpin = await pin_both_pods(run)
    for i in range(4):
        run.send(f"busy-agent-{i}", SHORT, {"x-claude-code-session-id": "agent-a"})
        await until_queued(client, stack, i + 1, fairness_id="agent-a")
    run.send("other-agent", SHORT, {"session_id": "agent-b"})
    await until_queued(client, stack, 1, fairness_id="agent-b")
    unpin.cancel()
    await until_finished(run, 5)
    await run.close()
    order = await run.order(run.finished)
    assert order[:2] == ["busy-agent-0", "other-agent"]  # not behind all four of agent-a's


async def test_ttl_expiry_is_429_with_the_reason_header(stack: Stack, client: aiohttp.ClientSession) -> None:
    run = Run(stack, client)
    await pin_both_pods(run)
    waiting = run.send("late", SHORT)
    status, headers, elapsed = await waiting
    assert status == 429
    assert headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
    assert TTL_S - 0.1 <= elapsed < TTL_S + 1.0
    assert run.finished == ["late"]  # it expired while the pool was still full
    await run.close()
    evicted = await epp_metric(client, stack.metrics_url, "llm_d_epp_flow_control_requests_total", outcome="EvictedTTL")
    assert evicted >= 1


async def test_control_headers_do_not_reach_the_model_server(stack: Stack, client: aiohttp.ClientSession) -> None:
    """Point the pool at a server that reports what reached it, through the same Envoy and EPP."""
    host = "127.0.0.90"
    echo = ModelServer(host, free_port(host))
    await echo.start()
    sim_pods = stack.pods
    try:
        stack.write_endpoints([PodInfo("echo", echo.hostport, "", "", "", "")])
        headers = {"x-llm-d-inference-objective": "premium", "x-llm-d-inference-fairness-id": "tenant-a"}
        for _ in range(100):  # until file discovery has swapped the pool
            async with client.post(f"{stack.url}/v1/completions", json={"model": "m", "prompt": "x"},
                                   headers=headers) as resp:  # fmt: skip
                await resp.read()
                if resp.headers.get("x-served-by") == echo.hostport:
                    break
            await asyncio.sleep(0.05)
        assert resp.status == 200 and resp.headers["x-served-by"] == echo.hostport
        assert resp.headers["x-received-objective"] == "-"
        assert resp.headers["x-received-fairness"] == "-"
    finally:
        stack.write_endpoints(sim_pods)
        await asyncio.sleep(0.5)  # file discovery polls every 250 ms
        await echo.stop()
