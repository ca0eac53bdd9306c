"""A vLLM-like KV-event publisher under the test's control (real ZeroMQ PUB + ROUTER sockets).

Unlike the simulator it can drop a batch on the wire (a gap), restart its sequence, answer replays
in either vLLM reply shape (3 frames since 0.26, 2 before), stay silent on replay, or send junk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from llmepp.datalayer.endpoint import join_hostport
from llmepp.kvevents.subscriber import ipv6_endpoint
from llmepp.testing.ports import free_port

END = (-1).to_bytes(8, "big", signed=True)


def stored(hashes: list[int], parent: int | None, tokens: list[int], block_size: int = 4, **extra: Any) -> dict:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": block_size, "medium": "GPU", **extra}  # fmt: skip


def removed(hashes: list[int]) -> dict:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


CLEARED = {"type": "AllBlocksCleared"}


def as_legacy(ev: dict) -> list[Any]:
    kind = ev["type"]
    if kind == "BlockStored":
        return [kind, ev["block_hashes"], ev["parent_block_hash"], ev["token_ids"], ev["block_size"], None,
                ev["medium"], None]  # fmt: skip
    if kind == "BlockRemoved":
        return [kind, ev["block_hashes"], ev["medium"]]
    return [kind]


async def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> None:
    """Bind, retrying briefly: a socket just closed on the same port releases it asynchronously."""
    for _ in range(200):
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
            await asyncio.sleep(0.01)
    sock.bind(endpoint)


class TestPublisher:
    __test__ = False  # not a pytest class

    def __init__(
        self,
        host: str,
        *,
        reply_frames: int = 3,
        legacy: bool = False,
        topic: str = "kv@pod@m",
        port: int = 0,
        replay_port: int = 0,
        connect: str = "",
        rank: int = 0,
    ) -> None:
        self.host = host
        self.rank = rank  # the batches' data_parallel_rank
        self.connect = connect  # connect the PUB socket here (global-socket mode) instead of binding
        self.port = port or free_port(host)
        self.replay_port = replay_port or free_port(host)
        self.reply_frames = reply_frames
        self.legacy = legacy
        self.topic = topic.encode()
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_requests: list[int] = []
        self.replay_silent = False
        self.clock_offset = 0.0  # added to the batches' timestamps: a clock stepped back or forward
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TestPublisher:
        for sock in (self._pub, self._router):
            sock.setsockopt(zmq.LINGER, 0)
            if ":" in self.host or ipv6_endpoint(self.connect):  # an IPv6 host ("::1") needs zmq.IPV6
                sock.setsockopt(zmq.IPV6, 1)
        if self.connect:
            self._pub.connect(self.connect)
        else:
            await _bind(self._pub, f"tcp://{join_hostport(self.host, self.port)}")
        await _bind(self._router, f"tcp://{join_hostport(self.host, self.replay_port)}")
        self._task = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ctx.closed:  # already closed (restarted())
            return
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(0)
        self._router.close(0)
        self._ctx.term()

    def payload(self, events: list[dict]) -> bytes:
        wire = [as_legacy(e) for e in events] if self.legacy else events
        return bytes(msgpack.packb([time.time() + self.clock_offset, wire, self.rank], use_bin_type=True))

    async def publish(self, events: list[dict], *, drop: bool = False) -> int:
        """Send one batch (or only buffer it for replay when `drop`); returns its seq."""
        seq = self.seq
        self.seq += 1
        payload = self.payload(events)
        self.buffer.append((seq, payload))
        if not drop:
            await self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        await asyncio.sleep(0.002)  # distinct timestamps, like a real engine step
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self._pub.send_multipart(frames)

    def restart(self) -> None:
        """A restarted engine: seq from 0, nothing buffered."""
        self.seq = 0
        self.buffer.clear()

    async def drop_connections(self) -> None:
        """The same engine loses its subscribers' connections (a network blip): the PUB socket is
        replaced on the same port; sequence and replay buffer carry on."""
        self._pub.close(0)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        if ":" in self.host:
            self._pub.setsockopt(zmq.IPV6, 1)
        await _bind(self._pub, f"tcp://{join_hostport(self.host, self.port)}")

    async def restarted(self) -> TestPublisher:
        """The engine's process restarted: this one closes, a new one binds the same ports (seq from 0,
        an empty replay buffer; subscribers see their connections drop and come back)."""
        await self.__aexit__(None, None, None)
        new = TestPublisher(self.host, reply_frames=self.reply_frames, legacy=self.legacy, topic=self.topic.decode(),
                            port=self.port, replay_port=self.replay_port, rank=self.rank)  # fmt: skip
        return await new.__aenter__()

    async def _serve(self) -> None:
        while True:
            frames = await self._router.recv_multipart()
            identity, start = frames[0], int.from_bytes(frames[-1], "big")
            self.replay_requests.append(start)
            if self.replay_silent:
                continue
            for seq, payload in list(self.buffer):
                if seq >= start:
                    body = [self.topic, seq.to_bytes(8, "big"), payload] if self.reply_frames == 3 else [
                        seq.to_bytes(8, "big"), payload]  # fmt: skip
                    await self._router.send_multipart([identity, b"", *body])
            end = [b"", END, b""] if self.reply_frames == 3 else [END, b""]
            await self._router.send_multipart([identity, b"", *end])


class Engine:
    """A publisher that can restart (a new process on the same ports), closed whatever happens:
    ``async with Engine(host) as engine: ... engine.pub ... await engine.restart()``."""

    def __init__(self, host: str) -> None:
        self.pub = TestPublisher(host)

    async def __aenter__(self) -> Engine:
        await self.pub.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pub.__aexit__()

    async def restart(self) -> TestPublisher:
        self.pub = await self.pub.restarted()
        return self.pub
