"""README, gRPC model servers: "Errors reach gRPC clients as gRPC statuses (400 → INVALID_ARGUMENT, 429 and
413 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE, with the message)." End to end: real Envoy (h2c to the pods'
gRPC faces), `epp` with deploy/config/grpc-epp-config.yaml, grpcio clients. tests/e2e covers only 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from llmepp.protocols import vllm_engine_pb2 as vl
from llmepp.testing.stack import Stack, StackOptions, epp_metric

from .test_grpc_apis import call_generate, generate

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CONFIG = (Path(__file__).parents[2] / "deploy" / "config" / "grpc-epp-config.yaml").read_text()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    options = StackOptions(
        pods=2, first_host=37, epp_config=CONFIG, grpc_pods=True, epp_args=["--max-body-size", "4096"]
    )
    async with Stack(options) as st:
        yield st


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy_port}") as ch:
        yield ch


async def call(channel: grpc.aio.Channel, ids: list[int]) -> list[vl.GenerateResponse]:
    return (await call_generate(channel, generate(ids, 2, stream=False)))[1]


async def test_a_small_call_is_served(channel: grpc.aio.Channel) -> None:
    answers = await call(channel, list(range(100, 140)))
    assert answers[-1].complete.completion_tokens == 2


async def test_a_body_over_the_limit_is_resource_exhausted(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, list(range(100_000, 104_000)))  # ~12 KB of varints > 4096
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.value.code(), err.value.details())
    assert err.value.details(), err.value


async def test_an_empty_pool_is_unavailable(
    stack: Stack, channel: grpc.aio.Channel, http: aiohttp.ClientSession
) -> None:
    stack.write_endpoints([])
    try:
        for _ in range(100):
            if await epp_metric(http, stack.metrics_url, "llm_d_epp_ready_endpoints") == 0:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(channel, list(range(10, 20)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
        assert err.value.details(), err.value
    finally:
        stack.write_endpoints(stack.pods)
        for _ in range(100):
            if await epp_metric(http, stack.metrics_url, "llm_d_epp_ready_endpoints") == 2:
                break
            await asyncio.sleep(0.05)
