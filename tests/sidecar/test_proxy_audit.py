"""The P/D sidecar as a hostile client and a picky operator see it: /metrics behind a model server
that redirects it (Starlette's slash redirect), redirects naming the decoder's private address, a
client reading slowly past the decode idle timeout, request paths the proxy must not rewrite."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import aiohttp
from aiohttp import web

from .test_proxy import Fake, http, started, stopped

__all__ = ["http"]  # the fixture, re-exported for pytest

METRICS = b'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 0.0\n'


async def slash_redirecting(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
    """A model server whose metrics app is mounted at /metrics/ (Starlette `Mount`): /metrics is a 307
    to an absolute URL built from the Host header it got (the decoder's own address)."""
    if request.path == "/metrics":
        return web.Response(status=307, headers={"Location": f"http://{request.host}/metrics/"})
    if request.path == "/metrics/":
        return web.Response(body=METRICS, content_type="text/plain")
    if request.path == "/relative":
        return web.Response(status=308, headers={"Location": "/metrics/"})
    if request.path == "/v1/completions/":  # FastAPI's redirect_slashes, for a POST too
        return web.Response(status=307, headers={"Location": f"http://{request.host}/v1/completions?x=1"})
    if request.path == "/loop":
        return web.Response(status=302, headers={"Location": f"http://{request.host}/loop"})
    return web.json_response({"path": request.path_qs})


async def test_metrics_behind_a_decoder_slash_redirect_are_served(http: aiohttp.ClientSession) -> None:
    # The EPP's scraper follows no redirect (a 307 is a failed scrape), and a scraper that does would have
    # followed it to the decoder's private address (127.0.0.1:8200 in a pod), not through the sidecar.
    p, d, sidecar = await started(decode=slash_redirecting)
    try:
        for method, path in (("GET", "/metrics"), ("GET", "/relative"), ("HEAD", "/metrics")):
            async with http.request(method, f"{sidecar.url}{path}", allow_redirects=False) as resp:
                assert resp.status == 200, (method, path, resp.headers.get("Location"))
                assert await resp.read() == (METRICS if method == "GET" else b"")
                assert resp.headers["Content-Length"] == str(len(METRICS))
        paths = [s.path for s in d.seen]
        assert paths == ["/metrics", "/metrics/", "/relative", "/metrics/", "/metrics", "/metrics/"]
    finally:
        await stopped(sidecar, p, d)


async def test_a_redirect_naming_the_decoder_points_back_at_the_sidecar(http: aiohttp.ClientSession) -> None:
    elsewhere = await Fake(slash_redirecting).start()

    async def decode(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        if request.path == "/away":  # another origin: not the sidecar's to follow nor to rewrite
            return web.Response(status=302, headers={"Location": f"http://{elsewhere.hostport}/x"})
        return await slash_redirecting(request, body)

    p, d, sidecar = await started(decode=decode)
    try:
        # A POST is never replayed by the sidecar: the client is told where to go - through the sidecar.
        async with http.post(f"{sidecar.url}/v1/completions/", json={"prompt": "a"}, allow_redirects=False) as resp:
            assert resp.status == 307 and resp.headers["Location"] == "/v1/completions?x=1"
        async with http.get(f"{sidecar.url}/away", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == f"http://{elsewhere.hostport}/x"
        async with http.get(f"{sidecar.url}/loop", allow_redirects=False) as resp:  # bounded, then passed on
            assert resp.status == 302 and resp.headers["Location"] == "/loop"
        assert elsewhere.seen == [] and len(d.seen) < 20
    finally:
        await stopped(sidecar, p, d, elsewhere)


async def test_a_slow_reading_client_is_not_cut_by_the_decode_idle_timeout(http: aiohttp.ClientSession) -> None:
    # The idle timeout bounds the decoder's silences. A client that stops reading for a while blocks the
    # relay's writes (and so its reads): that is no decoder silence, and no byte may be lost for it.
    blob = os.urandom(16 << 20)

    async def fast(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(blob), 1 << 16):
            await resp.write(blob[i : i + (1 << 16)])
        await resp.write_eof()
        return resp

    p, d, sidecar = await started(decode=fast, decode_idle_timeout=0.3)
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json={"prompt": "a", "stream": True}) as resp:
            assert resp.status == 200
            first = await resp.content.readexactly(1 << 16)
            await asyncio.sleep(1.0)  # the client reads nothing meanwhile
            rest = await resp.read()
        assert first + rest == blob
    finally:
        await stopped(sidecar, p, d)


async def test_the_request_target_reaches_the_decoder_unchanged(http: aiohttp.ClientSession) -> None:
    # A base URL with a trailing slash gives `//v1/models`; was: the decoder got `////v1/models`.
    async def echo(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.Response(text=request.raw_path)  # as sent (aiohttp's path_qs has the same `//` quirk)

    p, d, sidecar = await started(decode=echo)
    try:
        for target in ("//v1/models", "//v1/models?a=%2F&b=c+d", "/v1//models", "/a%2Fb?q=%20", "///x"):
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(f"GET {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 "), (target, answer[:100])
            assert answer.endswith(b"\r\n\r\n" + target.encode()), (target, answer[-60:])
    finally:
        await stopped(sidecar, p, d)


async def test_no_header_the_client_did_not_send_reaches_the_decoder(http: aiohttp.ClientSession) -> None:
    # Was: aiohttp's client defaults were added - `Content-Type: application/octet-stream` on a body sent
    # without one (FastAPI then refuses a JSON body it reads as JSON when no type is given: `requests.post(
    # url, data=...)` worked against vLLM, not through the sidecar), and `Accept-Encoding: gzip, deflate`,
    # inviting a compressed answer relayed as is to a client that never said it could decode it.
    async def echo(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.json_response(sorted(k.lower() for k in request.headers))

    p, d, sidecar = await started(decode=echo)
    try:
        for method, path, extra in (("POST", "/v1/completions", "Content-Length: 2\r\n\r\n{}"), ("GET", "/m", "\r\n")):
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{extra}".encode())
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
            received = set(json.loads(answer.partition(b"\r\n\r\n")[2]))
            assert not received & {"content-type", "accept-encoding", "accept", "user-agent"}, (method, received)
        # What the client did send is forwarded.
        headers = {"Content-Type": "application/json", "Accept-Encoding": "br", "User-Agent": "u", "Accept": "a/b"}
        async with http.post(f"{sidecar.url}/v1/completions", data=b"{}", headers=headers) as resp:
            assert {"content-type", "accept-encoding", "accept", "user-agent"} <= set(await resp.json())
        assert d.seen[-1].headers["accept-encoding"] == "br" and d.seen[-1].headers["user-agent"] == "u"
    finally:
        await stopped(sidecar, p, d)
