"""Two EPP replicas ingesting one pod into the shared Redis index agree with the pod, whichever replica's copy
of a batch lands first (the Lua guard applies the first one; the other is "applied already"). A replica
that missed batches another replica applied (its SUB socket joined late after a restart with a warm Redis
and no replay port, or its queue overflowed) continues from the shared index's state instead of its own
incomplete chains; a restarted replica resumes the removed blocks' kept positions along with the chains, so
stores naming an evicted parent (vLLM does) are keyed alike by every replica.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import redis.asyncio as aioredis
import zmq.asyncio

from llmepp.kvevents.chain import SourceChains, unpack_block
from llmepp.kvevents.ingest import SourceIngest
from llmepp.kvevents.keys import block_keys, root_key, tokens_to_bytes
from llmepp.kvevents.redis_index import RedisStore, connect
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.subscriber import Subscriber, SubscriberOptions
from llmepp.kvevents.tiers import TierTable
from llmepp.kvevents.wire import Message
from llmepp.testing.redis import RedisServer

TIERS = TierTable()
POD = "10.9.0.1:8000"
TOKENS = list(range(500, 500 + 6 * 4))  # six 4-token blocks
TOPIC = b"kv@10.9.0.1@m"


def stored(first: int, last: int) -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": [7000 + i for i in range(first, last)],
        "parent_block_hash": 7000 + first - 1 if first else None,
        "token_ids": TOKENS[4 * first : 4 * last],
        "block_size": 4,
        "medium": "GPU",
    }


def removed(*blocks: int) -> dict:
    return {"type": "BlockRemoved", "block_hashes": [7000 + b for b in blocks], "medium": "GPU"}


def msg(seq: int, *events: dict) -> Message:
    return Message(TOPIC, seq, msgpack.packb([time.time(), list(events), 0], use_bin_type=True))


class Replica:
    """One EPP's ingestion of the pod, fed message by message (as the pool's task does)."""

    def __init__(self, url: str) -> None:
        self.client = connect(url)
        self.store = RedisStore(self.client, TIERS, ttl=60.0)
        self.stats = KVEventStats()
        self.chains = SourceChains(4, 0, TIERS, 100_000)
        self.sub: Subscriber | None = None

    async def start(self) -> None:  # SubscriberPool._run: resume from the shared index, then subscribe
        resume = await self.store.resume(POD, self.chains)
        self.sub = Subscriber(
            POD,
            "tcp://127.0.0.1:1",
            "",
            SourceIngest(POD, self.chains, self.store, self.stats),
            options=SubscriberOptions(),
            stats=self.stats,
            replay_slots=asyncio.Semaphore(1),
            context=zmq.asyncio.Context.instance(),
            resume=resume,
        )

    async def deliver(self, m: Message) -> None:
        assert self.sub is not None
        await self.sub.handle(m)

    async def matched(self) -> int:
        keys = block_keys(tokens_to_bytes(TOKENS), 4, root_key("m"))
        return (await self.store.lookup(keys, [POD])).lengths.get(POD, 0)


async def _two_replicas(server: RedisServer) -> tuple[Replica, Replica]:
    a = Replica(server.url)
    await a.start()
    await a.deliver(msg(0, stored(0, 2)))  # blocks 0-1
    # B restarts (rolling update) with a warm Redis: it resumes at seq 1 with blocks 0-1 ...
    b = Replica(server.url)
    await b.start()
    # ... but batch 1 is published before its SUB socket has joined: only A receives it.
    await a.deliver(msg(1, stored(2, 4)))  # blocks 2-3
    assert await a.matched() == 4
    return a, b


async def test_a_replica_that_missed_a_batch_does_not_drop_the_next_stores_from_the_shared_index(
    server: RedisServer, client: aioredis.Redis
) -> None:
    a, b = await _two_replicas(server)
    m2 = msg(2, stored(4, 6))  # blocks 4-5, chained to block 3
    await b.deliver(m2)  # B's copy is first (a coin toss between replicas)
    await a.deliver(m2)  # A's correct copy: "applied already"
    # Every batch reached some replica, and A holds the full chain: the pod holds all 6 blocks.
    got = await a.matched()
    await a.client.aclose()
    await b.client.aclose()
    assert got == 6, f"shared index credits the pod with {got} of its 6 blocks"
    assert b.stats.caught_up_batches == 1 and b.stats.lost_batches == 0


async def test_a_replica_that_missed_a_batch_does_not_keep_evicted_blocks_in_the_shared_index(
    server: RedisServer, client: aioredis.Redis
) -> None:
    a, b = await _two_replicas(server)
    m2 = msg(2, removed(3, 2))  # the engine evicts blocks 3 and 2 (tail first)
    await b.deliver(m2)
    await a.deliver(m2)
    got = await a.matched()
    saved = [unpack_block(v) for v in (await client.hgetall(f"epp:kv:eng:{POD}")).values() if isinstance(v, bytes)]
    await a.client.aclose()
    await b.client.aclose()
    # The pod now holds blocks 0-1 only; the shared index must not route block 2-3 prompts to it for `ttl`.
    assert got == 2
    assert sum(1 for block in saved if block.tiers) == 2  # held; the removed ones' positions are kept (tiers 0)
    assert b.stats.caught_up_batches == 1 and b.stats.lost_batches == 0


async def _ghost_scenario(server: RedisServer, restarted_replica_first: bool) -> int:
    """No batch is lost: B is simply an EPP restarted (rolling update) with a warm Redis, in sync."""
    a = Replica(server.url)
    await a.start()
    await a.deliver(msg(0, stored(0, 2)))
    await a.deliver(msg(1, stored(2, 4)))
    await a.deliver(msg(2, removed(3)))  # block 3's cached copy is evicted ...
    b = Replica(server.url)
    await b.start()  # resumes at seq 3 from Redis's chain state: in sync, nothing missed
    # ... while a running request holds its own copy of it and stores its next blocks after it
    # (chain.py: vLLM names removed parents), then block 3 is cached again.
    for seq, events in ((3, [stored(4, 6)]), (4, [stored(3, 4)])):
        m = msg(seq, *events)
        first, second = (b, a) if restarted_replica_first else (a, b)
        await first.deliver(m)
        await second.deliver(m)
    got = await a.matched()
    await a.client.aclose()
    await b.client.aclose()
    return got


async def test_the_replica_that_ran_throughout_indexes_all_six_blocks(
    server: RedisServer, client: aioredis.Redis
) -> None:
    assert await _ghost_scenario(server, restarted_replica_first=False) == 6


async def test_a_restarted_replica_agrees_with_the_others_on_stores_after_an_evicted_parent(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """The restarted replica's copy of a batch storing after an evicted parent is keyed as the other's is."""
    assert await _ghost_scenario(server, restarted_replica_first=True) == 6


async def test_a_replica_waits_a_moment_for_the_batch_another_one_is_applying(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """B missed batch 1 and receives batch 2 before A has written batch 1: B waits for it (CATCH_UP_WAIT)
    rather than writing batch 2 onto chains without it (which A's batch 1 would then find applied past)."""
    a = Replica(server.url)
    await a.start()
    await a.deliver(msg(0, stored(0, 2)))
    b = Replica(server.url)
    await b.start()
    m1, m2 = msg(1, stored(2, 4)), msg(2, stored(4, 6))

    async def a_late() -> None:
        await asyncio.sleep(0.05)
        await a.deliver(m1)

    late = asyncio.create_task(a_late())
    await b.deliver(m2)  # B's copy of batch 2 first, after catching up with A's batch 1
    await late
    await a.deliver(m2)
    got = await a.matched()
    await a.client.aclose()
    await b.client.aclose()
    assert got == 6
    assert b.stats.caught_up_batches == 1 and b.stats.lost_batches == 0


async def test_batches_no_replica_has_are_lost_once_the_wait_is_over(
    server: RedisServer, client: aioredis.Redis
) -> None:
    a = Replica(server.url)
    await a.start()
    await a.deliver(msg(0, stored(0, 2)))
    await a.deliver(msg(2, stored(4, 6)))  # batch 1 reached nobody: its successor is an orphan store
    assert a.stats.lost_batches == 1 and a.stats.caught_up_batches == 0
    assert await a.matched() == 2
    await a.client.aclose()


async def _in_sync_with_an_old_process(server: RedisServer) -> tuple[Replica, Replica]:
    """Two replicas that both applied the old vLLM process's four batches (Redis at seq 3, blocks 0-3 held)."""
    a, b = Replica(server.url), Replica(server.url)
    await a.start()
    await b.start()
    for m in (msg(0, stored(0, 2)), msg(1, stored(2, 4)), msg(2, removed(3, 2)), msg(3, stored(2, 4))):
        await a.deliver(m)
        await b.deliver(m)
    return a, b


async def _restart_seen_late(server: RedisServer, late_replica_first: bool) -> int:
    a, b = await _in_sync_with_an_old_process(server)
    assert await a.matched() == 4
    # vLLM restarts (same pod, same address). The new process stores the same prompt again.
    n0, n1, n2 = msg(0, stored(0, 2)), msg(1, stored(2, 4)), msg(2, stored(4, 6))
    await a.deliver(n0)  # A sees the restart at the new process's first batch and applies it
    await a.deliver(n1)
    assert await a.matched() == 4
    # B's SUB socket rejoined the restarted publisher a moment later: its first batch is the new seq 2.
    first, second = (b, a) if late_replica_first else (a, b)
    await first.deliver(n2)
    await second.deliver(n2)
    got = await a.matched()
    await a.client.aclose()
    await b.client.aclose()
    return got


async def test_a_publisher_restart_seen_from_its_start_by_the_first_writer_keeps_every_block(
    server: RedisServer, client: aioredis.Redis
) -> None:
    assert await _restart_seen_late(server, late_replica_first=False) == 6


async def test_a_replica_that_joined_the_restarted_publisher_late_does_not_wipe_its_first_batches(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """A vLLM restart one replica applied is not undone by another that saw the new process only from a later
    batch (its SUB socket rejoined late): that replica continues from the shared state of the same restart
    instead of writing its empty chains (a second clear). Which copy lands first is a coin toss; both orders
    must give the index A's chains hold."""
    got = await _restart_seen_late(server, late_replica_first=True)
    assert got == 6, f"shared index credits the restarted pod with {got} of the 6 blocks it stored"


async def test_a_late_replica_waits_for_the_restart_another_one_is_applying(
    server: RedisServer, client: aioredis.Redis
) -> None:
    """B sees the restarted publisher first at its batch 2 while A is a moment from applying the restart (batches
    0 and 1): B waits for it as for any batch another replica is applying. Before, B checked which stream Redis's
    restart replaced once, before waiting, found none yet, and cleared the pod with its own empty chains: A's
    copies of batches 0 and 1 then counted as applied already and the index lost their blocks."""
    a, b = await _in_sync_with_an_old_process(server)
    n0, n1, n2 = msg(0, stored(0, 2)), msg(1, stored(2, 4)), msg(2, stored(4, 6))

    async def a_late() -> None:
        await asyncio.sleep(0.05)
        await a.deliver(n0)
        await a.deliver(n1)

    late = asyncio.create_task(a_late())
    await b.deliver(n2)
    await late
    await a.deliver(n2)
    got = await a.matched()
    await a.client.aclose()
    await b.client.aclose()
    assert got == 6, f"shared index credits the restarted pod with {got} of the 6 blocks it stored"
    assert b.stats.caught_up_batches == 2, b.stats
