"""Subscriber over real ZeroMQ: gaps and replay (both reply shapes), joining mid-stream, publisher
restarts, AllBlocksCleared, junk on the wire, a silent replay socket, and pool membership."""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack
import pytest
import zmq.asyncio
from helpers import RacingWrite, on_a_punctual_loop, until

from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.kvevents.chain import Delta, SourceChains
from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.ingest import MemoryStore, SourceIngest
from llmepp.kvevents.keys import block_keys, root_key, tokens_to_bytes
from llmepp.kvevents.pool import PoolOptions, SubscriberPool
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.subscriber import Subscriber, SubscriberOptions
from llmepp.kvevents.wire import EventBatch, Message
from llmepp.observability.logging import LogLimiter
from llmepp.testing.ports import free_port, free_port_pair, free_shared_port

from .publisher import CLEARED, TestPublisher, stored
from .rig import TIERS, Rig, endpoint, memory_pool, pool_match

TOKENS = list(range(100, 100 + 4 * 12))  # 12 blocks of 4 tokens


def chain(first: int, last: int, tokens: list[int] = TOKENS, base: int = 1000) -> dict:
    """BlockStored for blocks [first, last) of `tokens` (engine hashes base+i, parent-linked)."""
    hashes = [base + i for i in range(first, last)]
    return stored(hashes, base + first - 1 if first else None, tokens[4 * first : 4 * last])


@pytest.mark.parametrize(("reply_frames", "legacy"), [(3, False), (2, True)])
async def test_gap_is_replayed_before_the_live_batch(reply_frames: int, legacy: bool) -> None:
    host = "127.0.0.150"
    pub = TestPublisher(host, reply_frames=reply_frames, legacy=legacy)
    async with pub, Rig(host, pub.port, pub.replay_port) as rig:
        await pub.publish([chain(0, 2)])
        await pub.publish([chain(2, 4)], drop=True)  # lost on the wire
        await pub.publish([chain(4, 6)])  # its parent is in the lost batch
        # The replay applies the live batch too (the publisher buffered it) before its end marker arrives,
        # so wait for the replay to finish, not only for the blocks.
        await until(lambda: rig.matched(TOKENS) == 6 and rig.stats.replays_ok >= 1, what="6 blocks, replay done")
        assert rig.stats.gaps >= 1 and rig.stats.replays_ok >= 1
        assert 1 in pub.replay_requests or 0 in pub.replay_requests
        assert rig.stats.lost_batches == 0 and rig.chains.stats.orphans == 0
        assert rig.sub.next_seq == 3


async def test_joining_mid_stream_replays_from_zero() -> None:
    host = "127.0.0.151"
    async with TestPublisher(host) as pub:
        for i in range(3):
            await pub.publish([chain(2 * i, 2 * i + 2)])  # nobody listens yet
        async with Rig(host, pub.port, pub.replay_port) as rig:
            await pub.publish([chain(6, 8)])
            await until(lambda: rig.matched(TOKENS) == 8, what="8 blocks")
            assert pub.replay_requests[0] == 0
            # The replay returns everything from 0, the live batch included; each is applied once.
            assert rig.stats.batches == 4 and rig.stats.lost_batches == 0


async def test_publisher_restart_rebuilds_the_source() -> None:
    host = "127.0.0.152"
    other = list(range(900, 900 + 4 * 12))
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port) as rig:
        await pub.publish([chain(0, 3)])
        await pub.publish([chain(3, 5)])
        await until(lambda: rig.matched(TOKENS) == 5, what="first incarnation")
        pub.restart()  # seq back to 0: what the old engine held is gone
        await pub.publish([chain(0, 2, other, base=5000)])
        await until(lambda: rig.matched(other) == 2, what="second incarnation")
        assert rig.matched(TOKENS) == 0
        assert rig.stats.resets == 1 and len(rig.chains) == 2


