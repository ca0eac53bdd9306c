"""The virtual-time event loop: ordering, instant sleeps, stalls, refused I/O."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.des.vloop import SimulationStalled, VirtualClock, VirtualTimeLoop, run


def test_timers_fire_in_time_order_at_their_exact_times() -> None:
    fired: list[tuple[str, float]] = []

    async def main(loop: VirtualTimeLoop) -> None:
        def fire(name: str) -> None:
            fired.append((name, loop.time()))

        for name, delay in [("c", 3.0), ("a", 1.0), ("d", 3.0), ("b", 2.5), ("e", 0.0)]:
            loop.call_later(delay, fire, name)
        await asyncio.sleep(10)

    run(main, start=100.0)
    # Equal times keep insertion order (c before d), as in asyncio.
    assert fired == [("e", 100.0), ("a", 101.0), ("b", 102.5), ("c", 103.0), ("d", 103.0)]


def test_sleeps_cost_no_wall_time_and_interleave_by_virtual_time() -> None:
    log: list[tuple[float, str]] = []

    async def worker(loop: VirtualTimeLoop, name: str, period: float, n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(period)
            log.append((loop.time(), name))

    async def main(loop: VirtualTimeLoop) -> float:
        await asyncio.gather(worker(loop, "slow", 7.0, 3), worker(loop, "fast", 3.0, 5))
        return loop.time()

    wall = time.perf_counter()
    end = run(main)
    assert time.perf_counter() - wall < 1.0  # 21 simulated seconds
    assert end == 21.0
    assert log == sorted(log)
    assert [t for t, n in log if n == "fast"] == [3.0, 6.0, 9.0, 12.0, 15.0]


def test_wait_for_timeout_uses_virtual_time() -> None:
    async def main(loop: VirtualTimeLoop) -> float:
        never: asyncio.Future[None] = loop.create_future()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(never, 0.4)
        return loop.time()

    assert run(main) == pytest.approx(0.4)


def test_a_deadlock_raises_instead_of_hanging() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        await loop.create_future()

    with pytest.raises(SimulationStalled):
        run(main)


def test_threads_are_refused() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        await asyncio.to_thread(time.sleep, 0)

    with pytest.raises(RuntimeError, match="threads"):
        run(main)


def test_virtual_clock_is_the_simulators_clock_on_loop_time() -> None:
    async def main(loop: VirtualTimeLoop) -> tuple[float, float]:
        clock = VirtualClock(loop)
        before = clock.now()
        await asyncio.sleep(clock.to_wall(2.5))
        return before, clock.now()

    assert run(main, start=7.0) == (7.0, 9.5)
