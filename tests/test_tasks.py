"""cancel_and_wait: the one way background tasks are stopped."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from llmepp.tasks import cancel_and_wait


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
