"""One KV-event publisher: a SUB socket, sequence tracking, and replay of what was missed.

The publisher numbers batches 0, 1, 2, ... per process (vLLM's ZmqEventPublisher: `count()` from 0,
no incarnation id on the wire); the subscriber expects `seq == next`. Sequence numbers order a
source's batches; timestamps only tell a duplicate from a restart (below), so a publisher clock that
steps back changes nothing.

* `seq > next` — a gap (the SUB queue overflowed, or we joined mid-stream: `next` starts at 0, or at
  the position a shared index already holds). With a replay endpoint the missing batches are fetched
  from the publisher's ROUTER over a DEALER socket — not REQ, which keeps only the first reply —
  *before* the live message is applied, so a source's batches are always applied in order (parents
  before children). Live messages wait meanwhile in the SUB socket's bounded queue. Without a
  replay endpoint, or while cooling down after a failed replay, the gap is counted and skipped.
* `seq < next` — either a duplicate (a live batch the replay already delivered: its timestamp is not
  newer than the last applied one) or a publisher restart (sequence reset: a newer timestamp). A
  restart rebuilds the source: its state is dropped (`sink.on_reset`) and replayed from 0.

A restarted publisher whose numbers have already reached ours (it published while we were
disconnected, or while the EPP was down and a shared index kept our position) looks like a gap, or
like no gap at all. So a replay starts one batch early, at the last batch applied (the *anchor*, seq
`next - 1`, whose timestamp we keep): the same process sends that batch again with the same
timestamp; a restarted one sends another batch under that number (a restart: rebuilt from 0). A
replay is also made without a gap, once, when continuity is in doubt: after the SUB socket lost its
connection (a restart always drops it; ZeroMQ's monitor reports it) and when resuming from a shared
index. Then an older number with an older timestamp is a restart too if the publisher holds nothing
at or after the anchor (the same process always buffers its latest batch). Undecidable, and handled
as before: the anchor no longer buffered (more than the publisher's `buffer_steps` batches since),
no replay endpoint, or a replay cooling down.

Replay protocol: send ``[b"", start(8B BE)]``; the ROUTER answers one message per buffered batch with
seq >= start — ``[b"", topic, seq, payload]`` (vLLM >= 0.26) or ``[b"", seq, payload]`` — then the end
marker (seq -1). A replay gives up after `replay_idle_timeout` of silence or `replay_timeout` in total;
after a failure the source cools down for `replay_cooldown` (reference: 2 min timeout, 30 s cooldown,
at most 8 replays at once across sources). A reply whose first batch is later than asked (the
publisher's buffer no longer has it) is applied anyway and counted as incomplete.

Never fatal: malformed frames and payloads are counted and logged (rate-limited); a message over
`max_message_bytes` is dropped by ZeroMQ with its connection, which is dialled again (`_watch`). A dead or slow
publisher costs nothing but an idle task: ZeroMQ reconnects in the background, and all of this runs
in the source's own task, so routing never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from llmepp.datalayer.endpoint import split_hostport
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.wire import (
    EventBatch,
    MalformedMessage,
    Message,
    decode_batch,
    parse_frames,
    parse_replay_reply,
    replay_request,
)
from llmepp.observability.logging import LogLimiter
from llmepp.tasks import raise_if_cancelled

log = logging.getLogger(__name__)

# A bigger message drops the connection that brings it (ZeroMQ's MAXMSGSIZE; 0: no limit). vLLM's largest
# batches are one engine step's events: a few MB even for 100k-token prompts.
MAX_MESSAGE_BYTES = 64 << 20

# Seconds a dropped connection may go without ZeroMQ's own retry before the subscriber dials again.
REDIAL_AFTER = 0.5


class BatchSink(Protocol):
    """Where a source's decoded batches go, in sequence order (ingest.SourceIngest)."""

    async def on_batch(self, msg: Message, batch: EventBatch) -> None: ...

    def on_reset(self, replaced: tuple[int, float] | None = None) -> None:
        """The publisher restarted; `replaced`: the (seq, timestamp) of the last batch applied from the
        previous process, if known (a shared index takes the restart only if it is still there)."""
        ...

    async def catch_up(self, start: int, until: int) -> ResumePoint | None:
        """Batches [start, until) were missed and cannot be replayed: take the source's state from a
        shared index that holds some of them (another replica applied them); where to continue, or None."""
        ...


@dataclass(frozen=True, slots=True)
class SubscriberOptions:
    topic_filter: bytes = b"kv@"
    replay_timeout: float = 120.0
    replay_idle_timeout: float = 2.0
    replay_cooldown: float = 30.0
    # ZeroMQ queue bound (messages): beyond it the socket drops, which shows up as a gap.
    rcv_hwm: int = 10_000
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 5_000
    max_message_bytes: int = MAX_MESSAGE_BYTES


