"""The index against real simulator pods: what it says a pod holds is what the pod really reuses —
after stores, LRU evictions in a small KV cache, /reset_prefix_cache, in both event encodings."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
from helpers import until

from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.pool import SubscriberPool
from llmepp.testing.ports import free_port
from llmepp_sim.cluster import SimProcess
from llmepp_sim.tokenizer import SimTokenizer

from .rig import endpoint, memory_pool, pool_match

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
]
TOKENIZER = SimTokenizer()


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


class SimPods:
    def __init__(self, hosts: list[str], *extra: str) -> None:
        self.zmq_port = free_port(hosts[0])
        self.replay_port = free_port(hosts[0])
        self.proc = SimProcess([
            "--hosts", ",".join(hosts), "--port", "0", "--time-scale", "50", "--max-model-len", "4096",
            "--zmq-endpoint", f"tcp://{hosts[0]}:{self.zmq_port}",
            "--kv-events-replay-endpoint", f"tcp://{hosts[0]}:{self.replay_port}", *extra,
        ])  # fmt: skip
        self.pool: SubscriberPool
        self.index: MemoryIndex

    async def __aenter__(self) -> SimPods:
        await self.proc.start_async()
        self.pool, self.index = memory_pool(self.zmq_port, self.replay_port)
        for pod in self.proc.pods:
            host, port = pod.address.rsplit(":", 1)
            self.pool.endpoint_added(endpoint(host, int(port), pod.name))
        await asyncio.sleep(0.3)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.aclose()
        await asyncio.to_thread(self.proc.stop)

    def match(self, i: int, prompt: str) -> int:
        return pool_match(self.index, self.proc.pods[i].address, TOKENIZER.encode(prompt))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def complete(http: aiohttp.ClientSession, url: str, prompt: str) -> int:
    """Send a completion straight to a pod; returns the prompt tokens it served from cache."""
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 1}
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return int((await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.parametrize("legacy", [False, True])
async def test_index_follows_stores_on_the_right_pod(http: aiohttp.ClientSession, legacy: bool) -> None:
    flags = ["--use-vllm-legacy-event-format"] if legacy else []
    async with SimPods(["127.0.0.160", "127.0.0.161"], *flags) as sim:
        prompt = text(1, 150)
        full = len(TOKENIZER.encode(prompt)) // 16
        await complete(http, sim.proc.pods[1].url, prompt)
        await until(lambda: sim.match(1, prompt) == full, what="stored blocks on pod 1")
        assert sim.match(0, prompt) == 0
        # Truth check: the pod reuses exactly what the index says it holds.
        assert await complete(http, sim.proc.pods[1].url, prompt) == 16 * sim.match(1, prompt)


async def test_eviction_in_a_small_cache_removes_affinity(http: aiohttp.ClientSession) -> None:
    async with SimPods(["127.0.0.162"], "--kv-cache-size", "48") as sim:
        url = sim.proc.pods[0].url
        target = text(2, 120)
        full = len(TOKENIZER.encode(target)) // 16
        await complete(http, url, target)
        await until(lambda: sim.match(0, target) == full, what="target stored")
        # Other prompts fill the 48-block cache: LRU eviction drops the target's blocks (tail first).
        for seed in range(3, 9):
            await complete(http, url, text(seed, 120))
        await until(lambda: sim.match(0, target) < full, what="BlockRemoved applied")
        stats = sim.pool.stats
        assert stats.block_removed > 0
        held = sim.match(0, target)
        assert await complete(http, url, target) == 16 * held


async def test_reset_prefix_cache_clears_the_pod(http: aiohttp.ClientSession) -> None:
    async with SimPods(["127.0.0.163", "127.0.0.164"]) as sim:
        prompt = text(10, 100)
        for pod in sim.proc.pods:
            await complete(http, pod.url, prompt)
        await until(lambda: sim.match(0, prompt) > 0 and sim.match(1, prompt) > 0)
        async with http.post(sim.proc.pods[0].url + "/reset_prefix_cache") as resp:
            assert resp.status == 200
        await until(lambda: sim.match(0, prompt) == 0, what="AllBlocksCleared applied")
        assert sim.match(1, prompt) > 0 and sim.pool.stats.all_cleared == 1
        assert await complete(http, sim.proc.pods[0].url, prompt) == 0