async def test_restart_seen_mid_stream_replays_the_new_incarnation() -> None:
    host = "127.0.0.153"
    other = list(range(900, 900 + 4 * 12))
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port) as rig:
        for i in range(3):
            await pub.publish([chain(2 * i, 2 * i + 2)])
        await until(lambda: rig.matched(TOKENS) == 6, what="old incarnation")
        pub.restart()
        await pub.publish([chain(0, 1, other, base=5000)], drop=True)
        await pub.publish([chain(1, 3, other, base=5000)])  # seq 1: older number, newer data
        await until(lambda: rig.matched(other) == 3, what="new incarnation incl. replayed seq 0")
        assert rig.matched(TOKENS) == 0 and rig.stats.resets == 1
        assert pub.replay_requests[-1] == 0


async def test_all_blocks_cleared_drops_the_pod() -> None:
    host = "127.0.0.154"
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port) as rig:
        await pub.publish([chain(0, 4)])
        await until(lambda: rig.matched(TOKENS) == 4)
        await pub.publish([CLEARED])
        await until(lambda: rig.matched(TOKENS) == 0, what="cleared")
        assert rig.stats.all_cleared == 1 and len(rig.index) == 0
        await pub.publish([chain(0, 2)])
        await until(lambda: rig.matched(TOKENS) == 2, what="new blocks after the clear")


async def test_junk_is_counted_and_never_fatal() -> None:
    host = "127.0.0.155"
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port) as rig:
        await pub.publish([chain(0, 1)])
        await pub.send_raw([b"kv@pod@m", b"only two frames"])
        await pub.send_raw([b"kv@pod@m", b"\x00\x01", b"short seq"])
        await pub.send_raw([b"kv@pod@m", pub.seq.to_bytes(8, "big"), b"\xc1 not msgpack"])
        pub.seq += 1
        await pub.publish([chain(1, 3)])
        await until(lambda: rig.matched(TOKENS) == 3, what="blocks after the junk")
        assert rig.stats.malformed_frames == 2 and rig.stats.malformed_payloads == 1
        assert rig.stats.lost_batches == 0


async def test_silent_replay_socket_times_out_cools_down_and_keeps_going() -> None:
    host = "127.0.0.156"
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port, replay_idle_timeout=0.3) as rig:
        pub.replay_silent = True
        await pub.publish([chain(0, 2)])
        await until(lambda: rig.matched(TOKENS) == 2)
        await pub.publish([chain(2, 4)], drop=True)
        started = time.monotonic()
        await pub.publish([chain(4, 6)])  # gap → replay → silence
        await until(lambda: rig.stats.replays_failed == 1, what="replay timeout")
        assert time.monotonic() - started < 3.0
        await pub.publish([chain(6, 7)], drop=True)
        await pub.publish([chain(0, 3, base=1000)])  # re-stored chain from the root: indexable again
        await until(lambda: rig.stats.gaps == 2, what="second gap")
        assert len(pub.replay_requests) == 1  # cooling down: no second replay
        assert rig.stats.lost_batches == 2
        assert rig.chains.stats.orphans == 1  # the live batch whose parent was lost
        assert rig.matched(TOKENS) == 3


async def test_no_replay_endpoint_counts_the_gap() -> None:
    host = "127.0.0.157"
    async with TestPublisher(host) as pub, Rig(host, pub.port, None) as rig:
        await pub.publish([chain(0, 2)])
        await pub.publish([chain(2, 4)], drop=True)
        await pub.publish([chain(4, 6)])
        await until(lambda: rig.stats.gaps == 1)
        await until(lambda: rig.sub.next_seq == 3)
        assert rig.matched(TOKENS) == 2 and pub.replay_requests == []
        assert rig.stats.lost_batches == 1


async def test_pool_follows_endpoints_and_a_dead_publisher_costs_nothing() -> None:
    async def measure() -> None:
        host, dead = "127.0.0.158", "127.0.0.159"
        async with TestPublisher(host) as pub:
            pool, index = memory_pool(pub.port, pub.replay_port, block_tokens=4)
            alive_ep, dead_ep = endpoint(host, 8000), endpoint(dead, 8000)
            pool.endpoint_added(alive_ep)
            pool.endpoint_added(dead_ep)  # nothing listens there
            await asyncio.sleep(0.3)
            await pub.publish([chain(0, 3)])
            await until(lambda: len(index) == 3, what="3 keys indexed")
            assert index.bit_of(alive_ep.hostport) != 0
            # The event loop stays responsive: a 10 ms sleep is not delayed by the dead subscriber.
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            assert time.monotonic() - t0 < 0.1
            assert len(pool) == 2
            pool.endpoint_removed(alive_ep)
            await until(lambda: len(index) == 0 and index.bit_of(alive_ep.hostport) == 0, what="pod forgotten")
            pool.endpoint_removed(dead_ep)
            assert len(pool) == 0
            await pool.aclose()

    await on_a_punctual_loop(measure)


