"""The block pool and engine as vLLM 0.33's: freed blocks without a hash are reused before cached ones are evicted
(BlockPool.free_blocks, PR #42656), a recomputed block is cached and published again (no de-duplication), and
a P/D decode-side request reports the KV it pulled as cached tokens."""

from __future__ import annotations

from llmepp_sim.config import PodConfig
from llmepp_sim.engine import Engine, RequestKind
from llmepp_sim.kvcache import BlockPool
from llmepp_sim.kvwire import BlockRemoved, BlockStored, KVEvent
from llmepp_sim.lora import LoraManager

from .handclock import HandClock, run_until_idle, sim_request


def _engine(**overrides: object) -> tuple[Engine, HandClock]:
    clock = HandClock()
    fields: dict[str, object] = dict(
        block_size=4, kv_cache_size=4, max_num_seqs=4, max_model_len=64, time_to_first_token=0,
        prefill_overhead=1, prefill_time_per_token=0.1, inter_token_latency=2,
    )  # fmt: skip
    fields.update(overrides)
    return Engine(PodConfig(**fields), clock, LoraManager([]), None), clock  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 1. fresh blocks are reused first
def test_pool_reuses_freed_uncached_blocks_before_evicting_cached_ones() -> None:
    """vLLM BlockPool.free_blocks (PR #42656, merged 2026-05, in 0.33): freed blocks without a hash go to the
    *front* of the free queue (reused first), hashed blocks to the back (LRU). The simulator appends both, so a
    request's partial tail block takes an LRU slot and a cached block is evicted while an empty one waits."""
    pool = BlockPool(4, 4)
    a = pool.allocate(2)  # a full prompt block + the partial tail
    pool.store(a[:1], [101], None, [1, 2, 3, 4])
    b = pool.allocate(2)
    pool.store(b[:1], [201], None, [5, 6, 7, 8])
    pool.free(a)  # vLLM queue: [a1] + [a0]
    pool.free(b)  # vLLM queue: [b1, a1] + [a0, b0]
    pool.allocate(2)  # vLLM takes the two empty tails b1, a1: nothing is evicted
    assert pool.is_cached(101), "a cached block was evicted while freed uncached blocks were still free"
    assert pool.is_cached(201)


def test_engine_keeps_a_prefix_that_vllm_keeps_when_tail_blocks_are_free() -> None:
    """The same through the engine: three 5-token prompts (one full block + a partial one each) on a 4-block
    pool, one after another; then the first prompt again. In vLLM the first prompt's block is still cached
    (the partial tails were reused first), so the repeat hits 4 tokens."""
    engine, clock = _engine()
    p1, p2, p3 = [10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]
    for i, prompt in enumerate((p1, p2, p3)):
        engine.submit(sim_request(f"r{i}", prompt, 1))
        run_until_idle(engine, clock)
    again = sim_request("again", p1, 1)
    engine.submit(again)
    run_until_idle(engine, clock)
    assert again.finished
    assert again.num_cached_tokens == 4, f"cached {again.num_cached_tokens}: p1's block was evicted"


# --------------------------------------------------------------------------- 2. duplicate blocks
def test_a_recomputed_block_is_cached_again_and_published_as_vllm_does() -> None:
    """vLLM does not de-duplicate (BlockHashToBlockMap, "NOTE #1"): a full block recomputed under a hash that is
    already cached is inserted too and published in BlockStored; evicting one copy publishes BlockRemoved and
    the hash stays cached while the other copy lives (get_one_block). The simulator's docstring says it keeps
    the first block "as in vLLM" and leaves the duplicate out of the event."""
    events: list[KVEvent] = []
    pool = BlockPool(4, 4, events.extend)
    first = pool.allocate(1)
    pool.store(first, [7], None, [1, 2, 3, 4])
    pool.free(first)
    dup = pool.allocate(1)  # a never-used block (the free queue's head), not `first`
    assert dup != first
    pool.store(dup, [7], None, [1, 2, 3, 4])
    assert events.count(BlockStored([7], None, [1, 2, 3, 4], 4)) == 2
    pool.free(dup)
    pool.allocate(2)  # the two never-used blocks
    pool.allocate(1)  # evicts `first` (least recently freed)
    assert events[-1] == BlockRemoved([7])
    assert pool.is_cached(7), "the duplicate still holds hash 7 in vLLM"


# --------------------------------------------------------------------------- 3. P/D decode side
def test_a_remote_prefill_reports_the_transferred_tokens_as_cached() -> None:
    """vLLM: after the async load, num_computed_tokens = the loaded blocks' tokens (capped at num_tokens - 1)
    and `request.num_cached_tokens = num_computed_tokens` at its first scheduling, so the decode side's
    usage.prompt_tokens_details.cached_tokens is the prompt minus one token, not its local hit (0 here)."""
    engine, clock = _engine(kv_cache_size=64)
    prompt = list(range(100, 120))
    remote = sim_request("remote", prompt, 2)
    remote.kind = RequestKind.REMOTE_PREFILL
    engine.submit(remote)
    run_until_idle(engine, clock)
    assert remote.finished
    assert remote.num_cached_tokens == len(prompt) - 1, remote.num_cached_tokens
