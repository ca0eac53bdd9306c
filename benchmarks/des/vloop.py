"""A virtual-time asyncio event loop: simulated seconds pass instantly, in event order.

``VirtualTimeLoop`` is an ordinary ``asyncio.BaseEventLoop`` whose ``time()`` is a simulated clock and
whose "selector" never waits: when nothing is ready, it jumps the clock to the earliest scheduled timer.
Coroutines, futures, tasks, ``call_soon``/``call_later``/``asyncio.sleep``/``asyncio.wait_for`` all work
unchanged, so the simulator's engine step loop (``llmepp_sim.engine.Engine._run``) and the EPP's async
request path run as they do live — only on a clock that advances from event to event instead of with
the wall.

There is no I/O: the loop refuses sockets, subprocesses, signal handlers and executors (a thread would
break determinism and could not advance virtual time). A loop that has nothing ready and no timer is
deadlocked (a live loop would wait for I/O forever); ``select`` raises ``SimulationStalled`` then.

Determinism: ready callbacks run FIFO; timers fire in ``(when, scheduling order)`` order (asyncio's own
heap leaves equal times unordered; here ties are broken by a sequence number, as a DES event queue does).
Nothing depends on the wall clock, so the same program produces the same event sequence every run.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import selectors
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from llmepp_sim.clock import SimClock

T = TypeVar("T")


class SimulationStalled(RuntimeError):
    """Nothing is ready and no timer is pending: every task waits for something that cannot happen."""


class _NoIOSelector(selectors.BaseSelector):
    """``select(timeout)`` advances the virtual clock to the next timer instead of sleeping."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        raise RuntimeError("the virtual-time loop has no I/O")

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        raise KeyError(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self._loop
        if timeout is None:
            raise SimulationStalled(f"no ready callback and no timer at t={loop.time():.6f}: the simulation is stuck")
        if timeout > 0:
            # Jump exactly to the earliest timer (not now + timeout: float rounding could leave the clock a
            # hair short of it, and asyncio would then spin once more with a tiny timeout).
            scheduled = loop._scheduled  # type: ignore[attr-defined]
            target = scheduled[0]._when if scheduled else loop._now + timeout
            loop._now = max(loop._now, target)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        pass


class _Timer(asyncio.TimerHandle):
    """A timer ordered by (when, sequence number): simultaneous events fire in the order they were scheduled."""

    __slots__ = ("_seq",)

    def __init__(self, seq: int, when: float, callback: Callable[..., object], args: Sequence[Any],
                 loop: asyncio.AbstractEventLoop, context: contextvars.Context | None) -> None:  # fmt: skip
        super().__init__(when, callback, args, loop, context)
        self._seq = seq

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, _Timer):
            return NotImplemented
        mine, theirs = self.when(), other.when()
        if mine != theirs:
            return mine < theirs
        return self._seq < other._seq


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """An event loop on simulated time starting at ``start`` seconds."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self._now = float(start)
        self._selector = _NoIOSelector(self)
        self._clock_resolution = 1e-9
        self._seq = 0
        self.iterations = 0  # loop iterations (each runs every callback due at one instant), for speed reports

    def time(self) -> float:
        return self._now

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.TimerHandle:
        """asyncio's ``call_at`` with a tie-breaking sequence number in the timer."""
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()  # type: ignore[attr-defined]
        self._seq += 1
        timer = _Timer(self._seq, when, callback, args, self, context)
        heapq.heappush(self._scheduled, timer)  # type: ignore[attr-defined]
        timer._scheduled = True  # type: ignore[attr-defined]
        return timer

    # BaseEventLoop's abstract hooks for an I/O-less loop.
    def _process_events(self, event_list: list[Any]) -> None:
        self.iterations += 1

    def _write_to_self(self) -> None:
        pass

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:  # type: ignore[override]
        raise RuntimeError("the virtual-time loop cannot run threads (wall-clock work would break determinism)")

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        raise RuntimeError("the virtual-time loop has no signals")


class VirtualClock(SimClock):
    """The simulator's clock (``llmepp_sim.clock.SimClock``) reading the virtual loop's time.

    ``time_scale`` is 1: one simulated second is one second of loop time, so the engine's
    ``loop.call_later(clock.to_wall(delay))`` schedules its next step exactly ``delay`` simulated seconds on.
    """

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__(1.0)
        self._loop = loop

    def now(self) -> float:
        return self._loop.time()


def run(main: Callable[[VirtualTimeLoop], Awaitable[T]], start: float = 0.0) -> T:
    """Run ``main(loop)`` to completion on a fresh virtual-time loop and close the loop."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(main(loop))
    finally:
        try:
            _cancel_all(loop)
        finally:
            loop.close()


def _cancel_all(loop: VirtualTimeLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


__all__ = ["SimulationStalled", "VirtualClock", "VirtualTimeLoop", "run"]
