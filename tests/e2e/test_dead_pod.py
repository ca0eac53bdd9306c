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

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=3, first_host=40)) as st:
        yield st


async def completion(http: aiohttp.ClientSession, stack: Stack, prompt: str) -> tuple[int, str]:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 2}
    async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-inference-pod", "")


async def test_a_crashed_pod_is_routed_around_until_it_is_back(stack: Stack, http: aiohttp.ClientSession) -> None:
    dead = stack.pods[0]
    async with http.post(f"http://{dead.address}/admin/kill", json={"duration": 4}) as resp:
        assert resp.status == 202, await resp.text()
    await asyncio.sleep(1.5)  # > 1 s of refused scrapes
    served = Counter([await completion(http, stack, f"while it is down {i}") for i in range(30)])
    assert set(served) <= {(200, p.name) for p in stack.pods[1:]}, served
    for i in range(100):  # revived after 4 s; routed to again once its metrics page answers
        if (await completion(http, stack, f"is it back {i}"))[1] == dead.name:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the revived pod was never routed to again")
