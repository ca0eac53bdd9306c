"""Stopping background tasks."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` (None: skipped) and wait until each has ended. A task ending cancelled is what was asked;
    an exception a task ended with is raised (the first). The caller's own cancellation while it waits is
    passed on, not taken for a task's: `with suppress(CancelledError): await task` swallows it, and a close
    cancelled by a timeout would then go on with its next steps."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    error: BaseException | None = None
    for task in pending:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception as e:
            if error is None:
                error = e
    if error is not None:
        raise error


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task has been asked to stop. Called after a library call in a loop
    that must stop when cancelled: Python 3.11's asyncio.wait_for returns its result instead of raising when the
    cancellation arrives in the loop iteration the awaited call completes in (redis-py bounds every socket write
    with it), and the loop would then run on while the cancel_and_wait that stops it waits forever. The request
    stays counted (`Task.cancelling()`) when the CancelledError is swallowed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
