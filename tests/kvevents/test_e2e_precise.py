"""Precise prefix routing end to end: real Envoy, `epp` processes with the reference's precise-prefix
config shape (example C, HF tokenizer), simulator pods publishing KV events over ZeroMQ."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from llmepp.testing.ports import free_port, free_port_pair
from llmepp.testing.redis import RedisServer
from llmepp.testing.stack import Stack, StackOptions
from llmepp_sim.cluster import PodInfo, SimProcess
from llmepp_sim.tokenizer import TOKENIZER_PATH

pytestmark = pytest.mark.e2e

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "20", "--max-num-seqs", "8", "--max-model-len", "8192"]
EVENTS_SETTLE = 0.3  # s: the simulator flushes event batches within 5 ms; subscribers apply at once


LOAD_SCORERS = """
  - {pluginRef: active-request-scorer, weight: 4}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}"""


def config(
    zmq_port: int,
    replay_port: int,
    *,
    redis_url: str = "",
    chat_template: str = "role-tags",
    load_scorers: bool = True,
    backlog_limit: float | None = None,
) -> str:
    index = ""
    load = ""
    if redis_url:
        index = f"""
    indexerConfig:
      kvBlockIndexConfig:
        redisConfig: {{address: "{redis_url}"}}"""
        load = f"""
- type: redis-inflight-load-producer
  parameters:
    redisConfig: {{address: "{redis_url}"}}"""
    replay = f", replaySocketPort: {replay_port}" if replay_port else ""
    limit = "" if backlog_limit is None else f"\n  parameters: {{lastHolderBacklogLimit: {backlog_limit}}}"
    return f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: {MODEL}
    tokenizer: {{backend: hf, path: "{TOKENIZER_PATH}", chatTemplate: "{chat_template}"}}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSizeTokens: 16{index}
    kvEventsConfig:
      topicFilter: "kv@"
      concurrency: 32
      discoverPods: true
      podDiscoveryConfig: {{socketPort: {zmq_port}{replay}}}{load}
- type: active-request-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: no-hit-lru-scorer{limit}
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors:
    - pluginRef: precise-prefix-cache-producer
schedulingProfiles:
- name: default
  plugins:{LOAD_SCORERS if load_scorers else ""}
  - {{pluginRef: prefix-cache-scorer, weight: 2}}
  - {{pluginRef: no-hit-lru-scorer, weight: 2}}
"""


def stack_options(
    first_host: int,
    *,
    replay: bool = True,
    redis_url: str = "",
    replicas: int = 1,
    chat_template: str = "",
    sim_args: list[str] = SIM,
    load_scorers: bool = True,
    backlog_limit: float | None = None,
) -> StackOptions:
    host = f"127.0.0.{first_host}"
    zmq_port, replay_port = free_port(host), free_port(host) if replay else 0
    sim = [*sim_args, "--zmq-endpoint", f"tcp://{host}:{zmq_port}"]
    if chat_template:
        sim += ["--chat-template", chat_template]
    if replay:
        sim += ["--kv-events-replay-endpoint", f"tcp://{host}:{replay_port}"]
    return StackOptions(
        pods=4, first_host=first_host, sim_args=sim, epp_replicas=replicas,
        epp_config=config(zmq_port, replay_port, redis_url=redis_url, chat_template=chat_template or "role-tags",
                          load_scorers=load_scorers, backlog_limit=backlog_limit),
    )  # fmt: skip


