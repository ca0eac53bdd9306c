"""vLLM caches (hashes and publishes) a request's full prompt blocks when it *schedules* the request
(KVCacheManager.allocate_slots -> coordinator.cache_blocks(request, min(computed + new, num_tokens))), not
when the forward pass ends. So a second request with the same prefix that is scheduled after the first one
(in the same step, or in any later step) hits those blocks, and BlockStored is published at that step.

So must the simulator: otherwise a same-prefix request admitted while the first is still prefilling gets
no hit, recomputes the prompt and takes duplicate blocks, `vllm:prefix_cache_hits` and `usage.cached_tokens`
under-count the bursts prefix-aware routing creates, and the KV events arrive a whole prefill late.
"""

from __future__ import annotations

from llmepp_sim.config import PodConfig
from llmepp_sim.engine import Engine, Phase, SimRequest
from llmepp_sim.kvwire import BlockStored, KVEvent
from llmepp_sim.lora import LoraManager

from .handclock import HandClock, run_until_idle, sim_request, step


def _engine(events: list[KVEvent] | None = None) -> tuple[Engine, HandClock]:
    clock = HandClock()
    # llama-8b-h100-like latencies: 30 ms overhead + 0.2 ms per uncached prompt token.
    config = PodConfig(block_size=16, kv_cache_size=1000, max_num_seqs=8, max_model_len=4096,
                       time_to_first_token=0, prefill_overhead=30, prefill_time_per_token=0.2,
                       inter_token_latency=12)  # fmt: skip
    engine = Engine(config, clock, LoraManager([]), events.extend if events is not None else None)
    return engine, clock


PROMPT = list(range(100, 100 + 16 * 64))  # 1024 tokens = 64 full blocks


def test_a_request_scheduled_while_its_prefix_is_prefilling_hits_the_prefix_cache() -> None:
    engine, clock = _engine()
    a = sim_request("a", PROMPT, 4)
    engine.submit(a)
    step(engine, clock)
    assert a.phase in (Phase.FIXED, Phase.PREFILL)
    # 50 ms later (A's prefill takes 30 + 1024 * 0.2 = 235 ms) B, same prompt + a different question, arrives.
    clock.t += 0.050
    b = sim_request("b", PROMPT + list(range(5000, 5010)), 4)
    engine.submit(b)
    step(engine, clock)
    assert b.phase is not Phase.WAITING
    assert a.first_token_time is None  # A is still prefilling
    # vLLM: A's 64 blocks were cached when A was scheduled, so B reuses all of them.
    assert b.num_cached_tokens == 1024, f"B reused {b.num_cached_tokens} of A's 1024 cached prompt tokens"
    assert engine.stats.prefix_cache_hits == 1024


def test_two_identical_prompts_scheduled_in_the_same_step_share_the_blocks() -> None:
    engine, clock = _engine()
    a, b = sim_request("a", PROMPT, 4), sim_request("b", PROMPT, 4)
    engine.submit(a)
    engine.submit(b)
    step(engine, clock)
    assert a.phase is not Phase.WAITING and b.phase is not Phase.WAITING
    # vLLM schedules A first (caching its 64 blocks), then B's lookup finds them (up to num_tokens - 1 tokens:
    # the last block is recomputed): 63 blocks hit, and the pool holds 64 + 1 blocks, not 2 x 64.
    assert b.num_cached_tokens == 63 * 16
    assert engine.pool.num_free == engine.pool.num_blocks - 65


def test_block_stored_is_published_when_the_request_is_scheduled() -> None:
    events: list[KVEvent] = []
    engine, clock = _engine(events)
    a = sim_request("a", PROMPT, 4)
    engine.submit(a)
    step(engine, clock)
    assert a.first_token_time is None
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    # vLLM publishes BlockStored for the scheduled prompt blocks at the end of that step (before the forward
    # pass that computes them completes); the simulator waits for the end of the whole prefill.
    assert len(stored) == 64, f"{len(stored)} blocks published at scheduling time"


def _b_arrives_while_a_prefills() -> tuple[Engine, HandClock, SimRequest, SimRequest]:
    """A (PROMPT) admitted, and 50 ms into its 235 ms prefill B (PROMPT + 10 tokens) submitted and admitted."""
    engine, clock = _engine()
    a = sim_request("a", PROMPT, 4)
    engine.submit(a)
    step(engine, clock)
    clock.t += 0.050
    b = sim_request("b", PROMPT + list(range(5000, 5010)), 4)
    engine.submit(b)
    step(engine, clock)
    return engine, clock, a, b


def test_a_request_reusing_blocks_still_being_prefilled_waits_for_them() -> None:
    """vLLM runs the engine steps one after another: B, scheduled after the step that computes A's prompt, gets
    its first token only after that step, even though its cache hit counts A's blocks from the start. The
    simulator's prefill is one processor-shared span, so B waits (KV_WAIT) until A's prefill has ended and
    only then does its own 10 uncached tokens; A's prefill is not slowed by B's work meanwhile."""
    engine, clock, a, b = _b_arrives_while_a_prefills()
    run_until_idle(engine, clock)
    assert a.first_token_time is not None and b.first_token_time is not None
    assert b.num_cached_tokens == 1024
    # A alone: 30 ms + 1024 x 0.2 ms after its arrival at 1000.0.
    assert abs(a.first_token_time - (1000.0 + 0.030 + 0.2048)) < 1e-6, a.first_token_time - 1000.0
    assert b.first_token_time >= a.first_token_time + 10 * 0.0002 - 1e-9, (
        f"B's first token {1000 * (b.first_token_time - a.first_token_time):+.1f} ms after A's"
    )


def test_a_waiting_reuser_starts_when_the_prefill_it_waits_for_is_aborted() -> None:
    engine, clock, a, b = _b_arrives_while_a_prefills()
    clock.t += 0.040  # B's 30 ms of fixed delay is over: it waits for A's blocks
    step(engine, clock)
    assert b.phase is Phase.KV_WAIT
    engine.abort(a)
    run_until_idle(engine, clock)
    assert b.finished and b.finish_reason == "length" and len(b.output_ids) == 4
    assert not engine._computing


def test_a_waiting_reuser_starts_when_the_prefill_it_waits_for_is_preempted() -> None:
    engine, clock, a, b = _b_arrives_while_a_prefills()
    clock.t += 0.040
    step(engine, clock)
    assert b.phase is Phase.KV_WAIT
    engine._preempt(a)
    run_until_idle(engine, clock)
    assert a.finished and b.finished
    assert b.first_token_time is not None and a.first_token_time is not None
    assert not engine._computing
