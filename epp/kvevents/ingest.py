"""A source's decoded batches → index changes (chain.py) → an index store (memory or Redis).

`SourceIngest` is the subscriber's sink for one pod. Per batch it runs the events through the pod's
`SourceChains` into one `Delta` and hands that to the store with the batch's (timestamp, sequence),
which a shared store uses to apply every batch exactly once across EPP replicas (and, after a
publisher restart, the last batch seen from the previous process: `replaces`).
"""

from __future__ import annotations

from typing import Protocol

from llmepp.kvevents.chain import Delta, SourceChains
from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.stats import KVEventStats
from llmepp.kvevents.subscriber import ResumePoint
from llmepp.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Message, parse_topic


class IndexStore(Protocol):
    """What ingestion writes to (MemoryStore below, redis_index.RedisStore)."""

    async def write(
        self,
        pod: str,
        chains: SourceChains,
        ts: float,
        seq: int,
        delta: Delta,
        replaces: tuple[int, float] | None = None,
    ) -> None:
        """Store one batch's changes; `chains` is the source's state after the batch. `replaces`: the
        batch is the first after a publisher restart, which replaced the stream whose last batch
        applied was (seq, timestamp)."""
        ...

    async def resume(self, pod: str, chains: SourceChains) -> ResumePoint | None:
        """Restore the pod's chains from the store; where its stream continues (None: from 0)."""
        ...

    async def catch_up(
        self,
        pod: str,
        chains: SourceChains,
        start: int,
        until: int,
        restart_of: tuple[int, float] | None = None,
    ) -> ResumePoint | None:
        """Batches [start, until) of the pod were missed: if the store holds some of them (a shared index
        another replica kept up), restore `chains` from it and say where the stream continues. `restart_of`:
        the batches are a restarted publisher's, which replaced the stream ending at that (seq, timestamp)."""
        ...

    async def forget(self, pod: str, chains: SourceChains) -> None:
        """The endpoint left the pool."""
        ...


class MemoryStore:
    """The in-process index: writes apply synchronously, nothing survives a restart."""

    def __init__(self, index: MemoryIndex) -> None:
        self.index = index

    async def write(
        self,
        pod: str,
        chains: SourceChains,
        ts: float,
        seq: int,
        delta: Delta,
        replaces: tuple[int, float] | None = None,
    ) -> None:
        if delta.keys:
            self.index.apply(pod, delta)

    async def resume(self, pod: str, chains: SourceChains) -> ResumePoint | None:
        return None

    async def catch_up(
        self,
        pod: str,
        chains: SourceChains,
        start: int,
        until: int,
        restart_of: tuple[int, float] | None = None,
    ) -> ResumePoint | None:
        return None  # this EPP's own index: nobody else applied what it missed

    async def forget(self, pod: str, chains: SourceChains) -> None:
        delta = Delta()
        chains.clear(delta)
        self.index.apply(pod, delta)
        self.index.release(pod)


class SourceIngest:
    def __init__(self, pod: str, chains: SourceChains, store: IndexStore, stats: KVEventStats) -> None:
        self.pod = pod
        self.chains = chains
        self.store = store
        self.stats = stats
        self._reset_pending = False
        self._replaced: tuple[int, float] | None = None
        self._models: dict[bytes, str] = {}

    async def on_batch(self, msg: Message, batch: EventBatch) -> None:
        model = self._models.get(msg.topic)
        if model is None:
            if len(self._models) >= 64:  # one topic per publisher; more are junk, keep a bounded few
                self._models.clear()
            model = self._models[msg.topic] = parse_topic(msg.topic)[1]
        delta = Delta()
        chains = self.chains
        stats = self.stats
        replaces = None
        if self._reset_pending:
            self._reset_pending = False
            replaces, self._replaced = self._replaced, None
            chains.clear(delta)
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                stats.block_stored += chains.stored(ev, model, delta)
            elif isinstance(ev, BlockRemoved):
                stats.block_removed += chains.removed(ev, delta)
            elif isinstance(ev, AllBlocksCleared):
                stats.all_cleared += 1
                chains.clear(delta)
        await self.store.write(self.pod, chains, batch.ts, msg.seq, delta, replaces)

    async def catch_up(self, start: int, until: int) -> ResumePoint | None:
        if self._reset_pending:
            # A restarted publisher's first batches: only a shared index another replica fed from that same
            # restart has them (else the next batch starts the new process's state from empty).
            if self._replaced is None:
                return None
            point = await self.store.catch_up(self.pod, self.chains, start, until, restart_of=self._replaced)
            if point is not None:
                self._reset_pending, self._replaced = False, None  # the restart is applied, chains restored
            return point
        return await self.store.catch_up(self.pod, self.chains, start, until)

    def on_reset(self, replaced: tuple[int, float] | None = None) -> None:
        """The publisher restarted: what we know of it is void; the next batch starts from empty."""
        self._reset_pending = True
        self._replaced = replaced
