"""Host work done in wall time (body parsing, tokenisation) counts against the simulated prefill overhead.

At time scale N every wall millisecond the host spends on a request before the engine sees it becomes N
simulated milliseconds. The request is stamped when it arrives and its prefill is scheduled from that
arrival, as an engine would: host time up to the profile's overhead is absorbed (the overhead stands for
that work), host time beyond it makes the request late, and no request is ever earlier than the model.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from helpers import on_a_punctual_loop

from llmepp_sim.clock import SimClock
from llmepp_sim.config import PodConfig
from llmepp_sim.engine import Engine, SimRequest
from llmepp_sim.lora import LoraManager
from llmepp_sim.textgen import FillerStream, filler_vocabulary
from llmepp_sim.tokenizer import SimTokenizer, shared_tokenizer

from .simkit import FAST, STEADY, complete, pod, running, words

SLACK = 1e-3  # simulated seconds: float slack for lower bounds


class SlowTokenizer(SimTokenizer):
    """Tokenisation that holds the event loop for ``delay`` wall seconds, as CPU-bound host work does."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        end = time.monotonic() + self.delay
        while time.monotonic() < end:  # busy, like CPU work: nothing else runs on the loop meanwhile
            pass
        return await super().encode_prompt(prompt)


async def test_host_time_within_the_overhead_does_not_inflate_ttft(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        # 1 s simulated overhead = 100 ms wall at x10; the tokenizer takes 80 ms wall = 800 ms simulated.
        async with running([pod(prefill_overhead=1000.0, prefill_time_per_token=0.1)], time_scale=FAST) as cluster:
            cluster.pods[0].tokenizer = SlowTokenizer(0.08)
            result = await complete(http, cluster.urls[0], words(50, salt="slow host "), stream=True)
            assert result.status == 200
            model = 1.0 + result.body["usage"]["prompt_tokens"] * 0.1e-3
            ttft = result.ttft_wall * FAST
            assert ttft >= model - SLACK  # never earlier than the model
            # Not model + 10 x 80 ms: the host time ran inside the simulated overhead (the bound leaves 40 ms
            # wall for HTTP and event-loop lag on a loaded machine).
            assert ttft < model + 0.4

    await on_a_punctual_loop(measure)


async def test_host_time_beyond_the_overhead_makes_the_request_late_not_early(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        # 400 ms simulated overhead; the tokenizer takes 250 ms wall = 750 ms simulated at x3, then the GPU
        # prefill (2 ms/token) still has to run: it cannot overlap host work that precedes it.
        async with running([pod(prefill_overhead=400.0, prefill_time_per_token=2.0)], time_scale=STEADY) as cluster:
            cluster.pods[0].tokenizer = SlowTokenizer(0.25)
            result = await complete(http, cluster.urls[0], words(100, salt="slower host "), stream=True)
            assert result.status == 200
            work = result.body["usage"]["prompt_tokens"] * 2e-3
            ttft = result.ttft_wall * STEADY
            assert ttft >= 0.75 + work - SLACK  # late by the host time the overhead could not absorb
            assert ttft < 0.75 + work + 0.2  # ... but the overhead itself is not added on top (was 0.75 + 0.4 + work)

    await on_a_punctual_loop(measure)


def _request(rid: str, prompt: list[int], max_tokens: int) -> SimRequest:
    return SimRequest(rid, prompt, max_tokens, FillerStream(filler_vocabulary(shared_tokenizer()), 0, prompt))


async def test_backdated_arrival_never_starts_before_a_seat_was_free() -> None:
    """A request that arrived while the only seat was taken, and reached the engine after it freed, starts
    its overhead when the seat freed, not at its arrival: host time is absorbed only while the engine
    could have served the request."""

    async def measure() -> None:
        config = PodConfig(
            max_num_seqs=1, prefill_overhead=100.0, prefill_time_per_token=0.01, inter_token_latency=20.0
        )
        clock = SimClock(1.0)
        engine = Engine(config, clock, LoraManager([]), None)
        engine.start()
        try:
            first = _request("first", list(range(1, 33)), 2)
            engine.submit(first)
            arrival = clock.now()  # the second request arrives now, while `first` holds the seat (~120 ms)
            await first.wait_finished()
            await asyncio.sleep(0.05)  # host work that ends 50 ms after the seat freed
            submitted = clock.now()
            second = _request("second", list(range(101, 133)), 2)
            engine.submit(second, arrival=arrival)
            await second.wait(0)
            assert first.finish_time is not None and second.first_token_time is not None
            assert second.arrival_time == arrival
            work = 32 * 0.01e-3
            # Never early: the overhead starts no sooner than the seat freed.
            assert second.first_token_time >= first.finish_time + 0.1 + work - 1e-9
            # The 50 ms after the seat freed were absorbed (not 50 + 100 ms from submission); 50 ms of lag slack.
            assert second.first_token_time - submitted < 0.1
        finally:
            await engine.stop()

    await on_a_punctual_loop(measure)