class _SlowForgetStore(MemoryStore):
    """The first forget waits for `release` (a shared index's round trip); logs forgets and resumes."""

    def __init__(self) -> None:
        super().__init__(MemoryIndex(1_000_000, 10, TIERS))
        self.release = asyncio.Event()
        self.log: list[str] = []

    async def forget(self, pod: str, chains: SourceChains) -> None:
        first = "forget" not in " ".join(self.log)
        self.log.append("forget started")
        if first:
            await self.release.wait()
        await super().forget(pod, chains)
        self.log.append("forget done")

    async def resume(self, pod: str, chains: SourceChains) -> None:
        self.log.append("resume")
        return None


async def test_a_pod_removed_and_re_added_twice_waits_for_every_earlier_forget() -> None:
    """remove, add, remove, add in quick succession: the last source may only start once the first
    removal's forget is done. It waited for the latest stop only, so a slow first forget (a shared index)
    could land after the new source had begun, erasing what it had applied."""
    store = _SlowForgetStore()
    pool = SubscriberPool(
        PoolOptions(socket_port=free_port("127.0.0.160")),
        store,
        lambda: SourceChains(16, 0, TIERS, 1_000_000),
        KVEventStats(),
    )
    ep = endpoint("127.0.0.160", 8000)
    pool.endpoint_added(ep)
    await until(lambda: store.log == ["resume"], what="first source started")
    pool.endpoint_removed(ep)
    pool.endpoint_added(ep)
    pool.endpoint_removed(ep)
    pool.endpoint_added(ep)
    await asyncio.sleep(0.1)  # the second stop and the last source: nothing may run past the first forget
    assert store.log.count("resume") == 1, store.log
    store.release.set()
    await until(lambda: store.log.count("resume") == 2, what="the last source started")
    assert store.log == ["resume", "forget started", "forget done", "forget started", "forget done", "resume"]
    await pool.aclose()


async def test_a_data_parallel_rank_is_read_from_its_own_ports() -> None:
    """vLLM publishes rank r's events on socketPort + r and replays them on replaySocketPort + r; an
    endpoint of rank r (its target port's position) is subscribed there, and what that rank stores is
    attributed to that endpoint alone."""
    host = "127.0.0.166"
    base, replay = free_port_pair(host), free_port_pair(host)
    async with (
        TestPublisher(host, port=base, replay_port=replay) as rank0,
        TestPublisher(host, port=base + 1, replay_port=replay + 1) as rank1,
    ):
        await rank1.publish([chain(0, 2)])  # before anyone subscribed: only a replay can bring it
        pool, index = memory_pool(base, replay, block_tokens=4)
        ep0 = Endpoint(EndpointSpec(name="pod-rank-0", address=host, port=8000))
        ep1 = Endpoint(EndpointSpec(name="pod-rank-1", address=host, port=8001, rank=1))
        pool.endpoint_added(ep0)
        pool.endpoint_added(ep1)
        await asyncio.sleep(0.3)
        await rank1.publish([chain(2, 3)])  # joining mid-stream: replay from 0 on rank 1's replay port
        await until(lambda: len(index) == 3, what="rank 1's blocks indexed")
        assert rank1.replay_requests == [0] and rank0.replay_requests == []
        keys = block_keys(tokens_to_bytes(TOKENS[:12]), 4, root_key("m"))
        assert all(index.holders(k) == index.bit_of(ep1.hostport) for k in keys)
        await rank0.publish([chain(0, 1)])
        both = index.bit_of(ep0.hostport) | index.bit_of(ep1.hostport)
        await until(lambda: index.holders(keys[0]) == both, what="rank 0's block attributed to rank 0")
        await pool.aclose()