def long_prompt(seed: int, words: int = 400) -> str:
    rng = random.Random(seed)
    vocab = ["market", "river", "engine", "cloud", "signal", "harbor", "orbit", "lantern", "meadow", "quartz"]
    return " ".join(rng.choice(vocab) + str(rng.randrange(100)) for _ in range(words))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def complete(http: aiohttp.ClientSession, url: str, prompt: str) -> tuple[str, int]:
    """(pod that served it, prompt tokens it found cached)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
        return resp.headers["x-inference-pod"], int(data["usage"]["prompt_tokens_details"]["cached_tokens"])


async def chat(http: aiohttp.ClientSession, url: str, messages: list[dict[str, str]]) -> tuple[str, int]:
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
        return resp.headers["x-inference-pod"], int(data["usage"]["prompt_tokens_details"]["cached_tokens"])


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url) as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# The prompts are placed on pods *directly* (bypassing Envoy and the EPP), on pods a cold request
# would not pick first (no-hit-lru takes never-used pods in order: sim-0 first). Only the pods' KV
# events can tell the EPP where they are — routing history (the approximate producer) cannot.


async def test_repeated_prompt_lands_where_it_is_cached_and_a_reset_pod_loses_it(http: aiohttp.ClientSession) -> None:
    async with Stack(stack_options(150)) as stack:
        pods = stack.pods
        prompt = long_prompt(1)
        await complete(http, pods[2].url, prompt)
        await asyncio.sleep(EVENTS_SETTLE)
        for _ in range(3):
            pod, cached = await complete(http, stack.url, prompt)
            assert pod == pods[2].name and cached > 0
        # Behind the EPP's back: the pod drops its cache (AllBlocksCleared) and another pod gets the
        # first half of the prompt. A router still believing in the old pod would pick it (full match).
        async with http.post(pods[2].url + "/reset_prefix_cache") as resp:
            assert resp.status == 200
        words = prompt.split()
        await complete(http, pods[3].url, " ".join(words[: len(words) // 2]))
        await asyncio.sleep(EVENTS_SETTLE)
        pod, cached = await complete(http, stack.url, prompt)
        assert pod == pods[3].name and cached > 0
        assert await metric(http, stack.metrics_url, "llm_d_epp_kv_events_all_cleared_total") >= 1


async def test_a_prompt_evicted_behind_the_epps_back_goes_back_to_its_pod(http: aiohttp.ClientSession) -> None:
    async with Stack(stack_options(185)) as stack:
        home = stack.pods[2]
        prompt = long_prompt(8)
        await complete(http, home.url, prompt)
        await asyncio.sleep(EVENTS_SETTLE)
        removed = await metric(http, stack.metrics_url, "llm_d_epp_kv_events_block_removed_total")
        async with http.post(home.url + "/admin/evict", json={"fraction": 1.0}) as resp:
            assert resp.status == 200
            evicted = (await resp.json())["evicted"]
        assert evicted > 0
        await asyncio.sleep(EVENTS_SETTLE)
        # The EPP applied the removals (else a stale index, still crediting the pod, would send it there too).
        applied = await metric(http, stack.metrics_url, "llm_d_epp_kv_events_block_removed_total") - removed
        assert applied >= evicted, (applied, evicted)
        # No pod holds the prompt now (nothing is cached: the removal events arrived). A new prompt
        # would go to the never-used sim-0 first; this one returns to the pod that made room for it.
        pod, cached = await complete(http, stack.url, prompt)
        assert (pod, cached) == (home.name, 0)
        pod, cached = await complete(http, stack.url, prompt)
        assert pod == home.name and cached > 0
        pod, _ = await complete(http, stack.url, long_prompt(9))
        assert pod == stack.pods[0].name


async def test_an_evicted_prompt_skips_its_pod_while_that_pod_is_recomputing(http: aiohttp.ClientSession) -> None:
    # Prefix and no-hit-lru scorers only (no load scorer would move the prompt), real time and a slow prefill
    # (1 ms per token), so requests routed to the home pod queue there in prefill for seconds.
    slow = ["--latency-profile", "llama-8b-h100", "--time-scale", "1", "--prefill-time-per-token", "1",
            "--max-num-seqs", "8", "--max-model-len", "8192"]  # fmt: skip
    # A backlog of two long prompts: over a limit of 2 prompts (the default, 8, would wait for more).
    async with Stack(stack_options(190, sim_args=slow, load_scorers=False, backlog_limit=2)) as stack:
        home, pods = stack.pods[2], stack.pods

        async def evicted_on(pod_url: str, prompt: str) -> None:
            await complete(http, pod_url, prompt)
            await asyncio.sleep(EVENTS_SETTLE)
            async with http.post(pod_url + "/admin/evict", json={"fraction": 1.0}) as resp:
                assert resp.status == 200 and (await resp.json())["evicted"] > 0
            await asyncio.sleep(EVENTS_SETTLE)

        prompt = long_prompt(20, words=150)
        await evicted_on(home.url, prompt)
        # A prefill backlog on the home pod, through the EPP: long prompts whose first blocks only the home
        # pod holds, so the prefix scorer sends them there; each has ~3x the evicted prompt's tokens to compute.
        stems = [long_prompt(30 + i, words=40) for i in range(2)]
        for stem in stems:
            await complete(http, home.url, stem)
        await asyncio.sleep(EVENTS_SETTLE)
        backlog = [asyncio.create_task(complete(http, stack.url, f"{stem} {long_prompt(40 + i, words=500)}"))
                   for i, stem in enumerate(stems)]  # fmt: skip
        routed = f'llm_d_epp_inflight_requests{{endpoint_name="{home.name}"'
        for _ in range(200):  # until the EPP has routed both (their prompt tokens count until their first token)
            if await metric(http, stack.metrics_url, routed) == len(backlog):
                break
            await asyncio.sleep(0.02)
        # The evicted prompt now goes where a new one would (the never-used sim-0), not behind the backlog.
        assert await complete(http, stack.url, prompt) == (pods[0].name, 0)
        assert {pod for pod, _ in await asyncio.gather(*backlog)} == {home.name}
        # With the backlog gone, an evicted prompt goes home again.
        other = long_prompt(21, words=150)
        await evicted_on(home.url, other)
        assert await complete(http, stack.url, other) == (home.name, 0)


async def test_two_replicas_behind_one_envoy_agree(http: aiohttp.ClientSession) -> None:
    async with Stack(stack_options(155, replicas=2)) as stack:
        placed = {long_prompt(2): stack.pods[2], long_prompt(3): stack.pods[3]}
        for prompt, home in placed.items():
            await complete(http, home.url, prompt)
        await asyncio.sleep(EVENTS_SETTLE)
        # Envoy alternates the two EPPs per request; each has seen the pods' events.
        for prompt, home in placed.items():
            for _ in range(6):
                pod, cached = await complete(http, stack.url, prompt)
                assert pod == home.name and cached > 0
        served = [await metric(http, url, "llm_d_epp_request_total") for url in stack.metrics_urls]
        assert len(served) == 2 and all(n >= 4 for n in served), served


async def test_redis_index_survives_an_epp_restart(http: aiohttp.ClientSession) -> None:
    redis_server = RedisServer()
    # No replay socket: a restarted EPP could not rebuild its index from the pods.
    async with redis_server, Stack(stack_options(160, replay=False, redis_url=redis_server.url)) as stack:
        placed = {long_prompt(seed): stack.pods[3 - i] for i, seed in enumerate((4, 5, 6))}
        for prompt, home in placed.items():
            await complete(http, home.url, prompt)
        await asyncio.sleep(EVENTS_SETTLE)
        await stack.restart_epp()
        for prompt, home in placed.items():
            pod, cached = await complete(http, stack.url, prompt)
            assert pod == home.name and cached > 0


async def test_chat_rendered_with_the_models_jinja_template_lands_where_it_is_cached(
    http: aiohttp.ClientSession,
) -> None:
    """Pods and EPP render chats with the model's own Jinja template (ChatML with a default system
    prompt): the EPP's token ids equal the pod's, so a conversation's next turn finds its cached history."""
    template = str(Path(__file__).parent.parent / "tokenization" / "templates" / "chatml" / "tokenizer_config.json")
    async with Stack(stack_options(166, chat_template=template)) as stack:
        home = stack.pods[2]
        history = [{"role": "user", "content": long_prompt(7)}]
        await chat(http, home.url, history)
        await asyncio.sleep(EVENTS_SETTLE)
        history += [{"role": "assistant", "content": "noted"}, {"role": "user", "content": "and now?"}]
        pod, cached = await chat(http, stack.url, history)
        assert pod == home.name and cached > 0


