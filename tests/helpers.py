"""Small builders shared by unit tests (pure data; no mocks of behaviour), and a resource-owning test plugin."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from aiohttp import web

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, EndpointSpec
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams, registry
from llmepp.framework.scheduling import Scorer
from llmepp.request.types import InferenceRequest, RequestKind
from llmepp.server.tls import CERT_FILE, KEY_FILE, self_signed_pem
from llmepp.settings import Settings
from llmepp.testing.ports import free_port


def file_config(endpoints: Path | str, scorer: str = "type: queue-scorer") -> str:
    """FILE_CONFIG reading the endpoints file `endpoints`, with `scorer` (a plugins entry) as its scorer."""
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: file-discovery, parameters: {{path: {endpoints}}}}}
- {scorer}
dataLayer:
  discovery: {{pluginRef: file-discovery}}
"""


def loopback_settings(config: str) -> Settings:
    """Settings for an App serving `config` on loopback: free ports, no metrics port, no TLS, no tracing, a
    short drain."""
    return Settings(config_text=config, bind_address="127.0.0.1", grpc_port=free_port(),
                    grpc_health_port=free_port(), metrics_port=0, secure_serving=False, tracing=False,
                    drain_timeout=0.2)  # fmt: skip


# A config that builds an App in file-discovery mode without touching any file until start-up.
FILE_CONFIG = file_config("/nonexistent/endpoints.yaml")


def endpoint(
    i: int,
    *,
    queue: int = 0,
    running: int = 0,
    kv: float = 0.0,
    labels: dict[str, str] | None = None,
    scraped: bool = True,
    block_size: int = 0,
    num_blocks: int = 0,
) -> Endpoint:
    ep = Endpoint(
        EndpointSpec(name=f"pod-{i}", address=f"10.0.{i // 250}.{i % 250 + 1}", port=8000, labels=labels or {})
    )
    ep.metrics = EndpointMetrics(
        waiting_queue_size=queue,
        running_requests_size=running,
        kv_cache_usage_percent=kv,
        cache_block_size=block_size,
        cache_num_blocks=num_blocks,
        update_time=time.monotonic() if scraped else 0.0,
    )
    return ep


def request(prompt: bytes | None = b"hello", model: str = "m", **kw: object) -> InferenceRequest:
    return InferenceRequest(
        request_id="r-1",
        path="/v1/completions",
        headers={},
        kind=RequestKind.COMPLETIONS if prompt is not None else RequestKind.PASSTHROUGH,
        model=model,
        target_model=model,
        prompt=prompt,
        **kw,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ssl_context: ssl.SSLContext | None = None,
    *,
    route: tuple[str, str] = ("*", "/{tail:.*}"),
) -> AsyncIterator[str]:
    """Serve `handler` on loopback (HTTPS with `ssl_context`) for `route` (method, path; default every
    request); yields the server's URL."""
    app = web.Application()
    app.router.add_route(*route, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # handlers that hold a stream open
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def until(cond: Callable[[], bool], within: float = 5.0, what: str = "condition", interval: float = 0.01) -> None:
    """Let the loop run until `cond()` holds; AssertionError naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


# A 5 ms timer firing later than this means the process was starved of CPU (epoll's rounding is ~1 ms).
_STARVED = 0.015


class RacingWrite:
    """A call awaited as redis-py awaits its socket writes (`asyncio.wait_for`), which the test completes with
    `complete()` in the loop iteration it cancels the caller in: Python 3.11's wait_for then returns the result
    and swallows the cancellation."""

    def __init__(self) -> None:
        self._entered = asyncio.Event()
        self._written: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def __call__(self) -> None:
        self._entered.set()
        await asyncio.wait_for(self._written, 10)

    async def started(self) -> None:
        await asyncio.wait_for(self._entered.wait(), 5)

    def complete(self) -> None:
        """The write completes; a cancellation issued before the test next awaits arrives in the same iteration."""
        self._written.set_result(None)


async def _watch_lag(worst: list[float]) -> None:
    """Keep `worst[0]` at the latest this loop's 5 ms timer has fired, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + 0.005
        await asyncio.sleep(0.005)
        worst[0] = max(worst[0], loop.time() - due)


async def on_a_punctual_loop(measure: Callable[[], Awaitable[None]], attempts: int = 3, pause: float = 1.0) -> None:
    """Run `measure`, a test body asserting on wall-clock latencies, until an attempt passes.

    A failed attempt is run again (after `pause` s) only if this event loop's timers fired late meanwhile: a
    starved process (a loaded machine, a noisy CI neighbour) inflates every latency it measures, so that
    failure says nothing about the behaviour under test. A failure on a punctual loop, or on the last
    attempt, fails the test, noting each attempt's worst timer lateness.
    """
    lateness: list[float] = []
    for attempt in range(1, attempts + 1):
        worst = [0.0]
        watcher = asyncio.create_task(_watch_lag(worst))
        try:
            await measure()
            return
        except AssertionError as error:
            lateness.append(round(worst[0], 3))
            if worst[0] <= _STARVED or attempt == attempts:
                error.add_note(f"attempt {attempt} of {attempts}; worst timer lateness per attempt (s): {lateness}")
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await asyncio.sleep(pause)


def write_cert_pair(directory: Path, host: str = "localhost") -> bytes:
    """A fresh self-signed tls.crt + tls.key in `directory` (created if needed); returns the certificate PEM."""
    cert, key = self_signed_pem((host,))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CERT_FILE).write_bytes(cert)
    (directory / KEY_FILE).write_bytes(key)
    return cert


class ClosingScorer(Scorer):
    """A scorer owning a background task from setup to aclose (as a plugin with a client, a socket or a
    worker), recording its instances and how often each was closed. `register` it for one test."""

    type = "test-closing-scorer"
    instances: ClassVar[list[ClosingScorer]] = []

    class Params(PluginParams):
        fail_setup: bool = False

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.task: asyncio.Task[None] | None = None
        self.closed = 0
        ClosingScorer.instances.append(self)

    def setup(self, ctx: PluginContext) -> None:
        self.task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        if self.params.fail_setup:
            raise ConfigError(f"plugin {self.name!r} (type {self.type}): failSetup")

    async def aclose(self) -> None:
        self.closed += 1
        if self.task is not None:
            self.task.cancel()

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0] * len(endpoints)

    @classmethod
    def register(cls, monkeypatch: pytest.MonkeyPatch) -> None:
        """Known to the plugin registry for this test only (a global one would be built by every test that
        builds each registered type), with no instances yet."""
        monkeypatch.setitem(registry._types, cls.type, cls)
        cls.instances.clear()