async def test_a_rank_whose_port_would_exceed_65535_is_not_subscribed(caplog: pytest.LogCaptureFixture) -> None:
    pool, _ = memory_pool(65_500)
    pool.endpoint_added(Endpoint(EndpointSpec(name="r", address="127.0.0.167", port=8000, rank=100)))
    await asyncio.sleep(0.3)
    assert pool.stats.restarts == 0 and pool.subscriber("127.0.0.167:8000") is None
    assert "beyond 65535: not subscribed" in caplog.text
    await pool.aclose()


async def test_global_socket_mode_sorts_messages_by_topic_and_replays_per_pod() -> None:
    """kvEventsConfig.zmqEndpoint: the EPP binds one SUB socket and the pods connect to it; each
    message belongs to the pod its topic names (ip:port, name or IP; ranks by the batch's rank);
    gaps are replayed from that pod's own replay socket; unknown pods are counted and skipped."""
    a, b = "127.0.0.168", "127.0.0.169"
    bind_port, replay = free_port("127.0.0.1"), free_shared_port([a, b])
    bound = f"tcp://127.0.0.1:{bind_port}"
    pool, index = memory_pool(5557, replay, block_tokens=4, bind=bound)
    ep_a, ep_b = endpoint(a, 8000, name="pod-a"), endpoint(b, 8000, name="pod-b")
    pool.endpoint_added(ep_a)
    pool.endpoint_added(ep_b)
    async with (
        TestPublisher(a, connect=bound, replay_port=replay, topic=f"kv@{a}@m") as pub_a,
        TestPublisher(b, connect=bound, replay_port=replay, topic="kv@pod-b@m") as pub_b,
        TestPublisher("127.0.0.170", connect=bound, topic="kv@10.9.9.9@m") as stranger,
    ):
        await asyncio.sleep(0.3)  # the connects complete
        await pub_a.publish([chain(0, 3)])
        await pub_b.publish([chain(0, 1)])
        await stranger.publish([chain(0, 2)])
        await until(lambda: pool.stats.batches == 2 and pool.stats.unknown_sources == 1, what="both pods' batches")
        keys = block_keys(tokens_to_bytes(TOKENS[:12]), 4, root_key("m"))
        bits_a, bits_b = index.bit_of(ep_a.hostport), index.bit_of(ep_b.hostport)
        assert [index.holders(k) for k in keys] == [bits_a | bits_b, bits_a, bits_a]
        # A batch lost on the way: the next one reveals the gap, pod b's replay socket fills it.
        await pub_b.publish([chain(1, 2)], drop=True)
        await pub_b.publish([chain(2, 3)])
        await until(lambda: all(index.holders(k) == bits_a | bits_b for k in keys), what="pod b replayed")
        assert pub_b.replay_requests == [0] and pub_a.replay_requests == []  # from the anchor, seq 0
        assert pool.stats.lost_batches == 0
    await pool.aclose()


async def test_global_socket_mode_tells_ranks_on_one_ip_apart_by_the_batch_rank() -> None:
    host = "127.0.0.171"
    bound = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    pool, index = memory_pool(5557, block_tokens=4, bind=bound)
    ep0 = Endpoint(EndpointSpec(name="p-rank-0", address=host, port=8000))
    ep1 = Endpoint(EndpointSpec(name="p-rank-1", address=host, port=8001, rank=1))
    pool.endpoint_added(ep0)
    pool.endpoint_added(ep1)
    async with TestPublisher(host, connect=bound, topic=f"kv@{host}@m", rank=1) as rank1:
        await asyncio.sleep(0.3)
        await rank1.publish([chain(0, 2)])
        await until(lambda: pool.stats.batches == 1, what="rank 1's batch")
        keys = block_keys(tokens_to_bytes(TOKENS[:8]), 4, root_key("m"))
        assert [index.holders(k) for k in keys] == [index.bit_of(ep1.hostport)] * 2
    await pool.aclose()


