"""In vLLM a request's prefill runs inside an engine step; its first token comes out at the end of that step
and its second token at the end of the *next* step, so the first inter-token gap is a whole decode step, like
every other gap (``vllm:inter_token_latency_seconds`` >= one step).

So a prefill that finishes between two ticks of a running batch emits its first token with the batch at the
next tick: emitting it at once made the first gap anywhere in (0, step], biasing the benchmarks' ITL / TPOT
low (17 % at max_tokens 4) and producing sub-step ITL samples vLLM cannot.
"""

from __future__ import annotations

from llmepp_sim.config import PodConfig
from llmepp_sim.engine import Engine
from llmepp_sim.lora import LoraManager

from .handclock import HandClock, run_until_idle, sim_request


def test_the_first_inter_token_gap_of_a_request_joining_a_running_batch_is_a_whole_step() -> None:
    clock = HandClock()
    # time_factor_under_load 1: every decode step lasts exactly 20 ms.
    config = PodConfig(block_size=16, kv_cache_size=1000, max_num_seqs=8, max_model_len=4096,
                       time_to_first_token=0, prefill_overhead=10, prefill_time_per_token=0.1,
                       inter_token_latency=20, time_factor_under_load=1.0)  # fmt: skip
    engine = Engine(config, clock, LoraManager([]), None)
    step = 0.020
    a = sim_request("a", list(range(100, 164)), 200)
    engine.submit(a)
    # Let A decode for a while, then B arrives; its prefill ends 10 + 64 * 0.1 = 16.4 ms later, 3.6 ms
    # before A's next tick (ticks every 20 ms from A's first token at 1000.0164).
    run_until_idle(engine, clock, stop_at=1000.0164 + 10 * step)
    b = sim_request("b", list(range(300, 364)), 3)
    engine.submit(b)
    run_until_idle(engine, clock)
    assert b.finish_reason == "length" and len(b.output_ids) == 3
    assert b.first_token_time is not None and b.finish_time is not None
    first_gap_and_second = b.finish_time - b.first_token_time  # two gaps: token 1 -> 2 -> 3
    # vLLM: token 2 one step after token 1, token 3 one step after token 2.
    assert first_gap_and_second >= 2 * step - 1e-6, (
        f"B's 3 tokens span {first_gap_and_second * 1e3:.1f} ms, less than two {step * 1e3:.0f} ms decode steps"
    )


def test_no_inter_token_latency_sample_is_shorter_than_a_decode_step() -> None:
    clock = HandClock()
    config = PodConfig(block_size=16, kv_cache_size=4000, max_num_seqs=64, max_model_len=4096,
                       time_to_first_token=0, prefill_overhead=10, prefill_time_per_token=0.1,
                       inter_token_latency=20, time_factor_under_load=1.0)  # fmt: skip
    engine = Engine(config, clock, LoraManager([]), None)
    # A steady stream of requests arriving every 7 ms, each generating 4 tokens.
    for i in range(40):
        engine.submit(sim_request(f"r{i}", list(range(1000 + 64 * i, 1064 + 64 * i)), 4))
        run_until_idle(engine, clock, stop_at=clock.t + 0.007)
    run_until_idle(engine, clock)
    itl = engine.stats.itl
    below_step = itl.counts[0] + itl.counts[1]  # buckets le=0.01 and (0.01, 0.025]: anything < 25 ms
    assert itl.count == 40 * 3
    # Every sample should be one 20 ms step (bucket (0.01, 0.025]); none can be below 10 ms.
    assert itl.counts[0] == 0, (
        f"{itl.counts[0]} of {itl.count} ITL samples are below 10 ms with 20 ms decode steps "
        f"(mean ITL {itl.sum / itl.count * 1e3:.1f} ms); {below_step} below 25 ms"
    )
