"""BlockPool and block hashing in isolation (the engine-level behaviour is tested over HTTP elsewhere)."""

from __future__ import annotations

import hashlib
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp_sim import blockhash
from llmepp_sim.kvcache import BlockPool
from llmepp_sim.kvwire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_batch,
    encode_batch,
)


def test_block_hash_definition_is_the_documented_one() -> None:
    tokens = list(range(1000, 1040))
    root = int.from_bytes(hashlib.sha256(b"llmepp-sim-root:").digest()[-8:], "big")
    first = int.from_bytes(
        hashlib.sha256(root.to_bytes(8, "big") + struct.pack(">16I", *tokens[:16])).digest()[-8:], "big"
    )
    second = int.from_bytes(
        hashlib.sha256(first.to_bytes(8, "big") + struct.pack(">16I", *tokens[16:32])).digest()[-8:], "big"
    )
    assert blockhash.chain(tokens, 16) == [first, second]  # the partial third block has no hash
    assert blockhash.chain(tokens, 16, hash_seed="s") != [first, second]
    assert blockhash.chain(tokens, 16, lora_name="a")[0] != first


def test_lru_eviction_prefers_tails_and_emits_removed() -> None:
    events: list[KVEvent] = []
    pool = BlockPool(4, 2, events.extend)
    a = pool.allocate(2)
    pool.store(a, [11, 12], None, [1, 2, 3, 4])
    pool.free(a)
    assert pool.usage() == 0.0 and pool.num_cached == 2
    assert pool.cached_prefix([11, 12, 13]) == a
    b = pool.allocate(3)  # two never-used blocks first, then the tail of the cached pair
    assert pool.is_cached(11) and not pool.is_cached(12)
    assert events[-1] == BlockRemoved([12])
    assert pool.cached_prefix([11, 12]) == [a[0]]
    pool.free(b)


def test_reference_counts_keep_shared_blocks_in_use() -> None:
    pool = BlockPool(4, 2)
    a = pool.allocate(1)
    pool.store(a, [7], None, [1, 2])
    hits = pool.cached_prefix([7])
    assert pool.can_allocate(3, hits) is True  # hit block is in use: it does not cost a free block
    pool.touch(hits)
    pool.free(a)
    assert pool.usage() == 0.25  # still referenced by the second user
    pool.free(hits)
    assert pool.usage() == 0.0
    assert pool.can_allocate(4, hits) is False  # reusing a free cached block consumes one


def test_duplicate_hashes_are_cached_and_published_again_as_vllm_does() -> None:
    events: list[KVEvent] = []
    pool = BlockPool(8, 2, events.extend)
    first = pool.allocate(2)
    pool.store(first, [1, 2], None, [0, 0, 0, 0])
    second = pool.allocate(3)
    pool.store(second, [5, 2, 6], 4, [9] * 6)
    assert events[1:] == [BlockStored([5, 2, 6], 4, [9] * 6, 2)]
    assert pool.cached_prefix([2]) == [first[1]]  # a hit takes the oldest copy


def test_clear_cached_refuses_while_in_use() -> None:
    events: list[KVEvent] = []
    pool = BlockPool(2, 2, events.extend)
    a = pool.allocate(1)
    pool.store(a, [3], None, [1, 2])
    assert pool.clear_cached() is False
    pool.free(a)
    assert pool.clear_cached() is True
    assert events[-1] == AllBlocksCleared() and pool.num_cached == 0


def test_evict_drops_free_cached_blocks_only_and_reuses_them_first() -> None:
    events: list[KVEvent] = []
    pool = BlockPool(8, 2, events.extend)
    a = pool.allocate(3)
    pool.store(a, [1, 2, 3], None, [0] * 6)
    pool.free(a)  # tail first: LRU order is 3, 2, 1
    busy = pool.allocate(1)  # a never-used block
    b = pool.allocate(1)  # takes the next never-used block, nothing evicted yet
    pool.store(b, [9], None, [0, 0])
    assert pool.evict(2) == 2  # LRU: the two oldest free cached blocks
    assert events[-1] == BlockRemoved([3, 2])
    assert pool.cached_prefix([1, 2, 3]) == [a[0]] and pool.is_cached(9)  # in use: never evicted
    assert pool.num_free == 6  # still free, just empty
    c = pool.allocate(2)  # the emptied blocks come first: the remaining cached block survives
    assert set(c) == {a[1], a[2]} and pool.is_cached(1)
    pool.free(c + busy + b)
    assert pool.evict(100) == 2 and pool.num_cached == 0  # more than cached: all of them
    assert pool.evict(1) == 0 and isinstance(events[-1], BlockRemoved)


def test_random_eviction_is_seeded_and_bounded() -> None:
    def run(seed: int) -> list[int]:
        events: list[KVEvent] = []
        pool = BlockPool(20, 1, events.extend)
        blocks = pool.allocate(20)
        pool.store(blocks, list(range(100, 120)), None, list(range(20)))
        pool.free(blocks)
        assert pool.evict(4, random.Random(seed)) == 4
        assert pool.num_cached == 16
        removed = events[-1]
        assert isinstance(removed, BlockRemoved)
        return removed.block_hashes

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != [119, 118, 117, 116]  # not the LRU order


def test_wire_round_trip_both_formats() -> None:
    events: list[KVEvent] = [
        BlockStored([2**64 - 1, 5], None, [1, 2, 3, 4], 2, 3, "adapter"),
        BlockRemoved([5]),
        AllBlocksCleared(),
    ]
    for legacy in (False, True):
        ts, decoded, rank = decode_batch(encode_batch(1.5, events, 2, legacy))
        assert (ts, decoded, rank) == (1.5, events, 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 6), st.integers(0, 30)), max_size=60))
def test_pool_invariants_under_random_traffic(ops: list[tuple[int, int, int]]) -> None:
    """Free + in-use always adds up, and the published events describe exactly the cached set."""
    events: list[KVEvent] = []
    pool = BlockPool(12, 4, events.extend)
    held: list[list[int]] = []
    for op, size, salt in ops:
        if op == 0 or not held:  # a request with a salted prefix
            hashes = blockhash.chain([salt] * (4 * size), 4)
            hits = pool.cached_prefix(hashes)
            if not pool.can_allocate(size - len(hits), hits):
                continue
            pool.touch(hits)
            blocks = hits + pool.allocate(size - len(hits))
            pool.store(blocks[len(hits) :], hashes[len(hits) :], hashes[len(hits) - 1] if hits else None, [0] * 4)
            held.append(blocks)
        else:
            pool.free(held.pop(salt % len(held)))
        in_use = {b for blocks in held for b in blocks}
        assert pool.num_free == 12 - len(in_use)
        assert abs(pool.usage() - len(in_use) / 12) < 1e-9
        published: set[int] = set()
        for event in events:
            if isinstance(event, BlockStored):
                published |= set(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                published -= set(event.block_hashes)
        assert len(published) == pool.num_cached
        assert all(pool.is_cached(h) for h in published)
    for blocks in held:
        pool.free(blocks)
    assert pool.usage() == 0.0