async def test_ipv6_pods_are_subscribed_and_replayed_over_ipv6() -> None:
    """An IPv6 pod's publisher is `tcp://[::1]:<port>`: the SUB and the replay DEALER need zmq.IPV6 (without
    it the connect silently never completes). Its events are indexed under the bracketed `[::1]:8000`."""
    host = "::1"
    async with TestPublisher(host) as pub:
        await pub.publish([chain(0, 2)])  # before anyone subscribed: only a replay brings it
        pool, index = memory_pool(pub.port, pub.replay_port, block_tokens=4)
        ep = endpoint(host, 8000)
        assert ep.hostport == "[::1]:8000"
        pool.endpoint_added(ep)
        await asyncio.sleep(0.3)
        await pub.publish([chain(2, 3)])
        await until(lambda: len(index) == 3, what="the replayed and the live blocks indexed")
        assert pub.replay_requests == [0]
        subscriber = pool.subscriber("[::1]:8000")
        assert subscriber is not None and subscriber.endpoint == f"tcp://[::1]:{pub.port}"
        await pool.aclose()


async def test_global_socket_mode_binds_an_ipv6_endpoint() -> None:
    """kvEventsConfig.zmqEndpoint `tcp://[::1]:<port>`: bound with zmq.IPV6; an IPv6 pod connects to it and
    its topic names it by IP."""
    bound = f"tcp://[::1]:{free_port('::1')}"
    pool, index = memory_pool(5557, block_tokens=4, bind=bound)
    ep = endpoint("::1", 8000, name="pod-v6")
    pool.endpoint_added(ep)
    async with TestPublisher("::1", connect=bound, topic="kv@::1@m") as pub:
        await asyncio.sleep(0.3)  # the connect completes
        await pub.publish([chain(0, 2)])
        await until(lambda: pool.stats.batches == 1, what="the IPv6 pod's batch")
        keys = block_keys(tokens_to_bytes(TOKENS[:8]), 4, root_key("m"))
        assert [index.holders(k) for k in keys] == [index.bit_of("[::1]:8000")] * 2
    await pool.aclose()


async def test_an_event_no_engine_sends_is_skipped_not_fatal_to_the_source() -> None:
    """A token id beyond uint32 used to raise while keying: the pool restarted the source (forgetting
    all it held) and, with a replay socket, replayed the same batch from 0 and failed again, forever."""
    host = "127.0.0.168"
    async with TestPublisher(host) as pub:
        pool, index = memory_pool(pub.port, pub.replay_port, block_tokens=4)
        pool.endpoint_added(endpoint(host, 8000))
        await asyncio.sleep(0.3)
        await pub.publish([chain(0, 3)])
        await until(lambda: len(index) == 3, what="3 keys indexed")
        await pub.publish([stored([5555], None, [2**32] * 4), chain(3, 4)])
        await pub.publish([chain(4, 5)])
        await until(lambda: len(index) == 5, what="the batches around the bad event applied")
        assert pool.stats.restarts == 0 and pool.stats.skipped_events == 1
        await pool.aclose()


def test_rate_limited_logging_keeps_a_bounded_number_of_keys() -> None:
    """Keys name pods (which come and go) and, in global-socket mode, the topics of unknown publishers
    (anything that can connect chooses them): each was kept for good."""
    limiter = LogLimiter(logging.getLogger("test"), interval=10.0)
    for i in range(10_000):
        limiter.warning(f"unknown:{i}", "topic %d", i)
    assert len(limiter._last) <= 1024


async def test_a_source_remembers_a_bounded_number_of_topics() -> None:
    index = MemoryIndex(1000, 10, TIERS)
    ingest = SourceIngest("p:1", SourceChains(4, 0, TIERS, 1000), MemoryStore(index), KVEventStats())
    for i in range(5_000):
        await ingest.on_batch(Message(f"kv@p@model-{i}".encode(), i, b""), EventBatch(1.0 + i, [], 0))
    assert len(ingest._models) <= 1024


