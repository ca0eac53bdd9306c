"""Shared helpers: a subscriber (or pool) wired to an in-memory index, and polling waits."""

from __future__ import annotations

import asyncio
import contextlib

import zmq.asyncio

from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.kvevents.chain import SourceChains
from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.ingest import MemoryStore, SourceIngest
from llmepp.kvevents.keys import root_key, tokens_to_bytes
from llmepp.kvevents.pool import PoolOptions, SubscriberPool
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.subscriber import Subscriber, SubscriberOptions
from llmepp.kvevents.tiers import TierTable

TIERS = TierTable()


class Rig:
    """One Subscriber for pod "pod" feeding an in-memory index."""

    def __init__(self, host: str, port: int, replay_port: int | None, block_tokens: int = 4, **options: float) -> None:
        self.block_tokens = block_tokens
        self.index = MemoryIndex(100_000, 10, TIERS)
        self.chains = SourceChains(block_tokens, 0, TIERS, 100_000)
        self.stats = KVEventStats()
        opts = SubscriberOptions(**{"replay_idle_timeout": 0.5, "replay_cooldown": 30.0, **options})  # type: ignore[arg-type]
        self.sub = Subscriber(
            "pod",
            f"tcp://{host}:{port}",
            f"tcp://{host}:{replay_port}" if replay_port else "",
            SourceIngest("pod", self.chains, MemoryStore(self.index), self.stats),
            options=opts,
            stats=self.stats,
            replay_slots=asyncio.Semaphore(8),
            context=zmq.asyncio.Context.instance(),
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.get_running_loop().create_task(self.sub.run())
        await asyncio.sleep(0.3)  # ZeroMQ slow joiner: let the subscription reach the publisher
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def matched(self, tokens: list[int], model: str = "m") -> int:
        bit = self.index.bit("pod")
        m = self.index.match(tokens_to_bytes(tokens), self.block_tokens, root_key(model), bit)
        return m.lengths.get(bit, 0)


def endpoint(address: str, port: int, name: str = "") -> Endpoint:
    return Endpoint(EndpointSpec(name=name or address, address=address, port=port))


def memory_pool(
    socket_port: int, replay_port: int = 0, block_tokens: int = 16, bind: str = ""
) -> tuple[SubscriberPool, MemoryIndex]:
    index = MemoryIndex(1_000_000, 10, TIERS)
    pool = SubscriberPool(
        PoolOptions(socket_port=socket_port, replay_socket_port=replay_port, bind_endpoint=bind),
        MemoryStore(index),
        lambda: SourceChains(block_tokens, 0, TIERS, 1_000_000),
        KVEventStats(),
    )
    return pool, index


def pool_match(index: MemoryIndex, pod: str, token_ids: list[int], model: str = "sim-model", block: int = 16) -> int:
    bit = index.bit_of(pod)
    if not bit:
        return 0
    return index.match(tokens_to_bytes(token_ids), block, root_key(model), bit).lengths.get(bit, 0)
