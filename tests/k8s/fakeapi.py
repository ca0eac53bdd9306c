"""A scripted stand-in for the API server (plain HTTP on loopback), for what a real one will not do
on cue: answer garbage, a 500 of any shape, a stream cut at a chosen point. Each test gives the
handler; the client under test (llmepp.k8s.client.KubeClient) connects through a kubeconfig."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from helpers import serving

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
async def fake_api(handler: Handler, tmp_path: Path) -> AsyncIterator[KubeClient]:
    """Serve `handler` for every request; yields a KubeClient connected to it."""
    async with serving(handler) as url:
        client = await KubeClient.connect(str(kubeconfig(tmp_path / "fake.kubeconfig", url)))
        try:
            yield client
        finally:
            await client.aclose()
