"""Prefill/decode disaggregation end to end: a real Envoy, the `epp` program with the reference
P/D config (example B: prefill + decode profiles, disagg-profile-handler with
prefix-based-pd-decider, nonCachedTokens 16), 2 simulated prefill pods, and 2 simulated decode
pods each behind an `epp-pd-sidecar` (the EPP routes to the sidecar's address).

Which pod did what is read from each simulated pod's own /metrics; the decision from the EPP's
`llm_d_epp_disagg_decision_total`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.pdstack import PD_CONFIG, PDStack, PDStackOptions, scrape, total
from llmepp.testing.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
# Slow prefill compute (2 ms/token simulated) makes a local prefill impossible to confuse with a
# KV pull (5 ms + 0.005 ms/token) on the decode pod; time scale 4 keeps the suite quick.
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--prefill-time-per-token", "2.0"]
POD_COUNTERS = ("vllm:request_success_total", "vllm:generation_tokens_total",
                "vllm:request_prefill_time_seconds_sum")  # fmt: skip


def prompt(salt: str) -> str:
    """Exactly 4096 ASCII bytes = 1024 estimated tokens = 16 full 64-token prefix blocks, so a
    repeat is entirely cached on the decode pod that served it (nothing left to prefill)."""
    words = " ".join(["cache", "request", "server", "model", "token", "prefix", "queue", "batch"] * 120)
    return (salt + " " + words)[:4096]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[PDStack]:
    assert "nonCachedTokens: 16" in PD_CONFIG  # the reference file, unchanged
    async with PDStack(PDStackOptions(prefill=2, decode=2, sim_args=SIM, first_host=120)) as st:
        yield st


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


class Snapshot:
    """Every pod's counters and the EPP's decision counts, to diff around one request."""

    def __init__(self, pods: dict[str, dict[str, float]], decisions: dict[str, float]) -> None:
        self.pods, self.decisions = pods, decisions

    @classmethod
    async def take(cls, stack: PDStack, client: aiohttp.ClientSession) -> Snapshot:
        pods = {}
        for pod in stack.pods:  # straight to the pod, not through its sidecar
            samples = await scrape(client, f"{pod.url}/metrics")
            pods[pod.name] = {n: total(samples, n) for n in POD_COUNTERS}
        epp = await scrape(client, stack.metrics_url)
        kinds = ("decode-only", "prefill-decode")
        decisions = {k: total(epp, "llm_d_epp_disagg_decision_total", decision_type=k, model_name=MODEL) for k in kinds}
        return cls(pods, decisions)

    def minus(self, before: Snapshot) -> Snapshot:
        pods = {n: {k: v - before.pods[n][k] for k, v in c.items()} for n, c in self.pods.items()}
        return Snapshot(pods, {k: v - before.decisions[k] for k, v in self.decisions.items()})

    def served(self, counter: str = "vllm:request_success_total") -> dict[str, float]:
        return {n: c[counter] for n, c in self.pods.items() if c[counter]}


async def sse(resp: aiohttp.ClientResponse) -> list[dict[str, object]]:
    text = (await resp.read()).decode()
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def access_log_upstream(stack: PDStack, rid: str) -> str:
    assert stack.envoy is not None
    for _ in range(40):  # Envoy flushes its log every 200 ms
        line = next((ln for ln in stack.envoy.access_log() if rid in ln), "")
        if line:
            return dict(p.split("=", 1) for p in line.split() if "=" in p)["upstream"]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no access log line for {rid}")


async def test_long_uncached_prompt_is_disaggregated_then_cached_repeat_is_not(
    stack: PDStack, client: aiohttp.ClientSession
) -> None:
    text = prompt("story one")
    body = {"model": MODEL, "prompt": text, "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
    before = await Snapshot.take(stack, client)
    async with client.post(f"{stack.url}/v1/completions", json=body, headers={"x-request-id": "pd-long-1"}) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        decoder = resp.headers["x-inference-pod"]
        chunks = await sse(resp)
    assert decoder.startswith("decode-")
    tokens = [c["choices"][0]["text"] for c in chunks if c["choices"]]  # type: ignore[index]
    assert len([t for t in tokens if t]) == 12
    assert chunks[-1]["usage"]["completion_tokens"] == 12  # type: ignore[index]
    # Envoy sent it to the decode pod's sidecar, the address the EPP knows for that pod.
    assert await access_log_upstream(stack, "pd-long-1") == stack.routed_address[decoder]

    diff = (await Snapshot.take(stack, client)).minus(before)
    assert diff.decisions == {"prefill-decode": 1, "decode-only": 0}
    # One prefill pod computed the prompt and produced exactly one token; the decode pod decoded
    # all 12 after a KV pull (≈ 10 ms simulated) instead of a ≈ 2 s local prefill.
    served = diff.served()
    prefillers = [n for n in served if n.startswith("prefill-")]
    assert prefillers and len(prefillers) == 1 and served[prefillers[0]] == 1
    assert diff.pods[prefillers[0]]["vllm:generation_tokens_total"] == 1
    assert diff.pods[prefillers[0]]["vllm:request_prefill_time_seconds_sum"] > 1.0
    assert set(served) == {prefillers[0], decoder}
    assert diff.pods[decoder]["vllm:generation_tokens_total"] == 12
    # Under half a local prefill: at time scale 4 a host stall of 0.19 s once showed as 0.75 s simulated here.
    assert diff.pods[decoder]["vllm:request_prefill_time_seconds_sum"] < 1.0

    # The same prompt again: the decode pod holds all of it, so it stays decode-only there.
    await asyncio.sleep(0.05)
    before = await Snapshot.take(stack, client)
    async with client.post(f"{stack.url}/v1/completions", json={**body, "max_tokens": 4}) as resp:
        assert resp.status == 200 and resp.headers["x-inference-pod"] == decoder
        assert len(await sse(resp)) >= 4
    diff = (await Snapshot.take(stack, client)).minus(before)
    assert diff.decisions == {"prefill-decode": 0, "decode-only": 1}
    assert diff.served() == {decoder: 1}


async def test_short_prompt_stays_decode_only_and_client_cannot_steer_the_sidecar(
    stack: PDStack, client: aiohttp.ClientSession
) -> None:
    dead = f"127.0.0.120:{free_port('127.0.0.120')}"  # a prefill host, but nothing listens there
    before = await Snapshot.take(stack, client)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    async with client.post(f"{stack.url}/v1/completions", json=body, headers={"x-prefiller-host-port": dead}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-inference-pod"].startswith("decode-")
        assert (await resp.json())["usage"]["completion_tokens"] == 3
    diff = (await Snapshot.take(stack, client)).minus(before)
    assert diff.decisions == {"prefill-decode": 0, "decode-only": 1}
    assert list(diff.served()) == [resp.headers["x-inference-pod"]]


async def test_non_streaming_chat_is_disaggregated(stack: PDStack, client: aiohttp.ClientSession) -> None:
    before = await Snapshot.take(stack, client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt("chat two")}], "max_tokens": 6}
    async with client.post(f"{stack.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        answer = await resp.json()
        decoder = resp.headers["x-inference-pod"]
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 6
    assert answer["choices"][0]["message"]["content"]
    diff = (await Snapshot.take(stack, client)).minus(before)
    assert diff.decisions == {"prefill-decode": 1, "decode-only": 0}
    served = diff.served()
    assert decoder in served and len([n for n in served if n.startswith("prefill-")]) == 1
