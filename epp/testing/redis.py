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

from llmepp.testing.lifetime import die_with_parent
from llmepp.testing.ports import free_port

BINARY = "redis-server"
READY_TIMEOUT = 10.0  # seconds for a started redis-server to answer PING


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
    def __init__(self, port: int = 0, password: str = "") -> None:
        self.port = port or free_port()
        self.password = password  # requirepass: clients must AUTH
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="epp-redis-")

    @property
    def _log(self) -> Path:
        return Path(self._dir.name) / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = READY_TIMEOUT) -> RedisServer:
        self._spawn(ensure_installed())
        return self._wait_ready(timeout)

    def _spawn(self, binary: str) -> None:
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--daemonize", "no", "--loglevel", "warning"]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        with self._log.open("wb") as out:
            self.proc = subprocess.Popen(die_with_parent(args), stdout=out, stderr=subprocess.STDOUT)

    def _wait_ready(self, timeout: float) -> RedisServer:
        assert self.proc is not None
        log = self._log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # NOAUTH: up, with requirepass
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
        # Forked on the loop's thread (so redis dies with this process, see die_with_parent), waited off it.
        self._spawn(await asyncio.to_thread(ensure_installed))
        return await asyncio.to_thread(self._wait_ready, READY_TIMEOUT)

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
