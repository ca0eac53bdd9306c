"""vLLM's CPU offloading connector reports its stores as *location-only* BlockStored events.

vLLM (`OffloadingConnectorScheduler.take_events`, and the `_placeholder_stored` payload of the newer
`OffloadingEventsTracker` when self-describing events are off) yields, per offloaded chunk:

    BlockStored(block_hashes=[...], parent_block_hash=None, token_ids=[], lora_id=None,
                block_size=event.block_size   # older releases; 0 in newer ones
                , medium="CPU", lora_name=None)

i.e. no tokens, no parent: "this engine block now also lives on CPU". As llm-d's pool
(`handleDeviceTierUpdate`), the chains add the tier to the blocks they know; a block removed just before
comes back from its kept chain position, an unknown one is skipped. (These events used to be dropped as
unkeyable, or, with `block_size=0` and an unknown hash, keyed as a new prompt at the root.)
"""

from __future__ import annotations

import random

import pytest

from llmepp.kvevents.chain import SourceChains
from llmepp.kvevents.index import MemoryIndex
from llmepp.kvevents.keys import block_keys, root_key, tokens_to_bytes
from llmepp.kvevents.wire import BlockRemoved, BlockStored

from .test_chain_index import MODEL, TIERS, feed


def match(index: MemoryIndex, tokens: list[int], pod: str, block: int = 16) -> tuple[int, float]:
    cand = index.bit(pod)
    m = index.match(tokens_to_bytes(tokens), block, root_key(MODEL), cand)
    return m.lengths.get(cand, 0), m.weighted.get(cand, 0.0)


def offload_placeholder(hashes: list[int | bytes], block_size: int) -> BlockStored:
    """What vLLM's OffloadingConnector publishes when a chunk lands on CPU."""
    return BlockStored(
        block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=block_size, lora_id=None,
        medium="CPU", lora_name=None,
    )  # fmt: skip


@pytest.mark.parametrize("placeholder_block_size", [16, 0], ids=["block_size=event.block_size", "block_size=0"])
def test_blocks_offloaded_to_cpu_stay_indexed_after_the_gpu_evicts_them(placeholder_block_size: int) -> None:
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    tokens = [random.Random(7).randrange(50_000) for _ in range(16 * 4)]
    hashes: list[int | bytes] = [0x1111, 0x2222, 0x3333, 0x4444]
    feed(chains, index, "p:1", [BlockStored(hashes, None, tokens, 16, medium="GPU")])
    assert match(index, tokens, "p:1") == (4, pytest.approx(4.0))
    # The offloading connector copies all four blocks to CPU, then the GPU evicts them.
    feed(chains, index, "p:1", [offload_placeholder(hashes, placeholder_block_size)])
    feed(chains, index, "p:1", [BlockRemoved(hashes, "GPU")])
    # The pod still holds the prompt, on CPU: 4 blocks at weight 0.8 (llm-d: handleDeviceTierUpdate).
    assert match(index, tokens, "p:1") == (4, pytest.approx(4 * 0.8))


def test_a_location_only_store_of_an_unknown_block_does_not_restart_the_chain_at_the_root() -> None:
    """GPU evicts block B and the offload of B completes in the same engine step (vLLM publishes the
    block pool's events first, then the connector's): [BlockRemoved(B, GPU), BlockStored(B, CPU, no
    tokens)]. Then the engine stores C with parent B (e.g. the conversation's next turn)."""
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    rng = random.Random(3)
    a_tokens = [rng.randrange(50_000) for _ in range(16)]
    b_tokens = [rng.randrange(50_000) for _ in range(16)]
    c_tokens = [rng.randrange(50_000) for _ in range(16)]
    feed(chains, index, "p:1", [BlockStored([0xA, 0xB], None, a_tokens + b_tokens, 16, medium="GPU")])
    feed(chains, index, "p:1", [BlockRemoved([0xB], "GPU"), offload_placeholder([0xB], 0)])
    feed(chains, index, "p:1", [BlockStored([0xC], 0xB, c_tokens, 16, medium="GPU")])
    # C's tokens follow A+B; a prompt that *starts* with C's tokens is held by nobody.
    assert match(index, c_tokens, "p:1") == (0, 0.0), "C was keyed as the first block of a prompt"
    # C continues B's chain position (B's removal kept it): C's key is that of the prompt A+B+C.
    key_c = block_keys(tokens_to_bytes(a_tokens + b_tokens + c_tokens), 16, root_key(MODEL))[2]
    assert index.holders(key_c) == index.bit("p:1")


