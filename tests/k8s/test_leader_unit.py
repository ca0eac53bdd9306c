"""Leader election against an in-memory Lease API: what the real API server cannot easily be made
to do on cue (hang, answer garbage)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from llmepp.k8s.client import KubeError
from llmepp.k8s.leader import LeaderElector, LeaseConfig

from .kubeapi import eventually

# call timeout = max(1, min(renew / 2, 10)) = 1 s
LEASE, RENEW, RETRY = 3.0, 2.0, 0.5


class FakeLeaseApi:
    """GET / POST / PUT of one Lease. `hang`: every call waits out its timeout; `garbage`: 200 with junk."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None
        self.version = 0
        self.hang = False
        self.garbage = False
        self.last_write = 0.0

    async def request(
        self, method: str, path: str, *, params: Any = None, body: Any = None, request_timeout: float = 30.0
    ) -> bytes:
        if self.hang:
            await asyncio.sleep(request_timeout)
            raise TimeoutError("no answer")
        if self.garbage:
            return b"<html>502 Bad Gateway</html>"
        if method == "GET":
            if self.doc is None:
                raise KubeError(404, "NotFound")
            return json.dumps(self.doc).encode()
        self.version += 1
        self.doc = {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": str(self.version)}}
        self.last_write = time.monotonic()
        return json.dumps(self.doc).encode()


@contextlib.asynccontextmanager
async def elector(api: FakeLeaseApi) -> AsyncIterator[tuple[LeaderElector, asyncio.Task[None]]]:
    config = LeaseConfig("lease", "ns", "me", lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY)
    e = LeaderElector(api, config)  # type: ignore[arg-type]
    task = asyncio.create_task(e.run())
    try:
        yield e, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_leadership_ends_by_the_renew_deadline_even_when_calls_hang() -> None:
    """client-go bounds the whole renewal by the renew deadline. A call that hangs until its own timeout
    must not keep us leading past it: a follower may take the lease once lease_duration has passed
    since our last renewal, and two leaders must never overlap."""
    api = FakeLeaseApi()
    async with elector(api) as (e, _):
        await eventually(lambda: e.is_leader, within=5)
        await asyncio.sleep(RETRY * 1.5)  # a renewal or two went through
        api.hang = True
        last_renewal = api.last_write
        await eventually(lambda: not e.is_leader, within=LEASE + 3)
        led_for = time.monotonic() - last_renewal
        assert led_for <= RENEW + 0.5, f"still leader {led_for:.2f}s after the last renewal (deadline {RENEW}s)"


async def test_a_garbage_answer_is_a_failed_attempt_not_a_dead_elector() -> None:
    """A proxy answering 200 with HTML: the attempt fails and leadership is given up after the renew
    deadline. Before, the decode error killed the elector task and `is_leader` stayed True for good."""
    api = FakeLeaseApi()
    async with elector(api) as (e, task):
        await eventually(lambda: e.is_leader, within=5)
        api.garbage = True
        await eventually(lambda: not e.is_leader or task.done(), within=RENEW + 2)
        assert not task.done(), f"elector died: {task.exception()!r}"
        assert not e.is_leader
        api.garbage = False
        await eventually(lambda: e.is_leader, within=5)  # and it comes back


async def test_release_survives_a_garbage_answer() -> None:
    """Shutdown calls release(); a junk answer must not raise out of it (the drain would stop midway)."""
    api = FakeLeaseApi()
    async with elector(api) as (e, task):
        await eventually(lambda: e.is_leader, within=5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        api.garbage = True
        await e.release()
        assert not e.is_leader
