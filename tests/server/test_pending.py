"""`Pending.step`: routing runs eagerly and is continued in a task only when it waits."""

from __future__ import annotations

import asyncio

import pytest

from llmepp.server.stream import Pending


async def test_a_step_that_never_waits_finishes_at_once() -> None:
    async def route() -> str:
        return "answer"

    assert Pending(route()).step() == (True, "answer")


async def test_a_step_that_waits_continues_where_it_stopped() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    trace: list[str] = []

    async def route() -> str:
        trace.append("before")
        got = await gate
        trace.append(got)
        await asyncio.sleep(0)  # a bare yield after the first wait is passed through too
        return "answer " + got

    done, rest = Pending(route()).step()
    assert not done and trace == ["before"]
    task = asyncio.get_running_loop().create_task(_await(rest))
    await asyncio.sleep(0.01)
    assert not task.done()
    gate.set_result("opened")
    assert await asyncio.wait_for(task, 1.0) == "answer opened"
    assert trace == ["before", "opened"]


async def test_cancelling_the_continuation_cancels_the_step() -> None:
    cleaned: list[bool] = []

    async def route() -> str:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)
        return "never"

    done, rest = Pending(route()).step()
    assert not done
    task = asyncio.get_running_loop().create_task(_await(rest))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_errors_propagate_from_the_first_step_and_after_a_wait() -> None:
    async def fails_at_once() -> str:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):
        Pending(fails_at_once()).step()

    async def fails_later() -> str:
        await asyncio.sleep(0)
        raise ValueError("later")

    done, rest = Pending(fails_later()).step()
    assert not done
    with pytest.raises(ValueError, match="later"):
        await _await(rest)


async def _await(awaitable: object) -> object:
    return await awaitable  # type: ignore[misc]
