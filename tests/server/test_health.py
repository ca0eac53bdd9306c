"""gRPC health: liveness vs readiness, drain, unknown services, Watch — over a real channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmepp.server.health import HealthService, add_to_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Ready:
    def __init__(self) -> None:
        self.value = False

    def __call__(self) -> bool:
        return self.value


@pytest.fixture
async def health() -> AsyncIterator[tuple[HealthService, Ready, health_pb2_grpc.HealthStub]]:
    ready = Ready()
    service = HealthService(ready, watch_interval=0.05)
    server = grpc.aio.server()
    add_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield service, ready, health_pb2_grpc.HealthStub(channel)
    await channel.close()
    await server.stop(None)


async def check(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(resp.status)


READINESS_NAMES = ["readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"]


async def test_liveness_and_readiness(health: tuple[HealthService, Ready, health_pb2_grpc.HealthStub]) -> None:
    service, ready, stub = health
    assert await check(stub, "liveness") == SERVING
    for name in READINESS_NAMES:
        assert await check(stub, name) == NOT_SERVING
    ready.value = True
    for name in READINESS_NAMES:
        assert await check(stub, name) == SERVING
    service.drain()
    for name in READINESS_NAMES:
        assert await check(stub, name) == NOT_SERVING
    assert await check(stub, "liveness") == SERVING


async def test_unknown_service_is_not_found(health: tuple[HealthService, Ready, health_pb2_grpc.HealthStub]) -> None:
    _, _, stub = health
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await check(stub, "nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ready_callable_failure_is_not_serving(
    health: tuple[HealthService, Ready, health_pb2_grpc.HealthStub],
) -> None:
    service, _, stub = health

    def broken() -> bool:
        raise RuntimeError("datastore exploded")

    service._ready = broken
    assert await check(stub, "readiness") == NOT_SERVING


async def test_watch_follows_changes(health: tuple[HealthService, Ready, health_pb2_grpc.HealthStub]) -> None:
    service, ready, stub = health
    call = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.status == NOT_SERVING
    ready.value = True
    second = await asyncio.wait_for(call.read(), 5)
    assert second.status == SERVING
    service.drain()
    third = await asyncio.wait_for(call.read(), 5)
    assert third.status == NOT_SERVING
    call.cancel()


# -- SIGTERM: the drain, and a second signal ------------------------------------------------------
async def test_a_second_signal_during_the_drain_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the reference (controller-runtime's signal handler): the first SIGTERM drains, a second one exits 1."""
    import os
    import signal

    from llmepp import app as app_module

    exit_codes: list[int] = []
    exited = asyncio.Event()

    def fake_exit(code: int) -> None:
        exit_codes.append(code)
        exited.set()

    class DrainingApp:
        def __init__(self, settings: object) -> None:
            self.failed = asyncio.Event()  # no part fails while it serves
            self.failure = None

        async def start(self) -> None:
            asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

        async def shutdown(self) -> None:  # a drain that would take its full --drain-timeout
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(exited.wait(), 2)

    monkeypatch.setattr(app_module, "App", DrainingApp)
    monkeypatch.setattr(app_module, "tune_gc", lambda: None)
    monkeypatch.setattr(os, "_exit", fake_exit)
    await app_module.run(None)  # type: ignore[arg-type]
    assert exit_codes == [1]
