"""Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics.

    acquire   every retry_period (jittered ×1..1.2): read the lease; take it when it is
              free (no holder), ours, or its holder has not renewed for leaseDurationSeconds
              *as observed by us* (our monotonic clock from the moment we last saw the
              record change — no trust in other machines' wall clocks)
    renew     every retry_period while leading; a renewal that has not succeeded for
              renew_deadline (counted from when the last successful one was sent) drops
              leadership (renew_deadline < lease_duration, so we stop acting as leader before
              anyone else may take over); a lease found held by another identity drops it at once
    release   on graceful shutdown: holder cleared and leaseDurationSeconds=1, so a
              follower takes over at its next retry instead of after a full lease duration

Writes are optimistic (PUT with the resourceVersion we read): two candidates racing for a
free lease cannot both win — the loser gets 409 Conflict. Only readiness depends on
leadership; watches run on every replica (warm followers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec

from llmepp.k8s.client import KubeClient, KubeError
from llmepp.k8s.models import Lease, LeaseSpec
from llmepp.k8s.resources import LEASES
from llmepp.observability.streak import FailureStreak

log = logging.getLogger(__name__)

JITTER = 1.2  # client-go's wait.JitterUntil factor for the acquire loop
# A streak of failed attempts is logged when it starts, then at most once per this many seconds.
FAILURE_LOG_INTERVAL = 60.0


def lease_name(namespace: str, pool: str) -> str:
    return f"epp-{namespace}-{pool}.llm-d.ai"


def default_identity() -> str:
    """Unique per process (two EPPs in one pod must differ): `<pod or host>_<uuid>`."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4()}"


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs retry period < renew deadline < lease duration "
                f"(got {self.retry_period}s, {self.renew_deadline}s, {self.lease_duration}s)"
            )


