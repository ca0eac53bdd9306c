"""Data parallelism with the real sidecar, end to end: a real Envoy, the `epp` program, and one
data-parallel decode pod: two simulated vLLM ranks on consecutive ports of 127.0.0.187 behind one
`epp-pd-sidecar --data-parallel-size 2` (rank r on the sidecar's port + r), plus a simulated prefill
pod. The pool lists both rank ports (one endpoint per rank, as an InferencePool's targetPorts).

1. `data-parallel-profile-handler` (primaryPort = the sidecar's rank-0 port): whichever rank the
   EPP picks, Envoy delivers the request to the primary port with `x-data-parallel-host-port`, and
   the sidecar hands it to that rank's model server. The simulator's `x-inference-pod` /
   `x-inference-port` response headers say which rank served it; `x-epp-decision` which the EPP
   picked. The same pod's sidecar also runs a remote prefill before decoding on the named rank,
   when the request carries both headers (as the reference's pd-profile-handler with primaryPort
   stamps them; this EPP's profile handlers set one or the other, so that request is sent to the
   sidecar directly).
2. `disagg-profile-handler` with the rank ports as decode endpoints (a gateway that routes to every
   target port): the EPP picks a rank port, the sidecar's server on that port runs the remote
   prefill, and the decode (a KV pull, not a local prefill) happens on that rank.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
import pytest_asyncio

from llmepp.plugins.filters.header_testing import SELECTION_HEADER
from llmepp.plugins.profile_handlers.data_parallel import DATA_PARALLEL_HEADER
from llmepp.testing.pdstack import PDStack, PDStackOptions, scrape, total
from llmepp_sim.cluster import PodInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
PREFILL_HEADER = "x-prefiller-host-port"
# Slow prefill compute (2 ms/token simulated) tells a local prefill from a KV pull (≈ 5 ms).
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--prefill-time-per-token", "2.0"]
PROMPT = " ".join(["cache", "request", "server", "model", "token", "prefix"] * 100)  # ≈ 600 tokens
RANKS = ("decode-0-rank-0", "decode-0-rank-1")
COUNTERS = ("vllm:request_success_total", "vllm:generation_tokens_total", "vllm:request_prefill_time_seconds_sum")
PICK = re.compile(r"(?:^|\| )([\w-]+): ([0-9.]+:[0-9]+);")

DP_CONFIG = """
plugins:
- type: header-based-testing-filter
- type: decode-filter
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters: {{primaryPort: {port}}}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: header-based-testing-filter}}, {{pluginRef: decode-filter}}, {{pluginRef: max-score-picker}}]
"""
PD_CONFIG = """
plugins:
- type: header-based-testing-filter
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}]
- name: decode
  plugins: [{pluginRef: header-based-testing-filter}, {pluginRef: decode-filter}, {pluginRef: max-score-picker}]
