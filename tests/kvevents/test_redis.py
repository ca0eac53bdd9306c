"""The shared Redis index (real redis-server): replicas apply each batch once, lookups agree with the
in-memory index, restarts resume, publisher restarts invalidate, speculation is shared; and the
Redis-shared in-flight load producer."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import redis.asyncio as aioredis
from helpers import until

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.framework.datakeys import IN_FLIGHT_LOAD, PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT, TokenizedPrompt, scoped
from llmepp.framework.plugin import ConfigError, PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.kvevents.chain import Delta, SourceChains
from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.keys import block_keys, root_key, tokens_to_bytes
from llmepp.kvevents.pool import PoolOptions, SubscriberPool
from llmepp.kvevents.redis_index import RedisStore, connect
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.wire import BlockRemoved, BlockStored
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.precise_prefix import RedisPrecisePrefixCacheProducer
from llmepp.plugins.producers.shared_inflight import RedisInFlightLoadProducer
from llmepp.request.types import InferenceRequest, RequestKind, ResponseInfo
from llmepp.testing.redis import RedisServer

from .publisher import CLEARED, Engine, TestPublisher, removed, stored
from .rig import TIERS, endpoint

TOKENS = list(range(300, 300 + 4 * 16))


def chain(first: int, last: int, tokens: list[int] = TOKENS, base: int = 7000) -> dict:
    hashes = [base + i for i in range(first, last)]
    return stored(hashes, base + first - 1 if first else None, tokens[4 * first : 4 * last])


async def _eq(coro: object, value: int) -> bool:
    return await coro == value  # type: ignore[misc]


class Replica:
    """One EPP replica's ingestion: its own Redis client, store, chains and subscriber pool."""

    def __init__(self, url: str, port: int, replay_port: int) -> None:
        self.client = connect(url)
        self.store = RedisStore(self.client, TIERS, ttl=60.0)
        self.stats = KVEventStats()
        self.pool = SubscriberPool(
            PoolOptions(socket_port=port, replay_socket_port=replay_port),
            self.store,
            lambda: SourceChains(4, 0, TIERS, 100_000),
            self.stats,
        )

    async def close(self) -> None:
        await self.pool.aclose()
        await self.client.aclose()

    async def match(self, pod: str, tokens: list[int] = TOKENS) -> int:
        keys = block_keys(tokens_to_bytes(tokens), 4, root_key("m"))
        return (await self.store.lookup(keys, [pod])).lengths.get(pod, 0)


