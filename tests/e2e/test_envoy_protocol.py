"""The protocol through the REAL Envoy 1.40: our servicer + a fake director + aiohttp pods.

One EPP and three Envoys (FULL_DUPLEX_STREAMED by header, by metadata, BUFFERED) are shared
by the module; the restart test brings its own.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import TerminationCause
from llmepp.server.extproc import ExtProcServicer, create_server
from llmepp.server.h2 import create_h2_server
from llmepp.settings import Settings
from llmepp.testing.envoy import BodyMode, EnvoyProcess, deploy_config_text, envoy_binary, render_envoy_config
from llmepp.testing.fakes import FakeDirector
from llmepp.testing.ports import free_port, free_shared_port
from llmepp.units import parse_duration

from . import h2c
from .modelserver import USAGE, ModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

HOSTS = ["127.0.0.2", "127.0.0.3"]
MAX_BODY = 3 * 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    director: FakeDirector
    servicer: ExtProcServicer
    pods: list[ModelServer]
    fds: EnvoyProcess
    fds_port: int
    metadata: EnvoyProcess
    metadata_port: int
    buffered: EnvoyProcess
    buffered_port: int
    session: aiohttp.ClientSession

    def url(self, port: int, path: str = "/v1/completions") -> str:
        return f"http://127.0.0.1:{port}{path}"


async def start_epp(servicer: ExtProcServicer, settings: Settings, transport: str, address: str) -> tuple[Any, int]:
    if transport == "h2":
        h2server = create_h2_server(servicer, settings, address=address)
        await h2server.start()
        return h2server, h2server.port
    server, port = create_server(servicer, settings, address=address)
    await server.start()
    return server, port


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["grpc", "h2"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    pod_port = free_shared_port(HOSTS)
    pods = [ModelServer(h, pod_port, events=5, gap=0.05) for h in HOSTS]
    for p in pods:
        await p.start()
    director = FakeDirector([p.hostport for p in pods])
    settings = Settings(max_body_bytes=MAX_BODY)
    servicer = ExtProcServicer(director, EppMetrics(), settings)
    server, epp_port = await start_epp(servicer, settings, request.param, "127.0.0.1:0")
    envoys = []
    for kw in ({}, {"route_by": "metadata"}, {"body_mode": "BUFFERED"}):
        port, admin = free_port(), free_port()
        config = render_envoy_config(port, epp_port, admin, listen_address="127.0.0.1", epp_tls=False, **kw)  # type: ignore[arg-type]
        env = EnvoyProcess(config, admin)
        await env.start()
        envoys.append((env, port))
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield Stack(
            director,
            servicer,
            pods,
            envoys[0][0],
            envoys[0][1],
            envoys[1][0],
            envoys[1][1],
            envoys[2][0],
            envoys[2][1],
            session,
        )
    finally:
        await session.close()
        for env, _ in envoys:
            await env.stop()
        await server.stop(None)
        for p in pods:
            await p.stop()


async def settle(director: FakeDirector, within: float = 3.0) -> None:
    """Wait until every routed request has been released."""
    for _ in range(int(within / 0.02)):
        if not director.inflight:
            break
        await asyncio.sleep(0.02)
    assert director.inflight == {}, director.inflight


def completion(model: str = "m", stream: bool = False, prompt: str = "hello") -> dict:
    return {"model": model, "prompt": prompt, "stream": stream, "max_tokens": 4}


# -- config ------------------------------------------------------------------------------------------
async def test_deploy_config_matches_the_renderer_and_validates() -> None:
    text = (REPO / "deploy" / "envoy.yaml").read_text()
    assert yaml.safe_load(text) == yaml.safe_load(deploy_config_text())
    for kw in ({}, {"route_by": "metadata"}, {"body_mode": "BUFFERED"}):
        cfg = render_envoy_config(18081, 19002, 19901, **kw)  # type: ignore[arg-type]
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"envoy-validate-{os.getpid()}.yaml"
        path.write_text(cfg)
        proc = await asyncio.create_subprocess_exec(
            envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        path.unlink()
        assert proc.returncode == 0, out.decode()[-2000:]


async def test_deploy_timeouts_let_long_generations_finish() -> None:
    """Envoy's route `timeout` caps the whole response, an SSE stream that keeps sending included (cut
    mid-stream, flag UT), and the idle timeouts end any stream that sends no byte for that long: a
    non-streamed generation, or a request waiting in the EPP's flow control (504, flag SI). Checked with
    the real Envoy at 1/100 scale (2 s / 1 s). So neither may be shorter than a long generation: the total
    as the reference's standalone proxy (86400 s), the idle timeouts an hour."""
    cfg = yaml.safe_load(deploy_config_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = [r["route"] for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    assert parse_duration(route["timeout"]) >= 86400, route
    assert parse_duration(route["idle_timeout"]) >= 3600, route
    assert parse_duration(hcm["stream_idle_timeout"]) >= 3600, hcm["stream_idle_timeout"]


# -- routing -----------------------------------------------------------------------------------------
async def test_routes_by_header_to_the_picked_pod(stack: Stack) -> None:
    for pod in stack.pods:
        async with stack.session.post(
            stack.url(stack.fds_port), json=completion(), headers={"x-test-route": pod.hostport}
        ) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-served-by"] == pod.hostport
            assert r.headers["x-received-dest"] == pod.hostport
    # Round robin without a steer: both pods are used.
    served = set()
    for _ in range(4):
        async with stack.session.post(stack.url(stack.fds_port), json=completion()) as r:
            assert r.status == 200
            served.add(r.headers["x-served-by"])
    assert served == {p.hostport for p in stack.pods}
    await settle(stack.director)


async def test_routes_by_metadata(stack: Stack) -> None:
    pod = stack.pods[1]
    async with stack.session.post(
        stack.url(stack.metadata_port), json=completion(), headers={"x-test-route": pod.hostport}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-served-by"] == pod.hostport
    await settle(stack.director)
    # The access log is flushed every 200 ms.
    for _ in range(60):
        if any("lb_md=" + pod.hostport in ln for ln in stack.metadata.access_log()):
            break
        await asyncio.sleep(0.05)
    line = next(ln for ln in stack.metadata.access_log() if "lb_md=" + pod.hostport in ln)
    assert f"upstream={pod.hostport}" in line


async def test_client_destination_header_is_overwritten(stack: Stack) -> None:
    pod = stack.pods[0]
    async with stack.session.post(
        stack.url(stack.fds_port),
        json=completion(),
        headers={"x-gateway-destination-endpoint": "127.0.0.9:1", "x-test-route": pod.hostport},
    ) as r:
        assert r.status == 200
        assert r.headers["x-served-by"] == pod.hostport
        assert r.headers["x-received-dest"] == pod.hostport
    await settle(stack.director)


async def test_fallback_list_is_reduced_to_the_primary(stack: Stack) -> None:
    a, b = stack.pods
    async with stack.session.post(
        stack.url(stack.fds_port), json=completion(), headers={"x-test-route": f"{b.hostport},{a.hostport}"}
    ) as r:
        assert r.status == 200
        assert r.headers["x-served-by"] == b.hostport
    await settle(stack.director)


async def test_envoy_original_dst_rejects_a_list(stack: Stack) -> None:
    """Pins Envoy's behaviour: ORIGINAL_DST cannot use a comma-separated list (503 UH)."""
    a, b = stack.pods
    stack.servicer.destination_list = True
    try:
        for port in (stack.fds_port, stack.metadata_port):
            async with stack.session.post(
                stack.url(port), json=completion(), headers={"x-test-route": f"{a.hostport},{b.hostport}"}
            ) as r:
                assert r.status == 503
                assert "no healthy upstream" in await r.text()
    finally:
        stack.servicer.destination_list = False
    await settle(stack.director)


async def test_bodyless_get(stack: Stack) -> None:
    async with stack.session.get(stack.url(stack.fds_port, "/v1/models")) as r:
        assert r.status == 200
        assert r.headers["x-served-by"] in {p.hostport for p in stack.pods}
        assert (await r.json())["data"][0]["id"] == "m"
    await settle(stack.director)


# -- bodies ----------------------------------------------------------------------------------------
async def test_non_streamed_response_intact_and_usage(stack: Stack) -> None:
    n = len(stack.director.completions)
    async with stack.session.post(stack.url(stack.fds_port), json=completion()) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["choices"][0]["text"] == "hello" and doc["usage"] == USAGE
    await settle(stack.director)
    c = stack.director.completions[n]
    assert c.response.usage is not None and c.response.usage.prompt_tokens == 9
    assert c.response.usage.cached_tokens == 2 and c.response.cause is TerminationCause.NATURAL


async def test_streamed_sse_intact_and_incremental(stack: Stack) -> None:
    n = len(stack.director.completions)
    t0 = time.monotonic()
    first_at = None
    body = b""
    async with stack.session.post(
        stack.url(stack.fds_port, "/v1/chat/completions"),
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for chunk in r.content.iter_any():
            if first_at is None:
                first_at = time.monotonic() - t0
            body += chunk
    total = time.monotonic() - t0
    events = [e for e in body.decode().split("\n\n") if e]
    assert len(events) == 7 and events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:5]] == [f"t{i}" for i in range(5)]
    # 5 events 50 ms apart: the first arrives well before the end (streamed, not buffered).
    assert first_at is not None and total - first_at > 0.15
    await settle(stack.director)
    c = stack.director.completions[n]
    assert c.response.streaming and c.response.usage is not None and c.response.usage.total_tokens == 13


async def test_two_megabyte_prompt_byte_exact(stack: Stack) -> None:
    prompt = os.urandom(1_000_000).hex()
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    async with stack.session.post(
        stack.url(stack.fds_port), data=body, headers={"content-type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-received-sha256"] == hashlib.sha256(body).hexdigest()
        assert int(r.headers["x-received-bytes"]) == len(body)
    await settle(stack.director)


async def test_large_response_through_flow_control(stack: Stack) -> None:
    # 40 MB in one stream: more than every window on the way (Envoy's, and the EPP's
    # 16 MiB per-stream receive window on the h2 transport), so windows must be refilled.
    n = 40 * 1024 * 1024
    digest = hashlib.sha256()
    got = 0
    async with stack.session.get(stack.url(stack.fds_port, f"/big?n={n}")) as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(1 << 20):
            digest.update(chunk)
            got += len(chunk)
    pattern = bytes(range(256)) * 4096
    expected = hashlib.sha256(pattern * (n // len(pattern))).hexdigest()
    assert got == n and digest.hexdigest() == expected
    await settle(stack.director)


async def test_concurrent_streams_all_complete(stack: Stack) -> None:
    n = len(stack.director.completions)

    async def one(i: int) -> int:
        async with stack.session.post(
            stack.url(stack.fds_port), json=completion(stream=i % 2 == 0, prompt=f"p{i}")
        ) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(60)))
    assert statuses == [200] * 60
    await settle(stack.director, within=10)
    assert len(stack.director.completions) - n == 60


async def test_h2c_client(stack: Stack) -> None:
    body = json.dumps(completion(prompt="over h2c")).encode()
    data, ended = await asyncio.wait_for(
        h2c.post("127.0.0.1", stack.fds_port, "/v1/completions", body, {"x-test-route": stack.pods[1].hostport}), 10
    )
    assert ended
    doc = json.loads(data)
    assert doc["served_by"] == stack.pods[1].hostport
    assert doc["received_sha256"] == hashlib.sha256(body).hexdigest()
    await settle(stack.director)


@pytest.mark.parametrize("stream", [False, True])
async def test_http_1_0_client(stack: Stack, stream: bool) -> None:
    """As ApacheBench sends it: HTTP/1.0, no keep-alive (a stream's end is the connection's close). Before,
    Envoy answered an empty 426 (no bytes)."""
    body = json.dumps(completion(prompt="over HTTP/1.0", stream=stream)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.fds_port)
    writer.write(
        b"POST /v1/completions HTTP/1.0\r\nHost: localhost\r\ncontent-type: application/json\r\n"
        + f"x-test-route: {stack.pods[0].hostport}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    response = await asyncio.wait_for(reader.read(), 10)  # HTTP/1.0: the server closes when done
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert b"transfer-encoding" not in head.lower()  # an HTTP/1.0 client knows no chunks
    assert f"x-served-by: {stack.pods[0].hostport}".encode() in head.lower(), head
    if stream:
        assert payload.count(b"data: ") > 1 and payload.endswith(b"data: [DONE]\n\n"), payload
    else:
        assert json.loads(payload)["served_by"] == stack.pods[0].hostport
    await settle(stack.director)


async def test_http_1_0_without_a_host_header(stack: Stack) -> None:
    """HTTP/1.0 needs no Host header; without default_host_for_http_10 Envoy answered 400 (missing_host_header)."""
    body = json.dumps(completion(prompt="no host")).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.fds_port)
    writer.write(
        b"POST /v1/completions HTTP/1.0\r\ncontent-type: application/json\r\n"
        + f"x-test-route: {stack.pods[-1].hostport}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert json.loads(payload)["served_by"] == stack.pods[-1].hostport
    await settle(stack.director)


async def test_a_websocket_is_routed_to_the_picked_pod(stack: Stack) -> None:
    """vLLM's Realtime API (/v1/realtime): without upgrade_configs Envoy refused the handshake itself (403,
    upgrade_failed) before the EPP saw it. Now it is routed on its headers, then relayed both ways."""
    pod = stack.pods[-1]
    url = stack.url(stack.fds_port, "/v1/realtime").replace("http://", "ws://")
    async with stack.session.ws_connect(url, headers={"x-test-route": pod.hostport}) as ws:
        await ws.send_str("hello")
        assert await asyncio.wait_for(ws.receive_str(), 10) == f"{pod.hostport}:hello"
    await settle(stack.director)


async def test_model_rewrite_through_envoy(stack: Stack) -> None:
    for stream in (False, True):
        async with stack.session.post(
            stack.url(stack.fds_port),
            json=completion(model="client-name", stream=stream),
            headers={"x-llm-d-model-name-rewrite": "served-name"},
        ) as r:
            assert r.status == 200
            assert r.headers["x-received-model"] == "served-name"
            text = await r.text()
        assert "served-name" not in text and '"model":"client-name"' in text.replace(" ", "")
    await settle(stack.director)


async def test_control_headers_are_not_forwarded(stack: Stack) -> None:
    async with stack.session.post(
        stack.url(stack.fds_port),
        json=completion(),
        headers={"x-llm-d-inference-objective": "gold", "x-llm-d-inference-fairness-id": "tenant-a"},
    ) as r:
        assert r.status == 200
        assert r.headers["x-received-objective"] == "-"
        assert r.headers["x-received-fairness"] == "-"
    assert stack.director.requests[-1].objective == "gold"
    assert stack.director.requests[-1].fairness_id == "tenant-a"
    await settle(stack.director)


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b'{"model": ', b'{"model": "m", "prompt": "caf\xe9"}'])  # cut; latin-1
async def test_invalid_json_is_400(stack: Stack, body: bytes) -> None:
    async with stack.session.post(
        stack.url(stack.fds_port), data=body, headers={"content-type": "application/json"}
    ) as r:
        assert r.status == 400
        assert r.headers["content-type"] == "application/json"
        doc = await r.json()
        assert doc["error"]["type"] == "BadRequest" and "invalid JSON" in doc["error"]["message"]


async def test_a_gzip_request_body_reaches_the_epp_compressed_and_is_a_precise_400(stack: Stack) -> None:
    body = gzip.compress(json.dumps(completion()).encode())
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    async with stack.session.post(stack.url(stack.fds_port), data=body, headers=headers) as r:
        assert r.status == 400
        doc = await r.json()
        assert doc["error"]["message"] == (
            "request body has content-encoding 'gzip': the router reads JSON bodies uncompressed"
        )


async def test_too_large_is_413(stack: Stack) -> None:
    body = b'{"model": "m", "prompt": "' + b"x" * (MAX_BODY + 10) + b'"}'
    async with stack.session.post(
        stack.url(stack.fds_port), data=body, headers={"content-type": "application/json"}
    ) as r:
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "PayloadTooLarge"


@pytest.mark.parametrize(("status", "reason"), [(503, "rejected-no-endpoints"), (429, "rejected-saturated")])
async def test_rejections_carry_the_reason(stack: Stack, status: int, reason: str) -> None:
    async with stack.session.post(
        stack.url(stack.fds_port), json=completion(), headers={"x-test-error": f"{status}:{reason}"}
    ) as r:
        assert r.status == status
        assert r.headers["x-llm-d-request-dropped-reason"] == reason
        assert (await r.json())["error"]["code"] == status


async def test_director_crash_is_500(stack: Stack) -> None:
    async with stack.session.post(stack.url(stack.fds_port), json=completion(), headers={"x-test-crash": "1"}) as r:
        assert r.status == 500
        assert (await r.json())["error"]["type"] == "Internal"


async def test_unreachable_pod_is_envoy_503_and_released(stack: Stack) -> None:
    n = len(stack.director.completions)
    async with stack.session.post(
        stack.url(stack.fds_port), json=completion(), headers={"x-test-route": "127.0.0.9:1"}
    ) as r:
        assert r.status == 503
    await settle(stack.director)
    c = stack.director.completions[n]
    assert c.response.status == 503


async def test_client_disconnect_mid_stream_releases(stack: Stack) -> None:
    slow = ModelServer("127.0.0.4", free_port("127.0.0.4"), events=50, gap=0.05)
    await slow.start()
    try:
        n = len(stack.director.completions)
        async with aiohttp.ClientSession() as s:
            resp = await s.post(
                stack.url(stack.fds_port),
                json=completion(stream=True),
                headers={"x-test-route": slow.hostport},
            )
            await resp.content.readany()
            resp.close()  # drop the connection mid-stream
        await settle(stack.director, within=5)
        c = stack.director.completions[n]
        assert c.response.cause is TerminationCause.CLIENT_DISCONNECT
    finally:
        await slow.stop()


# -- BUFFERED mode ----------------------------------------------------------------------------------
async def test_buffered_mode_small_bodies(stack: Stack) -> None:
    pod = stack.pods[0]
    async with stack.session.post(
        stack.url(stack.buffered_port), json=completion(), headers={"x-test-route": pod.hostport}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-served-by"] == pod.hostport
        assert (await r.json())["usage"] == USAGE
    async with stack.session.post(stack.url(stack.buffered_port), json=completion(stream=True)) as r:
        assert r.status == 200
        assert (await r.read()).endswith(b"data: [DONE]\n\n")
    async with stack.session.post(
        stack.url(stack.buffered_port),
        json=completion(model="client-name"),
        headers={"x-llm-d-model-name-rewrite": "served-name"},
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-received-model"] == "served-name"
        assert (await r.json())["model"] == "client-name"
    await settle(stack.director)


# -- EPP restart ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "h2"])
async def test_epp_restart_fails_closed_then_recovers(transport: str) -> None:
    pod = ModelServer("127.0.0.2", free_port("127.0.0.2"))
    await pod.start()
    director = FakeDirector([pod.hostport])
    settings = Settings()
    epp_port = free_port()

    async def restart() -> Any:
        server, _ = await start_epp(
            ExtProcServicer(director, EppMetrics(), settings), settings, transport, f"127.0.0.1:{epp_port}"
        )
        return server

    server = await restart()
    port, admin = free_port(), free_port()
    try:
        config = render_envoy_config(port, epp_port, admin, listen_address="127.0.0.1", epp_tls=False)
        async with EnvoyProcess(config, admin) as env, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{port}/v1/completions"
            async with s.post(url, json=completion()) as r:
                assert r.status == 200
            await server.stop(None)
            async with s.post(url, json=completion()) as r:
                assert r.status == 500  # failure_mode_allow: false
            server = await restart()
            deadline = time.monotonic() + 15
            status = 0
            while time.monotonic() < deadline:
                async with s.post(url, json=completion()) as r:
                    status = r.status
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200, env.log[-3000:]
    finally:
        await server.stop(None)
        await pod.stop()


async def test_failure_mode_allow_cannot_fail_open_in_full_duplex() -> None:
    """What the docs say about an InferencePool's FailOpen: Envoy 1.40 ignores `failure_mode_allow: true`
    in FULL_DUPLEX_STREAMED (an unreachable EPP is still a 500), and where it does fail open (BUFFERED) the
    ORIGINAL_DST cluster has no pick to go by: 503, or the pod the CLIENT named in the header."""
    pod = ModelServer("127.0.0.2", free_port("127.0.0.2"))
    await pod.start()
    try:
        cases: list[tuple[BodyMode, int, int]] = [("FULL_DUPLEX_STREAMED", 500, 500), ("BUFFERED", 503, 200)]
        for mode, without_header, with_header in cases:
            port, admin = free_port(), free_port()
            config = render_envoy_config(
                port, free_port(), admin, body_mode=mode, listen_address="127.0.0.1", epp_tls=False
            ).replace("failure_mode_allow: false", "failure_mode_allow: true")
            assert "failure_mode_allow: true" in config
            async with EnvoyProcess(config, admin), aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{port}/v1/completions"
                async with s.post(url, json=completion()) as r:
                    assert r.status == without_header, mode
                steer = {"x-gateway-destination-endpoint": pod.hostport}
                async with s.post(url, json=completion(), headers=steer) as r:
                    assert r.status == with_header, mode
    finally:
        await pod.stop()
