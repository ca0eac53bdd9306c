"""cancel_and_wait: the one way background tasks are stopped."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import RacingWrite

from llmepp.tasks import cancel_and_wait, raise_if_cancelled


async def test_tasks_are_cancelled_and_awaited_and_none_is_skipped() -> None:
    tasks = [asyncio.create_task(asyncio.sleep(3600)) for _ in range(3)]
    await cancel_and_wait(tasks[0], None, *tasks[1:])
    assert all(t.cancelled() for t in tasks)
    await cancel_and_wait()  # nothing to do


async def test_a_task_that_failed_has_its_error_raised_after_every_task_ended() -> None:
    async def fail() -> None:
        raise RuntimeError("broke")

    failed = asyncio.create_task(fail())
    await asyncio.sleep(0)
    other = asyncio.create_task(asyncio.sleep(3600))
    with pytest.raises(RuntimeError, match="broke"):
        await cancel_and_wait(failed, other)
    assert other.cancelled()


async def test_the_callers_own_cancellation_is_passed_on_not_swallowed() -> None:
    """`task.cancel(); with suppress(CancelledError): await task` swallowed the caller's cancellation too: a close
    cancelled (a timeout) while its task was ending went on with its next steps."""
    after = []

    async def stubborn() -> None:  # takes a while to end once cancelled
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(asyncio.sleep(0.2))

    async def close() -> None:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)  # started: a task cancelled before its first step never runs its finally
        await cancel_and_wait(task)
        after.append("next step")

    closing = asyncio.create_task(close())
    await asyncio.sleep(0.05)
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    assert closing.cancelled() and after == []


async def test_a_loop_whose_cancellation_a_library_swallowed_still_stops() -> None:
    """Python 3.11's asyncio.wait_for returns the result when the cancellation arrives in the loop iteration the
    awaited call completes in (redis-py bounds its socket writes with it). The loop checks afterwards, so the
    cancel_and_wait stopping it returns (the clean-clone CI run hung 300 s in a shared-inflight replica's aclose)."""
    write = RacingWrite()
    rounds = 0

    async def sync_loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await write()
            raise_if_cancelled()
            await asyncio.sleep(0.01)

    task = asyncio.create_task(sync_loop())
    await write.started()
    write.complete()
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled() and rounds == 1


async def test_raise_if_cancelled_is_silent_when_nobody_asked() -> None:
    raise_if_cancelled()  # in a task never cancelled
    raise_if_cancelled()  # and twice: it changes nothing
