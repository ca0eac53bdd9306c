"""Publisher restarts the sequence numbers alone do not reveal (real ZeroMQ, in-memory index).

vLLM numbers a publisher's batches from 0 per process and sends no incarnation id; a restart shows
only as a sequence that went back. When we hear from the new process only after it has published
as many batches as the old one (we were disconnected, or the EPP was down), its numbers are level
with or past ours: a gap, or no gap at all. The replay socket settles it: asked to start one batch
early, at the last batch we applied (the anchor), the same process sends that batch again, with its
timestamp; a restarted one sends another batch under that number, or none if it is not that far.
"""

from __future__ import annotations

import asyncio

from helpers import until

from .publisher import Engine, TestPublisher, stored
from .rig import Rig

TOKENS = list(range(100, 100 + 4 * 12))  # the first incarnation's prompt: 12 blocks of 4 tokens
OTHER = list(range(900, 900 + 4 * 12))  # what the restarted engine stores


def chain(first: int, last: int, tokens: list[int] = TOKENS, base: int = 1000) -> dict:
    hashes = [base + i for i in range(first, last)]
    return stored(hashes, base + first - 1 if first else None, tokens[4 * first : 4 * last])


def other(first: int, last: int) -> dict:
    return chain(first, last, OTHER, base=5000)


async def first_incarnation(pub: TestPublisher, rig: Rig) -> None:
    for i in range(3):  # seq 0..2: 6 blocks
        await pub.publish([chain(2 * i, 2 * i + 2)])
    await until(lambda: rig.matched(TOKENS) == 6, what="the first incarnation's blocks")


async def test_a_restart_already_past_our_position_is_a_restart_not_a_gap() -> None:
    """The new process published seq 0..3 before we reconnected; its seq 4 looks like a gap after our 2.
    Replaying from 3 would graft the new process's batches 3..4 onto the old state."""
    host = "127.0.0.201"
    async with Engine(host) as engine, Rig(host, engine.pub.port, engine.pub.replay_port) as rig:
        await first_incarnation(engine.pub, rig)
        pub = await engine.restart()
        for i in range(4):
            await pub.publish([other(i, i + 1)], drop=True)  # nobody connected yet: buffered only
        await asyncio.sleep(0.3)  # the SUB socket reconnects
        await pub.publish([other(4, 6)])
        await until(lambda: rig.matched(OTHER) == 6, what="the new incarnation, replayed from 0")
        assert rig.matched(TOKENS) == 0 and rig.stats.resets == 1
        assert pub.replay_requests[0] == 2  # the anchor (our last batch): another batch under that number
        assert pub.replay_requests[-1] == 0
        assert rig.chains.stats.orphans == 0 and rig.stats.lost_batches == 0


async def test_a_restart_level_with_our_position_is_caught_on_reconnect() -> None:
    """The new process's next batch carries exactly the number we expect: no gap. The dropped
    connection makes the first batch after it checked against the anchor."""
    host = "127.0.0.202"
    async with Engine(host) as engine, Rig(host, engine.pub.port, engine.pub.replay_port) as rig:
        await first_incarnation(engine.pub, rig)
        pub = await engine.restart()
        for i in range(3):
            await pub.publish([other(i, i + 1)], drop=True)
        await asyncio.sleep(0.3)
        await pub.publish([other(3, 5)])  # seq 3: what we expect next
        await until(lambda: rig.matched(OTHER) == 5, what="the new incarnation, replayed from 0")
        assert rig.matched(TOKENS) == 0 and rig.stats.resets == 1
        assert rig.chains.stats.orphans == 0


async def test_a_restart_behind_us_with_a_clock_stepped_back_is_still_a_restart() -> None:
    """An older number with an older timestamp reads as a duplicate; after a dropped connection the
    anchor decides: the new process has nothing under our last number."""
    host = "127.0.0.203"
    async with Engine(host) as engine, Rig(host, engine.pub.port, engine.pub.replay_port) as rig:
        await first_incarnation(engine.pub, rig)
        pub = await engine.restart()
        pub.clock_offset = -3600.0
        await asyncio.sleep(0.3)
        await pub.publish([other(0, 2)])  # seq 0, an hour "older" than what we applied
        await until(lambda: rig.matched(OTHER) == 2, what="the new incarnation")
        assert rig.matched(TOKENS) == 0 and rig.stats.resets == 1 and rig.stats.duplicates == 0
        await pub.publish([other(2, 3)])
        await until(lambda: rig.matched(OTHER) == 3, what="and its next batch")


async def test_a_dropped_connection_to_the_same_process_keeps_the_state() -> None:
    """No false alarm: the anchor comes back with its own timestamp, and what was missed meanwhile
    is replayed on top of what we hold."""
    host = "127.0.0.204"
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port) as rig:
        await first_incarnation(pub, rig)
        await pub.drop_connections()
        await pub.publish([chain(6, 7)], drop=True)  # while disconnected
        await asyncio.sleep(0.3)
        await pub.publish([chain(7, 8)])
        await until(lambda: rig.matched(TOKENS) == 8, what="the missed and the live batch")
        assert rig.stats.resets == 0 and rig.stats.lost_batches == 0
        assert pub.replay_requests == [2]
        # The next batch after a verified reconnect needs no replay.
        await pub.publish([chain(8, 9)])
        await until(lambda: rig.matched(TOKENS) == 9)
        assert pub.replay_requests == [2]


async def test_a_dropped_connection_without_a_gap_is_verified_once() -> None:
    host = "127.0.0.205"
    async with TestPublisher(host) as pub, Rig(host, pub.port, pub.replay_port) as rig:
        await first_incarnation(pub, rig)
        await pub.drop_connections()
        await asyncio.sleep(0.3)
        await pub.publish([chain(6, 8)])  # seq 3, as expected
        await until(lambda: rig.matched(TOKENS) == 8)
        assert rig.stats.resets == 0 and rig.stats.batches == 4
        assert pub.replay_requests == [2]
