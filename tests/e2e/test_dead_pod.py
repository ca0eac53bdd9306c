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
