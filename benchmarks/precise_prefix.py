"""Precise prefix routing: ingestion throughput, lookup latency, tokenization cost, routing quality.

    .venv/bin/python -m benchmarks.precise_prefix micro      # ~1 min: ingest, ZMQ ingest, lookup, tokenize
    .venv/bin/python -m benchmarks.precise_prefix routing    # ~4 min: Envoy + simulator, precise vs approx
    .venv/bin/python -m benchmarks.precise_prefix            # both; results in benchmarks/PRECISE.md by hand

micro
  ingest       decode + index of pre-encoded vLLM batches in this process (map and legacy encodings);
               block events per CPU-second (`time.process_time`, one core).
  zmq-ingest   the same through a real Subscriber: a child process publishes over ZeroMQ as fast as
               the subscriber keeps up (bounded by a credit window), this process ingests; CPU =
               getrusage(RUSAGE_SELF) of the ingesting process (incl. the ZeroMQ I/O thread).
  lookup       hash + longest-prefix walk of a 100k-token prompt against an index holding 8 pods
               (one holds all 6,250 blocks — the worst case — others partial); plus the miss case and
               the whole produce() call. Tokenization is measured separately (HF, simulator tokenizer).

routing
  A shared-prefix workload through Envoy + EPP + 4 simulated pods (`--time-scale`), closed loop:
  `--groups` system prompts of ~`--prefix-tokens` tokens, each request = one group's prefix + a
  unique question. Precise (HF tokenizer, KV events) vs approximate (approx producer, estimate
  tokenizer); both with the reference's optimized-baseline weights. Scenarios: one EPP; one EPP while
  20% of one pod's KV cache is evicted behind the EPP's back every few seconds (direct requests to
  the pod); two EPP replicas splitting traffic. Reported: TTFT p50/p90 (client wall clock, ms) and
  the pods' prefix-cache hit rate (Δ vllm:prefix_cache_hits / Δ vllm:prefix_cache_queries over the
  measured window).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing as mp
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import zmq
import zmq.asyncio

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.framework.datakeys import TOKENIZED_PROMPT, TokenizedPrompt
from llmepp.framework.plugin import PluginContext, registry
from llmepp.kvevents.chain import Delta, SourceChains
from llmepp.kvevents.index import LAST_HOLDER_SLACK, MemoryIndex
from llmepp.kvevents.ingest import MemoryStore, SourceIngest
from llmepp.kvevents.keys import block_keys, root_key, tokens_to_bytes
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.subscriber import Subscriber, SubscriberOptions
from llmepp.kvevents.tiers import TierTable
from llmepp.kvevents.wire import decode_batch, parse_frames
from llmepp.request.types import InferenceRequest, RequestKind
from llmepp.testing.ports import free_port
from llmepp.testing.stack import Stack, StackOptions
from llmepp_sim.tokenizer import TOKENIZER_PATH, SimTokenizer

TIERS = TierTable()
MODEL = "sim-model"


# ---------------------------------------------------------------------------------------------
# Synthetic vLLM event stream
# ---------------------------------------------------------------------------------------------
def event_stream(n_batches: int, legacy: bool, mix: str, seed: int = 1) -> tuple[list[bytes], dict[str, int]]:
    """Pre-encoded batches as a busy vLLM emits them. Per batch 8 requests store 8-64 new 16-token
    blocks each (random tokens; block hashes opaque to us).

    mix `stores`: only new stores (every block needs hashing and indexing: the worst case).
    mix `steady`: a full cache — half the requests re-report a shared 32-block system prefix (vLLM
    >= 0.33 re-emits reused blocks) and chain their new blocks to it, and once 20,000 blocks are
    live every new block evicts the oldest one (BlockRemoved, as many blocks as were stored).
    Returns (payloads, block events by kind)."""
    rng = random.Random(seed)
    payloads: list[bytes] = []
    counts = {"stored_new": 0, "stored_again": 0, "removed": 0}
    next_hash = 1
    live: list[int] = []
    prefix_tokens = [rng.randrange(150_000) for _ in range(32 * 16)]
    prefix_hashes = list(range(10**12, 10**12 + 32))
    for _ in range(n_batches):
        events: list[Any] = []
        new = 0
        for _ in range(8):
            n = rng.randrange(8, 65)
            hashes = list(range(next_hash, next_hash + n))
            next_hash += n
            tokens = [rng.randrange(150_000) for _ in range(16 * n)]
            if mix == "steady" and rng.random() < 0.5:
                events.append(_stored(prefix_hashes, None, prefix_tokens, legacy))
                counts["stored_again"] += len(prefix_hashes)
                events.append(_stored(hashes, prefix_hashes[-1], tokens, legacy))
            else:
                events.append(_stored(hashes, None, tokens, legacy))
            new += n
            live.extend(hashes)
        counts["stored_new"] += new
        if mix == "steady" and len(live) > 20_000:
            evict, live = live[:new], live[new:]
            events.append(["BlockRemoved", evict, "GPU"] if legacy else
                          {"type": "BlockRemoved", "block_hashes": evict, "medium": "GPU"})  # fmt: skip
            counts["removed"] += len(evict)
        payloads.append(bytes(msgpack.packb([time.time(), events, 0], use_bin_type=True)))
    return payloads, counts


def _stored(hashes: list[int], parent: int | None, tokens: list[int], legacy: bool) -> Any:
    if legacy:
        return ["BlockStored", hashes, parent, tokens, 16, None, "GPU", None]
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip


async def _ingest_all(ingest: SourceIngest, payloads: list[bytes]) -> float:
    """CPU seconds to frame-check, decode and index every payload."""
    t0 = time.process_time()
    for seq, payload in enumerate(payloads):
        msg = parse_frames([b"kv@pod@sim-model", seq.to_bytes(8, "big"), payload])
        await ingest.on_batch(msg, decode_batch(msg.payload))
    return time.process_time() - t0


def bench_ingest(n_batches: int) -> list[str]:
    lines = []
    for mix, legacy in (("stores", False), ("stores", True), ("steady", False)):
        payloads, counts = event_stream(n_batches, legacy, mix)
        blocks = sum(counts.values())
        index = MemoryIndex(100_000_000, 10, TIERS)
        chains = SourceChains(16, 0, TIERS, 100_000_000)
        stats = KVEventStats()
        ingest = SourceIngest("10.0.0.1:8000", chains, MemoryStore(index), stats)
        cpu = asyncio.run(_ingest_all(ingest, payloads))
        t0 = time.process_time()
        for p in payloads:
            decode_batch(p)
        decode_cpu = time.process_time() - t0
        assert stats.block_stored + stats.block_removed == blocks and chains.stats.orphans == 0
        kinds = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
        lines.append(
            f"ingest {mix} {'legacy' if legacy else 'map'}: {blocks:,} block events ({kinds}) in {cpu:.2f} s CPU = "
            f"{blocks / cpu:,.0f} /s per core (decode alone {blocks / decode_cpu:,.0f} /s); {len(index):,} keys"
        )
    return lines


def bench_index_memory(n_batches: int) -> list[str]:
    """Memory of what ingestion keeps, per block held by one pod: the index (key → holders, tiers) and the
    pod's chain state (engine hash → our key, parents), from tracemalloc over a fresh store-only stream."""
    import gc
    import tracemalloc

    payloads, _ = event_stream(n_batches, False, "stores")
    gc.collect()
    tracemalloc.start()
    index = MemoryIndex(100_000_000, 10, TIERS)
    index_only = tracemalloc.take_snapshot()
    chains = SourceChains(16, 0, TIERS, 100_000_000)
    ingest = SourceIngest("10.0.0.1:8000", chains, MemoryStore(index), KVEventStats())
    asyncio.run(_ingest_all(ingest, payloads))
    gc.collect()
    used, _ = tracemalloc.get_traced_memory()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    by_file: dict[str, int] = {}
    for stat in after.compare_to(index_only, "filename"):
        name = stat.traceback[0].filename.rsplit("/", 1)[-1]
        by_file[name] = by_file.get(name, 0) + stat.size_diff
    keys = len(index)
    parts = ", ".join(f"{name} {size / keys:.0f}" for name, size in sorted(by_file.items(), key=lambda x: -x[1])[:3])
    return [f"index memory: {keys:,} blocks held by one pod: {used / keys:.0f} bytes per block in all "
            f"({used / 1e6:.1f} MB; by file: {parts} bytes per block)", _last_holder_memory()]  # fmt: skip