def ipv6_endpoint(endpoint: str) -> bool:
    """Whether a socket for `endpoint` needs `zmq.IPV6`: without it ZeroMQ cannot bind an IPv6 address
    (`tcp://[fd00::1]:5557`: "No such device") and never connects to one (silently). A wildcard bind
    (`tcp://*:5557`) gets it too: it then listens on IPv6 and IPv4, so the pods of an IPv6-only cluster
    reach it (ZeroMQ falls back to IPv4 where IPv6 is unavailable)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = split_hostport(endpoint[len("tcp://") :])[0]
    return host == "*" or ":" in host


def sub_socket(context: zmq.asyncio.Context, options: SubscriberOptions, endpoint: str = "") -> zmq.asyncio.Socket:
    """A SUB socket with the queue bound, reconnect pacing and topic filter of `options`, ready to bind or
    connect `endpoint` (IPv6: ipv6_endpoint)."""
    sock = context.socket(zmq.SUB)
    if ipv6_endpoint(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, options.rcv_hwm)
    sock.setsockopt(zmq.RECONNECT_IVL, options.reconnect_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, options.reconnect_ivl_max_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_bytes or -1)
    sock.setsockopt(zmq.SUBSCRIBE, options.topic_filter)
    return sock


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a shared index already is for this source: the next seq, the newest timestamp applied
    (duplicates are not newer), and the timestamp of batch `next_seq - 1` (the replay anchor)."""

    next_seq: int
    last_ts: float
    anchor_ts: float | None = None


# What a replay found (Subscriber._replay).
_OK, _FAILED, _RESTARTED, _EMPTY = range(4)


class _ReplayTimedOut(Exception):
    """The replay socket went silent (or the whole replay ran out of time). Not TimeoutError: a sink write's
    own deadline (RedisStore.write) raises that, and must reach the pool, which restarts the source."""


