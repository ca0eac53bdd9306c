"""LoRA adapters: load latency, slot waits, lora_requests_info, load/unload endpoints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from helpers import on_a_punctual_loop

from llmepp_sim import LoraModule

from .simkit import FAST, STEADY, complete, pod, running, scrape, scrape_until, words

LORA_POD: dict[str, Any] = {
    "lora_modules": [LoraModule("tuned-a", "/adapters/a"), LoraModule("tuned-b", "/adapters/b")],
    "max_loras": 1,
    "lora_load_latency": 500.0,
    "prefill_overhead": 5.0,
    "inter_token_latency": 10.0,
}


def latest_lora_info(families: dict[str, Any]) -> dict[str, str]:
    samples = families["vllm:lora_requests_info"].samples
    return dict(max(samples, key=lambda s: s.value).labels)


async def test_first_request_pays_the_load_and_the_second_does_not(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        async with running([pod(**LORA_POD)], time_scale=STEADY) as cluster:
            url = cluster.urls[0]
            cold = await complete(http, url, words(10), 2, stream=True, model="tuned-a")
            warm = await complete(http, url, words(10, salt="x "), 2, stream=True, model="tuned-a")
            base = await complete(http, url, words(10, salt="y "), 2, stream=True)
            assert cold.status == warm.status == base.status == 200
            assert cold.ttft_wall * STEADY > 0.49  # 500 ms load + prefill
            assert warm.ttft_wall * STEADY < 0.25
            assert base.ttft_wall * STEADY < 0.25

    await on_a_punctual_loop(measure)


async def test_second_adapter_waits_for_a_slot_and_metrics_show_it(http: aiohttp.ClientSession) -> None:
    async with running([pod(**LORA_POD)]) as cluster:
        url = cluster.urls[0]
        finished_at: dict[str, float] = {}

        async def timed(name: str, coro: Any) -> Any:
            result = await coro
            finished_at[name] = time.monotonic()
            return result

        a = asyncio.create_task(timed("a", complete(http, url, words(10), 120, stream=True, model="tuned-a")))
        # a is loading/running (~1.7 s simulated in total) before b is sent, and b has reached the pod before the
        # scrape looked: fixed sleeps (40 ms, 20 ms) could end first on a loaded machine, and b took the slot.
        await scrape_until(http, url, lambda f: latest_lora_info(f)["running_lora_adapters"] == "tuned-a")
        b = asyncio.create_task(timed("b", complete(http, url, words(10, salt="b "), 2, stream=True, model="tuned-b")))
        info = latest_lora_info(
            await scrape_until(http, url, lambda f: latest_lora_info(f)["waiting_lora_adapters"] != "")
        )
        assert info == {
            "model_name": "sim-model",
            "running_lora_adapters": "tuned-a",
            "waiting_lora_adapters": "tuned-b",
            "max_lora": "1",
        }
        await asyncio.gather(a, b)
        # b could start only after a finished, then paid its own 500 ms load.
        assert (finished_at["b"] - finished_at["a"]) * FAST > 0.49
        info = latest_lora_info(await scrape(http, url))
        assert info["running_lora_adapters"] == "" and info["waiting_lora_adapters"] == ""


async def test_base_model_requests_are_not_blocked_by_adapter_waits(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        async with running([pod(**LORA_POD, max_num_seqs=4)], time_scale=STEADY) as cluster:
            url = cluster.urls[0]
            a = asyncio.create_task(complete(http, url, words(10), 120, model="tuned-a"))
            await asyncio.sleep(0.02)
            b = asyncio.create_task(complete(http, url, words(10, salt="b "), 2, model="tuned-b"))
            await asyncio.sleep(0.01)
            base = await complete(http, url, words(10, salt="base "), 2)  # skips past the blocked adapter
            assert not b.done()
            assert base.total_wall * STEADY < 0.4
            await asyncio.gather(a, b)

    await on_a_punctual_loop(measure)


async def test_load_and_unload_endpoints(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        assert (await complete(http, url, "hi", 1, model="fresh")).status == 404
        async with http.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "/a/f"}) as r:
            assert r.status == 200
        async with http.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "/a/f"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "BadRequestError"
        async with http.get(url + "/v1/models") as r:
            models = {m["id"]: m for m in (await r.json())["data"]}
        assert models["fresh"]["parent"] == "sim-model" and models["fresh"]["root"] == "/a/f"
        served = await complete(http, url, "hi", 1, model="fresh")
        assert served.status == 200 and served.body["model"] == "fresh"
        async with http.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}) as r:
            assert r.status == 200
        async with http.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}) as r:
            assert r.status == 404
        assert (await complete(http, url, "hi", 1, model="fresh")).status == 404


async def test_adapters_have_their_own_prefix_cache_namespace(http: aiohttp.ClientSession) -> None:
    async with running([pod(**{**LORA_POD, "max_loras": 2})]) as cluster:
        url = cluster.urls[0]
        prompt = words(64)
        await complete(http, url, prompt, 1, model="tuned-a")
        assert (await complete(http, url, prompt, 1, model="tuned-a")).cached_tokens > 0
        assert (await complete(http, url, prompt, 1, model="tuned-b")).cached_tokens == 0
        assert (await complete(http, url, prompt, 1)).cached_tokens == 0
