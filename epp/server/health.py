"""gRPC health service (`grpc.health.v1.Health`) for the EPP (reference §8.3).

| service                                        | SERVING when                         |
|------------------------------------------------|--------------------------------------|
| `liveness`                                     | the process runs (also during drain) |
| `readiness`, `""`, the ext_proc service name   | `ready()` is true and not draining   |

`ready` is a callable the app supplies (e.g. "datastore synced"); it is evaluated on every
Check, so the answer is never stale. `drain()` flips the readiness services to NOT_SERVING
for good (SIGTERM: Envoy / Kubernetes stop sending new work while in-flight streams finish).
Watch streams the status and re-evaluates it every `watch_interval` seconds or at drain.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmepp.server.envoy import SERVICE_NAME as EXTPROC_SERVICE

LIVENESS = "liveness"
READINESS = "readiness"
READINESS_SERVICES = frozenset({READINESS, "", EXTPROC_SERVICE})

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, ready: Callable[[], bool], *, watch_interval: float = 1.0) -> None:
        self._ready = ready
        self._draining = False
        self._changed = asyncio.Event()
        self.watch_interval = watch_interval

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Readiness goes NOT_SERVING (and stays so); liveness keeps SERVING."""
        self._draining = True
        self._changed.set()

    def status(self, service: str) -> int | None:
        """The status for `service`, or None for an unknown service."""
        if service == LIVENESS:
            return SERVING
        if service in READINESS_SERVICES:
            if self._draining:
                return NOT_SERVING
            try:
                return SERVING if self._ready() else NOT_SERVING
            except Exception:
                return NOT_SERVING
        return None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        last: int | None = None
        while True:
            status = self.status(request.service)
            current = SERVICE_UNKNOWN if status is None else status
            if current != last:
                await context.write(health_pb2.HealthCheckResponse(status=current))
                last = current
            if self._draining:
                # Drain is final and the event stays set: poll slowly instead of spinning.
                await asyncio.sleep(self.watch_interval)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.watch_interval):
                    await self._changed.wait()


def add_to_server(service: HealthService, server: grpc.aio.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(service, server)