def _last_holder_memory() -> str:
    """What removals leave behind: the last holder of each removed key (bounded by keys held + a slack)."""
    import gc
    import random
    import tracemalloc

    rng = random.Random(7)
    n = LAST_HOLDER_SLACK
    keys = [rng.getrandbits(64) for _ in range(n)]
    index = MemoryIndex(100_000_000, 10, TIERS)
    index.apply("10.0.0.1:8000", Delta(keys=keys, masks=[1] * n))
    gc.collect()
    tracemalloc.start()
    # Fresh key objects, as a decoded batch brings (the ones the last holders keep alive); the holders
    # dict does not shrink, so what is traced is the last holders' map and its keys.
    removal = Delta(keys=[int(str(k)) for k in keys], masks=[0] * n)
    index.apply("10.0.0.1:8000", removal)
    del removal
    gc.collect()
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return f"last holders: {n:,} removed keys remembered: {used / n:.0f} bytes each ({used / 1e6:.1f} MB)"


# -- through ZeroMQ ------------------------------------------------------------------------------
def _publisher(port: int, payloads: list[bytes], credit_port: int) -> None:
    """Child process: publish as fast as the subscriber's credits allow (no HWM drops)."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    credits = ctx.socket(zmq.PULL)
    credits.bind(f"tcp://127.0.0.1:{credit_port}")
    credits.recv()  # the subscriber is connected
    window = 256
    for seq, payload in enumerate(payloads):
        if seq and seq % window == 0:
            credits.recv()
        pub.send_multipart([b"kv@pod@sim-model", seq.to_bytes(8, "big"), payload])
    credits.recv()
    pub.close(0)
    credits.close(0)
    ctx.term()


def bench_zmq_ingest(n_batches: int) -> list[str]:
    payloads, counts = event_stream(n_batches, False, "stores")
    blocks = sum(counts.values())
    port, credit_port = free_port(), free_port()
    child = mp.get_context("spawn").Process(target=_publisher, args=(port, payloads, credit_port))
    child.start()

    async def run() -> tuple[float, float, KVEventStats]:
        index = MemoryIndex(100_000_000, 10, TIERS)
        chains = SourceChains(16, 0, TIERS, 100_000_000)
        stats = KVEventStats()
        ctx = zmq.asyncio.Context.instance()
        sub = Subscriber("pod", f"tcp://127.0.0.1:{port}", "", SourceIngest("pod", chains, MemoryStore(index), stats),
                         options=SubscriberOptions(rcv_hwm=0), stats=stats, replay_slots=asyncio.Semaphore(1),
                         context=ctx)  # fmt: skip
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{credit_port}")
        task = asyncio.get_running_loop().create_task(sub.run())
        await asyncio.sleep(0.5)
        await push.send(b"go")
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        granted = 1
        while stats.batches < len(payloads):
            if stats.batches >= granted * 256 - 128:
                granted += 1
                await push.send(b"more")
            await asyncio.sleep(0.001)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await push.send(b"done")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        push.close(0)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return cpu, t1 - t0, stats

    cpu, wall, stats = asyncio.run(run())
    child.join(10)
    assert stats.lost_batches == 0 and stats.gaps == 0, stats
    return [
        f"zmq-ingest: {blocks:,} block events, {wall:.2f} s wall, {cpu:.2f} s CPU of the ingesting process = "
        f"{blocks / cpu:,.0f} /s per core ({blocks / wall:,.0f} /s wall)"
    ]


# -- lookup ------------------------------------------------------------------------------------
def _times(fn: Callable[[], object], n: int) -> tuple[float, float, float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    out.sort()
    return out[len(out) // 2] * 1e3, out[int(len(out) * 0.99) - 1] * 1e3, out[0] * 1e3


def bench_lookup(prompt_tokens: int, runs: int) -> list[str]:
    rng = random.Random(7)
    tokens = [rng.randrange(4096) for _ in range(prompt_tokens)]
    token_bytes = tokens_to_bytes(tokens)
    root = root_key(MODEL)
    keys = block_keys(token_bytes, 16, root)
    index = MemoryIndex(100_000_000, 10, TIERS)
    pods = [f"10.0.0.{i}:8000" for i in range(8)]
    index.apply(pods[0], Delta(keys=keys, masks=[1] * len(keys)))  # full match: the worst case
    for i, pod in enumerate(pods[1:], start=1):
        part = keys[: len(keys) * i // 10]
        index.apply(pod, Delta(keys=part, masks=[1] * len(part)))
    # Background: 1M unrelated keys spread over the pods (a realistic index size).
    for pod in pods:
        other = [rng.getrandbits(64) for _ in range(125_000)]
        index.apply(pod, Delta(keys=other, masks=[1] * len(other)))
    cand = 0
    for pod in pods:
        cand |= index.bit(pod)
    full = _times(lambda: index.match(token_bytes, 16, root, cand), runs)
    miss_bytes = tokens_to_bytes([t + 1 for t in tokens])
    miss = _times(lambda: index.match(miss_bytes, 16, root, cand), runs)
    hashing = _times(lambda: block_keys(token_bytes, 16, root), runs)
    m = index.match(token_bytes, 16, root, cand)
    assert m.lengths[index.bit(pods[0])] == len(keys)

    # The plugin's produce() for the same prompt (endpoint mapping, PrefixMatchInfo).
    producer = registry.build("precise-prefix-cache-producer", "p", {"kvEventsConfig": {"discoverPods": False}})
    ds = Datastore()
    for pod in pods:
        host, port = pod.split(":")
        ds.upsert(EndpointSpec(name=host, address=host, port=int(port)))
    producer.setup(PluginContext({}, ds, None, None))
    producer.index = index  # type: ignore[attr-defined]
    eps = list(ds.endpoints)
    for ep in eps:
        producer.endpoint_added(ep)  # type: ignore[attr-defined]

    def produce() -> None:
        req = InferenceRequest("r", "/v1/completions", {}, RequestKind.COMPLETIONS, model=MODEL, target_model=MODEL)
        req.data[TOKENIZED_PROMPT] = TokenizedPrompt(token_bytes, "hf")
        producer.produce(req, eps)  # type: ignore[attr-defined]

    plugin = _times(produce, runs)
    return [
        f"lookup {prompt_tokens:,} tokens ({len(keys):,} blocks, 8 pods, {len(index):,} keys in the index):",
        f"  full match     median {full[0]:.3f} ms  p99 {full[1]:.3f} ms  min {full[2]:.3f} ms (hashing included)",
        f"  hashing alone  median {hashing[0]:.3f} ms  p99 {hashing[1]:.3f} ms",
        f"  first-block miss median {miss[0] * 1e3:.1f} µs",
        f"  produce()      median {plugin[0]:.3f} ms  p99 {plugin[1]:.3f} ms",
    ]


def bench_redis(n_batches: int, prompt_tokens: int, runs: int) -> list[str]:
    """The shared index: ingestion through the guarded Lua script, and a 100k-token lookup."""
    from llmepp.kvevents.redis_index import RedisStore, connect
    from llmepp.testing.redis import RedisServer

    async def run(url: str) -> list[str]:
        client = connect(url)
        store = RedisStore(client, TIERS, ttl=3600.0)
        payloads, counts = event_stream(n_batches, False, "stores")
        blocks = sum(counts.values())
        chains = SourceChains(16, 0, TIERS, 100_000_000)
        ingest = SourceIngest("10.0.0.1:8000", chains, store, KVEventStats())
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await _ingest_all(ingest, payloads)
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        rng = random.Random(7)
        token_bytes = tokens_to_bytes([rng.randrange(4096) for _ in range(prompt_tokens)])
        keys = block_keys(token_bytes, 16, root_key(MODEL))
        pods = [f"10.0.1.{i}:8000" for i in range(8)]
        for i, pod in enumerate(pods):
            part = keys if i == 0 else keys[: len(keys) * i // 10]
            await store.write(pod, SourceChains(16, 0, TIERS, 10), 1.0, 0, Delta(keys=part, masks=[1] * len(part)))
        times = []
        for _ in range(max(5, runs // 10)):
            t = time.perf_counter()
            m = await store.lookup(block_keys(token_bytes, 16, root_key(MODEL)), pods)
            times.append(time.perf_counter() - t)
        assert m.lengths[pods[0]] == len(keys)
        times.sort()
        cold_times = []
        cold = [k ^ 1 for k in keys]  # no pod holds block 0: the walk reads one block
        for _ in range(max(5, runs // 10)):
            t = time.perf_counter()
            m = await store.lookup(cold, pods)
            cold_times.append(time.perf_counter() - t)
        assert not m.lengths
        await client.aclose()
        return [
            f"redis ingest: {blocks:,} block events in {wall:.2f} s wall, {cpu:.2f} s CPU in this process = "
            f"{blocks / wall:,.0f} /s wall per replica (Redis itself runs the Lua apply on its own core)",
            f"redis lookup {prompt_tokens:,} tokens, full match, 8 pods: median "
            f"{statistics.median(times) * 1e3:.1f} ms (hashing + one script call), max {times[-1] * 1e3:.1f} ms",
            f"redis lookup {prompt_tokens:,} tokens, miss at block 0: median "
            f"{statistics.median(cold_times) * 1e3:.2f} ms (keys already hashed)",
        ]

    with RedisServer() as server:
        return asyncio.run(run(server.url))


def bench_tokenize(runs: int) -> list[str]:
    from llmepp.tokenization.hf import HFTokenizer

    tok = HFTokenizer(TOKENIZER_PATH)
    rng = random.Random(3)
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 9))))
             for _ in range(5000)]  # fmt: skip
    lines = []
    sample = " ".join(rng.choice(words) for _ in range(2000))
    per_word = len(tok.ids(sample)) / 2000
    for target in (1_000, 10_000, 100_000):
        text = " ".join(rng.choice(words) for _ in range(int(target / per_word)))
        n = len(tok.ids(text))
        med, _, best = _times(functools.partial(tok.encode, text), max(3, runs // (target // 1000)))
        lines.append(f"tokenize (HF, simulator BPE) {n:,} tokens / {len(text):,} chars: median {med:.1f} ms "
                     f"({med * 1e3 / n:.2f} µs/token), min {best:.1f} ms")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------------
# Routing quality
# ---------------------------------------------------------------------------------------------
def precise_config(zmq_port: int, replay_port: int) -> str:
    return f"""
