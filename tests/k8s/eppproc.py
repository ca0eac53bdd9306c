"""An `epp` process (python -m llmepp) with its own identity, probed through its gRPC health service."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmepp.testing.ports import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Epp:
    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.grpc_port = free_port()
        self.health_port = free_port()
        self.args = [
            sys.executable, "-m", "llmepp", "--bind-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
            "--grpc-health-port", str(self.health_port), "--metrics-port", "0", "--log-format", "text", *args,
        ]  # fmt: skip
        self.log_path = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, within: float = 30.0) -> None:
        """Start and wait until the process answers health checks (liveness SERVING)."""
        env = {**os.environ, "POD_NAME": self.name}  # the lease identity is <POD_NAME>_<uuid>
        with self.log_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + within
        while await self.health("liveness") != SERVING:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not live after {within}s:\n{self.log[-4000:]}")
            await asyncio.sleep(0.1)

    async def health(self, service: str = "readiness") -> int | None:
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                return int(reply.status)
        except grpc.aio.AioRpcError:
            return None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.signal(signal.SIGKILL)
        await self.proc.wait()
