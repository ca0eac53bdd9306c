"""A throwaway `redis-server` on 127.0.0.1 for tests and benchmarks (Debian's package).

    async with RedisServer() as server:
        server.url   # redis://127.0.0.1:<free port>

Started with ``--save '' --appendonly no`` (nothing on disk) and stopped by PID. When the binary is
missing it is installed first (``apt-get install -y redis-server``, with ``apt-get update`` if the
package lists are empty), so a fresh CI machine needs nothing beforehand.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from llmepp.testing.ports import free_port

BINARY = "redis-server"


def ensure_installed() -> str:
    """Path of redis-server, installing the Debian package when needed."""
    found = shutil.which(BINARY)
    if found:
        return found
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "redis-server"]
    if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, check=True)
        subprocess.run(cmd, capture_output=True, check=True)
    found = shutil.which(BINARY)
    if not found:
        raise RuntimeError("redis-server is not available after installing the package")
    return found


class RedisServer:
    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="epp-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = ensure_installed()
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--daemonize", "no", "--loglevel", "warning"]  # fmt: skip
        log = Path(self._dir.name) / "redis.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server not answering on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._dir.cleanup()

    async def __aenter__(self) -> RedisServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
