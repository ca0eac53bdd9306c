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
