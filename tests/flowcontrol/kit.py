"""Builders for flow-control tests: a controller over real plugins, a pool, a fake clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from helpers import endpoint, request
from prometheus_client import CollectorRegistry

from llmepp.datalayer.endpoint import Endpoint
from llmepp.flowcontrol.controller import BandConfig, FlowControlConfig, FlowController
from llmepp.flowcontrol.metrics import FlowControlMetrics
from llmepp.flowcontrol.objectives import ObjectiveStore
from llmepp.framework.plugin import Plugin, registry
from llmepp.request.types import InferenceRequest


class Clock:
    """A monotonic-compatible clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Pool:
    """Pool membership like the datastore: an immutable tuple, replaced on change."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints)

    def __call__(self) -> tuple[Endpoint, ...]:
        return self.endpoints

    def set(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)


def plugin(type_name: str, **params: Any) -> Any:
    built: Plugin = registry.build(type_name, type_name, params)
    return built


def concurrency_pool(n: int = 1, max_concurrency: int = 1) -> tuple[Pool, Any]:
    """A pool whose saturation is in-flight requests / (n · max_concurrency)."""
    return Pool([endpoint(i) for i in range(n)]), plugin("concurrency-detector", maxConcurrency=max_concurrency)


def controller(
    pool: Pool,
    detector: Any,
    *,
    fairness: str = "global-strict-fairness-policy",
    ordering: str = "fcfs-ordering-policy",
    bands: dict[int, BandConfig] | None = None,
    objectives: dict[str, int] | None = None,
    clock: Callable[[], float] = time.monotonic,
    registry_: CollectorRegistry | None = None,
    usage_limit: Any = None,
    **config: Any,
) -> FlowController:
    default_band = BandConfig(
        ordering=plugin(ordering),
        fairness=plugin(fairness),
        max_requests=config.pop("band_max_requests", 5000),
        max_bytes=config.pop("band_max_bytes", 1_000_000_000),
    )
    config.setdefault("poll_interval", 0.002)
    cfg = FlowControlConfig(
        detector=detector,
        usage_limit=usage_limit or plugin("static-usage-limit-policy"),
        default_band=default_band,
        bands=bands or {},
        **config,
    )
    return FlowController(
        cfg,
        pool=pool,
        objectives=ObjectiveStore(objectives or {}),
        metrics=FlowControlMetrics.for_registry(registry_ or CollectorRegistry()),
        clock=clock,
    )


def req(
    rid: str, *, fairness: str = "default-flow", objective: str = "", priority: int = 0, body: bytes = b"{}"
) -> InferenceRequest:
    r = request(b"hi", fairness_id=fairness, objective=objective, priority=priority, body=body)
    r.request_id = rid
    return r


class Server:
    """Plays the director's part: admit, count in-flight on the endpoint (no longer pending), record dispatch order.

    With `auto_complete`, each dispatched request finishes at once (frees its slot and tells
    the controller), so dispatches chain one after another through completion credits.
    """

    def __init__(self, ctl: FlowController, pool: Pool, *, auto_complete: bool = False) -> None:
        self.ctl = ctl
        self.pool = pool
        self.auto_complete = auto_complete
        self.order: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.evicted: list[str] = []  # ids of the `evictable` requests the controller revoked

    async def serve(self, r: InferenceRequest) -> None:
        await self.ctl.admit(r, self.pool())
        ep = self.pool()[0]
        ep.inflight.requests += 1
        self.ctl.release_pending(r)  # charged: no longer pending
        self.order.append(r.request_id)
        if self.auto_complete:
            await asyncio.sleep(0)
            ep.inflight.requests -= 1
            self.ctl.request_completed(r)

    def submit(self, r: InferenceRequest) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self.serve(r))
        self.tasks[r.request_id] = task
        return task

    async def close(self) -> None:
        """Close the controller and reap every request task (their 503s are expected)."""
        await self.ctl.aclose()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def complete_one(self) -> None:
        self.pool()[0].inflight.requests -= 1
        self.ctl.request_completed(req("completed"))

    def evictable(self, r: InferenceRequest) -> InferenceRequest:
        """`r` with the stream's evict: release now (in-flight count, completion) and record its id."""

        def evict() -> bool:
            self.evicted.append(r.request_id)
            self.complete_one()
            self.ctl.request_completed(r)
            return True

        r.evict = evict
        return r


async def until(cond: Callable[[], bool], within: float = 2.0) -> None:
    """Let the loop run until `cond()` holds (fails the test after `within` seconds)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.0005)


async def spin(n: int = 20) -> None:
    """A few loop iterations: enough for wake-ups and dispatches already due to happen."""
    for _ in range(n):
        await asyncio.sleep(0)
