"""A scripted stand-in for the API server (plain HTTP on loopback), for what a real one will not do
on cue: answer garbage, a 500 of any shape, a stream cut at a chosen point. Each test gives the
handler; the client under test (llmepp.k8s.client.KubeClient) connects through a kubeconfig."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from llmepp.k8s.client import KubeClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{url}"}}}}]
users: [{{name: u, user: {{token: fake-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: u}}}}]
current-context: fake
"""
    )
    return path


@contextlib.asynccontextmanager
async def serving(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve `handler` for every request on loopback (HTTPS with `ssl_context`); yields the server's URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # handlers that hold a watch open
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fake_api(handler: Handler, tmp_path: Path) -> AsyncIterator[KubeClient]:
    """Serve `handler` for every request; yields a KubeClient connected to it."""
    async with serving(handler) as url:
        client = await KubeClient.connect(str(kubeconfig(tmp_path / "fake.kubeconfig", url)))
        try:
            yield client
        finally:
            await client.aclose()