class Subscriber:
    def __init__(
        self,
        pod: str,
        endpoint: str,
        replay_endpoint: str,
        sink: BatchSink,
        *,
        options: SubscriberOptions,
        stats: KVEventStats,
        replay_slots: asyncio.Semaphore,
        context: zmq.asyncio.Context,
        resume: ResumePoint | None = None,
        limiter: LogLimiter | None = None,
    ) -> None:
        self.pod = pod
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.sink = sink
        self.options = options
        self.stats = stats
        self._slots = replay_slots
        self._ctx = context
        self._log = limiter or LogLimiter(log)
        self.next_seq = resume.next_seq if resume else 0
        self.last_ts = resume.last_ts if resume else -math.inf
        # The timestamp of batch next_seq - 1 (None: unknown), and whether the stream we hold may
        # belong to an earlier process (module docstring).
        self._anchor_ts = resume.anchor_ts if resume else None
        self._suspect = resume is not None and resume.next_seq > 0
        self._cooldown_until = 0.0
        self._topic = b""

    async def run(self) -> None:
        """The source's task body: receive and apply until cancelled."""
        sub = sub_socket(self._ctx, self.options, self.endpoint)
        monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED)
        watch = asyncio.get_running_loop().create_task(self._watch(sub, monitor), name=f"kv-monitor-{self.pod}")
        sub.connect(self.endpoint)
        try:
            while True:
                frames = await sub.recv_multipart()
                self.stats.messages += 1
                try:
                    msg = parse_frames(frames)
                except MalformedMessage as e:
                    self.stats.malformed_frames += 1
                    self._log.warning(f"frames:{self.pod}", "KV events from %s: malformed message: %s", self.pod, e)
                    continue
                await self.handle(msg)
                # A done recv future does not yield; give requests their turn between batches.
                await asyncio.sleep(0)
        finally:
            watch.cancel()
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def _watch(self, sub: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """A lost connection may hide a publisher restart: check the next batch against the anchor.

        ZeroMQ retries a dropped connection itself (EVENT_CONNECT_RETRIED follows the drop at once), except
        after a protocol error such as a message over `max_message_bytes`: that session is gone for good,
        so after REDIAL_AFTER without a retry the subscriber dials again."""
        dropped = False
        try:
            while True:
                if dropped and not await monitor.poll(REDIAL_AFTER * 1000):
                    dropped = False
                    self._redial(sub)
                    continue
                event = parse_monitor_message(await monitor.recv_multipart())
                dropped = event["event"] == zmq.EVENT_DISCONNECTED
                if dropped:
                    self._suspect = True
        except zmq.ZMQError:  # the monitor closed under us (the subscriber is stopping)
            return

    def _redial(self, sub: zmq.asyncio.Socket) -> None:
        self.stats.redials += 1
        self._log.warning(
            f"redial:{self.pod}",
            "KV events from %s: the connection was dropped and not retried (a message over %d bytes, or another "
            "protocol error); dialling again",
            self.pod,
            self.options.max_message_bytes,
        )
        with contextlib.suppress(zmq.ZMQError):  # no longer registered: connecting again is enough
            sub.disconnect(self.endpoint)
        sub.connect(self.endpoint)

    async def handle(self, msg: Message) -> None:
        """One live message of this source, however it was received (its own socket, or the pool's
        bound socket in global-socket mode)."""
        self._topic = msg.topic
        await self._live(msg)
        raise_if_cancelled()  # a Redis-backed sink's client may have swallowed the task's cancellation

    # -- sequence handling -----------------------------------------------------------------------
    async def _live(self, msg: Message) -> None:
        seq = msg.seq
        if seq < self.next_seq:
            batch = self._decode(msg)
            if batch is None:
                return
            if batch.ts <= self.last_ts and not (self._suspect and await self._behind()):
                self.stats.duplicates += 1
                return
            # Newer data with an older number, or nothing at our last number: the publisher restarted.
            await self._rebuild(msg, batch)
            return
        if seq > self.next_seq or self._suspect:
            if await self._recover(self.next_seq, seq):
                await self._rebuild(msg, None)
                return
            if seq < self.next_seq:
                return  # the replay already delivered it
        batch = self._decode(msg)
        if batch is None:
            self.next_seq = seq + 1  # unreadable: its content is lost, the sequence moves on
            self._anchor_ts = None
            return
        await self._apply(msg, batch)

    async def _apply(self, msg: Message, batch: EventBatch) -> None:
        if batch.skipped:
            self.stats.skipped_events += batch.skipped
            self._log.warning(
                f"skipped:{self.pod}", "KV events from %s: %d unreadable events skipped", self.pod, batch.skipped
            )
        await self.sink.on_batch(msg, batch)
        self.stats.batches += 1
        self.next_seq = msg.seq + 1
        self._anchor_ts = batch.ts
        if batch.ts > self.last_ts:
            self.last_ts = batch.ts

    def _decode(self, msg: Message) -> EventBatch | None:
        try:
            return decode_batch(msg.payload)
        except MalformedMessage as e:
            self.stats.malformed_payloads += 1
            self._log.warning(f"payload:{self.pod}", "KV events from %s: seq %d unreadable: %s", self.pod, msg.seq, e)
            return None

    async def _rebuild(self, msg: Message, batch: EventBatch | None) -> None:
        """The publisher restarted: drop the source's state and read the new process from 0."""
        self.stats.resets += 1
        log.info(
            "KV event publisher restarted; rebuilding its state",
            extra={"pod": self.pod, "seq": msg.seq, "expected": self.next_seq},
        )
        anchor = self._anchor_ts
        self.sink.on_reset((self.next_seq - 1, anchor) if self.next_seq > 0 and anchor is not None else None)
        self.next_seq, self.last_ts, self._anchor_ts, self._suspect = 0, -math.inf, None, False
        seq = msg.seq
        if seq > 0:
            # No anchor: cannot find another restart. A shared index may hold the new process's first
            # batches, applied by a replica that saw them (the sink checks it is this restart's).
            await self._recover(0, seq)
        if seq < self.next_seq:
            return
        if batch is None:
            batch = self._decode(msg)
            if batch is None:
                self.next_seq = seq + 1
                return
        await self._apply(msg, batch)

    def _can_replay(self) -> bool:
        return bool(self.replay_endpoint) and asyncio.get_running_loop().time() >= self._cooldown_until

    async def _behind(self) -> bool:
        """In doubt (after a lost connection), a batch older than ours by number and by clock: whether the
        publisher lost our anchor, i.e. restarted with its clock behind. Otherwise a duplicate."""
        self._suspect = False
        if not self._can_replay() or self.next_seq == 0 or self._anchor_ts is None:
            return False
        outcome = await self._replay(self.next_seq)
        if outcome == _FAILED:
            self._cooldown_until = asyncio.get_running_loop().time() + self.options.replay_cooldown
        return outcome in (_RESTARTED, _EMPTY)

    async def _recover(self, start: int, until: int, *, catch_up: bool = True) -> bool:
        """Fetch batches [start, until) from the replay socket, else from what a shared index holds
        (`catch_up`: not after a restart, whose state starts empty), else count them lost; True if the
        replay showed the publisher restarted (nothing applied then). `until == start`: only the check."""
        self._suspect = False
        gap = until > start
        if gap:
            self.stats.gaps += 1
        if not self._can_replay():
            if gap:
                why = "no replay endpoint" if not self.replay_endpoint else "replay cooling down"
                await self._lost(start, until, why, catch_up)
            return False
        outcome = await self._replay(start)
        if outcome == _RESTARTED:
            return True
        if outcome == _FAILED:
            self._cooldown_until = asyncio.get_running_loop().time() + self.options.replay_cooldown
        if self.next_seq < until:
            await self._lost(self.next_seq, until, "not in the replay", catch_up)
        return False

    async def _lost(self, start: int, until: int, why: str, catch_up: bool) -> None:
        """Batches [start, until) are not coming: our state would miss them. A shared index that another
        replica kept up holds them: continue from its state (our chains would otherwise compute the next
        batches' changes wrongly, and a wrong copy applied first is what every replica then reads)."""
        point = await self.sink.catch_up(start, until) if catch_up else None
        if point is not None and point.next_seq > start:
            self.stats.caught_up_batches += min(point.next_seq, until) - start
            self.next_seq, self._anchor_ts = point.next_seq, point.anchor_ts
            self.last_ts = max(self.last_ts, point.last_ts)
            start = point.next_seq
        if start < until:
            self.stats.lost_batches += until - start
            msg = "KV events from %s: batches %d..%d missed (%s)"
            self._log.warning(f"gap:{self.pod}", msg, self.pod, start, until - 1, why)
            self.next_seq = until
            self._anchor_ts = None

    async def _replay(self, start: int) -> int:
        """Apply the buffered batches from `start` on. Asks from the anchor (`start - 1`) when its
        timestamp is known: the publisher's batch under that number must be the one we applied."""
        o = self.options
        loop = asyncio.get_running_loop()
        anchor = start - 1 if start > 0 and self._anchor_ts is not None else -1
        outcome = _OK
        async with self._slots:
            dealer = self._ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            # An oversized reply drops the connection, so the replay times out: counted as a failed replay.
            dealer.setsockopt(zmq.MAXMSGSIZE, o.max_message_bytes or -1)
            if ipv6_endpoint(self.replay_endpoint):
                dealer.setsockopt(zmq.IPV6, 1)
            dealer.connect(self.replay_endpoint)
            try:
                await dealer.send_multipart(replay_request(anchor if anchor >= 0 else start))
                deadline = loop.time() + o.replay_timeout
                first = True
                while True:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not await dealer.poll(min(o.replay_idle_timeout, remaining) * 1000):
                        raise _ReplayTimedOut
                    frames = await dealer.recv_multipart()
                    try:
                        item = parse_replay_reply(frames)
                    except MalformedMessage as e:
                        self.stats.malformed_frames += 1
                        self._log.warning(f"replay:{self.pod}", "KV replay from %s: malformed reply: %s", self.pod, e)
                        continue
                    if item is None:
                        if first and anchor >= 0:
                            outcome = _EMPTY  # nothing at or after our last number
                        break
                    if first:
                        first = False
                        if item.seq == anchor:
                            seen = self._decode(item)
                            if seen is not None and seen.ts != self._anchor_ts:
                                log.info(
                                    "KV replay: the publisher's batch under our last number is another one",
                                    extra={
                                        "pod": self.pod,
                                        "seq": anchor,
                                        "batch_ts": seen.ts,
                                        "ours": self._anchor_ts,
                                    },
                                )
                                outcome = _RESTARTED
                                break
                            continue  # the batch we applied last: same process, in sequence
                        if item.seq > start:
                            self.stats.replays_incomplete += 1
                            log.warning(
                                "KV replay incomplete: the publisher no longer buffers the start",
                                extra={"pod": self.pod, "asked": start, "first": item.seq},
                            )
                    if item.seq < self.next_seq:
                        continue
                    if not item.topic:
                        item = Message(self._topic, item.seq, item.payload)
                    batch = self._decode(item)
                    if batch is None:
                        self.next_seq = item.seq + 1
                        self._anchor_ts = None
                        continue
                    if item.seq > self.next_seq:
                        self.stats.lost_batches += item.seq - self.next_seq
                    await self._apply(item, batch)
                    self.stats.replayed_batches += 1
                    await asyncio.sleep(0)
            except _ReplayTimedOut:
                self.stats.replays_failed += 1
                self._log.warning(f"replay:{self.pod}", "KV replay from %s timed out", self.pod)
                return _FAILED
            except zmq.ZMQError as e:
                self.stats.replays_failed += 1
                self._log.warning(f"replay:{self.pod}", "KV replay from %s failed: %s", self.pod, e)
                return _FAILED
            finally:
                dealer.close(linger=0)
        self.stats.replays_ok += 1
        return outcome