def _micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        config: LeaseConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._leader = False
        self._observed: LeaseSpec | None = None
        self._observed_at = 0.0
        self._path = LEASES.item(config.namespace, config.name)
        self._rng = random.Random()
        self._other_holder = ""  # the last attempt found the lease validly held by this identity
        # Failed attempts (errors, not "held by another"): an API server down for an hour is not 1800
        # warnings per replica.
        self._streak = FailureStreak(
            log, {"lease": config.name}, remind_every=FAILURE_LOG_INTERVAL, quiet_for=FAILURE_LOG_INTERVAL, clock=clock
        )
        self.transitions = 0  # times this process became leader

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def identity(self) -> str:
        return self.config.identity

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise  # release() (shutdown) decides: it hands the lease over while we still hold it
        except BaseException:
            # A bug killed the loop: nobody renews now, so we must not go on claiming to lead.
            self._set_leader(False)
            raise

    async def _run(self) -> None:
        c = self.config
        while True:
            while True:
                # The deadline counts from when the winning write was sent: a follower may see it (and start
                # counting its lease duration) the moment it is stored, however late its answer reaches us.
                last_renewal = self._clock()
                if await self._try_acquire_or_renew():
                    break
                await asyncio.sleep(c.retry_period * (1 + self._rng.random() * (JITTER - 1)))
            self._set_leader(True)
            while True:
                # The next renewal after retry_period, but never past the deadline: renewals that keep failing
                # fast must end leadership at the deadline, not a retry period later (possibly after a
                # follower has taken the lease, when renew_deadline + retry_period > lease_duration).
                await asyncio.sleep(min(c.retry_period, max(c.renew_deadline - (self._clock() - last_renewal), 0.0)))
                # As client-go: the renewal is bounded by the deadline, so a hung call cannot keep us leading.
                started = self._clock()
                remaining = c.renew_deadline - (started - last_renewal)
                renewed = False
                if remaining > 0:
                    try:
                        async with asyncio.timeout(remaining):
                            renewed = await self._try_acquire_or_renew()
                    except TimeoutError:
                        pass
                if renewed:
                    last_renewal = started
                elif self._other_holder:
                    # Someone else holds the lease (it was deleted and re-created, or overwritten): our renewals
                    # cannot succeed before it expires, and they lead now. Waiting out the deadline = two leaders.
                    log.error("leader election lost: lease %s is held by %s", c.name, self._other_holder)
                    self._set_leader(False)
                    break
                elif self._clock() - last_renewal >= c.renew_deadline:
                    log.error("leader election lost: lease %s not renewed for %.1fs", c.name, c.renew_deadline)
                    self._set_leader(False)
                    break

    async def release(self) -> None:
        """Give the lease up (graceful shutdown). Cancel `run` first so it cannot re-take it."""
        was_leader = self._leader
        self._set_leader(False)
        if not was_leader:
            return
        now = _micro_time(datetime.now(UTC))
        try:
            doc = json.loads(await self.client.request("GET", self._path, request_timeout=self._call_timeout))
            if doc.get("spec", {}).get("holderIdentity") != self.identity:
                return
            doc["spec"] = {
                "leaseDurationSeconds": 1,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": doc["spec"].get("leaseTransitions", 0),
            }
            await self.client.request("PUT", self._path, body=doc, request_timeout=self._call_timeout)
            log.info("leader lease released", extra={"lease": self.config.name})
        except (KubeError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            log.warning("could not release leader lease %s: %s", self.config.name, e)

    @property
    def _call_timeout(self) -> float:
        # A call must end in time for the next attempt inside the renew deadline.
        return max(1.0, min(self.config.renew_deadline / 2, 10.0))

    def _set_leader(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self.transitions += 1
            log.info("became leader", extra={"lease": self.config.name, "identity": self.identity})
        if self._on_change is not None:
            self._on_change(leader)

    async def _try_acquire_or_renew(self) -> bool:
        try:
            ok = await self._attempt()
        except KubeError as e:
            if not e.conflict:  # 409: someone else wrote first; expected, not worth a log line
                self._streak.failed("leader election", e)
            return False
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:  # ValueError: not a Lease (JSON)
            self._streak.failed("leader election", f"{type(e).__name__}: {e}")
            return False
        self._streak.succeeded("leader election")
        return ok

    async def _attempt(self) -> bool:
        c = self.config
        self._other_holder = ""
        now = datetime.now(UTC)
        try:
            raw = await self.client.request("GET", self._path, request_timeout=self._call_timeout)
        except KubeError as e:
            if not e.not_found:
                raise
            spec = self._record(now, previous=None)
            body = {
                "apiVersion": LEASES.api_version,
                "kind": LEASES.kind,
                "metadata": {"name": c.name, "namespace": c.namespace},
                "spec": msgspec.to_builtins(spec),
            }
            await self.client.request(
                "POST", LEASES.collection(c.namespace), body=body, request_timeout=self._call_timeout
            )
            self._observe(spec)
            return True
        lease = msgspec.json.decode(raw, type=Lease)
        current = lease.spec
        if current != self._observed:
            self._observe(current)
        holder = current.holder_identity or ""
        duration = current.lease_duration_seconds or math.ceil(c.lease_duration)
        if holder and holder != self.identity and self._clock() < self._observed_at + duration:
            self._other_holder = holder
            return False  # held by someone who renewed within the lease duration (as far as we know)
        spec = self._record(now, previous=current)
        doc: dict[str, Any] = json.loads(raw)
        doc["spec"] = {**doc.get("spec", {}), **msgspec.to_builtins(spec)}
        await self.client.request("PUT", self._path, body=doc, request_timeout=self._call_timeout)
        self._observe(spec)
        return True

    def _record(self, now: datetime, previous: LeaseSpec | None) -> LeaseSpec:
        ours = previous is not None and previous.holder_identity == self.identity
        stamp = _micro_time(now)
        transitions = (previous.lease_transitions or 0) if previous is not None else 0
        return LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=math.ceil(self.config.lease_duration),
            acquire_time=previous.acquire_time if ours and previous is not None else stamp,
            renew_time=stamp,
            lease_transitions=transitions if ours or previous is None else transitions + 1,
        )

    def _observe(self, spec: LeaseSpec) -> None:
        self._observed = spec
        self._observed_at = self._clock()
