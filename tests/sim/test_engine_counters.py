"""The engine's prefix-cache counters (vllm:prefix_cache_queries / _hits) count what vLLM's do, driven on a
hand-set clock: vLLM's KVCacheManager.get_computed_blocks records nothing with prefix caching off, and files a
preempted request's re-admission under preempted_queries / preempted_hits, which are not exported."""

from __future__ import annotations

from llmepp_sim.config import PodConfig
from llmepp_sim.engine import Engine, SimRequest
from llmepp_sim.lora import LoraManager

from .handclock import HandClock, run_until_idle, sim_request


def _run(config: PodConfig, prompts: dict[str, list[int]], max_tokens: int) -> tuple[Engine, list[SimRequest]]:
    """Submit the prompts at once and step the engine's loop by hand until it is idle."""
    clock = HandClock()
    engine = Engine(config, clock, LoraManager([]), None)
    requests = [sim_request(rid, ids, max_tokens) for rid, ids in prompts.items()]
    for request in requests:
        engine.submit(request)
    run_until_idle(engine, clock, nudge=1e-9)
    return engine, requests


def test_no_prefix_cache_queries_with_prefix_caching_off() -> None:
    engine, requests = _run(PodConfig(enable_kvcache=False), {"a": list(range(100)), "b": list(range(100))}, 4)
    assert all(r.finish_reason == "length" for r in requests)
    assert engine.stats.prefix_cache_queries == engine.stats.prefix_cache_hits == 0


def test_a_recompute_after_a_preemption_is_not_a_new_query() -> None:
    # 6 blocks of 4 tokens: both 8-token prompts fit (2 + 2 blocks), their 8 output tokens each do not
    # (4 + 4 > 6), so the younger request is preempted and recomputed (then mostly from its own blocks).
    config = PodConfig(kv_cache_size=6, block_size=4, max_num_seqs=2, max_model_len=64)
    engine, requests = _run(config, {"a": list(range(10, 18)), "b": list(range(20, 28))}, 8)
    assert all(r.finish_reason == "length" for r in requests)
    assert engine.stats.preemptions >= 1
    assert engine.stats.prefix_cache_queries == 16  # each prompt once
    assert engine.stats.prefix_cache_hits == 0
