"""Request keys from events (parents, block-size ratios, tiers, removals) and the in-memory index."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.kvevents.chain import GHOSTS, Delta, SourceChains, pack_block, unpack_block
from llmepp.kvevents.index import LAST_HOLDER_SLACK, SPEC_QUEUE_SLACK, Match, MemoryIndex
from llmepp.kvevents.keys import block_keys, root_key, tokens_to_bytes
from llmepp.kvevents.tiers import TierTable
from llmepp.kvevents.wire import BlockRemoved, BlockStored

MODEL = "m"
TIERS = TierTable()


def engine_events(tokens: list[int], engine_bs: int, per_event: int, medium: str = "GPU") -> list[BlockStored]:
    """What an engine with `engine_bs`-token blocks reports for `tokens`, `per_event` blocks per event;
    engine hashes are opaque values unrelated to ours (a different algorithm and seed)."""
    n = len(tokens) // engine_bs
    hashes: list[int | bytes] = [random.Random(i).getrandbits(64) ^ 0xABCDEF for i in range(n)]
    events = []
    for start in range(0, n, per_event):
        end = min(n, start + per_event)
        events.append(
            BlockStored(
                block_hashes=hashes[start:end],
                parent_block_hash=hashes[start - 1] if start else None,
                token_ids=tokens[start * engine_bs : end * engine_bs],
                block_size=engine_bs,
                medium=medium,
            )
        )
    return events


def feed(chains: SourceChains, index: MemoryIndex, pod: str, events: Sequence[BlockStored | BlockRemoved]) -> Delta:
    delta = Delta()
    for ev in events:
        if isinstance(ev, BlockStored):
            chains.stored(ev, MODEL, delta)
        else:
            chains.removed(ev, delta)
    index.apply(pod, delta)
    return delta


def match(index: MemoryIndex, tokens: list[int], block: int, pods: list[str], model: str = MODEL) -> Match:
    cand = 0
    for p in pods:
        cand |= index.bit(p)
    return index.match(tokens_to_bytes(tokens), block, root_key(model), cand)


def lookup(index: MemoryIndex, tokens: list[int], block: int, pods: list[str], model: str = MODEL) -> dict[str, int]:
    return {index.pod_of(b): n for b, n in match(index, tokens, block, pods, model).lengths.items()}


@settings(max_examples=60, deadline=None)
@given(
    ours=st.sampled_from([4, 16]),
    ratio=st.sampled_from([(1, 1), (4, 1), (1, 4), (3, 2)]),
    n_tokens=st.integers(0, 300),
    per_event=st.integers(1, 5),
)
def test_event_keys_equal_prompt_keys_for_any_block_size_ratio(
    ours: int, ratio: tuple[int, int], n_tokens: int, per_event: int
) -> None:
    """The engine's block size and hashes do not matter: keys from events == keys from the prompt."""
    engine_bs = max(1, ours * ratio[0] // ratio[1])
    tokens = [random.Random(n_tokens).randrange(50_000) for _ in range(n_tokens)]
    chains = SourceChains(ours, 0, TIERS, max_blocks=10_000)
    delta = Delta()
    for ev in engine_events(tokens, engine_bs, per_event):
        chains.stored(ev, MODEL, delta)
    covered = (n_tokens // engine_bs) * engine_bs  # the engine only reports full blocks of its own
    assert delta.keys == block_keys(tokens_to_bytes(tokens[:covered]), ours, root_key(MODEL))
    assert set(delta.masks) <= {1}


def test_longest_consecutive_prefix_per_pod_and_removal() -> None:
    index = MemoryIndex(1000, 10, TIERS)
    tokens = list(range(16 * 10))
    a, b = SourceChains(16, 0, TIERS, 1000), SourceChains(16, 0, TIERS, 1000)
    ev_a = engine_events(tokens, 16, 4)
    feed(a, index, "a:1", ev_a)
    feed(b, index, "b:1", engine_events(tokens[: 16 * 3], 16, 4))
    assert lookup(index, tokens, 16, ["a:1", "b:1"]) == {"a:1": 10, "b:1": 3}
    # A longer prompt with the same prefix matches the same blocks; a different model matches nothing.
    assert lookup(index, [*tokens, *range(999, 1100)], 16, ["a:1"]) == {"a:1": 10}
    assert lookup(index, tokens, 16, ["a:1"], model="other") == {}
    # Evicting block 5 on a: a's consecutive match stops there (tail blocks no longer count).
    h5 = ev_a[1].block_hashes[1]
    feed(a, index, "a:1", [BlockRemoved([h5], "GPU")])
    assert lookup(index, tokens, 16, ["a:1", "b:1"]) == {"a:1": 5, "b:1": 3}
    # Candidates restrict the answer.
    assert lookup(index, tokens, 16, ["b:1"]) == {"b:1": 3}


def test_orphans_unknown_removals_and_kinds_are_counted() -> None:
    chains = SourceChains(16, 0, TIERS, 1000)
    delta = Delta()
    chains.stored(BlockStored([1], parent_block_hash=99, token_ids=list(range(16)), block_size=16), MODEL, delta)
    chains.removed(BlockRemoved([12345]), delta)
    chains.stored(
        BlockStored([2], token_ids=list(range(16)), block_size=16, kv_cache_spec_kind="sliding_window"), MODEL, delta
    )
    chains.stored(BlockStored([3], token_ids=list(range(16)), block_size=16, medium="NVME"), MODEL, delta)
    assert delta.keys == []
    s = chains.stats
    assert (s.orphans, s.unknown_removals, s.skipped_kind, s.unknown_medium) == (1, 1, 1, 1)


def test_a_store_after_a_removed_parent_continues_the_chain() -> None:
    """A request's own copy of a block whose cached twin was evicted: the engine names the removed
    hash as the parent of what the request stores next; those blocks are keyed, not orphans."""
    tokens = list(range(16 * 3))
    chains = SourceChains(16, 0, TIERS, 1000)
    delta = Delta()
    chains.stored(BlockStored([1, 2], token_ids=tokens[:32], block_size=16), MODEL, delta)
    chains.removed(BlockRemoved([2]), delta)
    chains.stored(BlockStored([3], parent_block_hash=2, token_ids=tokens[32:], block_size=16), MODEL, delta)
    want = block_keys(tokens_to_bytes(tokens), 16, root_key(MODEL))
    assert delta.keys == [want[0], want[1], want[1], want[2]] and delta.masks == [1, 1, 0, 1]
    assert chains.stats.orphans == 0
    # A clear forgets removed blocks too (a restarted engine may hash differently).
    chains.removed(BlockRemoved([3]), delta)
    chains.clear(delta)
    chains.stored(BlockStored([4], parent_block_hash=3, token_ids=tokens[32:], block_size=16), MODEL, delta)
    assert chains.stats.orphans == 1


def test_removed_parents_are_remembered_within_a_bound() -> None:
    chains = SourceChains(16, 0, TIERS, 100_000)
    delta = Delta()
    n = GHOSTS + 10
    for h in range(1, n + 1):
        chains.stored(BlockStored([h], token_ids=[h] * 16, block_size=16), MODEL, delta)
    chains.removed(BlockRemoved(list(range(1, n + 1))), delta)
    for parent in (1, 10, 11, n):  # the oldest 10 removals are forgotten
        chains.stored(BlockStored([10**9 + parent], parent_block_hash=parent, token_ids=[0] * 16), MODEL, delta)
    assert chains.stats.orphans == 2


def _held(index: MemoryIndex, tokens: list[int], salt: str = "") -> int:
    """Blocks of `tokens` pod p:1 holds, for a request with `salt` (MODEL's root)."""
    bit = index.bit("p:1")
    return index.match(tokens_to_bytes(tokens), 16, root_key(MODEL, salt), bit).lengths.get(bit, 0)


def test_an_image_identifier_in_the_first_block_is_not_taken_for_the_cache_salt() -> None:
    """vLLM's block extra keys are the LoRA name, the identifiers (plain strings) of the multimodal items
    overlapping the block, then the cache_salt, on block 0 only. An image starting in block 0 of a request with
    no salt must not root the chain as if its hash were a salt: multimodal requests match on their text tokens."""
    index, chains = MemoryIndex(1000, 10, TIERS), SourceChains(16, 0, TIERS, 1000)
    tokens = [random.Random(5).randrange(50_000) for _ in range(16 * 3)]
    image = "5f1c0a9e3b7d2c4f8a6e1b0d9c3f7a2e5b8d4c1f0e9a7b6c3d2e1f0a9b8c7d6e"
    feed(chains, index, "p:1", [BlockStored([0x11, 0x22, 0x33], None, tokens, 16, extra_keys=[[image], [image], None])])
    assert _held(index, tokens) == 3

    index, chains = MemoryIndex(1000, 10, TIERS), SourceChains(16, 0, TIERS, 1000)
    salted = [["imghash", "tenant-a"], ["imghash"], None]  # an image and a salt: the salt comes last
    feed(chains, index, "p:1", [BlockStored([0x11, 0x22, 0x33], None, tokens, 16, extra_keys=salted)])
    assert _held(index, tokens, salt="tenant-a") == 3 and _held(index, tokens) == 0


def test_tiers_weight_the_match_and_removal_is_per_tier() -> None:
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    tokens = list(range(16 * 5))
    gpu = engine_events(tokens, 16, 5)
    feed(chains, index, "p:1", gpu)
    cand = index.bit("p:1")
    m = index.match(tokens_to_bytes(tokens), 16, root_key(MODEL), cand)
    assert m.weighted[cand] == pytest.approx(5.0)
    # Offloaded to CPU, then dropped from GPU: still held, at the CPU weight.
    cpu = [BlockStored(ev.block_hashes, ev.parent_block_hash, ev.token_ids, 16, medium="CPU") for ev in gpu]
    feed(chains, index, "p:1", [*cpu, BlockRemoved(gpu[0].block_hashes[3:], "GPU")])
    m = index.match(tokens_to_bytes(tokens), 16, root_key(MODEL), cand)
    assert m.lengths[cand] == 5
    assert m.weighted[cand] == pytest.approx(3 * 1.0 + 2 * 0.8)
    feed(chains, index, "p:1", [BlockRemoved(gpu[0].block_hashes[3:], "CPU")])
    assert index.match(tokens_to_bytes(tokens), 16, root_key(MODEL), cand).lengths[cand] == 3


def test_duplicate_stores_are_reference_counted() -> None:
    """vLLM >= 0.33 re-reports reused blocks; two engine blocks with equal tokens share a key."""
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    tokens = list(range(16))
    feed(chains, index, "p:1", [BlockStored([1], None, tokens, 16), BlockStored([1], None, tokens, 16)])
    feed(chains, index, "p:1", [BlockStored([2], None, tokens, 16)])  # other engine hash, same key
    feed(chains, index, "p:1", [BlockRemoved([1])])
    assert lookup(index, tokens, 16, ["p:1"]) == {"p:1": 1}
    feed(chains, index, "p:1", [BlockRemoved([2])])
    assert lookup(index, tokens, 16, ["p:1"]) == {}


def test_clear_drops_everything_the_pod_held() -> None:
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    tokens = list(range(64))
    feed(chains, index, "p:1", engine_events(tokens, 16, 2))
    delta = Delta()
    chains.clear(delta)
    index.apply("p:1", delta)
    assert delta.clear_at == 4 and len(index) == 0 and len(chains) == 0
    assert lookup(index, tokens, 16, ["p:1"]) == {}


def test_engine_map_is_bounded() -> None:
    index = MemoryIndex(10_000, 10, TIERS)
    chains = SourceChains(4, 0, TIERS, max_blocks=50)
    feed(chains, index, "p:1", engine_events(list(range(4 * 200)), 4, 7))
    assert len(chains) <= 50
    assert len(index) == len(chains.kmask) <= 50


def test_engine_block_pack_roundtrip() -> None:
    chains = SourceChains(16, 0, TIERS, 1000)
    chains.stored(BlockStored([7, 8], None, list(range(40)), 20), MODEL, Delta())  # 20-token engine blocks
    for block in chains.engine.values():
        back = unpack_block(pack_block(block))
        assert (back.tiers, back.keys, back.last_key, back.pending) == (
            block.tiers, block.keys, block.last_key, block.pending
        )  # fmt: skip
    restored = SourceChains(16, 0, TIERS, 1000)
    restored.restore({h: unpack_block(pack_block(b)) for h, b in chains.engine.items()})
    assert restored.kmask == chains.kmask


def test_index_size_bound_evicts_least_recently_stored() -> None:
    index = MemoryIndex(size=3, pod_cache_size=10, tiers=TIERS)
    index.apply("p:1", Delta(keys=[1, 2, 3], masks=[1, 1, 1]))
    index.apply("p:1", Delta(keys=[1], masks=[1]))  # refreshes key 1
    index.apply("p:1", Delta(keys=[4], masks=[1]))
    b = index.bit("p:1")
    assert [index.holders(k) for k in (1, 2, 3, 4)] == [b, 0, b, b]


def test_pod_cache_size_bounds_holders_per_key() -> None:
    index = MemoryIndex(size=10, pod_cache_size=2, tiers=TIERS)
    for pod in ("a:1", "b:1", "c:1"):
        index.apply(pod, Delta(keys=[42], masks=[1]))
    assert index.holders(42).bit_count() == 2
    assert index.holders(42) & index.bit("c:1")


def test_speculative_entries_expire_unless_confirmed() -> None:
    now = [100.0]
    index = MemoryIndex(1000, 10, TIERS, clock=lambda: now[0])
    tokens = list(range(48))
    keys = block_keys(tokens_to_bytes(tokens), 16, root_key(MODEL))
    index.speculate("a:1", keys, ttl=2.0)
    index.speculate("b:1", keys[:1], ttl=2.0)
    assert lookup(index, tokens, 16, ["a:1", "b:1"]) == {"a:1": 3, "b:1": 1}
    assert index.speculative_entries == 4
    # Events confirm a's first two blocks before the TTL runs out.
    index.apply("a:1", Delta(keys=keys[:2], masks=[1, 1]))
    now[0] += 1.0
    index.speculate("b:1", keys[:1], ttl=2.0)  # refreshed: lives until 103
    now[0] += 1.5
    assert lookup(index, tokens, 16, ["a:1", "b:1"]) == {"a:1": 2, "b:1": 1}
    now[0] += 1.0
    assert lookup(index, tokens, 16, ["a:1", "b:1"]) == {"a:1": 2}
    assert index.speculative_entries == 0


def test_release_frees_the_bit_and_entries() -> None:
    index = MemoryIndex(1000, 10, TIERS)
    index.apply("a:1", Delta(keys=[1, 2], masks=[1, 1]))
    index.speculate("a:1", [3], 5.0)
    bit = index.bit("a:1")
    index.release("a:1")
    assert len(index) == 0 and index.speculative_entries == 0 and index.bit_of("a:1") == 0
    assert index.bit("b:1") == bit  # reused


def last_holder(index: MemoryIndex, tokens: list[int], pods: list[str]) -> str | None:
    last = match(index, tokens, 16, pods).last
    return index.pod_of(last) if last else None


def test_a_prefix_evicted_everywhere_reports_the_pod_that_last_held_it() -> None:
    index = MemoryIndex(1000, 10, TIERS)
    tokens = list(range(16 * 4))
    a, b = SourceChains(16, 0, TIERS, 1000), SourceChains(16, 0, TIERS, 1000)
    ev_a, ev_b = engine_events(tokens, 16, 4), engine_events(tokens, 16, 4)
    feed(a, index, "a:1", ev_a)
    pods = ["a:1", "b:1", "c:1"]
    assert last_holder(index, tokens, pods) is None  # held: a hit, not a last holder
    # a evicts the tail only: still a (shorter) hit.
    feed(a, index, "a:1", [BlockRemoved(ev_a[0].block_hashes[2:], "GPU")])
    assert lookup(index, tokens, 16, pods) == {"a:1": 2} and last_holder(index, tokens, pods) is None
    # a evicts block 0: nobody holds the prompt; a held it last.
    feed(a, index, "a:1", [BlockRemoved(ev_a[0].block_hashes[:2], "GPU")])
    assert lookup(index, tokens, 16, pods) == {} and last_holder(index, tokens, pods) == "a:1"
    assert last_holder(index, tokens, ["b:1", "c:1"]) is None  # only candidates are reported
    # b stores and evicts it after a: the most recent remover wins.
    feed(b, index, "b:1", ev_b)
    assert last_holder(index, tokens, pods) is None
    feed(b, index, "b:1", [BlockRemoved(ev_b[0].block_hashes, "GPU")])
    assert last_holder(index, tokens, pods) == "b:1"
    # A speculative entry is a hit like a real one.
    index.speculate("c:1", [next(iter(block_keys(tokens_to_bytes(tokens), 16, root_key(MODEL))))], 5.0)
    assert lookup(index, tokens, 16, pods) == {"c:1": 1} and last_holder(index, tokens, pods) is None
    # A pod that leaves the pool is forgotten as a last holder (its bit is handed out again).
    index.release("b:1")
    assert last_holder(index, tokens, ["a:1", "d:1"]) is None


def test_last_holders_are_bounded_by_the_index_size() -> None:
    index = MemoryIndex(size=2, pod_cache_size=10, tiers=TIERS)
    index.apply("a:1", Delta(keys=[1, 2], masks=[1, 1]))
    index.apply("a:1", Delta(keys=[1, 2], masks=[0, 0]))
    index.apply("a:1", Delta(keys=[3, 3], masks=[1, 0]))
    bit = index.bit_of("a:1")
    assert [index.last_holder(k) for k in (1, 2, 3)] == [0, bit, bit]  # key 1, the oldest, dropped
    # Removing a key the pod does not hold records nothing.
    index.apply("b:1", Delta(keys=[9], masks=[0]))
    assert index.last_holder(9) == 0

    # A large index keeps as many last holders as it holds keys, plus a slack.
    index = MemoryIndex(size=10**8, pod_cache_size=10, tiers=TIERS)
    n = LAST_HOLDER_SLACK + 10
    index.apply("a:1", Delta(keys=list(range(n)), masks=[1] * n))
    index.apply("a:1", Delta(keys=list(range(n)), masks=[0] * n))
    assert index.last_holder(9) == 0 and index.last_holder(10) == index.last_holder(n - 1) != 0


def test_removals_from_a_sliding_window_group_leave_the_full_attention_blocks() -> None:
    """Hybrid models (HMA): every KV-cache group caches the request's blocks under the same engine hash
    and evicts them on its own; BlockRemoved names the group but not its kind. A sliding-window group
    drops blocks outside its window all the time, while the full-attention group still holds the prefix."""
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    tokens = list(range(16 * 4))
    full = engine_events(tokens, 16, 4)
    swa = [
        BlockStored(ev.block_hashes, ev.parent_block_hash, ev.token_ids, 16, medium="GPU", group_idx=1,
                    kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=32)
        for ev in full
    ]  # fmt: skip
    full = [
        BlockStored(ev.block_hashes, ev.parent_block_hash, ev.token_ids, 16, medium="GPU", group_idx=0,
                    kv_cache_spec_kind="full_attention")
        for ev in full
    ]  # fmt: skip
    feed(chains, index, "p:1", [*full, *swa])
    assert lookup(index, tokens, 16, ["p:1"]) == {"p:1": 4}
    # The window moved on: group 1 evicts blocks 0 and 1; group 0 still holds all four.
    feed(chains, index, "p:1", [BlockRemoved(full[0].block_hashes[:2], "GPU", group_idx=1)])
    assert lookup(index, tokens, 16, ["p:1"]) == {"p:1": 4}
    assert chains.stats.skipped_kind == 2
    # The full-attention group's own removal still counts.
    feed(chains, index, "p:1", [BlockRemoved(full[0].block_hashes[2:3], "GPU", group_idx=0)])
    assert lookup(index, tokens, 16, ["p:1"]) == {"p:1": 2}


@pytest.mark.parametrize(
    "event",
    [
        BlockStored([1], None, list(range(32)), 16),  # 2 blocks of tokens for one engine block
        BlockStored([1, 2], None, list(range(16)), 16),  # 1 block of tokens for two engine blocks
        BlockStored([1, 2], None, list(range(40)), 16),
        BlockStored([1], None, list(range(16)), 16, lora_id=3),  # an adapter's block, its name unknown
    ],
)
def test_stores_that_cannot_be_keyed_are_skipped_and_counted(event: BlockStored) -> None:
    """Keys come from the tokens of each engine block; a store whose token count is not blocks ×
    block_size cannot say which tokens are whose (keying it anyway claims blocks the engine does not
    hold, or chains later stores from the wrong position). An adapter's blocks keyed under the base
    model would be hits for base-model prompts the engine cannot serve from them (vLLM before lora_name
    sent only lora_id)."""
    index = MemoryIndex(1000, 10, TIERS)
    chains = SourceChains(16, 0, TIERS, 1000)
    delta = feed(chains, index, "p:1", [event])
    assert delta.keys == [] and len(chains) == 0 and chains.stats.unkeyable == 1
    assert lookup(index, list(range(32)), 16, ["p:1"]) == {}
    # The same block with its adapter's name is keyed under the adapter.
    named = BlockStored([1], None, list(range(16)), 16, lora_id=3, lora_name="ad")
    feed(chains, index, "p:1", [named])
    assert lookup(index, list(range(16)), 16, ["p:1"], model="ad") == {"p:1": 1}


def test_a_holder_displaced_by_pod_cache_size_leaves_no_tier_entry_behind() -> None:
    """A key over `podCacheSize` drops a holder; its lower-tier weight went with it, but an empty
    per-key tier dict stayed: kept for good once the key was gone (a leak per such key), and, the
    tier dict being non-empty, every lookup took the slow path."""
    index = MemoryIndex(size=10, pod_cache_size=1, tiers=TIERS)
    index.apply("a:1", Delta(keys=[42], masks=[2]))  # a holds key 42 on CPU only
    index.apply("b:1", Delta(keys=[42], masks=[1]))  # b takes the only slot
    index.apply("b:1", Delta(keys=[42], masks=[0]))
    assert len(index) == 0
    assert index._low == {}


def test_superseded_speculative_deadlines_do_not_pile_up() -> None:
    """The producer speculates each routed prompt twice: held for `speculativeMaxHold` (5 min) at
    routing, then shortened to `speculativeTTL` at the first response bytes. The long deadlines stayed
    queued until they passed, one per prompt block per request for 5 minutes, whatever expired."""
    now = [0.0]
    index = MemoryIndex(1000, 10, TIERS, clock=lambda: now[0])
    for r in range(50):
        keys = list(range(r * 100, r * 100 + 100))
        index.speculate("a:1", keys, 300.0)
        now[0] += 0.5
        index.speculate("a:1", keys, 2.0)
        index.expire()
    now[0] += 3.0
    index.expire()
    assert index.speculative_entries == 0
    assert sum(len(q) for q in index._spec_queues.values()) == 0


def test_superseded_speculative_deadlines_do_not_pile_up_behind_a_held_request() -> None:
    """Superseded deadlines were dropped only from the front of their queue: while one request stayed
    held (its first response bytes not yet back: a long prefill or a non-streaming request), every later
    request's superseded 5-minute entry queued behind it, one per prompt block, for up to 5 minutes."""
    now = [0.0]
    index = MemoryIndex(1_000_000, 10, TIERS, clock=lambda: now[0])
    index.speculate("a:1", list(range(10**6, 10**6 + 256)), 300.0)  # held throughout
    for r in range(500):
        keys = list(range(r * 256, (r + 1) * 256))
        index.speculate("b:1", keys, 300.0)
        now[0] += 0.005
        index.speculate("b:1", keys, 2.0)
        now[0] += 0.005
        index.expire()
    now[0] += 3.0
    index.expire()
    live = index.speculative_entries
    assert live == 256  # the held request's
    assert sum(len(q) for q in index._spec_queues.values()) <= 2 * live + SPEC_QUEUE_SLACK


def test_mediums_no_tier_names_are_not_memoised_without_bound() -> None:
    tiers = TierTable()
    for i in range(10_000):
        assert tiers.bit(f"DISK-{i}") == 0
    assert tiers.bit("GPU") == 1 and tiers.bit("cpu") == 2 and tiers.bit(None) == 1
    assert len(tiers._by_medium) <= 64


def test_a_re_reported_block_is_recently_stored_again() -> None:
    """vLLM >= 0.33 re-reports the prefix blocks a request reuses. The chains swallowed the report (the
    block was known): a prefix every request reuses stayed the *least* recently stored key, the first
    the size bound evicted (and, swallowed again, it never came back while the engine held it); in the
    shared index its entries expired `ttl` after the first store (test_redis.py)."""
    index = MemoryIndex(size=3, pod_cache_size=10, tiers=TIERS)
    chains = SourceChains(4, 0, TIERS, 1000)
    hot, cold, new = list(range(8)), list(range(100, 104)), list(range(200, 204))
    feed(chains, index, "p:1", [BlockStored([1, 2], None, hot, 4)])  # a shared system prompt
    feed(chains, index, "p:1", [BlockStored([3], None, cold, 4)])
    delta = feed(chains, index, "p:1", [BlockStored([1, 2], None, hot, 4)])  # reused: re-reported
    assert delta.keys == block_keys(tokens_to_bytes(hot), 4, root_key(MODEL)) and delta.masks == [1, 1]
    feed(chains, index, "p:1", [BlockStored([4], None, new, 4)])  # over the bound: the oldest goes
    assert lookup(index, hot, 4, ["p:1"]) == {"p:1": 2}
    assert lookup(index, cold, 4, ["p:1"]) == {}
    # Still reference counted once: one removal drops it.
    feed(chains, index, "p:1", [BlockRemoved([1, 2])])
    assert lookup(index, hot, 4, ["p:1"]) == {}


def test_the_engine_bound_sheds_the_least_recently_stored_blocks() -> None:
    """Over `max_blocks` a source forgets engine blocks from the least recently stored: a prefix that vLLM
    re-reports on every reuse (0.33 and later) is recent, however early it was first stored. Before, the
    bound shed by first store, so the pod's hottest prefix left the index first."""
    index = MemoryIndex(size=1000, pod_cache_size=10, tiers=TIERS)
    chains = SourceChains(4, 0, TIERS, max_blocks=10)
    hot = list(range(8))  # 2 engine blocks, stored first

    def feed(ev: BlockStored) -> None:
        delta = Delta()
        chains.stored(ev, MODEL, delta)
        index.apply("p:1", delta)

    def held(tokens: list[int]) -> int:
        bit = index.bit("p:1")
        return index.match(tokens_to_bytes(tokens), 4, root_key(MODEL), bit).lengths.get(bit, 0)

    feed(BlockStored([1, 2], None, hot, 4))
    for i in range(8):  # one-off prompts; the hot prefix is reused (re-reported) all along
        feed(BlockStored([100 + i], None, list(range(100 + 4 * i, 104 + 4 * i)), 4))
        feed(BlockStored([1, 2], None, hot, 4))
    assert held(hot) == 2
    feed(BlockStored([999], None, [7, 7, 7, 7], 4))  # 11 blocks > 10: shed to 9
    assert held(hot) == 2
    assert held(list(range(100, 104))) == 0  # the oldest one-off went instead


def test_a_block_removed_again_is_the_most_recent_removed_parent() -> None:
    """The removed parents a source remembers (GHOSTS) are dropped oldest removal first. A block removed,
    stored again and removed again is the newest removal; before, it kept its first removal's place and
    was dropped first, so a store continuing from it was an orphan (its keys never indexed)."""
    chains = SourceChains(4, 0, TIERS, 100_000)
    delta = Delta()
    chains.stored(BlockStored([7], None, [1, 2, 3, 4], 4), MODEL, delta)
    chains.removed(BlockRemoved([7]), delta)
    chains.stored(BlockStored([7], None, [1, 2, 3, 4], 4), MODEL, delta)  # cached again
    for h in range(1000, 1000 + GHOSTS - 1):  # other blocks come and go
        chains.stored(BlockStored([h], None, [h] * 4, 4), MODEL, delta)
        chains.removed(BlockRemoved([h]), delta)
    chains.removed(BlockRemoved([7]), delta)  # removed again: the most recent removal
    chains.stored(BlockStored([50_000], None, [9] * 4, 4), MODEL, delta)
    chains.removed(BlockRemoved([50_000]), delta)  # one removal more than GHOSTS remembers
    chains.stored(BlockStored([8], parent_block_hash=7, token_ids=[5, 6, 7, 8], block_size=4), MODEL, delta)
    assert chains.stats.orphans == 0
