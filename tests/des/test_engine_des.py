"""The simulator's engine, unchanged, on virtual time: exact latency formulas, and the same behaviour live."""

from __future__ import annotations

import asyncio
import math
from typing import cast

import pytest

from benchmarks.des.vloop import VirtualClock, VirtualTimeLoop, run
from llmepp_sim import blockhash
from llmepp_sim.clock import SimClock
from llmepp_sim.config import PodConfig
from llmepp_sim.engine import Engine, SimRequest
from llmepp_sim.lora import LoraManager
from llmepp_sim.textgen import FillerStream, filler_vocabulary
from llmepp_sim.tokenizer import shared_tokenizer

CONFIG = PodConfig(prefill_overhead=30.0, prefill_time_per_token=0.2, inter_token_latency=12.0, kv_cache_size=512)
PROMPT = [(7 * i) % 4000 + 1 for i in range(640)]  # 40 full blocks of 16
OUT = 8


def _request(rid: str, prompt: list[int]) -> SimRequest:
    return SimRequest(rid, prompt, OUT, FillerStream(filler_vocabulary(shared_tokenizer()), 0, prompt))


async def _serve_twice(clock: SimClock) -> list[tuple[float, float, int]]:
    """(TTFT, mean ITL, cached tokens) of the same prompt sent twice, one after the other."""
    engine = Engine(CONFIG, clock, LoraManager([]), None)
    engine.start()
    out = []
    for rid in ("a", "b"):
        request = _request(rid, PROMPT)
        t0 = clock.now()
        engine.submit(request)
        await request.wait_finished()
        assert request.first_token_time is not None and request.finish_time is not None
        itl = (request.finish_time - request.first_token_time) / (OUT - 1)
        out.append((request.first_token_time - t0, itl, request.num_cached_tokens or 0))
    await engine.stop()
    return out


def test_single_request_matches_the_latency_formula_exactly() -> None:
    async def main(loop: VirtualTimeLoop) -> list[tuple[float, float, int]]:
        return await _serve_twice(VirtualClock(loop))

    (ttft_a, itl_a, cached_a), (ttft_b, itl_b, cached_b) = run(main)
    assert cached_a == 0
    assert ttft_a == pytest.approx((30.0 + 640 * 0.2) / 1e3, abs=1e-9)
    assert itl_a == pytest.approx(12.0 / 1e3, abs=1e-9)
    # The repeat hits every block but the last (vLLM recomputes the last prompt token's block).
    assert cached_b == 640 - 16
    assert ttft_b == pytest.approx((30.0 + 16 * 0.2) / 1e3, abs=1e-9)
    assert itl_b == pytest.approx(12.0 / 1e3, abs=1e-9)


def test_concurrent_prefills_share_the_gpu_as_live() -> None:
    """Two prompts submitted together each prefill at half speed: both first tokens at overhead + 2 x work."""

    async def main(loop: VirtualTimeLoop) -> list[float]:
        engine = Engine(CONFIG, VirtualClock(loop), LoraManager([]), None)
        engine.start()
        requests = [_request("x", PROMPT), _request("y", [t + 1 for t in PROMPT])]
        for r in requests:
            engine.submit(r)
        await asyncio.gather(*(r.wait_finished() for r in requests))
        await engine.stop()
        return [r.first_token_time - r.arrival_time for r in requests if r.first_token_time is not None]

    ttfts = run(main)
    assert ttfts == pytest.approx([(30.0 + 2 * 640 * 0.2) / 1e3] * 2, abs=1e-9)


async def test_the_same_engine_on_the_wall_clock_agrees() -> None:
    """Live mode (real asyncio loop, wall clock): same hits, TTFT/ITL within timer lateness of the DES."""

    async def des(loop: VirtualTimeLoop) -> list[tuple[float, float, int]]:
        return await _serve_twice(VirtualClock(loop))

    expected = await asyncio.to_thread(run, des)
    live = await _serve_twice(SimClock(time_scale=1.0))
    for (l_ttft, l_itl, l_cached), (d_ttft, d_itl, d_cached) in zip(live, expected):
        assert l_cached == d_cached
        # Live timers only ever fire late (epoll rounds timeouts up to whole milliseconds).
        assert d_ttft - 0.001 <= l_ttft <= d_ttft * 1.2 + 0.015
        assert l_itl == pytest.approx(d_itl, rel=0.2)


