"""Fault injection: random failures, forced statuses, slow start, slow/hung metrics, kill and revive."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from helpers import on_a_punctual_loop

from .simkit import FAST, complete, pod, running, sample, scrape, words

EXPECTED = {
    "rate_limit": (429, "RateLimitError"),
    "invalid_api_key": (401, "AuthenticationError"),
    "context_length": (400, "BadRequestError"),
    "server_error": (500, "InternalServerError"),
    "invalid_request": (400, "BadRequestError"),
    "model_not_found": (404, "NotFoundError"),
}


async def test_every_failure_type_at_100_percent(http: aiohttp.ClientSession) -> None:
    async with running([pod(failure_injection_rate=100.0, failure_types=["rate_limit"])]) as cluster:
        url = cluster.urls[0]
        for kind, (status, err_type) in EXPECTED.items():
            async with http.post(url + "/admin/config", json={"failure_types": [kind]}) as response:
                assert response.status == 200
            for _ in range(3):
                result = await complete(http, url, "hello", 2)
                assert result.status == status, kind
                assert result.body["error"]["type"] == err_type
                assert result.body["error"]["code"] == status
        # Injection happens before the engine: nothing ran.
        assert sample(await scrape(http, url), "vllm:prompt_tokens") == 0


async def test_partial_injection_rate_is_roughly_honoured(http: aiohttp.ClientSession) -> None:
    async with running([pod(failure_injection_rate=30.0, failure_types=["server_error"], seed=3)]) as cluster:
        statuses = [(await complete(http, cluster.urls[0], "x", 1)).status for _ in range(100)]
        assert set(statuses) == {200, 500}
        assert 15 <= statuses.count(500) <= 45


async def test_x_return_error_forces_the_status(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        for status, err_type in ((429, "RateLimitError"), (503, "ServiceUnavailableError"), (400, "BadRequestError")):
            result = await complete(http, url, "x", 1, headers={"X-Return-Error": str(status)})
            assert result.status == status
            assert result.body["error"]["type"] == err_type
            assert result.headers["x-inference-pod"] == "sim-0"
        assert (await complete(http, url, "x", 1, headers={"X-Return-Error": "banana"})).status == 200


async def test_startup_duration_answers_503_then_serves(http: aiohttp.ClientSession) -> None:
    async with running([pod(startup_duration=0.4)]) as cluster:
        url = cluster.urls[0]
        async with http.get(url + "/health") as response:
            assert response.status == 503
        starting = await complete(http, url, "x", 1)
        assert starting.status == 503
        assert starting.body["error"]["type"] == "ServiceUnavailableError"
        async with http.get(url + "/metrics") as response:
            assert response.status == 200  # scrapes work while starting
        await asyncio.sleep(0.45)
        async with http.get(url + "/health") as response:
            assert response.status == 200
        assert (await complete(http, url, "x", 1)).status == 200


async def test_slow_metrics(http: aiohttp.ClientSession) -> None:
    async with running([pod(metrics_delay=0.3)]) as cluster:
        start = time.monotonic()
        await scrape(http, cluster.urls[0])
        assert time.monotonic() - start >= 0.3


async def test_hung_metrics_never_answer_until_switched_off(http: aiohttp.ClientSession) -> None:
    async with running([pod(metrics_hang=True)]) as cluster:
        url = cluster.urls[0]
        with pytest.raises(asyncio.TimeoutError):
            async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=0.5)) as response:
                await response.read()
        assert (await complete(http, url, "x", 1)).status == 200  # only /metrics hangs
        async with http.post(url + "/admin/config", json={"metrics_hang": False}) as response:
            assert response.status == 200
        await scrape(http, url)


async def test_kill_via_admin_drops_connections_and_comes_back(http: aiohttp.ClientSession) -> None:
    async with running([pod(inter_token_latency=50.0)]) as cluster:
        url = cluster.urls[0]
        await complete(http, url, words(50), 2)
        assert sample(await scrape(http, url), "vllm:prompt_tokens") > 0
        in_flight = asyncio.create_task(complete(http, url, words(10), 200, stream=True))
        await asyncio.sleep(0.05)
        async with http.post(url + "/admin/kill", json={"duration": True}) as response:
            assert response.status == 400  # not a number of seconds (was: read as 1 s)
        async with http.post(url + "/admin/kill", json={"duration": 0.5}) as response:
            assert response.status == 202
        with pytest.raises(aiohttp.ClientError):  # the stream is cut mid-way
            await in_flight
        await asyncio.sleep(0.1)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(url + "/health") as response:
                await response.read()
        await asyncio.sleep(0.6)
        async with http.get(url + "/health") as response:
            assert response.status == 200
        # A restarted engine: counters and cache start from zero.
        families = await scrape(http, url)
        assert sample(families, "vllm:prompt_tokens") == 0
        assert (await complete(http, url, words(50), 2)).cached_tokens == 0


async def test_kill_and_revive_from_python(http: aiohttp.ClientSession) -> None:
    async with running([pod(), pod("127.0.0.3")]) as cluster:
        victim, survivor = cluster.pods
        await victim.kill()
        assert not victim.alive
        with pytest.raises(aiohttp.ClientConnectionError):
            await complete(http, victim.url, "x", 1)
        assert (await complete(http, survivor.url, "x", 1)).status == 200
        await victim.revive()
        assert victim.alive
        assert (await complete(http, victim.url, "x", 1)).status == 200


async def test_admin_config_changes_latency_at_runtime(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        async with running([pod(inter_token_latency=5.0)]) as cluster:
            url = cluster.urls[0]
            quick = await complete(http, url, "x", 20)
            async with http.post(url + "/admin/config", json={"inter-token-latency": 60.0}) as response:
                assert response.status == 200
                assert (await response.json())["inter_token_latency"] == 60.0
            slow = await complete(http, url, "x", 20)
            # Simulated: ~30 ms prefill + 19 x 5 ms, then + 19 x 60 ms.
            assert quick.total_wall * FAST < 0.8
            assert slow.total_wall * FAST > 1.1
            async with http.post(url + "/admin/config", json={"kv_cache_size": 5}) as response:
                assert response.status == 400  # memory layout is not a runtime knob
            async with http.post(url + "/admin/config", json={"failure_injection_rate": 101}) as response:
                assert response.status == 400
            async with http.get(url + "/admin/config") as response:
                described = await response.json()
            assert described["config"]["inter_token_latency"] == 60.0
            assert described["alive"] is True and described["name"] == "sim-0"

    await on_a_punctual_loop(measure)