plugins:
- type: token-producer
  parameters:
    tokenizer: {{backend: hf, path: "{TOKENIZER_PATH}", chatTemplate: role-tags}}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    kvEventsConfig: {{podDiscoveryConfig: {{socketPort: {zmq_port}, replaySocketPort: {replay_port}}}}}
{SCORERS.format(producer="precise-prefix-cache-producer")}"""


def approx_config() -> str:
    return f"""
plugins:
- type: approx-prefix-cache-producer
{SCORERS.format(producer="approx-prefix-cache-producer")}"""


# The reference's optimized-baseline weights (its nightly benchmark), identical for both producers.
SCORERS = """- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: {producer}}}
- type: no-hit-lru-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: no-hit-lru-scorer, weight: 2}}"""


@dataclass
class RoutingArgs:
    time_scale: float
    seconds: float
    concurrency: int
    groups: int
    prefix_tokens: int
    kv_blocks: int


async def _pod_counters(http: aiohttp.ClientSession, urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        async with http.get(url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def _stream(http: aiohttp.ClientSession, url: str, prompt: str) -> float:
    """TTFT (wall seconds) of one streamed completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True}
    t0 = time.monotonic()
    async with http.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        first = 0.0
        async for _ in resp.content.iter_any():
            if not first:
                first = time.monotonic() - t0
    return first


