"""Envoy closes an idle pod connection before vLLM would. vLLM's server (uvicorn, VLLM_HTTP_TIMEOUT_KEEP_ALIVE=5)
closes a keep-alive connection after 5 s idle; a request Envoy writes on such a connection just as the pod's
timer fires is reset before any answer, and the client gets 503 "upstream connect error or disconnect/reset
before headers. reset reason: connection termination" (flag UC), retried by nothing. The shipped config's pod
cluster therefore closes pod connections idle for 4 s (Envoy's default: an hour), as the EPP's own pooled
clients do (sidecar, metrics scraping).

The pod below is uvicorn's keep-alive made deterministic: a connection idle for >= 5 s when a request arrives
is closed without an answer (its timer fired as the request arrived); everything else is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from llmepp.observability.metrics import EppMetrics
from llmepp.server.extproc import ExtProcServicer
from llmepp.server.h2 import create_h2_server
from llmepp.settings import Settings
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.fakes import FakeDirector
from llmepp.testing.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

UVICORN_KEEPALIVE = 5.0  # vLLM's default (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), uvicorn's timeout_keep_alive


class UvicornLikePod:
    def __init__(self, host: str) -> None:
        self.host, self.port = host, free_port(host)
        self.idle_since: dict[int, float] = {}  # connection → when its last answer went out
        self.closed_on_arrival = 0

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=3600)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        conn = id(transport)
        since = self.idle_since.get(conn)
        if since is not None and time.monotonic() - since >= UVICORN_KEEPALIVE:
            self.closed_on_arrival += 1
            transport.close()  # the keep-alive timer won the race: closed, the request unanswered
            raise asyncio.CancelledError
        await request.read()
        await asyncio.sleep(float(request.headers.get("x-hold", "0")))
        response = web.json_response({"ok": True})
        await response.prepare(request)
        await response.write_eof()
        self.idle_since[conn] = time.monotonic()
        return response

    async def stop(self) -> None:
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def envoy_and_epp(pods: list[str]) -> AsyncIterator[tuple[EnvoyProcess, int]]:
    """The shipped Envoy config (on loopback, h2c to the EPP) in front of an in-process EPP routing to `pods`."""
    settings = Settings()
    server = create_h2_server(
        ExtProcServicer(FakeDirector(pods), EppMetrics(), settings), settings, address="127.0.0.1:0"
    )
    await server.start()
    try:
        port, admin = free_port(), free_port()
        config = render_envoy_config(port, server.port, admin, listen_address="127.0.0.1", epp_tls=False)
        async with EnvoyProcess(config, admin, log_level="warning") as envoy:
            yield envoy, port
    finally:
        await server.stop(None)


async def test_a_pod_connection_idle_past_vllms_keepalive_is_not_reused() -> None:
    pod = UvicornLikePod("127.0.0.2")
    await pod.start()
    try:
        async with envoy_and_epp([pod.hostport]) as (envoy, port), aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{port}/v1/completions"
            body = {"model": "m", "prompt": "x"}

            async def post(hold: float = 0.0) -> int:
                async with s.post(url, json=body, headers={"x-hold": str(hold)}) as r:
                    await r.read()
                    return r.status

            # The pod's first request creates its ORIGINAL_DST host (requests racing it could land on a duplicate
            # host object of their own); then a burst of two opens a second pod connection.
            assert await post() == 200
            await asyncio.sleep(0.2)
            assert await asyncio.gather(post(0.3), post(0.3)) == [200, 200]
            # Steady lighter traffic keeps the pod (ORIGINAL_DST host) in use on one connection for 6 s;
            # the other one sits idle past the pod's keep-alive.
            for _ in range(6):
                await asyncio.sleep(1.0)
                assert await post() == 200
            # The next burst needs both connections again.
            statuses = await asyncio.gather(post(0.3), post(0.3))
            await asyncio.sleep(0.3)  # access log flush
            log = "\n".join(envoy.access_log()[-2:])
            assert statuses == [200, 200], (statuses, pod.closed_on_arrival, log)
    finally:
        await pod.stop()