# -- Self-describing offload events (vLLM >= 0.24, `kv_connector_extra_config.self_describing_kv_events`) --
# The connector's OffloadingEventsTracker publishes each offloaded chunk as a BlockStored with the chunk's
# per-GPU-block hashes, its parent, its tokens and block_size = the GPU block size, but extra_keys=None; an
# eviction fans out a BlockRemoved to the same hashes. Chunks of a prefix that diverges inside a chunk
# re-announce the shared hashes once per chunk, and vLLM asks consumers to reference-count them.


def self_describing(hashes: list[int | bytes], parent: int | None, tokens: list[int]) -> BlockStored:
    return BlockStored(hashes, parent, tokens, 16, medium="CPU")


def test_a_block_shared_by_two_offloaded_chunks_stays_on_cpu_until_both_are_evicted() -> None:
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    rng = random.Random(11)
    shared = [rng.randrange(50_000) for _ in range(32)]
    tail_a = [rng.randrange(50_000) for _ in range(32)]
    tail_b = [rng.randrange(50_000) for _ in range(32)]
    a: list[int | bytes] = [0xA0, 0xA1, 0xA2, 0xA3]
    b: list[int | bytes] = [0xA0, 0xA1, 0xB2, 0xB3]
    feed(chains, index, "p:1", [BlockStored(a, None, shared + tail_a, 16, medium="GPU")])
    feed(chains, index, "p:1", [BlockStored(b[2:], 0xA1, tail_b, 16, medium="GPU")])
    # CPU chunks of 4 GPU blocks: both contain A0, A1.
    feed(chains, index, "p:1", [self_describing(a, None, shared + tail_a), self_describing(b, None, shared + tail_b)])
    feed(chains, index, "p:1", [BlockRemoved(a + b[2:], "GPU")])
    assert match(index, shared + tail_b, "p:1") == (4, pytest.approx(4 * 0.8))
    # The CPU evicts chunk A: its removal names A0 and A1 too, which chunk B still holds.
    feed(chains, index, "p:1", [BlockRemoved(a, "CPU")])
    assert match(index, shared + tail_b, "p:1") == (4, pytest.approx(4 * 0.8))
    assert match(index, shared + tail_a, "p:1") == (2, pytest.approx(2 * 0.8))
    feed(chains, index, "p:1", [BlockRemoved(b, "CPU")])
    assert match(index, shared + tail_b, "p:1") == (0, 0.0)


def test_a_gpu_block_stored_again_is_not_counted_twice() -> None:
    """vLLM >= 0.33 re-reports reused GPU blocks (emit_cached_block_events); the GPU removes a block once."""
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    tokens = [random.Random(5).randrange(50_000) for _ in range(32)]
    stored = BlockStored([0x1, 0x2], None, tokens, 16, medium="GPU")
    feed(chains, index, "p:1", [stored, stored])
    feed(chains, index, "p:1", [BlockRemoved([0x1, 0x2], "GPU")])
    assert match(index, tokens, "p:1") == (0, 0.0)


def test_an_offloaded_chunk_of_a_salted_prompt_evicted_from_gpu_keeps_the_salted_keys() -> None:
    """The self-describing store carries no extra_keys, so its first block cannot name the cache_salt;
    the engine hash names the same block the GPU store keyed with its salt."""
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    tokens = [random.Random(9).randrange(50_000) for _ in range(32)]
    hashes: list[int | bytes] = [0x51, 0x52]
    feed(chains, index, "p:1", [BlockStored(hashes, None, tokens, 16, medium="GPU", extra_keys=[["s1"], None])])
    # The GPU evicts the blocks before the connector's store event is published.
    feed(chains, index, "p:1", [BlockRemoved(hashes, "GPU"), self_describing(hashes, None, tokens)])
    cand = index.bit("p:1")
    m = index.match(tokens_to_bytes(tokens), 16, root_key(MODEL, "s1"), cand)
    assert (m.lengths.get(cand, 0), m.weighted.get(cand, 0.0)) == (2, pytest.approx(2 * 0.8))
