"""The simulated GPU KV cache: a fixed pool of blocks with vLLM-style automatic prefix caching.

Mirrors vLLM v1's ``BlockPool`` semantics:

* A block is *in use* while at least one running request references it (reference counted).
* When its last user finishes, a block joins the free queue but keeps its hash: it stays *cached* and can
  be reused by a later request with the same prefix until the allocator evicts it.
* The free queue is LRU: allocation takes the least recently freed block first. Requests free their blocks
  tail-first, so a sequence's last blocks are evicted before its first ones (prefixes survive longest).
  A freed block that holds no hash (a partial tail, a block never filled) goes to the *front* of the queue
  and is reused before any cached block is evicted (vLLM ``BlockPool.free_blocks``, since PR #42656).
* Only full blocks are hashed/cached; each stored run emits ``BlockStored``, each eviction ``BlockRemoved``.
  As vLLM, the pool does not de-duplicate: a block recomputed under a hash that is already cached is cached
  (and published) too, a hit takes the oldest copy, and the hash stays cached until its last copy is evicted
  (each evicted copy publishes ``BlockRemoved``).
* ``usage`` counts in-use blocks only (cached-but-free blocks are free), exactly like
  ``vllm:kv_cache_usage_perc``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence

from llmepp_sim.kvwire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

EventSink = Callable[[list[KVEvent]], None]


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, sink: EventSink | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._sink = sink
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # hash -> its cached copies, oldest first (vLLM's BlockHashToBlockMap; a hit takes the first)
        self._by_hash: dict[int, dict[int, None]] = {}
        # Insertion order = eviction order (oldest first); holds exactly the blocks with ref 0.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    # --- queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest run of resident blocks from the start of ``hashes``."""
        blocks = []
        for h in hashes:
            copies = self._by_hash.get(h)
            if not copies:
                break
            blocks.append(next(iter(copies)))
        return blocks

    def can_allocate(self, num_new: int, hit_blocks: Sequence[int]) -> bool:
        # Reusing a cached-but-free block takes it out of the free queue, so it counts against capacity.
        evictable_hits = sum(1 for b in hit_blocks if self._ref[b] == 0)
        return num_new + evictable_hits <= len(self._free)

    # --- mutations
    def touch(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"KV cache exhausted: need {count} blocks, {len(self._free)} free")
        blocks: list[int] = []
        evicted: list[int] = []
        for _ in range(count):
            b, _ = self._free.popitem(last=False)
            if (h := self._uncache(b)) is not None:
                evicted.append(h)
            self._ref[b] = 1
            blocks.append(b)
        if evicted:
            self._emit([BlockRemoved(evicted)])
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Release one reference to each block; release tail-first so prefixes are evicted last. Blocks without
        a hash go to the front of the free queue (reused first), cached ones to the back (vLLM free_blocks)."""
        fresh: list[int] = []
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
                if self._hash[b] is None:
                    fresh.append(b)
        for b in reversed(fresh):  # vLLM prepend_n: the first of them ends up at the head
            self._free.move_to_end(b, last=False)

    def store(
        self,
        blocks: Sequence[int],
        hashes: Sequence[int],
        parent_hash: int | None,
        token_ids: Sequence[int],
        lora_id: int | None = None,
        lora_name: str | None = None,
    ) -> None:
        """Register freshly computed full blocks in the prefix cache and publish them.

        ``token_ids`` are the tokens of exactly these blocks. As vLLM (cache_full_blocks), a hash that is
        already cached under another block is cached again under this one and published: the blocks form
        one ``BlockStored``.
        """
        bs = self.block_size
        events: list[KVEvent] = []
        run_start: int | None = None

        def close_run(end: int) -> None:
            if run_start is None:
                return
            parent = parent_hash if run_start == 0 else hashes[run_start - 1]
            events.append(
                BlockStored(
                    block_hashes=list(hashes[run_start:end]),
                    parent_block_hash=parent,
                    token_ids=list(token_ids[run_start * bs : end * bs]),
                    block_size=bs,
                    lora_id=lora_id,
                    lora_name=lora_name,
                )
            )

        for i, (b, h) in enumerate(zip(blocks, hashes)):
            if self._hash[b] == h:  # already this hash's block (a prefix hit): not new
                close_run(i)
                run_start = None
                continue
            self._hash[b] = h
            self._by_hash.setdefault(h, {})[b] = None
            if run_start is None:
                run_start = i
        close_run(len(blocks))
        self._emit(events)

    def clear_cached(self) -> bool:
        """Drop every cached-but-free block's hash (vLLM's reset_prefix_cache); refused while in use."""
        if len(self._free) != self.num_blocks:
            return False
        self._by_hash.clear()
        self._hash = [None] * self.num_blocks
        self._emit([AllBlocksCleared()])
        return True

    def evict(self, count: int, rng: random.Random | None = None) -> int:
        """Evict up to ``count`` cached-but-free blocks, as traffic the router never saw would; returns how many.

        Least recently freed first (the allocator's order), or a uniform sample with ``rng``. In-use blocks
        cannot be evicted (as in vLLM). Each evicted hash is published in one ``BlockRemoved``; the emptied
        blocks move to the front of the free queue so the next allocations reuse them before evicting more.
        """
        cached = [b for b in self._free if self._hash[b] is not None]
        chosen = rng.sample(cached, min(count, len(cached))) if rng is not None else cached[: max(0, count)]
        evicted: list[int] = []
        for b in chosen:
            if (h := self._uncache(b)) is not None:
                evicted.append(h)
            self._free.move_to_end(b, last=False)
        if evicted:
            self._emit([BlockRemoved(evicted)])
        return len(chosen)

    def _uncache(self, b: int) -> int | None:
        """Drop block ``b``'s hash (one copy of it); the hash, or None if it had none."""
        h = self._hash[b]
        if h is None:
            return None
        self._hash[b] = None
        copies = self._by_hash.get(h)
        if copies is not None:
            copies.pop(b, None)
            if not copies:
                del self._by_hash[h]
        return h

    def _emit(self, events: list[KVEvent]) -> None:
        if events and self._sink is not None:
            self._sink(events)
