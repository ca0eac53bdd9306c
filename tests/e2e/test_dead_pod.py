"""A crashed model server still listed in the pool (real Envoy, the `epp` program, three simulated pods, the
default profile): every request sent to it fails at once, so its load reads as none and a load-aware
picker would send it the traffic. Once nothing has listened on it for a second, routing leaves it out;
when it is back, it is routed to again."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions

from .answers import completion

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=3, first_host=40)) as st:
        yield st


async def served(http: aiohttp.ClientSession, stack: Stack, prompt: str) -> tuple[int, str]:
    status, headers, _ = await completion(http, stack.url, "sim-model", prompt, 2)
    return status, headers.get("x-inference-pod", "")


async def test_a_crashed_pod_is_routed_around_until_it_is_back(stack: Stack, http: aiohttp.ClientSession) -> None:
    dead = stack.pods[0]
    async with http.post(f"http://{dead.address}/admin/kill", json={"duration": 4}) as resp:
        assert resp.status == 202, await resp.text()
    await asyncio.sleep(1.5)  # > 1 s of refused scrapes
    answers = Counter([await served(http, stack, f"while it is down {i}") for i in range(30)])
    assert set(answers) <= {(200, p.name) for p in stack.pods[1:]}, answers
    for i in range(100):  # revived after 4 s; routed to again once its metrics page answers
        if (await served(http, stack, f"is it back {i}"))[1] == dead.name:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the revived pod was never routed to again")


async def test_with_every_pod_down_the_client_gets_envoys_503_as_json(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Nothing to route around: the EPP still picks a pod and Envoy's connection to it fails (UF: refused; UC: a
    pooled connection the killed pod closed). Envoy's own answer comes in the EPP's error shape, naming the
    failure and its response flag, not as plain text."""
    for pod in stack.pods:
        async with http.post(f"http://{pod.address}/admin/kill", json={"duration": 3}) as resp:
            assert resp.status == 202, await resp.text()
    await asyncio.sleep(1.5)  # every pod refused its scrapes for > 1 s
    async with http.post(
        f"{stack.url}/v1/completions", json={"model": "sim-model", "prompt": "anyone there?", "max_tokens": 2}
    ) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["code"] == 503 and error["type"] == "gateway_error", error
    assert error["message"].startswith("upstream connect error") and error["message"].endswith(("(UF)", "(UC)")), error
    # The EPP's own refusals keep their body: a bad request is its 400, not rewritten by Envoy.
    async with http.post(f"{stack.url}/v1/completions", json={"prompt": "no model"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] != "gateway_error"
    await asyncio.sleep(2)  # back before the module's next test
