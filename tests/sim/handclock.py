"""The simulator's engine driven by hand, without its task: a clock the test sets, requests built as the server
builds them, and the engine's loop stepped until it is idle."""

from __future__ import annotations

from llmepp_sim.clock import SimClock
from llmepp_sim.engine import Engine, SimRequest
from llmepp_sim.textgen import FillerStream, filler_vocabulary
from llmepp_sim.tokenizer import shared_tokenizer


class HandClock(SimClock):
    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 1000.0

    def now(self) -> float:
        return self.t


def sim_request(rid: str, ids: list[int], max_tokens: int) -> SimRequest:
    return SimRequest(rid, ids, max_tokens, FillerStream(filler_vocabulary(shared_tokenizer()), 0, ids))


def step(engine: Engine, clock: HandClock) -> None:
    """One turn of the engine's loop at the clock's time."""
    engine._advance(clock.t)
    engine._schedule(clock.t)


def run_until_idle(engine: Engine, clock: HandClock, stop_at: float | None = None, nudge: float = 0.0) -> None:
    """Step the loop event by event until nothing is left to do (or the next event is past `stop_at`, where
    the clock then stands); `nudge` moves each step just past its event."""
    for _ in range(100_000):
        step(engine, clock)
        next_event = engine._next_event(clock.t)
        if next_event is None or (stop_at is not None and next_event > stop_at):
            if stop_at is not None:
                clock.t = stop_at
            return
        clock.t = max(clock.t, next_event) + nudge
    raise AssertionError("the engine never went idle")
