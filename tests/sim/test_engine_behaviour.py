"""Engine behaviour seen through real HTTP: prefix caching, eviction, queueing, contention, load, preemption."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from helpers import on_a_punctual_loop, until

from .simkit import FAST, STEADY, complete, pod, running, sample, scrape, words

# Slow prefill makes cache effects large compared with timer jitter (1 ms wall = 10 ms simulated).
SLOW_PREFILL: dict[str, Any] = {"prefill_overhead": 10.0, "prefill_time_per_token": 1.0, "inter_token_latency": 5.0}


async def test_repeat_prompt_hits_prefix_cache_and_ttft_drops(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        async with running([pod(**SLOW_PREFILL)], time_scale=STEADY) as cluster:
            url = cluster.urls[0]
            prompt = words(400)
            first = await complete(http, url, prompt, stream=True)
            second = await complete(http, url, prompt, stream=True)
            assert first.status == second.status == 200
            assert first.cached_tokens == 0
            prompt_tokens = second.body["usage"]["prompt_tokens"]
            # All full blocks but the one holding the last token (vLLM always recomputes the last token).
            assert second.cached_tokens == (prompt_tokens - 1) // 16 * 16
            # ~410 ms vs ~26 ms simulated
            assert second.ttft_wall < first.ttft_wall / 3

    await on_a_punctual_loop(measure)


async def test_ttft_grows_with_uncached_and_shrinks_with_cached_tokens(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        async with running([pod(**SLOW_PREFILL, max_model_len=2048)], time_scale=STEADY) as cluster:
            url = cluster.urls[0]
            ttft = {}
            for n in (100, 300, 600):
                result = await complete(http, url, words(n, salt=f"size{n} "), stream=True)
                assert result.cached_tokens == 0
                ttft[n] = result.ttft_wall * STEADY  # simulated seconds
            assert ttft[100] < ttft[300] < ttft[600]
            # Model: 10 ms + n x 1 ms, so +300 ms from 300 to 600 tokens. The bounds leave room for a loaded
            # machine's event-loop lag but demand the per-token slope.
            assert 0.2 < ttft[600] - ttft[300] < 0.5
            shared = words(600, salt="shared ")
            await complete(http, url, shared, stream=True)
            longer = await complete(http, url, shared + " batch queue", stream=True)
            assert longer.cached_tokens >= 576
            assert longer.ttft_wall * STEADY < ttft[600] / 4

    await on_a_punctual_loop(measure)


async def test_eviction_under_pressure_drops_cached_prefix(http: aiohttp.ClientSession) -> None:
    async with running([pod(kv_cache_size=40, prefill_time_per_token=0.1)]) as cluster:
        url = cluster.urls[0]
        victim = words(200, salt="victim ")
        await complete(http, url, victim)
        assert (await complete(http, url, victim)).cached_tokens > 0  # resident while there is room
        for i in range(6):  # 6 x 13 blocks through a 40-block cache
            await complete(http, url, words(200, salt=f"other{i} "))
        assert (await complete(http, url, victim)).cached_tokens == 0


async def test_full_batch_queues_and_later_requests_pay_the_wait(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        # At STEADY (3x) a stall of 100 ms wall between a request's arrival and its admission still reads as no
        # wait (< 0.3 s simulated); at FAST it took 30 ms, which a loaded machine can produce.
        async with running([pod(max_num_seqs=2, inter_token_latency=50.0)], time_scale=STEADY) as cluster:
            url, engine = cluster.urls[0], cluster.pods[0].engine
            tasks = [
                asyncio.create_task(complete(http, url, words(20, salt=f"q{i} "), 30, stream=True)) for i in range(6)
            ]
            # Until all have arrived (a fixed sleep raced them on a loaded machine); the first two run for ~1.5 s
            # simulated (0.5 s wall).
            await until(
                lambda: len(engine.running) + len(engine.waiting) == 6, what="all six at the pod", interval=0.002
            )
            families = await scrape(http, url)
            assert sample(families, "vllm:num_requests_running") == 2
            assert sample(families, "vllm:num_requests_waiting") == 4
            results = await asyncio.gather(*tasks)
            one_request = min(r.total_wall for r in results) * STEADY  # ~ 34 ms prefill + 29 x 50 ms decode
            assert max(r.ttft_wall for r in results) * STEADY > 1.6 * one_request
            families = await scrape(http, url)
            assert sample(families, "vllm:num_requests_waiting") == 0

            # The engine's own clock, not the client's: a wall-clock stall of this process (at time scale 3,
            # 0.1 s wall is 0.3 simulated seconds) can delay when the client sees a token, not when the engine
            # admitted a request. The first pair never waited, the second waited one batch, the last two.
            def waited(le: str) -> float:
                return sample(families, "vllm:request_queue_time_seconds", "_bucket", le=le)

            assert waited("0.3") == 2
            assert waited("1.0") == 2
            assert waited("2.5") == 4
            assert sample(families, "vllm:request_queue_time_seconds", "_count") == 6
            queue_sum = sample(families, "vllm:request_queue_time_seconds", "_sum")
            assert queue_sum > 2 * one_request

    await on_a_punctual_loop(measure)


async def test_concurrent_prefills_share_the_gpu(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        async with running([pod(**SLOW_PREFILL, max_model_len=2048)], time_scale=STEADY) as cluster:
            url = cluster.urls[0]
            solo = await complete(http, url, words(500, salt="solo "), stream=True)
            pair = await asyncio.gather(
                *(complete(http, url, words(500, salt=f"pair{i} "), stream=True) for i in range(2))
            )
            # ~510 ms alone; ~1010 ms when two prefills split the GPU.
            assert min(r.ttft_wall for r in pair) > 1.5 * solo.ttft_wall

    await on_a_punctual_loop(measure)


async def test_inter_token_latency_rises_with_batch_size(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        config = pod(max_num_seqs=4, inter_token_latency=40.0, time_factor_under_load=3.0, prefill_overhead=1.0)
        async with running([config]) as cluster:
            url = cluster.urls[0]

            def itl(result: object) -> float:
                assert hasattr(result, "total_wall") and hasattr(result, "ttft_wall")
                return (result.total_wall - result.ttft_wall) / 29 * FAST

            alone = itl(await complete(http, url, words(10), 30, stream=True))
            loaded = await asyncio.gather(
                *(complete(http, url, words(10, salt=f"l{i} "), 30, stream=True) for i in range(4))
            )
            busy = sum(itl(r) for r in loaded) / len(loaded)
            assert 0.035 < alone < 0.07  # 40 ms at one running request
            assert 0.100 < busy < 0.18  # 3 x 40 ms at max_num_seqs
            assert busy > 2 * alone
            families = await scrape(http, url)
            itl_count = sample(families, "vllm:inter_token_latency_seconds", "_count")
            assert itl_count == 5 * 29

    await on_a_punctual_loop(measure)


async def test_decode_blocks_are_allocated_and_preemption_recovers(http: aiohttp.ClientSession) -> None:
    # 4 requests x (2 prompt blocks + 4 decode blocks) = 24 blocks > 16: decoding must preempt.
    config = pod(kv_cache_size=16, max_num_seqs=4, inter_token_latency=2.0, max_model_len=256)
    async with running([config]) as cluster:
        url = cluster.urls[0]
        results = await asyncio.gather(*(complete(http, url, words(30, salt=f"p{i} "), 64) for i in range(4)))
        assert all(r.status == 200 for r in results)
        assert all(r.body["usage"]["completion_tokens"] == 64 for r in results)
        families = await scrape(http, url)
        assert sample(families, "vllm:num_preemptions") > 0
        assert sample(families, "vllm:generation_tokens") == 4 * 64
        assert sample(families, "vllm:kv_cache_usage_perc") == 0.0  # finished blocks are free (cached)


async def test_kv_usage_gauge_is_live(http: aiohttp.ClientSession) -> None:
    async with running([pod(kv_cache_size=100, inter_token_latency=50.0)]) as cluster:
        url, engine = cluster.urls[0], cluster.pods[0].engine
        task = asyncio.create_task(complete(http, url, words(160), 40))
        # Once it runs (~2 s simulated, 0.2 s wall); a fixed 50 ms sleep could end before it reached the pod.
        await until(lambda: len(engine.running) == 1, what="the request running", interval=0.002)
        during = sample(await scrape(http, url), "vllm:kv_cache_usage_perc")
        await task
        after = sample(await scrape(http, url), "vllm:kv_cache_usage_perc")
        assert 0.10 <= during <= 0.14  # ~11-13 of 100 blocks while running
        assert after == 0.0


async def test_idle_pods_do_not_spin() -> None:
    import resource

    async with running([pod(host=f"127.0.0.{i}") for i in range(2, 18)]):
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert cpu < 0.1  # 16 idle pods: no engine loop runs without work


async def test_client_disconnect_aborts_and_frees_the_seat(http: aiohttp.ClientSession) -> None:
    async with running([pod(max_num_seqs=1, inter_token_latency=100.0)]) as cluster:
        url = cluster.urls[0]
        for stream in (False, True):
            body = {"prompt": "x", "max_tokens": 500, "stream": stream}
            with contextlib.suppress(asyncio.TimeoutError):
                timeout = aiohttp.ClientTimeout(total=0.1)
                async with http.post(url + "/v1/completions", json=body, timeout=timeout) as response:
                    await response.read()
            await asyncio.sleep(0.05)
            families = await scrape(http, url)
            assert sample(families, "vllm:num_requests_running") == 0
        assert sample(families, "vllm:request_success", finished_reason="abort") == 2
        assert (await complete(http, url, "x", 2)).status == 200  # the single seat is free again