_VOCAB = [
    "market", "river", "engine", "cloud", "signal", "harbor", "orbit", "lantern", "meadow", "quartz",
    "planet", "garden", "silver", "window", "forest", "bridge", "thunder", "candle", "mirror", "castle",
]  # fmt: skip
_TOKENIZER = SimTokenizer()


def _text(rng: random.Random, tokens: int) -> str:
    """Random words worth about `tokens` tokens of the simulator's tokenizer."""
    words = [rng.choice(_VOCAB) for _ in range(tokens)]
    text = " ".join(words)
    n = len(_TOKENIZER.encode(text))
    return " ".join(words[: max(1, len(words) * tokens // max(n, 1))])


async def run_scenario(kind: str, scenario: str, a: RoutingArgs, first_host: int) -> dict[str, Any]:
    host = f"127.0.0.{first_host}"
    zmq_port, replay_port = free_port(host), free_port(host)
    sim = ["--latency-profile", "llama-8b-h100", "--time-scale", str(a.time_scale), "--max-num-seqs", "8",
           "--max-model-len", "16384", "--kv-cache-size", str(a.kv_blocks),
           "--zmq-endpoint", f"tcp://{host}:{zmq_port}",
           "--kv-events-replay-endpoint", f"tcp://{host}:{replay_port}"]  # fmt: skip
    cfg = precise_config(zmq_port, replay_port) if kind == "precise" else approx_config()
    opts = StackOptions(pods=4, first_host=first_host, sim_args=sim, epp_config=cfg,
                        epp_replicas=2 if scenario == "2 replicas" else 1)  # fmt: skip
    rng = random.Random(11)
    prefixes = [_text(rng, a.prefix_tokens) for _ in range(a.groups)]
    ttfts: list[float] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http, Stack(opts) as stack:
        pod_urls = [p.url for p in stack.pods]

        async def client(i: int) -> None:
            crng = random.Random(100 + i)
            while not stop.is_set():
                prompt = crng.choice(prefixes) + " question " + _text(crng, 60)
                ttfts.append(await _stream(http, stack.url, prompt))

        async def evict_behind_the_back() -> None:
            """Every 3 s: unique direct requests to pod 0 worth 20% of its KV cache (LRU evicts)."""
            erng = random.Random(5)
            while not stop.is_set():
                await asyncio.sleep(3.0)
                budget = a.kv_blocks // 5 * 16
                while budget > 0 and not stop.is_set():
                    n = min(budget, 1500)
                    await _stream(http, pod_urls[0], _text(erng, n))
                    budget -= n

        # Warm-up (not measured): every group once, through the EPP.
        for p in prefixes:
            await _stream(http, stack.url, p + " warmup")
        await asyncio.sleep(0.5)
        ttfts.clear()
        h0, q0 = await _pod_counters(http, pod_urls)
        tasks = [asyncio.get_running_loop().create_task(client(i)) for i in range(a.concurrency)]
        if scenario == "20% evicted":
            tasks.append(asyncio.get_running_loop().create_task(evict_behind_the_back()))
        await asyncio.sleep(a.seconds)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        h1, q1 = await _pod_counters(http, pod_urls)
    ttfts.sort()
    return {
        "kind": kind, "scenario": scenario, "requests": len(ttfts),
        "ttft_p50_ms": statistics.median(ttfts) * 1e3, "ttft_p90_ms": ttfts[int(len(ttfts) * 0.9)] * 1e3,
        "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0,
    }  # fmt: skip


async def bench_routing(a: RoutingArgs) -> list[str]:
    lines = [
        f"routing: 4 pods, time-scale {a.time_scale}, {a.concurrency} closed-loop clients, {a.seconds:.0f} s per run, "
        f"{a.groups} groups x ~{a.prefix_tokens} prefix tokens + ~60 unique, kv-cache {a.kv_blocks} blocks/pod; "
        "weights queue 2, kv 2, prefix 3, no-hit-lru 2",
        "| scenario | producer | requests | TTFT p50 (ms wall) | TTFT p90 (ms wall) | prefix-cache hit rate |",
        "|---|---|---|---|---|---|",
    ]
    host = 100
    for scenario in ("1 EPP", "20% evicted", "2 replicas"):
        for kind in ("precise", "approx"):
            r = await run_scenario(kind, scenario, a, host)
            host += 5
            lines.append(f"| {scenario} | {kind} | {r['requests']} | {r['ttft_p50_ms']:.1f} | "
                         f"{r['ttft_p90_ms']:.1f} | {r['hit_rate']:.1%} |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "micro", "routing"])
    p.add_argument("--batches", type=int, default=2000, help="event batches for the ingest benchmarks")
    p.add_argument("--prompt-tokens", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--kv-blocks", type=int, default=640)
    a = p.parse_args(argv)
    out: list[str] = []
    if a.what in ("all", "micro"):
        for fn in (lambda: bench_ingest(a.batches), lambda: bench_index_memory(a.batches),
                   lambda: bench_zmq_ingest(a.batches),
                   lambda: bench_lookup(a.prompt_tokens, a.runs), lambda: bench_tokenize(a.runs),
                   lambda: bench_redis(a.batches // 4, a.prompt_tokens, a.runs)):  # fmt: skip
            lines = fn()
            print("\n".join(lines), flush=True)
            out += lines
    if a.what in ("all", "routing"):
        ra = RoutingArgs(a.time_scale, a.seconds, a.concurrency, a.groups, a.prefix_tokens, a.kv_blocks)
        out += asyncio.run(bench_routing(ra))
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
