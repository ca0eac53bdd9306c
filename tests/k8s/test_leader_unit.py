"""Leader election against an in-memory Lease API: what the real API server cannot easily be made
to do on cue (hang, answer garbage)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmepp.k8s.client import KubeError
from llmepp.k8s.leader import LeaderElector, LeaseConfig

from .kubeapi import eventually

# call timeout = max(1, min(renew / 2, 10)) = 1 s
LEASE, RENEW, RETRY = 3.0, 2.0, 0.5


class FakeLeaseApi:
    """GET / POST / PUT of one Lease. `hang`: every call waits out its timeout; `garbage`: 200 with junk;
    `fail`: every call is answered 500 at once (an API server whose etcd is down)."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None
        self.version = 0
        self.hang = False
        self.garbage = False
        self.fail = False
        self.last_write = 0.0
        self.answer_delay = 0.0  # a write commits at once, its answer comes this much later

    async def request(
        self, method: str, path: str, *, params: Any = None, body: Any = None, request_timeout: float = 30.0
    ) -> bytes:
        if self.hang:
            await asyncio.sleep(request_timeout)
            raise TimeoutError("no answer")
        if self.garbage:
            return b"<html>502 Bad Gateway</html>"
        if self.fail:
            raise KubeError(500, "InternalError", "etcdserver: request timed out")
        if method == "GET":
            if self.doc is None:
                raise KubeError(404, "NotFound")
            return json.dumps(self.doc).encode()
        self.version += 1
        self.doc = {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": str(self.version)}}
        self.last_write = time.monotonic()
        if self.answer_delay:
            await asyncio.sleep(self.answer_delay)
        return json.dumps(self.doc).encode()


@contextlib.asynccontextmanager
async def elector(api: FakeLeaseApi, retry: float = RETRY) -> AsyncIterator[tuple[LeaderElector, asyncio.Task[None]]]:
    config = LeaseConfig("lease", "ns", "me", lease_duration=LEASE, renew_deadline=RENEW, retry_period=retry)
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


async def test_the_renew_deadline_counts_from_when_the_last_renewal_was_sent() -> None:
    """A follower takes the lease lease_duration after it saw the last renewal, which it may see the moment
    it is written. The leader must stop by renew_deadline after that write, so it must count from when it
    sent the renewal, not from when the (slow) answer came: before, a renewal answered 0.9 s late kept us
    leading 0.9 s longer (with --ha-renew-deadline=10s --ha-lease-duration=12s and a 5 s answer: two
    leaders for 3 s)."""
    api = FakeLeaseApi()
    async with elector(api) as (e, _):
        await eventually(lambda: e.is_leader, within=5)
        api.answer_delay = 0.9  # under the call timeout (1 s) and the time left before the deadline
        written = api.last_write
        await eventually(lambda: api.last_write > written, within=RETRY * 3)  # a renewal committed...
        committed = api.last_write
        api.hang = True  # ...and its late answer is the last one we get
        await eventually(lambda: not e.is_leader, within=LEASE + 3)
        led_for = time.monotonic() - committed
        assert led_for <= RENEW + 0.2, f"still leader {led_for:.2f}s after the last renewal was written"


async def test_renewals_that_fail_fast_end_leadership_at_the_deadline_not_a_retry_period_later() -> None:
    """With retry 1.9 s, renew deadline 2 s and lease 3 s (valid flags), a leader whose renewals are answered
    500 at once used to sleep a whole retry period past a failed attempt made just inside the deadline, and
    lead until ~3.8 s after its last renewal, when a follower may already hold the lease (from 3 s)."""
    api = FakeLeaseApi()
    async with elector(api, retry=1.9) as (e, _):
        await eventually(lambda: e.is_leader, within=5)
        written = api.last_write
        await eventually(lambda: api.last_write > written, within=5)  # a renewal committed...
        committed = api.last_write
        api.fail = True  # ...and every later call fails at once
        await eventually(lambda: not e.is_leader, within=LEASE + 3)
        led_for = time.monotonic() - committed
        assert led_for <= RENEW + 0.2, f"still leader {led_for:.2f}s after the last renewal was written"


async def test_an_elector_that_dies_stops_claiming_leadership() -> None:
    """Whatever kills the election loop (here: a RuntimeError the retry does not expect, such as aiohttp's
    "Session is closed"), `is_leader` must not stay True: nobody renews the lease any more, a follower takes
    it after lease_duration, and two replicas would be ready leaders for good."""

    class Broken(FakeLeaseApi):
        broken = False

        async def request(self, method: str, path: str, **kwargs: Any) -> bytes:
            if self.broken:
                raise RuntimeError("Session is closed")
            return await super().request(method, path, **kwargs)

    api = Broken()
    config = LeaseConfig("lease", "ns", "me", lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY)
    e = LeaderElector(api, config)  # type: ignore[arg-type]
    task = asyncio.create_task(e.run())
    try:
        await eventually(lambda: e.is_leader, within=5)
        api.broken = True
        await eventually(task.done, within=RETRY * 3)
        assert isinstance(task.exception(), RuntimeError)
        assert not e.is_leader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            await task


async def test_an_unreachable_api_server_is_logged_once_per_interval_not_per_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API server is down (or flapping) for an hour: before, every attempt (every retry period, 2 s by
    default) was a WARNING line, per replica, for as long as it lasted. The informers log a failure streak at
    its start and then once per interval; so must leader election, and say when it is over."""
    api = FakeLeaseApi()
    api.garbage = True
    config = LeaseConfig("lease", "ns", "me", lease_duration=LEASE, renew_deadline=RENEW, retry_period=0.02)
    e = LeaderElector(api, config)  # type: ignore[arg-type]
    task = asyncio.create_task(e.run())
    try:
        with caplog.at_level(logging.DEBUG, logger="llmepp.k8s.leader"):
            await asyncio.sleep(1.0)  # ~40 failed attempts
            api.garbage = False
            await eventually(lambda: e.is_leader, within=2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    attempts = [r for r in caplog.records if r.levelno == logging.DEBUG and "leader election" in r.getMessage()]
    assert len(loud) == 1 and len(attempts) >= 10, (loud, len(attempts))
    assert any("recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_a_shutdown_as_a_renewal_completes_stops_the_loop() -> None:
    """Python 3.11's asyncio.wait_for returned the renewal's result when the shutdown's cancellation arrived in
    the same loop iteration as the renewal's answer: the loop, its cancellation swallowed, went on renewing
    (and the shutdown waited for it for ever)."""

    class Gated(FakeLeaseApi):
        def __init__(self) -> None:
            super().__init__()
            self.gate: asyncio.Event | None = None
            self.waiting = asyncio.Event()

        async def request(self, method: str, path: str, **kwargs: Any) -> bytes:
            if self.gate is not None and method == "PUT":
                self.waiting.set()
                await self.gate.wait()
            return await super().request(method, path, **kwargs)

    api = Gated()
    config = LeaseConfig("lease", "ns", "me", lease_duration=LEASE, renew_deadline=RENEW, retry_period=0.05)
    e = LeaderElector(api, config)  # type: ignore[arg-type]
    task = asyncio.create_task(e.run())
    try:
        await eventually(lambda: e.is_leader, within=5)
        api.gate = asyncio.Event()
        await asyncio.wait_for(api.waiting.wait(), 5)  # a renewal's PUT is in flight
        api.gate.set()  # its answer arrives on the next loop iteration, the cancellation in the same one
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done and task.cancelled()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=5)
