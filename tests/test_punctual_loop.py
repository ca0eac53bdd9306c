"""`on_a_punctual_loop`: wall-clock tests are retried only when the process was starved, never otherwise."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import on_a_punctual_loop


async def _starve(seconds: float) -> None:
    """Block this event loop as a loaded machine would (the lag watcher's timer is armed first)."""
    await asyncio.sleep(0.01)
    time.sleep(seconds)  # noqa: ASYNC251 - the blocking is the point
    await asyncio.sleep(0.01)


async def test_a_failure_on_a_punctual_loop_fails_at_once() -> None:
    calls = 0

    async def measure() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        assert calls > 5, "the model is wrong"

    with pytest.raises(AssertionError, match="the model is wrong") as failure:
        await on_a_punctual_loop(measure, pause=0)
    assert calls == 1
    assert "attempt 1 of 3" in failure.value.__notes__[0]


async def test_a_failure_while_starved_is_measured_again() -> None:
    calls = 0

    async def measure() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await _starve(0.06)
            raise AssertionError("too slow")
        await asyncio.sleep(0.02)

    await on_a_punctual_loop(measure, pause=0)
    assert calls == 2


async def test_starved_on_every_attempt_fails_with_the_lateness_seen() -> None:
    calls = 0

    async def measure() -> None:
        nonlocal calls
        calls += 1
        await _starve(0.06)
        raise AssertionError("too slow")

    with pytest.raises(AssertionError, match="too slow") as failure:
        await on_a_punctual_loop(measure, attempts=2, pause=0)
    assert calls == 2
    note = failure.value.__notes__[0]
    assert note.startswith("attempt 2 of 2") and note.count(",") == 1  # one lateness per attempt
    lateness = [float(x) for x in note.split("[")[1].rstrip("]").split(",")]
    assert all(value >= 0.04 for value in lateness)
