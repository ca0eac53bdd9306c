"""A pod whose /metrics has never answered is unknown load, not an idle pod (real Envoy, the `epp`
program, two simulated pods): the load scorers leave it unscored, so the requests go to the pod
whose load is known, although both queues read 0. Forced requests (header-based-testing-filter)
show the unscraped pod is in the pool and serves when asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""
FORCE = "test-epp-endpoint-selection"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=2, first_host=251, epp_config=CONFIG)) as st:
        yield st


async def served_by(http: aiohttp.ClientSession, stack: Stack, prompt: str, headers: dict[str, str]) -> tuple[int, str]:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 2}
    async with http.post(f"{stack.url}/v1/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-inference-pod", "")


async def forced_status_until(http: aiohttp.ClientSession, stack: Stack, host: str, status: int) -> None:
    """Waits (file discovery polls its file) until a request forced to `host` answers `status`."""
    for _ in range(100):
        if (await served_by(http, stack, "probe", {FORCE: host}))[0] == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"a request forced to {host} never answered {status}")


async def set_metrics_hang(http: aiohttp.ClientSession, address: str, hang: bool) -> None:
    async with http.post(f"http://{address}/admin/config", json={"metrics_hang": hang}) as resp:
        assert resp.status == 200, await resp.text()


async def test_a_never_scraped_pod_gets_no_unforced_traffic(stack: Stack, http: aiohttp.ClientSession) -> None:
    known, unscraped = stack.pods
    unscraped_host = unscraped.address.rsplit(":", 1)[0]
    await set_metrics_hang(http, unscraped.address, True)
    try:
        # Re-added, the pod is a new endpoint whose scrapes never answer: never scraped.
        stack.write_endpoints([known])
        await forced_status_until(http, stack, unscraped_host, 429)  # gone: every endpoint filtered out
        stack.write_endpoints([known, unscraped])
        await forced_status_until(http, stack, unscraped_host, 200)  # back, and routable when asked

        pods = [(await served_by(http, stack, f"distinct prompt {i}", {}))[1] for i in range(12)]
        # Both queues read 0: reading "never scraped" as an empty queue made this a coin toss per request.
        assert pods == [known.name] * 12, pods
        assert (await served_by(http, stack, "asked for", {FORCE: unscraped_host})) == (200, unscraped.name)
    finally:
        await set_metrics_hang(http, unscraped.address, False)
        stack.write_endpoints(stack.pods)