"""


class DataParallelStack(PDStack):
    """One prefill pod and one two-rank decode pod behind a data-parallel sidecar; `DP_CONFIG` gets
    the sidecar's primary port once it is known."""

    async def start_pods(self) -> None:
        await super().start_pods()
        if "{port}" in self.options.epp_config:
            self.options.epp_config = self.options.epp_config.format(port=self.rank_port(0).rsplit(":", 1)[1])

    def rank(self, name: str) -> PodInfo:
        return next(p for p in self.pods if p.name == name)

    def rank_port(self, rank: int) -> str:
        """The sidecar's port for `rank`: the endpoint the EPP knows for it."""
        return self.routed_address[RANKS[rank]]

    @property
    def prefill(self) -> PodInfo:
        return self.pods_with_role("prefill")[0]

    async def counters(self, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        out = {}
        for pod in self.pods:  # straight to each model server, not through the sidecar
            samples = await scrape(http, f"{pod.url}/metrics")
            out[pod.name] = {n: total(samples, n) for n in COUNTERS}
        return out

    async def upstream_of(self, rid: str) -> str:
        """The address Envoy sent request `rid` to (its access log, flushed every 200 ms)."""
        assert self.envoy is not None
        for _ in range(40):
            line = next((ln for ln in self.envoy.access_log() if rid in ln), "")
            if line:
                return dict(p.split("=", 1) for p in line.split() if "=" in p)["upstream"]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no access log line for {rid}")


def options(config: str, first_host: int) -> PDStackOptions:
    return PDStackOptions(prefill=1, decode=1, decode_ranks=2, sim_args=SIM, first_host=first_host,
                          epp_config=config, epp_args=["--decision-header"])  # fmt: skip


Counters = Mapping[str, Mapping[str, float]]


def diff(after: Counters, before: Counters) -> dict[str, dict[str, float]]:
    return {pod: {k: v - before[pod][k] for k, v in c.items()} for pod, c in after.items()}


def served(d: Counters) -> dict[str, float]:
    return {pod: c["vllm:request_success_total"] for pod, c in d.items() if c["vllm:request_success_total"]}


def picked(headers: Mapping[str, str], profile: str) -> str:
    """The endpoint the EPP picked in `profile` (x-epp-decision)."""
    return dict(PICK.findall(headers["x-epp-decision"]))[profile]


@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def dp_stack() -> AsyncIterator[DataParallelStack]:
    st = DataParallelStack(options(DP_CONFIG, 186))
    async with st:
        yield st


@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def pd_stack() -> AsyncIterator[DataParallelStack]:
    st = DataParallelStack(options(PD_CONFIG, 190))
    async with st:
        yield st


class TestDataParallelProfileHandler:
    async def test_each_request_is_served_by_the_rank_the_epp_picked(
        self, dp_stack: DataParallelStack, http: aiohttp.ClientSession
    ) -> None:
        st = dp_stack
        primary = st.rank_port(0)
        before = await st.counters(http)
        for i, rank in enumerate((1, 0, 1, 1, 0)):
            body = {"model": MODEL, "prompt": f"rank {rank} request {i}", "max_tokens": 3}
            headers = {SELECTION_HEADER: st.rank_port(rank), "x-request-id": f"dp-forced-{i}"}
            async with http.post(f"{st.url}/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] == 3
                assert picked(resp.headers, "default") == st.rank_port(rank)
                assert resp.headers["x-inference-pod"] == RANKS[rank]
                assert resp.headers["x-inference-port"] == st.rank(RANKS[rank]).address.rsplit(":", 1)[1]
            # Envoy dialled the pod's primary port (the rank-0 server), whatever the rank.
            assert await st.upstream_of(f"dp-forced-{i}") == primary
        d = diff(await st.counters(http), before)
        assert served(d) == {RANKS[0]: 2, RANKS[1]: 3}

    async def test_unforced_picks_and_streaming_follow_the_decision(
        self, dp_stack: DataParallelStack, http: aiohttp.ClientSession
    ) -> None:
        st = dp_stack
        seen = set()
        for i in range(6):
            body = {"model": MODEL, "prompt": f"free choice {i}", "max_tokens": 4, "stream": True}
            async with http.post(f"{st.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                text = (await resp.read()).decode()
                rank = st.routed_address[resp.headers["x-inference-pod"]]
                assert rank == picked(resp.headers, "default")
                seen.add(resp.headers["x-inference-pod"])
            events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]" and len([json.loads(e) for e in events[:-1]]) >= 4
        assert seen <= set(RANKS)

    async def test_a_client_cannot_pick_the_rank_or_another_host(
        self, dp_stack: DataParallelStack, http: aiohttp.ClientSession
    ) -> None:
        """The EPP overwrites a client's x-data-parallel-host-port with its own pick."""
        st = dp_stack
        before = await st.counters(http)
        for rank, forged in ((1, st.rank_port(0)), (0, st.rank_port(1)), (0, f"{st.prefill.address}")):
            headers = {SELECTION_HEADER: st.rank_port(rank), DATA_PARALLEL_HEADER: forged}
            body = {"model": MODEL, "prompt": "forged", "max_tokens": 2}
            async with http.post(f"{st.url}/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200 and resp.headers["x-inference-pod"] == RANKS[rank]
        assert served(diff(await st.counters(http), before)) == {RANKS[0]: 2, RANKS[1]: 1}

    async def test_remote_prefill_then_decode_on_the_named_rank(
        self, dp_stack: DataParallelStack, http: aiohttp.ClientSession
    ) -> None:
        """Both headers on the primary port: prefill on the prefill pod, decode (a KV pull) on rank 1."""
        st = dp_stack
        before = await st.counters(http)
        headers = {DATA_PARALLEL_HEADER: st.rank_port(1), PREFILL_HEADER: st.prefill.address}
        body = {"model": MODEL, "prompt": "pd " + PROMPT, "max_tokens": 6}
        async with http.post(f"http://{st.rank_port(0)}/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-inference-pod"] == RANKS[1]
            assert (await resp.json())["usage"]["completion_tokens"] == 6
        d = diff(await st.counters(http), before)
        assert served(d) == {st.prefill.name: 1, RANKS[1]: 1}
        assert d[st.prefill.name]["vllm:generation_tokens_total"] == 1
        assert d[st.prefill.name]["vllm:request_prefill_time_seconds_sum"] > 1.0  # ≈ 600 × 2 ms computed
        assert d[RANKS[1]]["vllm:generation_tokens_total"] == 6
        assert d[RANKS[1]]["vllm:request_prefill_time_seconds_sum"] < 0.4  # pulled, not recomputed

    async def test_a_header_naming_no_rank_of_the_pod_is_refused(
        self, dp_stack: DataParallelStack, http: aiohttp.ClientSession
    ) -> None:
        st = dp_stack
        before = await st.counters(http)
        host, port = st.rank_port(0).rsplit(":", 1)
        for value in (st.prefill.address, f"{host}:{int(port) + 2}", st.rank(RANKS[1]).address):
            headers = {DATA_PARALLEL_HEADER: value, PREFILL_HEADER: st.prefill.address}
            async with http.post(f"http://{st.rank_port(0)}/v1/completions", json={"model": MODEL, "prompt": "x"},
                                 headers=headers) as resp:  # fmt: skip
                assert resp.status == 400
                assert "names no data-parallel rank of this pod" in (await resp.json())["error"]["message"]
        assert served(diff(await st.counters(http), before)) == {}


class TestDisaggregationOnRankPorts:
    async def test_the_picked_rank_port_prefills_remotely_and_decodes_on_its_rank(
        self, pd_stack: DataParallelStack, http: aiohttp.ClientSession
    ) -> None:
        st = pd_stack
        for i, rank in enumerate((1, 0)):
            before = await st.counters(http)
            body = {"model": MODEL, "prompt": f"{i} " + PROMPT, "max_tokens": 5, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            headers = {SELECTION_HEADER: st.rank_port(rank), "x-request-id": f"pd-rank-{i}"}
            async with http.post(f"{st.url}/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["x-inference-pod"] == RANKS[rank]
                assert picked(resp.headers, "decode") == st.rank_port(rank)
                assert picked(resp.headers, "prefill") == st.prefill.address
                await resp.read()
            assert await st.upstream_of(f"pd-rank-{i}") == st.rank_port(rank)  # the rank's own port
            d = diff(await st.counters(http), before)
            assert served(d) == {st.prefill.name: 1, RANKS[rank]: 1}
            assert d[st.prefill.name]["vllm:generation_tokens_total"] == 1
            assert d[RANKS[rank]]["vllm:generation_tokens_total"] == 5
            assert d[RANKS[rank]]["vllm:request_prefill_time_seconds_sum"] < 0.4
