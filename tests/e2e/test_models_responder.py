"""`models-responder` end to end: a real Envoy, the `epp` program, three simulated pods.

`GET /v1/models` through Envoy is answered by the EPP with every pod's models, including an adapter
loaded on one pod only (a pod alone would list just its own), and requests for that adapter reach
only that pod, also right after it is loaded and after the default profile would have sent them
elsewhere; unloading it shows in the list within a poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import pytest_asyncio

from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.testing.stack import Stack, StackOptions, epp_metric

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CONFIG = DEFAULT_CONFIG.replace("plugins:\n", "plugins:\n- type: models-responder\n", 1)
ADAPTER = "legal-lora"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=3, first_host=100, epp_config=CONFIG)) as st:
        yield st


async def listed(http: aiohttp.ClientSession, stack: Stack) -> tuple[int, list[str], str]:
    async with http.get(f"{stack.url}/v1/models") as resp:
        body = await resp.json(content_type=None)
        ids = [m["id"] for m in body.get("data", [])]
        return resp.status, ids, resp.headers.get("x-inference-pod", "")


async def eventually(check: Callable[[], object], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():  # type: ignore[misc]
            return
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.1)


async def test_the_pool_model_list_and_adapter_routing(stack: Stack, http: aiohttp.ClientSession) -> None:
    status, ids, pod_header = await listed(http, stack)
    assert status == 200 and ids == ["sim-model"]
    assert pod_header == ""  # answered by the EPP, not by a pod

    holder = stack.pods[1]
    async with http.post(f"http://{holder.address}/v1/load_lora_adapter", json={"lora_name": ADAPTER}) as resp:
        assert resp.status == 200, await resp.text()

    async def adapter_listed() -> bool:
        return (await listed(http, stack))[1] == [ADAPTER, "sim-model"]

    await eventually(adapter_listed)
    async with http.get(f"{stack.url}/v1/models/{ADAPTER}") as resp:
        assert resp.status == 200 and (await resp.json())["id"] == ADAPTER
    async with http.get(f"{stack.url}/v1/models/no-such-model") as resp:
        assert resp.status == 404 and "does not exist" in (await resp.json())["error"]["message"]

    pods = []
    for i in range(12):
        body = {"model": ADAPTER, "prompt": f"question {i} " * 20, "max_tokens": 2}
        async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            pods.append(resp.headers["x-inference-pod"])
    assert set(pods) == {holder.name}, pods

    # The base model still spreads over every pod (no-hit-lru rotates cold requests).
    base_pods = set()
    for i in range(9):
        body = {"model": "sim-model", "prompt": f"other {i} " * 20, "max_tokens": 2}
        async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            base_pods.add(resp.headers["x-inference-pod"])
    assert len(base_pods) == 3, base_pods

    async with http.post(f"http://{holder.address}/v1/unload_lora_adapter", json={"lora_name": ADAPTER}) as resp:
        assert resp.status == 200

    async def adapter_gone() -> bool:
        return (await listed(http, stack))[1] == ["sim-model"]

    await eventually(adapter_gone)
    labels = {"model_name": "", "target_model_name": ""}
    responded = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_total", **labels)
    assert responded >= 3  # the /v1/models requests are counted like any request
