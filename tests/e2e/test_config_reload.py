"""`--watch-config-file` end to end: a real `epp` behind Envoy picks up a changed profile without a
restart, keeps its prefix index across the change, keeps routing with the last good config when
the file turns bad or asks for a change that needs a restart, and answers every request while it
reloads under load."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.stack import Stack, StackOptions, epp_metric, with_file_discovery
from llmepp_sim.cluster import PodInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
FIRST_HOST = 170
# Every pod is labelled with its address; the profile keeps only the pod `slot` names, so where the
# requests land shows which config is in force. The prefix producer is there to be carried over.
CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: label-selector-filter
  name: pin
  parameters: {{matchLabels: {{slot: "127.0.0.{host}"}}}}
- type: approx-prefix-cache-producer
  parameters: {{blockSizeTokens: {block}}}
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: pin}}
  - {{pluginRef: prefix-cache-scorer, weight: 1}}
"""


def config(host: int, block: int = 16) -> str:
    return CONFIG.format(host=host, block=block)


class SlotStack(Stack):
    def endpoint_labels(self, pod: PodInfo) -> dict[str, str]:
        return {**super().endpoint_labels(pod), "slot": pod.address.rsplit(":", 1)[0]}

    def rewrite_config(self, text: str, *, as_is: bool = False) -> None:
        """What an operator's edit (or a ConfigMap update) does to the file the EPP watches."""
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(text if as_is else with_file_discovery(text, self.endpoints_file))
        os.replace(tmp, self.config_file)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[SlotStack]:
    options = StackOptions(
        pods=2, first_host=FIRST_HOST, epp_config=config(FIRST_HOST), epp_args=["--watch-config-file"]
    )
    async with SlotStack(options) as st:
        yield st


async def served_by(http: aiohttp.ClientSession, stack: Stack, n: int = 4, tag: str = "") -> Counter[str]:
    pods: Counter[str] = Counter()
    for i in range(n):
        body = {"model": MODEL, "prompt": f"{tag} a prompt the index remembers {i}", "max_tokens": 2}
        async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            pods[resp.headers["x-inference-pod"]] += 1
    return pods


async def reloads(http: aiohttp.ClientSession, stack: Stack, result: str) -> float:
    return await epp_metric(http, stack.metrics_url, "llm_d_epp_config_reloads_total", result=result)


async def until_reloads(http: aiohttp.ClientSession, stack: Stack, result: str, n: float) -> None:
    for _ in range(150):  # the EPP polls every second and waits one poll for the file to settle
        if await reloads(http, stack, result) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {result} reload; EPP log:\n{stack.epp.log if stack.epp else ''}")


async def test_a_changed_profile_applies_without_a_restart_and_keeps_the_prefix_index(
    stack: SlotStack, http: aiohttp.ClientSession
) -> None:
    first, second = stack.pods
    assert await served_by(http, stack) == Counter({first.name: 4})
    indexed = await epp_metric(http, stack.metrics_url, "llm_d_epp_prefix_indexer_size")
    assert indexed > 0
    assert stack.epp is not None
    pid = stack.epp.proc.pid if stack.epp.proc else None

    stack.rewrite_config(config(FIRST_HOST + 1))
    await until_reloads(http, stack, "applied", 1)
    assert await served_by(http, stack, tag="new") == Counter({second.name: 4})
    # The same process, and the producer's index carried over: it holds the earlier prompts' blocks
    # besides the new ones (as many), where a rebuilt index would hold the new ones only.
    assert stack.epp.proc is not None and stack.epp.proc.pid == pid
    assert await epp_metric(http, stack.metrics_url, "llm_d_epp_prefix_indexer_size") > indexed
    assert await epp_metric(http, stack.metrics_url, "llm_d_epp_config_last_reload_successful") == 1


async def test_a_bad_or_restart_only_change_is_refused_and_routing_goes_on(
    stack: SlotStack, http: aiohttp.ClientSession
) -> None:
    second = stack.pods[1]
    before = await served_by(http, stack, 1)
    rejected = await reloads(http, stack, "rejected")

    stack.rewrite_config("plugins: [unclosed\n", as_is=True)
    await until_reloads(http, stack, "rejected", rejected + 1)
    assert await epp_metric(http, stack.metrics_url, "llm_d_epp_config_last_reload_successful") == 0
    assert await served_by(http, stack) == Counter({next(iter(before)): 4})

    # The producer's block size: its index is built for it, so only a restart may change it.
    stack.rewrite_config(config(FIRST_HOST, block=32))
    await until_reloads(http, stack, "rejected", rejected + 2)
    assert await served_by(http, stack) == Counter({second.name: 4})  # the last good config still routes
    assert stack.epp is not None
    log = stack.epp.log
    assert "config is not valid YAML" in log
    assert "plugin 'approx-prefix-cache-producer' (type approx-prefix-cache-producer): changed" in log
    assert "restart the EPP to apply this" in log


async def test_reloads_under_load_lose_no_request(stack: SlotStack, http: aiohttp.ClientSession) -> None:
    applied = await reloads(http, stack, "applied")

    async def one(i: int) -> int:
        body = {"model": MODEL, "prompt": f"under load {i}", "max_tokens": 2}
        async with http.post(f"{stack.url}/v1/completions", json=body) as resp:
            await resp.read()
            return resp.status

    done = asyncio.Event()

    async def load() -> list[int]:
        statuses: list[int] = []
        while not done.is_set():  # batches of 20 concurrent requests for as long as the reloads go on
            statuses += await asyncio.gather(*(one(len(statuses) + i) for i in range(20)))
        return statuses

    traffic = asyncio.get_running_loop().create_task(load())
    for n, host in enumerate([FIRST_HOST, FIRST_HOST + 1, FIRST_HOST, FIRST_HOST + 1], start=1):
        stack.rewrite_config(config(host))
        await until_reloads(http, stack, "applied", applied + n)
    done.set()
    statuses = await traffic
    assert len(statuses) >= 100 and set(statuses) == {200}, (len(statuses), set(statuses))
    # The last config pins the second pod: new requests go there.
    assert await served_by(http, stack, 2, tag="after") == Counter({stack.pods[1].name: 2})