class _ReferenceEngine(Engine):
    """The engine's per-token block bookkeeping as it was before the DES speed-ups (whole-sequence copies)."""

    def _ensure_blocks(self, request: SimRequest) -> None:
        needed = math.ceil(request.num_tokens / self.config.block_size) - len(request.block_ids)
        while needed > 0:
            if self.pool.num_free == 0:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    return
                continue
            request.block_ids += self.pool.allocate(1)
            needed -= 1
        self._store_full_blocks(request)

    def _store_full_blocks(self, request: SimRequest) -> None:
        bs = self.config.block_size
        full = min(request.num_tokens // bs, len(request.block_ids))
        if full <= request.stored_blocks:
            return
        tokens = request.all_token_ids()
        blockhash.extend_chain(request.block_hashes, tokens, bs, self._root_hash, b"")
        start = request.stored_blocks
        self.pool.store(
            request.block_ids[start:full],
            request.block_hashes[start:full],
            request.block_hashes[start - 1] if start else None,
            tokens[start * bs : full * bs],
        )
        request.stored_blocks = full


def test_the_faster_block_bookkeeping_behaves_exactly_as_before() -> None:
    """A tight KV pool (evictions, preemptions, shared prefixes): same events, hits and timings as the original."""
    config = PodConfig(kv_cache_size=80, max_num_seqs=8, max_model_len=4096)
    shared = [(3 * i) % 4000 + 1 for i in range(200)]
    prompts = [shared + [(11 * i + k) % 4000 + 1 for i in range(37 + 9 * k)] for k in range(12)]

    def scenario(engine_cls: type[Engine]) -> tuple[list[object], list[tuple[object, ...]], int]:
        events: list[object] = []

        async def main(loop: VirtualTimeLoop) -> list[tuple[object, ...]]:
            engine = engine_cls(config, VirtualClock(loop), LoraManager([]), events.extend)
            engine.start()
            requests = []
            for k, p in enumerate(prompts):
                r = SimRequest(str(k), p, 40 + 7 * k, FillerStream(filler_vocabulary(shared_tokenizer()), 0, p))
                engine.submit(r)
                requests.append(r)
                await asyncio.sleep(0.013 * (k % 3))
            await asyncio.gather(*(r.wait_finished() for r in requests))
            out: list[tuple[object, ...]] = [
                (r.num_cached_tokens, r.first_token_time, r.finish_time, tuple(r.output_ids)) for r in requests
            ]
            out.append((engine.stats.preemptions, engine.stats.prefix_cache_hits))
            await engine.stop()
            return out

        results = run(main)
        return events, results, int(cast(int | None, results[-1][0]) or 0)

    new_events, new_results, preemptions = scenario(Engine)
    old_events, old_results, _ = scenario(_ReferenceEngine)
    assert preemptions > 0  # the scenario does exercise preemption and recomputation
    assert new_results == old_results
    assert new_events == old_events


def test_token_range_and_windowed_chain_match_the_whole_sequence() -> None:
    request = _request("w", PROMPT[:100])
    request.output_ids = list(range(1, 60))
    whole = request.all_token_ids()
    for start, stop in [(0, 16), (96, 112), (100, 159), (16, 100), (112, 144), (0, 159)]:
        assert request.token_range(start, stop) == whole[start:stop]
    full = blockhash.chain(whole, 16)
    partial = full[:6]
    blockhash.extend_chain(partial, whole[96:], 16, blockhash.root_hash(""), first_block=6)
    assert partial == full
    with pytest.raises(ValueError):
        blockhash.extend_chain(full[:2], whole[96:], 16, blockhash.root_hash(""), first_block=6)
