"""Requests that end abnormally through the REAL Envoy, at each phase: the client goes away while its
body arrives, while routing waits, after routing before the response headers; the pod answers 5xx or
dies mid-stream. Whatever the phase, the EPP releases the request exactly once (or never routed it),
its ext_proc stream closes, and no routing step is left pending."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import TerminationCause
from llmepp.server.extproc import ExtProcServicer
from llmepp.settings import Settings
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.fakes import FakeDirector
from llmepp.testing.ports import free_port

from .test_envoy_protocol import start_epp

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

POD_HOST = "127.0.0.6"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Rig:
    director: FakeDirector
    metrics: EppMetrics
    port: int
    pod: str  # ip:port of the scripted pod
    behaviour: list[Handler]  # what the pod does with the next connection


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request, never answers (until the connection goes)."""
    await _read_request(reader)
    await reader.read()


async def server_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    body = b'{"error": "boom"}'
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    await writer.drain()  # then closed: Envoy pools keep-alive connections, each test scripts a fresh one


async def dies_mid_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Starts an SSE answer, sends one event, then the connection drops (a crashed pod)."""
    await _read_request(reader)
    event = b'data: {"choices":[{"text":"t0"}]}\n\n'
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"%x\r\n%s\r\n" % (len(event), event))  # fmt: skip
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["grpc", "h2"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    behaviour: list[Handler] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await (behaviour.pop(0) if behaviour else hang)(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    pod_port = free_port(POD_HOST)
    pod = await asyncio.start_server(on_connection, POD_HOST, pod_port)
    director = FakeDirector([f"{POD_HOST}:{pod_port}"])
    metrics = EppMetrics()
    settings = Settings()
    server, epp_port = await start_epp(ExtProcServicer(director, metrics, settings), settings, request.param,
                                       "127.0.0.1:0")  # fmt: skip
    port, admin = free_port(), free_port()
    envoy = EnvoyProcess(render_envoy_config(port, epp_port, admin, listen_address="127.0.0.1", epp_tls=False), admin)
    await envoy.start()
    try:
        yield Rig(director, metrics, port, f"{POD_HOST}:{pod_port}", behaviour)
    finally:
        await envoy.stop()
        await server.stop(None)
        pod.close()
        await pod.wait_closed()


def post(rig: Rig, body: bytes, *, length: int | None = None, **headers: str) -> bytes:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body) if length is None else length}\r\n{extra}\r\n").encode() + body  # fmt: skip


async def send(rig: Rig, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


def streams(rig: Rig) -> float:
    return rig.metrics.registry.get_sample_value("llm_d_epp_extproc_streams_inflight") or 0.0


async def settled(rig: Rig, completions: int, within: float = 5.0) -> None:
    """Every stream closed, every routed request released, `completions` of them in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while streams(rig) or rig.director.inflight or len(rig.director.completions) < completions:
        assert loop.time() < deadline, (streams(rig), rig.director.inflight, len(rig.director.completions))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # nothing more comes
    assert len(rig.director.completions) == completions
    assert streams(rig) == 0 and rig.director.inflight == {}
    pending: list[Any] = [t for t in asyncio.all_tasks() if "_await_pending" in repr(t)]
    assert not pending


def body(**kw: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "hello", "max_tokens": 4, **kw}).encode()


async def test_client_gone_while_its_body_arrives(rig: Rig) -> None:
    n, routed = len(rig.director.completions), len(rig.director.requests)
    data = body()
    _, writer = await send(rig, post(rig, data[:10], length=len(data)))
    await asyncio.sleep(0.3)  # Envoy has opened the ext_proc stream and sent the first chunk
    writer.transport.abort()
    await settled(rig, n)
    assert len(rig.director.requests) == routed  # never routed


async def test_client_gone_while_routing_waits(rig: Rig) -> None:
    # Flow control queueing or a slow data producer: the routing step is waiting when the client goes.
    n = len(rig.director.completions)
    _, writer = await send(rig, post(rig, body(), x_test_delay_ms="1500"))
    await asyncio.sleep(0.3)
    assert streams(rig) == 1
    writer.transport.abort()
    await settled(rig, n)


async def test_client_gone_after_routing_before_the_response_headers(rig: Rig) -> None:
    n = len(rig.director.completions)
    rig.behaviour.append(hang)
    _, writer = await send(rig, post(rig, body(), x_test_route=rig.pod))
    for _ in range(100):
        if rig.director.inflight:
            break
        await asyncio.sleep(0.02)
    assert rig.director.inflight
    writer.transport.abort()
    await settled(rig, n + 1)
    c = rig.director.completions[n]
    assert c.response.cause is TerminationCause.CLIENT_DISCONNECT and not c.response.status


async def test_a_pod_5xx_is_a_natural_end(rig: Rig) -> None:
    n = len(rig.director.completions)
    rig.behaviour.append(server_error)
    reader, writer = await send(rig, post(rig, body(), x_test_route=rig.pod))
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 500")
    await settled(rig, n + 1)
    c = rig.director.completions[n]
    assert c.response.cause is TerminationCause.NATURAL and c.response.status == 500
    writer.close()


async def test_a_pod_dying_mid_stream_is_released_once(rig: Rig) -> None:
    n = len(rig.director.completions)
    rig.behaviour.append(dies_mid_stream)
    reader, writer = await send(rig, post(rig, body(stream=True), x_test_route=rig.pod))
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.read(), 5)  # Envoy ends the client's response (no terminating chunk)
    await settled(rig, n + 1)
    c = rig.director.completions[n]
    assert c.response.status == 200 and c.response.bytes > 0
    assert c.response.cause is not TerminationCause.NATURAL  # the answer was cut short
    writer.close()