class DataParallelStack(Stack):
    """One pod serving two data-parallel ranks: one address, HTTP ports p and p + 1, KV events on
    z and z + 1 (replay r and r + 1), as vLLM offsets each rank's sockets; the endpoints file names
    each rank's endpoint with its `rank`, as the Kubernetes pool does from the target ports."""

    def __init__(self, host: str, zmq_port: int, replay_port: int, options: StackOptions) -> None:
        super().__init__(options)
        self.host, self.zmq_port, self.replay_port = host, zmq_port, replay_port

    async def start_pods(self) -> None:
        base = self.pod_port
        pods = [
            {
                "name": f"dp-rank-{rank}",
                "host": self.host,
                "port": base + rank,
                "zmq-endpoint": f"tcp://{self.host}:{self.zmq_port + rank}",
                "kv-events-replay-endpoint": f"tcp://{self.host}:{self.replay_port + rank}",
            }
            for rank in (0, 1)
        ]
        sim_yaml = self.workdir / "sim.yaml"
        sim_yaml.write_text(yaml.safe_dump({"pods": pods}))
        self.sim = SimProcess(["--config", str(sim_yaml), *SIM], ready_timeout=self.options.startup_timeout)
        await self.sim.start_async()

    def write_endpoints(self, pods: list[PodInfo]) -> None:
        entries = []
        for pod in pods:
            host, port = pod.address.rsplit(":", 1)
            entries.append({"name": pod.name, "address": host, "port": int(port), "rank": int(port) - self.pod_port})
        self.endpoints_file.write_text(yaml.safe_dump({"endpoints": entries}))


