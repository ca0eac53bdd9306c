"""The out-of-tree example plugin (examples/epp-plugin-example, installed into the venv by
`make venv`) inside a real `epp` process behind Envoy: the config names it only by its type
string `kv-headroom-scorer`, and it steers requests away from a pod whose KV cache is busy."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.pdstack import scrape, total
from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
# The scorer is the only one: with free KV everywhere the picker breaks ties at random; a pod
# whose cache is over (1 − reserveFraction) full scores 0 and loses every time.
CONFIG = """
plugins:
- type: kv-headroom-scorer
  parameters: {reserveFraction: 0.3}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: kv-headroom-scorer, weight: 1}]
"""
# 128 blocks of 16 tokens: one 1,600-token request fills most of a pod's KV cache.
SIM = ["--latency-profile", "llama-8b-h100", "--kv-cache-size", "128", "--max-model-len", "2048"]
LONG_PROMPT = " ".join(["cache", "request", "server", "model"] * 400)  # 1,600 single-token words


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    assert importlib.util.find_spec("epp_plugin_example") is not None, (
        "epp-plugin-example is not installed in this venv (`make venv` installs it)"
    )
    async with Stack(StackOptions(pods=2, first_host=130, sim_args=SIM, epp_config=CONFIG)) as st:
        yield st


async def tiny(client: aiohttp.ClientSession, stack: Stack) -> str:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    async with client.post(f"{stack.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        await resp.read()
        return resp.headers["x-inference-pod"]


async def test_example_scorer_steers_away_from_a_kv_loaded_pod(stack: Stack) -> None:
    assert "kv-headroom-scorer" in stack.config_file.read_text()  # named only by its type string
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        # Idle pods: both get traffic (the plugin does not simply pin one pod).
        idle = Counter([await tiny(client, stack) for _ in range(16)])
        assert set(idle) == {p.name for p in stack.pods}, idle

        # Load pod A directly (bypassing Envoy): a long request holding ~100 of its 128 KV blocks.
        loaded, other = stack.pods
        body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}

        async def hold() -> None:
            async with client.post(f"{loaded.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()

        holder = asyncio.create_task(hold())
        try:
            for _ in range(100):  # until the pod reports the load (then one EPP scrape interval)
                usage = total(await scrape(client, f"{loaded.url}/metrics"), "vllm:kv_cache_usage_perc")
                if usage > 0.75:
                    break
                await asyncio.sleep(0.05)
            assert usage > 0.75
            await asyncio.sleep(0.3)
            busy = Counter([await tiny(client, stack) for _ in range(12)])
            assert not holder.done()  # the load lasted through the measurement
            assert busy == {other.name: 12}, busy
        finally:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
