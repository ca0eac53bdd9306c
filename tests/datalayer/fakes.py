"""Real servers on 127.0.0.x for scraper tests: an aiohttp metrics server whose behaviour
can be switched at runtime, and a raw TCP server that answers with scripted bytes."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

from .vllm_page import vllm_page

# Self-signed EC certificate for 127.0.0.1 / .43 / .44 / localhost, valid until 2126.
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBpTCCAUugAwIBAgIUWHqaZLm4zB5tc/KoBsYR2udWPlgwCgYIKoZIzj0EAwIw
EzERMA8GA1UEAwwIZXBwLXRlc3QwIBcNMjYxMTIwMjM0MTM2WhgPMjEyNjEwMjcy
MzQxMzZaMBMxETAPBgNVBAMMCGVwcC10ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAE5QM5tu1UluSBLBFm+To3WzBcGegN5hp66lOlRvIYYP9/+UB9JMvHJ2oM
ldTbMJF8Npismwz5DGkk/rXWSm1ndqN7MHkwHQYDVR0OBBYEFJ9fDpUGHg3sMgIF
ReCot3Q496xzMB8GA1UdIwQYMBaAFJ9fDpUGHg3sMgIFReCot3Q496xzMA8GA1Ud
EwEB/wQFMAMBAf8wJgYDVR0RBB8wHYcEfwAAAYcEfwAAK4cEfwAALIIJbG9jYWxo
b3N0MAoGCCqGSM49BAMCA0gAMEUCIBI0I0KfEZmKWYakd9BM579s0jDx1S/KLYCw
X9UgevwvAiEAqRoXVryLjw9HJFu3LKwi0j5W+gDrqmkhsFga9sKszlU=
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg9sDVs/1wsih5Us3L
vmkOUz3NaOW5kzhDVSICDrU2mAShRANCAATlAzm27VSW5IEsEWb5OjdbMFwZ6A3m
GnrqU6VG8hhg/3/5QH0ky8cnagyV1NswkXw2mKybDPkMaST+tdZKbWd2
-----END PRIVATE KEY-----
"""


def bound_socket(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class MetricsServer:
    """An aiohttp model-server stand-in. `mode`: ok | hang | garbage | status | chunked."""

    def __init__(self, host: str, page: bytes | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = 0
        self.page = page if page is not None else vllm_page()
        self.mode = "ok"
        self.status = 503  # what mode "status" answers
        self.requests = 0
        self.ssl_context = ssl_context
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> MetricsServer:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        app.router.add_get("/other", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = bound_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, ssl_context=self.ssl_context)
        await site.start()
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.mode == "hang":
            await self._release.wait()
        if self.mode == "garbage":
            return web.Response(body=b"<html><body>not metrics</body></html>", content_type="text/html")
        if self.mode == "status":
            return web.Response(status=self.status, text="overloaded")
        if self.mode == "chunked":
            resp = web.StreamResponse()
            resp.content_type = "text/plain"
            await resp.prepare(request)
            for i in range(0, len(self.page), 4000):
                await resp.write(self.page[i : i + 4000])
            await resp.write_eof()
            return resp
        return web.Response(body=self.page, content_type="text/plain")


# responder(connection_index, request_index_on_connection) -> (chunks to write, close after)
Responder = Callable[[int, int], tuple[list[bytes], bool]]


class RawServer:
    """Answers every request head with scripted bytes; counts connections and requests."""

    def __init__(self, host: str, responder: Responder) -> None:
        self.host = host
        self.port = 0
        self.responder = responder
        self.connections = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Transport] = set()

    async def start(self) -> RawServer:
        loop = asyncio.get_running_loop()
        sock = bound_socket(self.host)
        self.port = sock.getsockname()[1]
        self._server = await loop.create_server(lambda: _RawProto(self), sock=sock)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Python 3.12.1+: wait_closed also waits for the connections, and a client's keep-alive one stays open.
            for transport in list(self._open):
                transport.abort()
            await self._server.wait_closed()


class _RawProto(asyncio.Protocol):
    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.index = server.connections
        server.connections += 1
        self.count = 0
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server._open.add(cast(asyncio.Transport, transport))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._open.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf and not self.transport.is_closing():
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.server.requests += 1
            chunks, close = self.server.responder(self.index, self.count)
            self.count += 1
            for c in chunks:
                self.transport.write(c)
            if close:
                self.transport.close()


def ok_response(body: bytes, extra_headers: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n".encode() + body