async def eventually(check: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def test_two_replicas_apply_every_batch_once_and_agree(server: RedisServer, client: aioredis.Redis) -> None:
    host = "127.0.0.175"
    async with TestPublisher(host) as pub:
        a, b = Replica(server.url, pub.port, pub.replay_port), Replica(server.url, pub.port, pub.replay_port)
        ep = endpoint(host, 8000)
        pod = ep.hostport
        a.pool.endpoint_added(ep)
        b.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        for i in range(0, 8, 2):
            await pub.publish([chain(i, i + 2)])
        await pub.publish([{"type": "BlockRemoved", "block_hashes": [7007], "medium": "GPU"}])

        async def settled() -> bool:
            src = await client.hgetall(f"epp:kv:src:{pod}")
            return bool(src) and int(src[b"seq"]) == 4

        await eventually(settled)
        assert await a.match(pod) == await b.match(pod) == 7
        await until(lambda: a.stats.batches == 5 and b.stats.batches == 5)
        # Each batch was delivered twice (once per replica) but stored once: one generation (the first
        # batch of a source new to Redis starts it), one field per key, the engine chain state saved once (the
        # 7 blocks held, and the removed one's kept position: later stores may name it as their parent).
        assert await client.hget("epp:kv:gen", pod) == b"1"
        assert await client.hlen(f"epp:kv:eng:{pod}") == 8
        # A cleared cache invalidates the pod for both replicas in O(1) (generation bump).
        await pub.publish([CLEARED])

        async def cleared() -> bool:
            return await a.match(pod) == 0 and await b.match(pod) == 0

        await eventually(cleared)
        assert await client.hget("epp:kv:gen", pod) == b"2"
        await a.close()
        await b.close()


async def test_restarted_replica_resumes_chains_and_position(server: RedisServer, client: aioredis.Redis) -> None:
    host = "127.0.0.176"
    async with TestPublisher(host) as pub:
        ep = endpoint(host, 8000)
        a = Replica(server.url, pub.port, pub.replay_port)
        a.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        await pub.publish([chain(0, 3)])
        await pub.publish([chain(3, 5)])
        await eventually(lambda: _eq(a.match(ep.hostport), 5))
        await a.close()
        # While no replica runs, the engine stores more blocks (chained to the earlier ones).
        await pub.publish([chain(5, 7)])
        restarted = Replica(server.url, pub.port, pub.replay_port)
        restarted.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        await pub.publish([chain(7, 9)])
        await eventually(lambda: _eq(restarted.match(ep.hostport), 9))
        # It resumed at seq 2 (replaying only what Redis lacked, asked from Redis's last batch, seq 1, to
        # check it is still the publisher's) with the saved chain state: no orphans.
        assert pub.replay_requests == [1] and restarted.stats.resets == 0
        assert restarted.pool.chains()[0].stats.orphans == 0
        await restarted.close()


async def test_a_resumed_replica_still_skips_a_sliding_window_groups_removals(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """A hybrid model caches a prompt in its full-attention and its sliding-window group under one engine
    hash; a removal names only the group, whose kind the chains learn from its stores. A replica resumed
    from Redis (a rolling update) did not know the sliding-window group any more: its first removal there
    took the prefix the full-attention group still holds out of the shared index."""
    host = "127.0.0.177"
    hashes = [7000, 7001, 7002, 7003]
    tokens = TOKENS[:16]
    async with TestPublisher(host) as pub:
        ep = endpoint(host, 8000)
        a = Replica(server.url, pub.port, pub.replay_port)
        a.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        await pub.publish(
            [
                stored(hashes, None, tokens, group_idx=0, kv_cache_spec_kind="full_attention"),
                stored(hashes, None, tokens, group_idx=1, kv_cache_spec_kind="sliding_window"),
            ]
        )
        await eventually(lambda: _eq(a.match(ep.hostport, tokens), 4))
        await a.close()
        restarted = Replica(server.url, pub.port, pub.replay_port)
        restarted.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        # The window moved on: group 1 drops the first two blocks; group 0 still holds all four.
        await pub.publish([{**removed(hashes[:2]), "group_idx": 1}])
        await pub.publish([chain(4, 6)])  # a later batch: the removal's has been applied
        await eventually(lambda: _eq(restarted.match(ep.hostport, TOKENS[:24]), 6))
        assert await restarted.match(ep.hostport, tokens) == 4
        await restarted.close()


async def test_the_last_holder_of_an_evicted_prefix_is_shared(server: RedisServer, client: aioredis.Redis) -> None:
    host = "127.0.0.174"
    async with TestPublisher(host) as pub:
        ep = endpoint(host, 8000)
        pod, other = ep.hostport, "127.0.0.173:8000"
        a = Replica(server.url, pub.port, pub.replay_port)
        a.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        await pub.publish([chain(0, 4)])
        await eventually(lambda: _eq(a.match(pod), 4))
        keys = block_keys(tokens_to_bytes(TOKENS), 4, root_key("m"))
        assert (await a.store.lookup(keys, [pod, other])).last is None  # held: a hit
        await pub.publish([{"type": "BlockRemoved", "block_hashes": [7000, 7001, 7002, 7003], "medium": "GPU"}])
        await eventually(lambda: _eq(a.match(pod), 0))
        # Another replica (its own client) sees which pod held the prompt last; only candidates count.
        b = RedisStore(connect(server.url), TIERS)
        found = await b.lookup(keys, [other, pod])
        assert found.last == pod and found.lengths == {}
        assert (await b.lookup(keys, [other])).last is None
        await b.client.aclose()
        await a.close()


async def test_publisher_restart_is_detected_by_the_shared_guard(server: RedisServer, client: aioredis.Redis) -> None:
    host = "127.0.0.177"
    other = list(range(5000, 5000 + 4 * 16))
    async with TestPublisher(host) as pub:
        ep = endpoint(host, 8000)
        a = Replica(server.url, pub.port, pub.replay_port)
        a.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        for i in range(0, 6, 2):
            await pub.publish([chain(i, i + 2)])
        await eventually(lambda: _eq(a.match(ep.hostport), 6))
        pub.restart()
        await pub.publish([chain(0, 2, other, base=9000)])

        async def swapped() -> bool:
            return await a.match(ep.hostport) == 0 and await a.match(ep.hostport, other) == 2

        await eventually(swapped)
        assert await client.hget("epp:kv:gen", ep.hostport) == b"2"
        await a.close()


def _producer(url: str, **extra: object) -> RedisPrecisePrefixCacheProducer:
    params = {
        "indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"address": url, "lookupTimeout": "100ms"}}},
        "tokenProcessorConfig": {"blockSizeTokens": 4},
        "speculativeIndexing": True,
        "speculativeTTL": "500ms",
        "kvEventsConfig": {"discoverPods": False},
        **extra,
    }
    p = registry.build("precise-prefix-cache-producer", "precise", params)
    assert isinstance(p, RedisPrecisePrefixCacheProducer)
    return p


def _request() -> InferenceRequest:
    req = InferenceRequest(
        "r", "/v1/completions", {}, RequestKind.COMPLETIONS, model="m", target_model="m", prompt=b"x"
    )
    req.data[TOKENIZED_PROMPT] = TokenizedPrompt(tokens_to_bytes(TOKENS), "hf")
    return req


async def test_speculation_written_by_one_replica_is_seen_by_another(server: RedisServer, client: object) -> None:
    a, b = _producer(server.url), _producer(server.url)
    eps = [endpoint("127.0.0.178", 8000), endpoint("127.0.0.179", 8000)]
    first = _request()
    await a.produce(first, eps)
    info = first.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")]
    assert info.hits == {} and info.total_blocks == 16
    a.pre_request(first, SchedulingResult("default", {"default": ProfileResult(targets=[eps[1]])}))
    second = _request()
    await eventually(lambda: _hits(b, second, eps, {eps[1]: 16}))
    await asyncio.sleep(0.6)  # past speculativeTTL, but the request is still in prefill: held
    assert await _hits(b, _request(), eps, {eps[1]: 16})
    a.first_response_chunk(first, ResponseInfo(status=200))  # prefill done: the events have speculativeTTL
    await asyncio.sleep(0.6)  # no event confirmed it
    assert await _hits(b, _request(), eps, {})
    await a.aclose()
    await b.aclose()


async def test_a_batch_is_looked_up_and_speculated_prompt_by_prompt(server: RedisServer, client: object) -> None:
    """A completions batch's prompts are cached by the engine each on its own: each prompt's keys are looked up
    on their own and the matches add up; the routed pod is speculated to hold each prompt."""
    a, b = _producer(server.url), _producer(server.url)
    eps = [endpoint("127.0.0.178", 8000), endpoint("127.0.0.179", 8000)]
    other = list(range(500, 540))  # 10 blocks of 4
    prompts = [tokens_to_bytes(TOKENS), tokens_to_bytes(other)]

    def request(*parts: bytes) -> InferenceRequest:
        req = _request()
        req.data[TOKENIZED_PROMPT] = TokenizedPrompt.joined(list(parts), "hf")
        return req

    batch = request(*prompts)
    await a.produce(batch, eps)
    info = batch.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")]
    assert info.hits == {} and info.total_blocks == 26
    a.pre_request(batch, SchedulingResult("default", {"default": ProfileResult(targets=[eps[1]])}))
    await eventually(lambda: _hits(b, request(prompts[1]), eps, {eps[1]: 10}))
    assert await _hits(b, request(prompts[0]), eps, {eps[1]: 16})
    assert await _hits(b, request(*prompts), eps, {eps[1]: 26})
    await a.aclose()
    await b.aclose()


async def _hits(p: RedisPrecisePrefixCacheProducer, req: InferenceRequest, eps: list, want: dict) -> bool:
    await p.produce(req, eps)
    return bool(req.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")].hits == want)


async def test_unreachable_redis_means_no_prefix_data_not_a_stall() -> None:
    p = _producer("redis://127.0.0.1:1")
    req = _request()
    t0 = time.monotonic()
    await p.produce(req, [endpoint("127.0.0.178", 8000)])
    assert time.monotonic() - t0 < 0.5
    assert req.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")].hits == {}
    await p.aclose()


async def test_inflight_load_is_shared_between_replicas(server: RedisServer, client: object) -> None:
    params = {"redisConfig": {"address": server.url}, "syncInterval": "50ms", "replicaTTL": "300ms"}
    ds = Datastore()
    ds.upsert(EndpointSpec(name="a", address="127.0.0.180", port=8000))
    ds.upsert(EndpointSpec(name="b", address="127.0.0.180", port=8001))
    ep_a, ep_b = ds.endpoints
    replicas = []
    for rid in ("r1", "r2"):
        p = registry.build("redis-inflight-load-producer", "load", {**params, "replicaId": rid})
        assert isinstance(p, RedisInFlightLoadProducer)
        p.setup(PluginContext({"load": p}, ds, None, None))
        replicas.append(p)
    r1, r2 = replicas
    req = InferenceRequest("q", "/v1/completions", {}, RequestKind.COMPLETIONS, model="m", prompt=b"x" * 400)
    r1.produce(req, [ep_a, ep_b])
    r1.pre_request(req, SchedulingResult("default", {"default": ProfileResult(targets=[ep_a])}))
    view = r1.view
    assert view.get(ep_a) is not None and view[ep_a].requests == 1  # local: at once

    def seen_by_r2(requests: int) -> bool:
        probe = InferenceRequest("p", "/", {}, kind=req.kind)
        r2.produce(probe, [ep_a, ep_b])
        loads = probe.data[scoped(IN_FLIGHT_LOAD, "load")]
        got = loads.get(ep_a)
        return (got.requests if got is not None else 0) == requests and loads.get(ep_b) is None

    await until(lambda: seen_by_r2(1), within=3, what="r2 sees r1's request")
    r1.response_complete(req, ResponseInfo(status=200), SchedulingResult("default", {}))
    await until(lambda: seen_by_r2(0), within=3, what="release seen")
    # r1 charges again, then dies without cleaning up: its heartbeat lapses after replicaTTL.
    r1.pre_request(req, SchedulingResult("default", {"default": ProfileResult(targets=[ep_a])}))
    await until(lambda: seen_by_r2(1), within=3)
    assert r1._task is not None
    r1._task.cancel()
    await until(lambda: seen_by_r2(0), within=3, what="dead replica forgotten")
    await r1.redis.aclose()
    await r2.aclose()


async def test_lookups_agree_with_the_in_memory_index(server: RedisServer, client: aioredis.Redis) -> None:
    """Differential: random stores (both tiers), removals, clears and speculation (onto a pod that holds
    nothing and onto one that holds some of the keys, on either tier) applied to both indexes; every lookup
    (random prompts sharing prefixes, random candidate sets) must agree."""
    rng = random.Random(11)
    pods = [f"10.0.2.{i}:8000" for i in range(5)]
    fresh = "10.0.2.99:8000"  # only ever speculated on
    root = root_key("m")
    trunk = [rng.randrange(50_000) for _ in range(4 * 40)]
    prompts = [trunk[: 4 * rng.randrange(1, 41)] + [rng.randrange(50_000) for _ in range(4 * 10)] for _ in range(6)]
    prompt_keys = [block_keys(tokens_to_bytes(p), 4, root) for p in prompts]
    for round_ in range(12):
        await client.flushall()
        store = RedisStore(client, TIERS)
        memory = MemoryIndex(1_000_000, 64, TIERS)
        held: dict[str, dict[int, int]] = {pod: {} for pod in pods}
        for seq in range(8):
            for pod in pods:
                delta = Delta()
                if rng.random() < 0.1 and held[pod]:  # the pod's cache was cleared
                    delta.keys += list(held[pod])
                    delta.masks += [0] * len(held[pod])
                    delta.clear_at = len(delta.keys)
                    held[pod].clear()
                keys = rng.choice(prompt_keys)
                start = rng.randrange(len(keys))
                for k in keys[start : start + rng.randrange(1, 20)]:
                    mask = rng.choice((1, 1, 1, 2, 3))
                    delta.keys.append(k)
                    delta.masks.append(mask)
                    held[pod][k] = mask
                for k in rng.sample(list(held[pod]), min(len(held[pod]), rng.randrange(3))):
                    delta.keys.append(k)  # removals, leaving holes and last holders behind
                    delta.masks.append(0)
                    del held[pod][k]
                memory.apply(pod, delta)
                await store.write(pod, SourceChains(4, 0, TIERS, 10), 1.0, seq, delta)
        spec_keys = rng.choice(prompt_keys)[: rng.randrange(1, 30)]
        for onto in (fresh, rng.choice(pods)):
            memory.speculate(onto, spec_keys, 60.0)
            await store.speculate(onto, spec_keys, 60.0)
        for prompt, keys in zip(prompts, prompt_keys):
            candidates = rng.sample([*pods, fresh], rng.randrange(1, len(pods) + 2))
            mask = 0
            for pod in candidates:
                mask |= memory.bit(pod)
            want = memory.match(tokens_to_bytes(prompt), 4, root, mask)
            got = await store.lookup(keys, candidates)
            assert got.lengths == {memory.pod_of(b): n for b, n in want.lengths.items()}, round_
            assert got.weighted == pytest.approx({memory.pod_of(b): w for b, w in want.weighted.items()}), round_
            assert got.last == (memory.pod_of(want.last) if want.last else None), round_


async def test_a_prefix_speculated_onto_the_pod_holding_it_on_cpu_scores_as_on_gpu(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """The request just routed there loads the offloaded prefix back: both indexes score it at the best
    tier's weight. Before, the in-memory index charged the CPU tier's (3.2 for 4 blocks), Redis did not
    (4.0), so a scorer ranked pods differently by backend."""
    pod, tokens, root = "10.0.3.1:8000", list(range(16)), root_key("m")
    keys = block_keys(tokens_to_bytes(tokens), 4, root)
    on_cpu = Delta(keys=list(keys), masks=[2] * len(keys))  # tier bit 2: cpu
    memory = MemoryIndex(1000, 10, TIERS)
    memory.apply(pod, on_cpu)
    memory.speculate(pod, keys, 60.0)
    store = RedisStore(client, TIERS)
    await store.write(pod, SourceChains(4, 0, TIERS, 10), 1.0, 0, on_cpu)
    await store.speculate(pod, keys, 60.0)
    bit = memory.bit(pod)
    assert memory.match(tokens_to_bytes(tokens), 4, root, bit).weighted == {bit: pytest.approx(4.0)}
    assert (await store.lookup(keys, [pod])).weighted == {pod: pytest.approx(4.0)}


async def test_pools_larger_than_one_script_call_are_looked_up_in_chunks(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """Redis's Lua takes at most ~8,000 values per call; a pool of 5,000 candidates is looked up in
    chunks and answers as one (a hit in the last chunk; the last holder from whichever chunk has it)."""
    store = RedisStore(client, TIERS)
    keys = block_keys(tokens_to_bytes(TOKENS), 4, root_key("m"))
    pods = [f"10.9.{i // 250}.{i % 250}:8000" for i in range(5_000)]
    holder, gone = pods[-1], pods[3_000]
    await store.write(holder, SourceChains(4, 0, TIERS, 10), 1.0, 0, Delta(keys=keys, masks=[1] * len(keys)))
    found = await store.lookup(keys, pods)
    assert found.lengths == {holder: len(keys)} and found.last is None
    other = [k ^ 1 for k in keys]
    await store.write(gone, SourceChains(4, 0, TIERS, 10), 1.0, 0, Delta(keys=other, masks=[1] * len(other)))
    await store.write(gone, SourceChains(4, 0, TIERS, 10), 1.0, 1, Delta(keys=other, masks=[0] * len(other)))
    found = await store.lookup(other, pods)
    assert found.lengths == {} and found.last == gone


async def test_producers_keyed_differently_keep_apart_in_one_redis(server: RedisServer, client: aioredis.Redis) -> None:
    """Two configurations over the same pods and Redis (a rollout changing blockSizeTokens, or two
    producers in one config): the stream guard `src:<pod>` and the chain state `eng:<pod>` were shared,
    so each batch landed in whichever index wrote it first and the other never saw it (and a restarted
    replica resumed chains computed for another block size)."""
    host = "127.0.0.181"
    async with TestPublisher(host) as pub:
        ep = endpoint(host, 8000)
        producers = []
        for block in (4, 8):
            events = {"discoverPods": True,
                      "podDiscoveryConfig": {"socketPort": pub.port, "replaySocketPort": pub.replay_port}}  # fmt: skip
            p = _producer(server.url, kvEventsConfig=events, tokenProcessorConfig={"blockSizeTokens": block})
            p.endpoint_added(ep)
            producers.append(p)
        await asyncio.sleep(0.3)
        await pub.publish([chain(0, 4)])  # 16 tokens: 4 blocks of 4, 2 blocks of 8
        small, large = producers
        await eventually(lambda: _hits(small, _request(), [ep], {ep: 4}))
        await eventually(lambda: _hits(large, _request(), [ep], {ep: 2}))
        for p in producers:
            await p.aclose()


async def test_the_guard_orders_a_sources_batches_by_sequence_not_by_clock(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """Sequence numbers order a publisher's batches; its clock stepping back (NTP) refused every batch
    until the clock caught up again. Timestamps only tell a late copy from a restart."""
    store = RedisStore(client, TIERS)
    keys = block_keys(tokens_to_bytes(TOKENS), 4, root_key("m"))
    pod = "10.0.3.1:8000"
    chains = SourceChains(4, 0, TIERS, 10)

    async def put(seq: int, ts: float, first: int, last: int, mask: int = 1) -> None:
        part = keys[first:last]
        await store.write(pod, chains, ts, seq, Delta(keys=part, masks=[mask] * len(part)))

    async def held() -> int:
        return (await store.lookup(keys, [pod])).lengths.get(pod, 0)

    await put(0, 10_000.0, 0, 2)
    await put(1, 10_001.0, 2, 4)
    await put(2, 6_402.0, 4, 6)  # the clock stepped back an hour
    await put(3, 6_403.0, 6, 8)
    assert await held() == 8
    # Late copies (another replica delivering them again) are refused, and none passes for a restart,
    # not even one newer than the last batch's timestamp.
    await put(1, 10_001.0, 2, 4, mask=0)
    await put(3, 6_403.0, 6, 8, mask=0)
    assert await held() == 8 and await client.hget("epp:kv:gen", pod) == b"1"
    resume = await store.resume(pod, SourceChains(4, 0, TIERS, 10))
    assert resume is not None and resume.next_seq == 4
    assert resume.last_ts == 10_001.0 and resume.anchor_ts == 6_403.0
    # A restart still shows as an older number with newer data.
    await put(0, 20_000.0, 0, 1)
    assert await held() == 1 and await client.hget("epp:kv:gen", pod) == b"2"


async def test_a_publisher_whose_clock_steps_back_loses_no_batches(server: RedisServer, client: aioredis.Redis) -> None:
    host = "127.0.0.206"
    async with TestPublisher(host) as pub:
        ep = endpoint(host, 8000)
        a = Replica(server.url, pub.port, pub.replay_port)
        a.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        await pub.publish([chain(0, 2)])
        await pub.publish([chain(2, 4)])
        await eventually(lambda: _eq(a.match(ep.hostport), 4))
        pub.clock_offset = -3600.0
        await pub.publish([chain(4, 6)])
        await pub.publish([chain(6, 8)])
        await eventually(lambda: _eq(a.match(ep.hostport), 8))
        assert a.stats.resets == 0 and a.stats.batches == 4
        await a.close()


OTHER = list(range(5000, 5000 + 4 * 16))


async def test_a_replica_resuming_after_the_publisher_restarted_rebuilds_the_pod(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """No replica was running while the engine restarted and published as many batches as Redis holds:
    the stream seems to continue where Redis stands. The resumed subscriber checks the anchor (the
    last batch Redis applied, with its timestamp) before trusting it."""
    host = "127.0.0.207"
    ep = endpoint(host, 8000)
    pod = ep.hostport
    async with Engine(host) as engine:
        a = Replica(server.url, engine.pub.port, engine.pub.replay_port)
        a.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        for i in range(3):
            await engine.pub.publish([chain(2 * i, 2 * i + 2)])
        await eventually(lambda: _eq(a.match(pod), 6))
        await a.close()
        pub = await engine.restart()
        for i in range(3):
            await pub.publish([chain(i, i + 1, OTHER, base=9000)], drop=True)
        b = Replica(server.url, pub.port, pub.replay_port)
        b.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        await pub.publish([chain(3, 5, OTHER, base=9000)])  # seq 3: where Redis says the stream goes on

        async def rebuilt() -> bool:
            return await b.match(pod) == 0 and await b.match(pod, OTHER) == 5

        await eventually(rebuilt)
        assert b.stats.resets == 1 and await client.hget("epp:kv:gen", pod) == b"2"
        assert b.pool.chains()[0].stats.orphans == 0
        await b.close()


async def test_a_restart_with_the_clock_stepped_back_replaces_the_shared_state(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """The new process's batches are older by the clock than what Redis holds: by timestamp they are
    late copies. The subscriber that found the anchor gone says which batch it saw replaced, and Redis,
    still at that batch, takes the restart."""
    host = "127.0.0.209"
    ep = endpoint(host, 8000)
    pod = ep.hostport
    async with Engine(host) as engine:
        a = Replica(server.url, engine.pub.port, engine.pub.replay_port)
        a.pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        for i in range(3):
            await engine.pub.publish([chain(2 * i, 2 * i + 2)])
        await eventually(lambda: _eq(a.match(pod), 6))
        pub = await engine.restart()
        pub.clock_offset = -3600.0
        for i in range(4):
            await pub.publish([chain(i, i + 1, OTHER, base=9000)], drop=True)
        await asyncio.sleep(0.3)
        await pub.publish([chain(4, 6, OTHER, base=9000)])

        async def rebuilt() -> bool:
            return await a.match(pod) == 0 and await a.match(pod, OTHER) == 6

        await eventually(rebuilt)
        assert a.stats.resets == 1 and await client.hget("epp:kv:gen", pod) == b"2"
        await a.close()


async def test_redis_lookup_failures_are_counted_and_exported() -> None:
    """A lookup past `lookupTimeout` (Redis paused) and one against a stopped Redis each mean no prefix
    data for that request; both are counted (llm_d_epp_kv_events_lookup_{timeouts,errors}_total), as is a
    speculative write that fails."""
    with RedisServer() as srv:
        p = _producer(srv.url)
        metrics = EppMetrics()
        p.setup(PluginContext({}, None, None, metrics))
        eps = [endpoint("127.0.0.208", 8000)]
        await p.produce(_request(), eps)
        assert (p.stats.lookup_errors, p.stats.lookup_timeouts) == (0, 0)
        admin = connect(srv.url)
        await admin.execute_command("CLIENT", "PAUSE", 500, "ALL")
        req = _request()
        await p.produce(req, eps)
        assert req.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")].hits == {}
        assert (p.stats.lookup_errors, p.stats.lookup_timeouts) == (0, 1)
        await admin.aclose()
        await asyncio.sleep(0.6)
        srv.stop()
        req = _request()
        await p.produce(req, eps)
        assert req.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")].hits == {}
        assert (p.stats.lookup_errors, p.stats.lookup_timeouts) == (1, 1)

        def sample(name: str) -> float | None:
            return metrics.registry.get_sample_value(f"llm_d_epp_kv_events_{name}_total", {"producer": "precise"})

        assert sample("lookup_errors") == 1 and sample("lookup_timeouts") == 1
        p.pre_request(req, SchedulingResult("default", {"default": ProfileResult(targets=eps)}))
        await until(lambda: p.stats.speculation_errors == 1, what="the failed speculative write counted")
        assert sample("speculation_errors") == 1
        await p.aclose()


async def test_a_burst_on_a_stalled_redis_waits_no_longer_than_lookup_timeout() -> None:
    """Under asyncio.timeout, some of a burst of lookups on a paused Redis waited the whole pause (redis-py
    held their cancellation until the command completed); past MAX_PENDING_LOOKUPS waiting on Redis, a
    request does not call it at all."""
    from llmepp.plugins.producers.precise_prefix import MAX_PENDING_LOOKUPS

    with RedisServer() as srv:
        config = {"redisConfig": {"address": srv.url, "lookupTimeout": "50ms"}}
        p = _producer(srv.url, indexerConfig={"kvBlockIndexConfig": config})
        eps = [endpoint("127.0.0.150", 8000), endpoint("127.0.0.151", 8000)]
        await p.produce(_request(), eps)  # connected, scripts loaded
        admin = connect(srv.url)
        await admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")

        async def one() -> float:
            req = _request()
            t0 = time.monotonic()
            await p.produce(req, eps)
            assert req.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")].hits == {}
            return time.monotonic() - t0

        took = await asyncio.gather(*(one() for _ in range(250)))
        slow = sorted(t for t in took if t > 0.5)
        assert not slow, f"{len(slow)} of 250 requests waited past lookupTimeout=50ms: up to {slow[-1]:.2f} s"
        assert p.stats.lookup_timeouts == MAX_PENDING_LOOKUPS
        assert p.stats.lookup_skips == 250 - MAX_PENDING_LOOKUPS and p.stats.lookup_errors == 0
        await asyncio.sleep(1.6)  # the pause ends: the abandoned lookups complete and free their slots
        await until(lambda: p._pending_lookups == 0, what="the abandoned lookups done")
        assert await _hits(p, _request(), eps, {})
        assert p.stats.lookup_timeouts == MAX_PENDING_LOOKUPS  # the lookup after the pause answered in time
        await admin.aclose()
        await p.aclose()


async def test_speculation_during_a_stall_leaves_ingestion_its_connections() -> None:
    """Speculative writes (one per routed target, each holding a pooled connection up to 1 s) are capped as
    lookups are: a 0.8 s Redis stall at ~200 routed requests/s must not take all of redis-py's 100 connections,
    or a KV-event write arriving meanwhile (built to wait out a stall) fails at once and the pod's subscriber
    restarts, dropping its chains."""
    from llmepp.plugins.producers.precise_prefix import MAX_PENDING_SPECULATIONS

    with RedisServer() as srv:
        p = _producer(srv.url, speculativeTTL="30s")
        eps = [endpoint(f"127.0.0.{160 + i}", 8000) for i in range(4)]
        await p.produce(_request(), eps)  # connected, scripts loaded
        admin = connect(srv.url)
        await admin.execute_command("CLIENT", "PAUSE", 800, "ALL")

        async def route(i: int) -> None:
            req = _request()
            await p.produce(req, eps)  # no prefix data (the lookup times out or is skipped)
            p.pre_request(req, SchedulingResult("default", {"default": ProfileResult(targets=[eps[i % 4]])}))

        routed = [asyncio.get_running_loop().create_task(route(i)) for i in range(120)]
        for task in routed:
            await asyncio.sleep(0.005)
            assert not task.done() or task.exception() is None
        chains = SourceChains(4, p.seed, p.tiers, 1000)
        delta = Delta()
        chains.stored(BlockStored([1], None, [1, 2, 3, 4], 4), "m", delta)
        await p.redis_store.write(eps[0].hostport, chains, 1.0, 0, delta)  # waits out the stall, no error
        await asyncio.gather(*routed)
        assert p.stats.speculation_skips > 0
        assert len(p._tasks) <= MAX_PENDING_SPECULATIONS
        await admin.aclose()
        await p.aclose()


async def test_every_key_a_pod_leaves_behind_expires(server: RedisServer, client: aioredis.Redis) -> None:
    """`ttl` bounds the garbage of pods that are gone. Two leaks: a removal that deleted a block's last
    holder (HDEL empties the hash, Redis deletes it) recreated it for the last-holder mark without an
    expiry, so every evicted block stayed for good; and a pod's stream position and chain state
    (`src:`/`eng:`, one packed entry per engine block) had no expiry at all."""
    store = RedisStore(client, TIERS, ttl=60.0)
    pod = "127.0.0.179:8000"
    chains = SourceChains(4, 0, TIERS, 100)
    delta = Delta()
    chains.stored(BlockStored([1, 2], None, TOKENS[:8], 4), "m", delta)
    await store.write(pod, chains, 1.0, 0, delta)
    delta = Delta()
    chains.removed(BlockRemoved([2]), delta)
    await store.write(pod, chains, 2.0, 1, delta)
    keys = [k async for k in client.scan_iter("epp:kv:*")]
    assert {k.decode().split(":")[2] for k in keys} == {"b", "src", "eng", "gen"}
    assert len(keys) == 5
    for k in keys:
        assert 0 < await client.pttl(k) <= 60_000, k
    removed = f"epp:kv:b:{delta.keys[0]:016x}"
    assert await client.hgetall(removed) == {b"l|": pod.encode()}


async def test_a_re_reported_block_refreshes_its_expiry(server: RedisServer, client: aioredis.Redis) -> None:
    """vLLM >= 0.33 re-reports the blocks a request reuses: a prefix in constant use must not drop out of
    the shared index `ttl` after it was first stored (the chains swallowed the re-report)."""
    store = RedisStore(client, TIERS, ttl=60.0)
    pod = "127.0.0.179:8000"
    chains = SourceChains(4, 0, TIERS, 100)
    delta = Delta()
    chains.stored(BlockStored([1, 2], None, TOKENS[:8], 4), "m", delta)
    await store.write(pod, chains, 1.0, 0, delta)
    blocks = [f"epp:kv:b:{k:016x}" for k in delta.keys]
    for k in blocks:
        await client.pexpire(k, 1_000)  # most of the ttl has passed
    delta = Delta()
    chains.stored(BlockStored([1, 2], None, TOKENS[:8], 4), "m", delta)  # reused: re-reported
    await store.write(pod, chains, 2.0, 1, delta)
    for k in blocks:
        assert await client.pttl(k) > 50_000, k
    keys = block_keys(tokens_to_bytes(TOKENS[:8]), 4, root_key("m"))
    assert (await store.lookup(keys, [pod])).lengths == {pod: 2}


async def test_a_lookup_reads_only_its_candidates_generations(server: RedisServer, client: aioredis.Redis) -> None:
    """Every pod that ever cleared its cache or restarted keeps a field in `gen` (pods come and go, the
    hash only grows); each lookup read the whole hash (HGETALL) inside Redis, on the request path."""
    store = RedisStore(client, TIERS, ttl=60.0)
    await client.hset("epp:kv:gen", mapping={f"10.0.{i // 250}.{i % 250}:8000": 1 for i in range(5_000)})
    pod = "127.0.0.179:8000"
    chains = SourceChains(4, 0, TIERS, 100)
    delta = Delta()
    chains.stored(BlockStored([1, 2], None, TOKENS[:8], 4), "m", delta)
    await store.write(pod, chains, 1.0, 0, delta)
    delta = Delta()
    chains.clear(delta)
    chains.stored(BlockStored([1], None, TOKENS[:4], 4), "m", delta)
    await store.write(pod, chains, 2.0, 1, delta)  # gen 1 for the pod
    keys = block_keys(tokens_to_bytes(TOKENS[:8]), 4, root_key("m"))
    await client.config_resetstat()
    assert (await store.lookup(keys, [pod, "10.0.0.1:8000"])).lengths == {pod: 1}
    stats = await client.info("commandstats")
    assert "cmdstat_hgetall" not in stats, stats["cmdstat_hgetall"]


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("redis://10.0.0.1:6379/2", "redis://10.0.0.1:6379/2"),
        ("10.0.0.1:6379", "redis://10.0.0.1:6379"),
        ("valkey://redis:6379", "redis://redis:6379"),
        ("valkeys://:pw@redis:6380", "rediss://:pw@redis:6380"),
        ("/run/redis/redis.sock", "unix:///run/redis/redis.sock"),
        ("redis://[fd00::1]:6379", "redis://[fd00::1]:6379"),
    ],
)
def test_redis_addresses_llm_d_accepts_become_urls(address: str, url: str) -> None:
    from llmepp.kvevents.redis_index import redis_url

    assert redis_url(address) == url


@pytest.mark.parametrize("kind", ["redis-inflight-load-producer", "precise-prefix-cache-producer"])
@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", "empty"),
        ("redis://127.0.0.1:6379/abc", "the database after the host must be a number"),  # redis-py: db 0
        ("redis:///var/run/redis.sock", "names no host"),  # redis-py: localhost:6379
        ("http://127.0.0.1:6379", "scheme 'http'"),
        ("redis://127.0.0.1:99999", "the port must be a number"),
    ],
)
def test_an_address_redis_would_read_as_another_is_a_start_up_error_naming_the_field(
    kind: str, address: str, problem: str
) -> None:
    params: dict[str, object] = {"redisConfig": {"address": address}}
    field = "redisConfig.address"
    if kind == "precise-prefix-cache-producer":
        params = {"indexerConfig": {"kvBlockIndexConfig": params}}
        field = "indexerConfig.kvBlockIndexConfig.redisConfig.address"
    with pytest.raises(ConfigError, match=f"{field}: .*{problem}"):
        registry.build(kind, "p", params)


async def test_a_new_pod_at_a_departed_pods_address_inherits_none_of_its_entries(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """Kubernetes reuses pod IPs. The departed pod's position expired with `ttl`, but its field stays in a
    key another pod keeps storing; the new pod's first batch must start a generation that field is not of."""
    store = RedisStore(client, TIERS, ttl=0.3)
    old, other = "10.0.0.1:8000", "10.0.0.2:8000"
    shared = Delta()
    SourceChains(4, 0, TIERS, 100).stored(BlockStored([1, 2], None, TOKENS[:8], 4), "m", shared)
    await store.write(old, SourceChains(4, 0, TIERS, 100), 1.0, 0, shared)
    for seq in range(6):  # the other pod keeps the shared prefix's keys alive past `ttl`
        await asyncio.sleep(0.1)
        await store.write(other, SourceChains(4, 0, TIERS, 100), 1.0 + seq, seq, shared)
    assert not await client.exists(f"epp:kv:src:{old}")
    fresh = Delta()
    SourceChains(4, 0, TIERS, 100).stored(BlockStored([91], None, list(range(900, 904)), 4), "m", fresh)
    await store.write(old, SourceChains(4, 0, TIERS, 100), 100.0, 0, fresh)  # the new pod's first batch
    keys = block_keys(tokens_to_bytes(TOKENS[:8]), 4, root_key("m"))
    assert (await store.lookup(keys, [old, other])).lengths == {other: 2}


async def test_a_redis_restarted_empty_is_refilled_from_the_replicas_state_without_a_replay() -> None:
    """The request path's lookups meet the dead connections first, so the next batch's write reaches the
    empty Redis and succeeds: it must not leave the pod with only that batch's blocks."""
    srv = RedisServer().start()
    host = "127.0.0.184"
    try:
        async with TestPublisher(host) as pub:
            client = connect(srv.url)
            store = RedisStore(client, TIERS, ttl=60.0)
            stats = KVEventStats()
            pool = SubscriberPool(
                PoolOptions(socket_port=pub.port), store, lambda: SourceChains(4, 0, TIERS, 100_000), stats
            )
            pod = endpoint(host, 8000).hostport
            pool.endpoint_added(endpoint(host, 8000))
            await asyncio.sleep(0.3)
            await pub.publish([chain(0, 3)])

            async def matched() -> int:
                keys = block_keys(tokens_to_bytes(TOKENS), 4, root_key("m"))
                try:
                    return (await store.lookup(keys, [pod])).lengths.get(pod, 0)
                except Exception:
                    return -1

            await eventually(lambda: _eq(matched(), 3))
            port = srv.port
            srv.stop()
            srv = RedisServer(port=port).start()
            for _ in range(3):
                await matched()  # requests arrive: they find the dead connections
            await pub.publish([chain(3, 5)])
            await eventually(lambda: _eq(matched(), 5))
            assert stats.restarts == 0 and stats.lost_batches == 0
            await pool.aclose()
            await client.aclose()
    finally:
        srv.stop()


class _CountingProxy:
    """A TCP proxy in front of Redis counting the client's writes (its round trips, one command or pipeline each)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writes = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await r.read(1 << 20):
                    self.writes += count
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False))


async def test_a_batch_is_looked_up_in_one_round_trip(server: RedisServer, client: object) -> None:
    """README: lookups are one script call on the request path within `lookupTimeout`. A batch's prompts are looked
    up each from its root but in one pipelined round trip under that one deadline (one call after the other, a
    batch of 20 prompts waited 20 round trips, past the deadline and the director's producer budget)."""
    proxy = _CountingProxy(int(server.url.rsplit(":", 1)[1]))
    p = _producer(await proxy.start())
    eps = [endpoint("127.0.0.180", 8000), endpoint("127.0.0.181", 8000)]

    def request(prompts: list[list[int]]) -> InferenceRequest:
        req = _request()
        req.data[TOKENIZED_PROMPT] = TokenizedPrompt.joined([tokens_to_bytes(t) for t in prompts], "hf")
        return req

    try:
        await p.produce(request([list(range(100, 132))]), eps)  # connected, the script loaded
        before = proxy.writes
        batch = request([list(range(1000 * i, 1000 * i + 32)) for i in range(20)])
        await p.produce(batch, eps)
        assert batch.data[scoped(PREFIX_CACHE_MATCH_INFO, "precise")].total_blocks == 20 * 8
        assert p.stats.lookup_timeouts == 0 and p.stats.lookup_errors == 0
        # One pipeline (the client may write it in more than one piece), not a round trip per prompt.
        assert proxy.writes - before <= 2, f"a batch of 20 prompts took {proxy.writes - before} writes to Redis"
    finally:
        await p.aclose()
        assert proxy.server is not None
        proxy.server.close()


async def test_with_ttl_off_a_real_entry_outlives_the_speculation_that_created_its_key(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """`ttl: 0` is no expiry, but a key a speculative entry created carries that entry's short expiry, and the
    pod's real BlockStored left it there: the entry vanished with the speculation while the pod held the block."""
    store = RedisStore(client, TIERS, ttl=0)
    pod = "127.0.0.181:8000"
    tokens = list(range(300, 308))
    keys = block_keys(tokens_to_bytes(tokens), 4, root_key("m"))
    await store.speculate(pod, keys, 0.1)  # the routed request's prompt, before its events
    chains = SourceChains(4, 0, TIERS, 100)
    delta = Delta()
    chains.stored(BlockStored([1, 2], None, tokens, 4), "m", delta)  # the pod's events confirm it
    await store.write(pod, chains, 1.0, 0, delta)
    await asyncio.sleep(1.5)  # past the speculation's deadline and its 1 s grace
    assert (await store.lookup(keys, [pod])).lengths == {pod: 2}
