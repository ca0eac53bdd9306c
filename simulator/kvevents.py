"""KV-event publishing over ZeroMQ, as vLLM does it, plus the replay socket for gap recovery.

PUB socket (bound at ``--zmq-endpoint``), one multipart message per batch::

    [topic, seq.to_bytes(8, "big"), msgpack(EventBatch)]

``topic`` is ``kv@<pod>@<model>`` by default (``--kv-events-topic`` template), ``seq`` starts at 0 and counts
batches. A batch holds at most ``--event-batch-size`` events; a partial batch is flushed after
``event_flush_interval`` ms (wall clock), so subscribers lag the engine by at most a few ms.

ROUTER replay socket (``--kv-events-replay-endpoint``): a request ``[identity, b"", start_seq(8B BE)]`` is
answered with ``[identity, b"", topic, seq, payload]`` for every buffered batch with ``seq >= start_seq``
(vLLM >= 0.26 framing), then the end marker ``[identity, b"", b"", (-1).to_bytes(8, "big", signed=True),
b""]``. The last ``--kv-events-replay-queue-size`` batches are buffered.

Both sockets *bind* (the simulator is the stable side; subscribers connect). A ``*`` port binds any
free port; ``endpoint`` / ``replay_endpoint`` report what was actually bound. With ``--kv-events-connect``
the PUB socket instead connects to ``--zmq-endpoint``, a subscriber every pod publishes to (vLLM connects
to any endpoint without a wildcard host).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from llmepp_sim.kvwire import KVEvent, encode_batch

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
REBIND_ATTEMPTS = 40
REBIND_PAUSE = 0.05  # s


def _ipv6(endpoint: str) -> bool:
    """An endpoint on an IPv6 address (`tcp://[::1]:5557`): ZeroMQ binds or connects it only with zmq.IPV6."""
    rest = endpoint[len("tcp://") :] if endpoint.startswith("tcp://") else ""
    return rest.startswith("[") or rest.count(":") > 1


async def _bind(sock: zmq.Socket, endpoint: str) -> None:
    # A revived pod rebinds the port its previous sockets just released; libzmq frees it asynchronously.
    for attempt in range(REBIND_ATTEMPTS):
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or attempt == REBIND_ATTEMPTS - 1:
                raise
            await asyncio.sleep(REBIND_PAUSE)


class KVEventPublisher:
    def __init__(
        self,
        endpoint: str,
        topic: str,
        *,
        batch_size: int = 16,
        flush_interval: float = 0.005,
        legacy_format: bool = False,
        data_parallel_rank: int = 0,
        replay_endpoint: str = "",
        replay_queue_size: int = 1024,
        connect: bool = False,
    ) -> None:
        self._connect = connect
        self.topic = topic.encode()
        self._requested_endpoint = endpoint
        self._requested_replay = replay_endpoint
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._legacy = legacy_format
        self._rank = data_parallel_rank
        self._pending: list[KVEvent] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=replay_queue_size)
        self._pub: zmq.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.next_seq = 0
        self.endpoint = ""
        self.replay_endpoint = ""

    async def start(self) -> None:
        # One context (one I/O thread) for every pod of the process.
        ctx = zmq.asyncio.Context.instance()
        # PUB only sends, never waits: a plain socket avoids a Future per message.
        self._pub = zmq.Socket(ctx, zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        if _ipv6(self._requested_endpoint):
            self._pub.setsockopt(zmq.IPV6, 1)
        if self._connect:
            self._pub.connect(self._requested_endpoint)
        else:
            await _bind(self._pub, self._requested_endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        if self._requested_replay:
            self._router = ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            if _ipv6(self._requested_replay):
                self._router.setsockopt(zmq.IPV6, 1)
            await _bind(self._router, self._requested_replay)
            self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(), name="kv-replay")

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._pending.clear()
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None

    # --- publishing (called synchronously from the engine)
    def publish(self, events: Sequence[KVEvent]) -> None:
        if self._pub is None:
            return
        self._pending.extend(events)
        while len(self._pending) >= self._batch_size:
            batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
            self._send(batch)
        if self._pending and self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        self._flush_timer = None
        if self._pending:
            batch, self._pending = self._pending, []
            self._send(batch)

    def _send(self, events: list[KVEvent]) -> None:
        assert self._pub is not None
        seq = self.next_seq
        self.next_seq += 1
        payload = encode_batch(time.time(), events, self._rank, self._legacy)
        self._buffer.append((seq, payload))
        # PUB never blocks: with NOBLOCK a full queue drops the message, as vLLM's publisher does.
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)

    # --- replay
    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) < 3:
                continue
            identity, start = frames[0], int.from_bytes(frames[-1], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart([identity, b"", self.topic, seq.to_bytes(8, "big"), payload])
            await router.send_multipart([identity, b"", b"", END_OF_REPLAY, b""])
