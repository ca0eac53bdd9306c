"""SIGTERM on a real EPP (`app.run`): readiness NOT_SERVING at once (liveness stays SERVING), an in-flight
ext_proc stream keeps being served through the drain, and `run` returns (exit code 0) once it is done."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmepp import app as app_module
from llmepp.settings import Settings
from llmepp.testing.ports import free_port
from tests.server.client import Stream, response_body, response_headers

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_sigterm_drains_an_in_flight_stream_then_run_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "tune_gc", lambda: None)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {name: pod-a, address: 127.0.0.1, port: 18000}\n")
    grpc_port, health_port = free_port(), free_port()
    config = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: file-discovery, parameters: {{path: {endpoints}}}}}
- type: queue-scorer
dataLayer:
  discovery: {{pluginRef: file-discovery}}
"""
    settings = Settings(config_text=config, bind_address="127.0.0.1", grpc_port=grpc_port,
                        grpc_health_port=health_port, metrics_port=0, secure_serving=False, drain_timeout=3.0,
                        tracing=False)  # fmt: skip
    running = asyncio.create_task(app_module.run(settings))
    try:
        await _drain(running, grpc_port, health_port)
    finally:
        running.cancel()


async def _drain(running: asyncio.Task[None], grpc_port: int, health_port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as health_channel:
        health = health_pb2_grpc.HealthStub(health_channel)

        async def status(service: str) -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status

        for _ in range(200):
            assert not running.done(), running.exception()
            try:
                if await status("readiness") == SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
        else:
            pytest.fail("never ready")
        # Its own subchannel pool: close() then closes the connection (Envoy's EDS drain of a removed endpoint).
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
        stream = Stream(pb_grpc.ExternalProcessorStub(channel).Process())
        routed = await stream.route(b'{"model": "m", "prompt": "x"}')  # the response phases are still to come
        assert routed[0].WhichOneof("response") == "request_headers"
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await status("readiness") == NOT_SERVING
        assert await status("liveness") == SERVING
        await asyncio.sleep(1.5)  # longer than the quiet period: the open stream holds the drain
        assert not running.done()
        await stream.send(response_headers(), response_body(b"data: [DONE]\n\n", eos=True))
        answers = [await stream.recv(), await stream.recv()]  # still served during the drain
        assert [a.WhichOneof("response") for a in answers] == ["response_headers", "response_body"]
        await stream.close()
        await channel.close()
    await asyncio.wait_for(running, 10)  # at the end of --drain-timeout at the latest
    assert running.result() is None
