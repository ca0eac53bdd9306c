"""Global-socket KV events (`kvEventsConfig.zmqEndpoint`, the EPP binds one SUB socket that every pod's vLLM
connects to): a message whose topic names no pool endpoint is counted and logged through the pool's
LogLimiter under one key for the site, with at most 256 bytes of the topic (epp/kvevents/pool.py, `_dispatch`).

The topic is whatever the publisher sends after the `kv@` filter, and anything that can reach the bound port
can publish. Keyed by the topic (as it was), every distinct topic was a new rate-limit key (a WARNING line per
message) and the whole topic was kept as that key and written into the line: a message may be 64 MiB.

Per-pod subscriptions (the default mode) are not affected.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tracemalloc

import zmq
import zmq.asyncio
from helpers import until

from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.kvevents.chain import SourceChains
from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.ingest import MemoryStore
from llmepp.kvevents.pool import PoolOptions, SubscriberPool
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.tiers import TierTable
from llmepp.testing.ports import free_port

POOL_LOG = "llmepp.kvevents.pool"


class _Lines(logging.Handler):
    """Counts WARNING lines and their sizes (keeps no record: the memory test measures the EPP, not us)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.longest = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.longest = max(self.longest, len(record.getMessage()))


class _Rig:
    def __init__(self) -> None:
        self.bound = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
        tiers = TierTable()
        index = MemoryIndex(1_000_000, 10, tiers)
        self.pool = SubscriberPool(
            PoolOptions(socket_port=5557, bind_endpoint=self.bound),
            MemoryStore(index),
            lambda: SourceChains(4, 0, tiers, 1_000_000),
            KVEventStats(),
        )
        self.lines = _Lines()
        self.base = 0  # unknown-topic messages counted before the rig was up (its probes)
        self.logger = logging.getLogger(POOL_LOG)

    async def __aenter__(self) -> _Rig:
        self.logger.addHandler(self.lines)
        self.propagate, self.logger.propagate = self.logger.propagate, False
        self.pool.endpoint_added(Endpoint(EndpointSpec(name="pod-0", address="127.0.0.190", port=8000)))
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        await asyncio.sleep(0.2)  # the pool binds
        self.pub.connect(self.bound)
        # Up once a message gets through (a PUB socket drops what it sends before the subscription arrives).
        for _ in range(200):
            await self.publish(b"kv@probe")
            await asyncio.sleep(0.05)
            if self.pool.stats.unknown_sources:
                break
        await asyncio.sleep(0.1)  # the probes still on their way
        self.base = self.pool.stats.unknown_sources
        self.lines.count = 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.pub.close(0)
        self.ctx.term()
        await self.pool.aclose()
        self.logger.removeHandler(self.lines)
        self.logger.propagate = self.propagate

    def dispatched(self) -> int:
        """Messages from unknown topics since the rig was up."""
        return self.pool.stats.unknown_sources - self.base

    async def publish(self, topic: bytes) -> None:
        await self.pub.send_multipart([topic, (1).to_bytes(8, "big"), b"\x93\xcb" + b"\0" * 8 + b"\x90\xc0"])


async def test_distinct_unknown_topics_are_not_rate_limited() -> None:
    async with _Rig() as rig:
        n = 500
        for i in range(n):
            await rig.publish(f"kv@10.66.{i // 256}.{i % 256}@m".encode())
        await until(lambda: rig.dispatched() == n, within=10.0, what="every message dispatched")
        # One kind of event at one site: the limiter's interval (10 s) allows one line, and a few at most.
        assert rig.lines.count <= 5, f"{rig.lines.count} warning lines for {n} messages within one interval"


async def test_an_unknown_topic_is_not_kept_whole_in_memory_and_log() -> None:
    async with _Rig() as rig:
        n, size = 8, 1 << 20  # 1 MiB topics (a message may be 64 MiB)
        gc.collect()
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            for _ in range(n):
                await rig.publish(b"kv@" + os.urandom(size))
            await until(lambda: rig.dispatched() == n, within=10.0, what="every message dispatched")
            await asyncio.sleep(0.1)
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()
        assert rig.lines.longest <= 4096, f"a log line of {rig.lines.longest} characters (the whole topic)"
        assert retained <= 4 << 20, f"{retained / 2**20:.1f} MiB kept for {n} dropped messages"