async def test_each_data_parallel_rank_is_routed_on_its_own_events(http: aiohttp.ClientSession) -> None:
    host = "127.0.0.196"
    zmq_port, replay_port, pod_port = (free_port_pair(host) for _ in range(3))
    options = StackOptions(
        pods=1, first_host=196, pod_port=pod_port, epp_config=config(zmq_port, replay_port, load_scorers=False)
    )
    async with DataParallelStack(host, zmq_port, replay_port, options) as stack:
        rank0, rank1 = stack.pods
        assert (rank0.name, rank1.name) == ("dp-rank-0", "dp-rank-1")
        # Placed behind the EPP's back on rank 1, then on rank 0: only each rank's own events say where.
        # (A cold prompt would go to rank 0 first; with both ranks read from rank 0's socket, rank 1's
        # prompt would look cold and rank 0's would look cached on both.)
        on1, on0 = long_prompt(21), long_prompt(22)
        await complete(http, rank1.url, on1)
        await complete(http, rank0.url, on0)
        await asyncio.sleep(EVENTS_SETTLE)
        for _ in range(2):
            pod, cached = await complete(http, stack.url, on1)
            assert pod == rank1.name and cached > 0
            pod, cached = await complete(http, stack.url, on0)
            assert pod == rank0.name and cached > 0


async def test_global_socket_mode_pods_publish_to_the_epps_bound_socket(http: aiohttp.ClientSession) -> None:
    """The older llm-d wiring: `kvEventsConfig.zmqEndpoint`, the EPP binds and every pod's publisher
    connects to it (vLLM `"endpoint": "tcp://<epp>:5557"`, topic `kv@<pod IP>@<model>`)."""
    bound = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    sim = [*SIM, "--zmq-endpoint", bound, "--kv-events-connect", "--kv-events-topic", "kv@{host}@{model}"]
    # The older config shape: a bound endpoint, no pod discovery.
    global_config = (
        config(0, 0, load_scorers=False)
        .replace("podDiscoveryConfig: {socketPort: 0}", f'zmqEndpoint: "{bound}"')
        .replace("discoverPods: true", "discoverPods: false")
    )
    assert bound in global_config and "discoverPods: false" in global_config
    async with Stack(StackOptions(pods=4, first_host=200, sim_args=sim, epp_config=global_config)) as stack:
        pods = stack.pods
        prompt = long_prompt(31)
        await complete(http, pods[3].url, prompt)  # placed behind the EPP's back
        await asyncio.sleep(EVENTS_SETTLE)
        for _ in range(2):
            pod, cached = await complete(http, stack.url, prompt)
            assert pod == pods[3].name and cached > 0
        assert await metric(http, stack.metrics_url, "llm_d_epp_kv_events_unknown_sources_total") == 0