async def test_a_batch_nested_too_deep_is_counted_not_fatal_to_the_source() -> None:
    """msgspec's RecursionError escaped the decoder: the source's task died, the pool restarted it
    (forgetting all it held) and the replay from 0 brought the same batch back, forever."""
    host = "127.0.0.172"
    async with TestPublisher(host) as pub:
        pool, index = memory_pool(pub.port, pub.replay_port, block_tokens=4)
        pool.endpoint_added(endpoint(host, 8000))
        await asyncio.sleep(0.3)
        await pub.publish([chain(0, 3)])
        await until(lambda: len(index) == 3, what="3 keys indexed")
        deep = b"\x93" + msgpack.packb(time.time()) + b"\x91" + b"\x91" * 5_000 + b"\x01" + msgpack.packb(0)
        await pub.send_raw([pub.topic, pub.seq.to_bytes(8, "big"), deep])
        pub.buffer.append((pub.seq, deep))
        pub.seq += 1
        await pub.publish([chain(3, 4)])
        await until(lambda: pool.stats.malformed_payloads == 1 and len(index) == 4, what="the next batch applied")
        assert pool.stats.restarts == 0 and pool.stats.resets == 0 and pub.replay_requests == []
        await pool.aclose()


async def test_a_message_over_the_size_limit_is_dropped_and_the_source_reconnects() -> None:
    """ZeroMQ drops a connection that brings a message over MAXMSGSIZE and, unlike any other drop, never
    retries it: the subscriber dials again itself, and the gap the lost batch leaves is replayed."""
    host = "127.0.0.173"
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port, max_message_bytes=4096) as rig:
        await pub.publish([chain(0, 2)])
        await until(lambda: rig.matched(TOKENS) == 2, what="first batch")
        huge = stored([7000], None, list(range(3000)), block_size=3000)  # ~6 KB of msgpack
        await pub.publish([huge])
        await until(lambda: rig.stats.redials == 1, what="the dropped connection dialled again")
        assert rig.stats.messages == 1  # the oversized message never reached the subscriber
        await asyncio.sleep(0.3)  # slow joiner: the subscription reaches the publisher again
        await pub.publish([chain(2, 4)])
        # The replay of the gap meets the oversized batch too: that reply is dropped the same way, the
        # replay times out and the batch is counted lost; the live batch after it is applied.
        await until(lambda: rig.matched(TOKENS) == 4, what="the batch after the gap")
        assert rig.stats.lost_batches == 1 and rig.stats.replays_failed == 1


async def test_a_publisher_blip_is_left_to_zeromq_to_reconnect() -> None:
    host = "127.0.0.182"
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port) as rig:
        await pub.publish([chain(0, 2)])
        await until(lambda: rig.matched(TOKENS) == 2, what="first batch")
        await pub.drop_connections()
        await asyncio.sleep(1.0)  # longer than the subscriber waits for ZeroMQ's own retry
        await pub.publish([chain(2, 4)])
        await until(lambda: rig.matched(TOKENS) == 4, what="the batch after the blip")
        assert rig.stats.redials == 0 and rig.stats.lost_batches == 0


async def test_global_socket_mode_drops_an_oversized_message_and_the_pod_connects_again() -> None:
    host = "127.0.0.183"
    bound = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    options = PoolOptions(socket_port=5557, bind_endpoint=bound, subscriber=SubscriberOptions(max_message_bytes=4096))
    index = MemoryIndex(1_000_000, 10, TIERS)
    pool = SubscriberPool(options, MemoryStore(index), lambda: SourceChains(4, 0, TIERS, 1_000_000), KVEventStats())
    pool.endpoint_added(endpoint(host, 8000))
    async with TestPublisher(host, connect=bound, topic=f"kv@{host}@m") as pub:
        await asyncio.sleep(0.3)  # the connect completes
        await pub.publish([chain(0, 2)])
        await until(lambda: pool.stats.batches == 1, what="first batch")
        await pub.publish([stored([7000], None, list(range(3000)), block_size=3000)])
        await asyncio.sleep(0.5)  # the pod's PUB socket sees its connection closed and dials again
        await pub.publish([chain(2, 4)])
        await until(lambda: pool.stats.batches == 2, what="the batch after the oversized one")
        assert pool.stats.messages == 2 and pool.stats.lost_batches == 1  # no replay socket configured
    await pool.aclose()


class _StallsOnce(MemoryStore):
    """A store whose write of batch `seq` fails once with the write deadline's TimeoutError (a stalled Redis)."""

    def __init__(self, index: MemoryIndex, seq: int) -> None:
        super().__init__(index)
        self.seq = seq
        self.failed = False

    async def write(self, pod, chains, ts, seq, delta: Delta, replaces=None) -> None:  # type: ignore[no-untyped-def]
        if seq == self.seq and not self.failed:
            self.failed = True
            raise TimeoutError
        await super().write(pod, chains, ts, seq, delta, replaces)


