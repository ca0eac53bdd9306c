"""The `epp-pd-sidecar` program between real simulated pods (all separate processes): a
simulated prefill pod, a simulated decode pod, and the sidecar in front of the decode pod.

What each pod did is read from its own /metrics: the prefill pod served one 1-token request
(do_remote_decode), the decode pod pulled the KV instead of prefilling (do_remote_prefill:
its prefill phase costs the KV-transfer time, not the much longer compute time)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import yaml

from llmepp.testing.pdstack import SidecarProcess, scrape, total
from llmepp.testing.ports import free_port
from llmepp_sim.cluster import PodInfo, SimProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Prefill compute is made slow (2 ms/token simulated) so a local prefill (~1.2 s simulated for 600
# tokens) cannot be mistaken for a KV pull (5 ms + 0.005 ms/token); time scale 4 keeps it quick.
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--prefill-time-per-token", "2.0"]
PROMPT = " ".join(["cache", "request", "server", "model", "token", "prefix"] * 100)  # 600 single-token words


class Topology:
    def __init__(self, sim: SimProcess, sidecar: SidecarProcess, address: str) -> None:
        self.sim, self.sidecar, self.address = sim, sidecar, address

    @property
    def prefill(self) -> PodInfo:
        return next(p for p in self.sim.pods if p.role == "prefill")

    @property
    def decode(self) -> PodInfo:
        return next(p for p in self.sim.pods if p.role == "decode")

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def topo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Topology]:
    work: Path = tmp_path_factory.mktemp("pd-sidecar")
    pods = [{"name": "prefill-0", "host": "127.0.0.126", "port": 0, "role": "prefill"},
            {"name": "decode-0", "host": "127.0.0.127", "port": 0, "role": "decode"}]  # fmt: skip
    (work / "sim.yaml").write_text(yaml.safe_dump({"pods": pods}))
    sim = SimProcess(["--config", str(work / "sim.yaml"), *SIM]).start()
    try:
        decode = next(p for p in sim.pods if p.role == "decode")
        port = free_port("127.0.0.127")
        sidecar = SidecarProcess(
            ["--host", "127.0.0.127", "--port", str(port), "--decoder-url", decode.url], work / "sidecar.log"
        )
        await sidecar.start()
        try:
            yield Topology(sim, sidecar, f"127.0.0.127:{port}")
        finally:
            await sidecar.stop()
    finally:
        sim.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def counters(http: aiohttp.ClientSession, pod: PodInfo) -> dict[str, float]:
    samples = await scrape(http, f"{pod.url}/metrics")
    names = ("vllm:request_success_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
             "vllm:request_prefill_time_seconds_sum", "vllm:request_prefill_time_seconds_count")  # fmt: skip
    return {n: total(samples, n) for n in names}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


async def test_disaggregated_streaming_completion(topo: Topology, http: aiohttp.ClientSession) -> None:
    p0, d0 = await counters(http, topo.prefill), await counters(http, topo.decode)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"x-prefiller-host-port": topo.prefill.address}
    async with http.post(f"{topo.url}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-inference-pod"] == "decode-0"
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) == 8
    assert chunks[-1]["usage"]["completion_tokens"] == 8 and chunks[-1]["usage"]["prompt_tokens"] >= 600

    p = delta(await counters(http, topo.prefill), p0)
    d = delta(await counters(http, topo.decode), d0)
    # The prefill pod: one request, one generated token, the whole prompt computed.
    assert p["vllm:request_success_total"] == 1 and p["vllm:generation_tokens_total"] == 1
    assert p["vllm:prompt_tokens_total"] >= 600
    assert p["vllm:request_prefill_time_seconds_sum"] > 1.0  # ≈ 600 × 2 ms of compute
    # The decode pod: the 8 tokens, after a KV pull (≈ 8 ms simulated), not a 1.2 s prefill.
    assert d["vllm:request_success_total"] == 1 and d["vllm:generation_tokens_total"] == 8
    assert d["vllm:request_prefill_time_seconds_count"] == 1
    assert d["vllm:request_prefill_time_seconds_sum"] < 0.4


async def test_disaggregated_non_streaming_chat(topo: Topology, http: aiohttp.ClientSession) -> None:
    p0 = await counters(http, topo.prefill)
    body = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT + " chat"}], "max_tokens": 5}
    async with http.post(f"{topo.url}/v1/chat/completions", json=body,
                         headers={"x-prefiller-host-port": topo.prefill.address}) as resp:  # fmt: skip
        assert resp.status == 200 and resp.headers["x-inference-pod"] == "decode-0"
        answer = await resp.json()
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 5
    p = delta(await counters(http, topo.prefill), p0)
    assert p["vllm:request_success_total"] == 1 and p["vllm:generation_tokens_total"] == 1


async def test_without_header_the_decode_pod_prefills_itself(topo: Topology, http: aiohttp.ClientSession) -> None:
    p0, d0 = await counters(http, topo.prefill), await counters(http, topo.decode)
    body = {"model": "sim-model", "prompt": "fresh " + PROMPT, "max_tokens": 3, "stream": True}
    async with http.post(f"{topo.url}/v1/completions", json=body) as resp:
        assert resp.status == 200 and resp.headers["x-inference-pod"] == "decode-0"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert delta(await counters(http, topo.prefill), p0)["vllm:request_success_total"] == 0
    d = delta(await counters(http, topo.decode), d0)
    assert d["vllm:generation_tokens_total"] == 3
    assert d["vllm:request_prefill_time_seconds_sum"] > 1.0  # computed locally this time


async def test_prefill_pod_error_and_dead_prefill_pod(topo: Topology, http: aiohttp.ClientSession) -> None:
    # A real model-server error (context too long on the prefill pod) comes back as-is.
    body = {"model": "sim-model", "prompt": PROMPT * 40, "max_tokens": 2}
    async with http.post(f"{topo.url}/v1/completions", json=body,
                         headers={"x-prefiller-host-port": topo.prefill.address}) as resp:  # fmt: skip
        assert resp.status == 400 and resp.headers["x-pd-failed-stage"] == "prefill"
        assert "maximum context length" in (await resp.json())["error"]["message"]
    dead = f"127.0.0.126:{free_port('127.0.0.126')}"
    async with http.post(f"{topo.url}/v1/completions", json={"model": "sim-model", "prompt": "x"},
                         headers={"x-prefiller-host-port": dead}) as resp:  # fmt: skip
        assert resp.status == 502
        assert f"prefill pod {dead} unreachable" in (await resp.json())["error"]["message"]
