"""A Redis stall shorter than the KV-event write deadline (`RedisStore.write_timeout`, 5 s; resume: 4x that), such
as a failover's CLIENT PAUSE or a slow fork, is waited out: the precise producer's client does not time a command
out sooner, which would restart the pod's subscriber and lose the batches published meanwhile (no replay port)."""

from __future__ import annotations

import asyncio
import time

from llmepp.framework.plugin import registry
from llmepp.kvevents.chain import Delta, SourceChains
from llmepp.kvevents.keys import block_keys, root_key, tokens_to_bytes
from llmepp.kvevents.pool import PoolOptions, SubscriberPool
from llmepp.kvevents.redis_index import connect
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.wire import BlockStored
from llmepp.plugins.producers.precise_prefix import RedisPrecisePrefixCacheProducer
from llmepp.testing.redis import RedisServer

from .publisher import TestPublisher, stored
from .rig import TIERS, endpoint

TOKENS = list(range(300, 300 + 4 * 6))
PAUSE_MS = 3000  # shorter than write_timeout (5 s)


def producer(url: str) -> RedisPrecisePrefixCacheProducer:
    """The store and client as an EPP configures them (indexerConfig.kvBlockIndexConfig.redisConfig)."""
    params = {
        "indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"address": url}}},
        "tokenProcessorConfig": {"blockSizeTokens": 4},
        "kvEventsConfig": {"discoverPods": False},
    }
    p = registry.build("precise-prefix-cache-producer", "precise", params)
    assert isinstance(p, RedisPrecisePrefixCacheProducer)
    return p


def chain(first: int, last: int) -> dict[str, object]:
    return stored([7000 + i for i in range(first, last)], 7000 + first - 1 if first else None,
                  TOKENS[4 * first : 4 * last])  # fmt: skip


async def test_a_write_waits_out_a_stall_shorter_than_write_timeout() -> None:
    with RedisServer() as srv:
        p, admin = producer(srv.url), connect(srv.url)
        client, store = p.redis, p.redis_store  # write_timeout 5 s
        assert store.write_timeout > PAUSE_MS / 1000
        chains = SourceChains(4, 0, TIERS, 100)
        delta = Delta()
        chains.stored(BlockStored([1], None, TOKENS[:4], 4), "m", delta)
        await store.lookup([1], ["p"])  # connected, scripts loaded
        await admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        t0 = time.monotonic()
        try:
            await store.write("10.0.0.1:8000", chains, 1.0, 0, delta)
        except Exception as e:
            raise AssertionError(
                f"the write failed after {time.monotonic() - t0:.1f} s of a {PAUSE_MS / 1000:.0f} s stall "
                f"(write_timeout {store.write_timeout:.0f} s): {e!r}"
            ) from None
        finally:
            await asyncio.sleep(max(0.0, PAUSE_MS / 1000 - (time.monotonic() - t0)))
            await client.aclose()
            await admin.aclose()


async def test_a_short_stall_loses_no_batch_of_a_single_replica() -> None:
    host = "127.0.0.231"
    with RedisServer() as srv:
        async with TestPublisher(host) as pub:
            p, admin = producer(srv.url), connect(srv.url)
            client, store = p.redis, p.redis_store
            stats = KVEventStats()
            pool = SubscriberPool(PoolOptions(socket_port=pub.port), store,
                                  p._new_chains, stats)  # fmt: skip
            pod = endpoint(host, 8000).hostport
            keys = block_keys(tokens_to_bytes(TOKENS), 4, root_key("m", "", p.seed))

            async def matched() -> int:
                return (await store.lookup(keys, [pod])).lengths.get(pod, 0)

            try:
                pool.endpoint_added(endpoint(host, 8000))
                await asyncio.sleep(0.3)
                await pub.publish([chain(0, 2)])
                deadline = time.monotonic() + 5
                while await matched() != 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                await admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
                await pub.publish([chain(2, 3)])  # its write waits on the paused Redis
                await asyncio.sleep(2.5)
                await pub.publish([chain(3, 4)])  # published during the stall: queued on the SUB socket
                await asyncio.sleep(PAUSE_MS / 1000 - 2.5 + 1.5)  # the stall ends; whatever restarts, settles
                await pub.publish([chain(4, 6)])
                await asyncio.sleep(0.5)
                got = await matched()
                assert (got, stats.restarts, stats.lost_batches) == (6, 0, 0), (
                    f"after a {PAUSE_MS / 1000:.0f} s stall: {got} of 6 blocks indexed, "
                    f"{stats.restarts} subscriber restarts, {stats.lost_batches} batches lost"
                )
            finally:
                await pool.aclose()
                await client.aclose()
                await admin.aclose()