async def test_a_store_write_timing_out_during_a_replay_restarts_the_source() -> None:
    """As on the live path (RedisStore.write's 5 s deadline raises TimeoutError; the pool restarts the source,
    which resumes from the store's position). The replay took it for its own socket timeout: the batch was
    counted a failed replay and the store lacked it for good while the chains held it."""
    host = "127.0.0.179"
    tokens = list(range(100, 100 + 16 * 8))

    def chain16(first: int, last: int) -> dict:
        hashes = [1000 + i for i in range(first, last)]
        return stored(hashes, 1000 + first - 1 if first else None, tokens[16 * first : 16 * last], block_size=16)

    index = MemoryIndex(100_000, 10, TIERS)
    store = _StallsOnce(index, seq=1)
    async with TestPublisher(host, topic="kv@pod@sim-model") as pub:
        options = PoolOptions(socket_port=pub.port, replay_socket_port=pub.replay_port,
                              subscriber=SubscriberOptions(replay_idle_timeout=0.5))  # fmt: skip
        pool = SubscriberPool(options, store, lambda: SourceChains(16, 0, TIERS, 100_000), KVEventStats())
        ep = endpoint(host, 8000)
        pool.endpoint_added(ep)
        try:
            await asyncio.sleep(0.3)  # slow joiner
            await pub.publish([chain16(0, 2)])
            await pub.publish([chain16(2, 4)], drop=True)  # a gap: replayed, and its write times out
            await pub.publish([chain16(4, 6)])
            await until(lambda: store.failed, what="the replayed batch's write failed")
            await asyncio.sleep(1.5)  # the restarted source waits RESTART_DELAY (1 s) and subscribes again
            await pub.publish([chain16(6, 8)])
            await until(lambda: pool_match(index, ep.hostport, tokens) == 8, within=6.0, what="all 8 blocks")
        finally:
            await pool.aclose()


async def test_a_cancellation_a_redis_backed_sink_swallowed_still_stops_the_source() -> None:
    """redis-py bounds each socket write with asyncio.wait_for, which in Python 3.11 returns the write's result
    when the cancellation arrives in the iteration the write completes in: the source's task would go back to
    its socket (or queue) and the pool's close would wait for it forever."""
    write = RacingWrite()

    class RedisLikeSink:
        async def on_batch(self, msg: Message, batch: EventBatch) -> None:
            await write()

        def on_reset(self, replaced: tuple[int, float] | None = None) -> None:
            pass

        async def catch_up(self, start: int, until: int) -> None:
            return None

    stats = KVEventStats()
    sub = Subscriber(
        "pod", "tcp://127.0.0.1:1", "", RedisLikeSink(), options=SubscriberOptions(), stats=stats,
        replay_slots=asyncio.Semaphore(1), context=zmq.asyncio.Context.instance(),
    )  # fmt: skip
    handling = asyncio.create_task(sub.handle(Message(b"kv@pod@m", 0, msgpack.packb([time.time(), [], 0]))))
    await write.started()
    write.complete()
    handling.cancel()
    await asyncio.wait({handling}, timeout=5)
    assert handling.cancelled()


async def test_a_pool_closes_when_its_redis_backed_store_swallowed_a_sources_cancellation() -> None:
    """The same race in the store's resume, at a source's start: the source would go on to subscribe and wait
    on its socket, and the pool's aclose with it."""
    write = RacingWrite()

    class RedisLikeStore(MemoryStore):
        async def resume(self, pod: str, chains: SourceChains) -> None:
            await write()  # the write of its commands

    pool = SubscriberPool(
        PoolOptions(socket_port=free_port()),
        RedisLikeStore(MemoryIndex(1000, 10, TIERS)),
        lambda: SourceChains(16, 0, TIERS, 1000),
        KVEventStats(),
    )
    pool.endpoint_added(endpoint("127.0.0.152", 8000))
    await write.started()
    write.complete()  # aclose's cancellation arrives in the same iteration
    async with asyncio.timeout(5):
        await pool.aclose()
