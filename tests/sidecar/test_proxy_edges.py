"""The P/D sidecar on hostile or broken input, against real local upstreams: header values that
must name exactly one host:port, redirects, compressed or deeply nested bodies, oversized or
compressed prefill answers, a decoder dying mid-stream, Connection-listed headers, retry backoff
and the listen / decoder port ranges. Bad input is a precise JSON error, never a 500 page, a hang
or a request sent somewhere the header did not name."""

from __future__ import annotations

import asyncio
import gzip
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import on_a_punctual_loop
from multidict import CIMultiDict

from llmepp.sidecar import proxy
from llmepp.sidecar.cli import options_from_args
from llmepp.sidecar.proxy import Sidecar, SidecarOptions, parse_hostport

from .test_proxy import KV, Fake, decode_stream, http, prefill_ok, started, stopped

__all__ = ["http"]  # the fixture, re-exported for pytest

BODY = {"model": "m", "prompt": "a", "max_tokens": 3}


async def test_the_prefiller_header_names_exactly_one_host_and_port(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started(prefill_max_retries=2, prefill_retry_backoff=0.01)
    elsewhere = await Fake(prefill_ok).start()  # what a smuggled path / port must never reach
    try:
        port = p.port
        bad = [
            f"127.0.0.1/x:{port}",  # was: a POST to 127.0.0.1:80/x:<port>/v1/completions
            f"127.0.0.1?:{port}",
            f"127.0.0.1#:{port}",
            f"u@127.0.0.1:{port}",
            f"127.0.0.1:{elsewhere.port}@127.0.0.1:{port}",
            f"127.0.0.1 :{port}",  # was: retried, then a 502 "unreachable"
            f"a b:{port}",
            f"127.0.0.1:{port},127.0.0.2:{port}",  # several values
            f"http://127.0.0.1:{port}",
            f"[127.0.0.1:{port}",
            f"[nope]:{port}",
            f"[fe80::1%eth0]:{port}",
            f"-x:{port}",
        ]
        for value in bad:
            async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                                 headers={"x-prefiller-host-port": value}) as resp:  # fmt: skip
                assert resp.status == 400, value
                assert resp.content_type == "application/json"
                assert "x-prefiller-host-port" in (await resp.json())["error"]["message"], value
        assert p.seen == [] and elsewhere.seen == [] and d.seen == []
    finally:
        await stopped(sidecar, p, d, elsewhere)


async def test_an_ipv6_prefill_pod_with_or_without_brackets(http: aiohttp.ClientSession) -> None:
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"kv_transfer_params": KV})

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "::1", 0).start()
    port = int(runner.addresses[0][1])
    p, d, sidecar = await started(allowed_prefill_networks=["::1/128"], prefill_max_retries=0)
    try:
        # Bracketed (net.JoinHostPort) and bare (the last colon separates the port) spellings.
        for value in (f"[::1]:{port}", f"::1:{port}", f"[0:0::1]:{port}"):
            async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                                 headers={"x-prefiller-host-port": value}) as resp:  # fmt: skip
                assert resp.status == 200, (value, await resp.text())
        assert len(seen) == 3 and [s.json["kv_transfer_params"] for s in d.seen] == [KV] * 3
    finally:
        await stopped(sidecar, p, d)
        await runner.cleanup()


async def test_a_long_request_header_is_forwarded(http: aiohttp.ClientSession) -> None:
    """Envoy passes headers up to 60 KiB; the sidecar refused any line over aiohttp's 8,190 bytes (plain-text
    400), so a request Envoy passes failed in a P/D pool only."""
    p, d, sidecar = await started()
    try:
        for size in (9_000, 50_000):
            headers = {"x-long": "a" * size, "x-prefiller-host-port": p.hostport}
            async with http.post(f"{sidecar.url}/v1/completions", json=BODY, headers=headers) as resp:
                assert resp.status == 200, (size, await resp.text())
                await resp.read()
        assert [len(s.headers["x-long"]) for s in d.seen] == [9_000, 50_000]
    finally:
        await stopped(sidecar, p, d)


def test_parse_hostport() -> None:
    assert parse_hostport("10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert parse_hostport("[fd00::1]:8000") == ("fd00::1", 8000)
    assert parse_hostport("fd00::1:8000") == ("fd00::1", 8000)
    assert parse_hostport("prefill-0.prefill.ns.svc:8000") == ("prefill-0.prefill.ns.svc", 8000)
    for bad in ("10.0.0.1/x:80", "a b:80", "u@h:80", "h,h:80", "[h]:80", "[fe80::1%eth0]:80", "::1", "h:+80", "h:0"):
        with pytest.raises(ValueError, match="x-prefiller-host-port"):
            parse_hostport(bad)


async def test_a_prefill_redirect_is_not_followed(http: aiohttp.ClientSession) -> None:
    elsewhere = await Fake(prefill_ok).start()  # e.g. an address outside the allowed networks

    async def redirect(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": f"http://{elsewhere.hostport}/leak"})

    p, d, sidecar = await started(prefill=redirect, allowed_prefill_networks=["127.0.0.0/8"])
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 502 and resp.headers["x-pd-failed-stage"] == "prefill"
            assert "answered 307" in (await resp.json())["error"]["message"]
        assert len(p.seen) == 1 and elsewhere.seen == [] and d.seen == []
    finally:
        await stopped(sidecar, p, d, elsewhere)


async def test_a_compressed_request_body_reaches_the_upstreams_decompressed(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started()
    try:
        raw = gzip.compress(b'{"model": "m", "prompt": "a", "max_tokens": 3}')
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        for extra in ({"x-prefiller-host-port": p.hostport}, {}):
            async with http.post(f"{sidecar.url}/v1/completions", data=raw, headers={**headers, **extra}) as resp:
                assert resp.status == 200, await resp.text()
        for seen in (*p.seen, *d.seen):  # aiohttp decompressed it: the header must not claim gzip any more
            assert "content-encoding" not in seen.headers and seen.json["prompt"] == "a"
        assert len(p.seen) == 1 and len(d.seen) == 2
        for extra in ({"x-prefiller-host-port": p.hostport}, {}):
            async with http.post(f"{sidecar.url}/v1/completions", data=b"not gzip", headers={**headers, **extra}) as r:
                assert r.status == 400 and r.content_type == "application/json"
                assert "request body" in (await r.json())["error"]["message"]
        assert len(p.seen) == 1 and len(d.seen) == 2
    finally:
        await stopped(sidecar, p, d)


async def test_deeply_nested_json_is_a_json_error(http: aiohttp.ClientSession) -> None:
    deep = b"[" * 50_000 + b"]" * 50_000

    async def nested(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.Response(body=b'{"kv_transfer_params": ' + deep + b"}", content_type="application/json")

    p, d, sidecar = await started()
    p2 = await Fake(nested).start()
    try:
        async with http.post(f"{sidecar.url}/v1/completions", data=deep,
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
        async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                             headers={"x-prefiller-host-port": p2.hostport}) as resp:  # fmt: skip
            assert resp.status == 502 and resp.headers["x-pd-failed-stage"] == "prefill"
            assert "invalid JSON" in (await resp.json())["error"]["message"]
        assert p.seen == [] and d.seen == []
    finally:
        await stopped(sidecar, p, d, p2)


async def test_json_with_a_string_that_is_not_utf8_is_a_json_error(http: aiohttp.ClientSession) -> None:
    # msgspec raises UnicodeDecodeError (not its DecodeError) for such a string: it was aiohttp's plain 500.
    async def garbled(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.Response(body=b'{"kv_transfer_params": "\xff"}', content_type="application/json")

    p, d, sidecar = await started()
    p2 = await Fake(garbled).start()
    try:
        async with http.post(f"{sidecar.url}/v1/completions", data=b'{"prompt": "\xff"}',
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
        async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                             headers={"x-prefiller-host-port": p2.hostport}) as resp:  # fmt: skip
            assert resp.status == 502 and resp.headers["x-pd-failed-stage"] == "prefill"
        assert p.seen == [] and d.seen == []
    finally:
        await stopped(sidecar, p, d, p2)


async def test_an_oversized_prefill_answer_is_refused_not_buffered(http: aiohttp.ClientSession) -> None:
    sent = []

    async def endless(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(1000):
            await resp.write(b" " * 65536)
            sent.append(1)
        await resp.write_eof()
        return resp

    p, d, sidecar = await started(prefill=endless, max_body_bytes=1 << 20)
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 502 and resp.headers["x-pd-failed-stage"] == "prefill"
            assert "more than 1048576 bytes" in (await resp.json())["error"]["message"]
        await asyncio.sleep(0.1)
        assert len(sent) < 1000 and d.seen == []  # the prefill answer was cut off, not read to the end
    finally:
        await stopped(sidecar, p, d)


async def test_a_compressed_prefill_answer_is_decompressed(http: aiohttp.ClientSession) -> None:
    async def gzipped(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        assert "gzip" in request.headers.get("Accept-Encoding", "")  # the client's, forwarded
        blob = gzip.compress(b'{"kv_transfer_params": {"remote_block_ids": [7]}}')
        return web.Response(body=blob, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    p, d, sidecar = await started(prefill=gzipped)
    try:
        headers = {"x-prefiller-host-port": p.hostport, "Accept-Encoding": "gzip"}
        async with http.post(f"{sidecar.url}/v1/completions", json=BODY, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        assert d.seen[0].json["kv_transfer_params"] == {"remote_block_ids": [7]}
    finally:
        await stopped(sidecar, p, d)


async def test_a_decoder_dying_mid_stream_cuts_the_client_stream_cleanly(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async def dying(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 0\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    p, d, sidecar = await started(decode=dying)
    try:
        with caplog.at_level(logging.WARNING):
            with pytest.raises(aiohttp.ClientPayloadError):  # the client is told: a truncated body
                async with http.post(f"{sidecar.url}/v1/completions", json={**BODY, "stream": True},
                                     headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
                    assert resp.status == 200
                    await resp.read()
            await asyncio.sleep(0.1)
        assert "decoder stream broke" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # nothing escaped
        assert sidecar._session is not None and not sidecar._session.connector._acquired  # type: ignore[union-attr]
    finally:
        await stopped(sidecar, p, d)


async def test_connection_listed_headers_are_hop_by_hop(http: aiohttp.ClientSession) -> None:
    async def decode(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.json_response({}, headers={"Connection": "x-down-hop", "x-down-hop": "1", "x-down": "1"})

    p, d, sidecar = await started(decode=decode)
    try:
        headers = {"Connection": "keep-alive, X-Up-Hop", "x-up-hop": "1", "x-up": "1"}
        for extra in ({"x-prefiller-host-port": p.hostport}, {}):
            async with http.post(f"{sidecar.url}/v1/completions", json=BODY, headers={**headers, **extra}) as resp:
                assert resp.status == 200
                assert "x-down-hop" not in resp.headers and resp.headers["x-down"] == "1"
        for seen in (*p.seen, *d.seen):
            assert "x-up-hop" not in seen.headers and seen.headers["x-up"] == "1"
        assert len(p.seen) == 1 and len(d.seen) == 2
    finally:
        await stopped(sidecar, p, d)


async def test_retry_backoff_is_capped(http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []

    async def no_sleep(delay: float) -> None:
        delays.append(delay)

    async def busy(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.json_response({"error": "busy"}, status=503)

    monkeypatch.setattr(proxy.asyncio, "sleep", no_sleep)
    # 1030 retries: 0.2 s * 2**1024 was an OverflowError (a 500), long after waits of centuries.
    p, d, sidecar = await started(prefill=busy, prefill_max_retries=1030, prefill_retry_backoff=0.2)
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 503 and resp.headers["x-pd-failed-stage"] == "prefill"
        assert len(p.seen) == 1031 and len(delays) == 1030
        assert delays[:3] == [0.2, 0.4, 0.8] and max(delays) == proxy.MAX_RETRY_BACKOFF
    finally:
        await stopped(sidecar, p, d)
    # A base above the cap is honoured as given, never shortened.
    assert proxy.retry_delay(60.0, 5) == 60.0


def test_ports_out_of_range_are_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    for bad, reason in (
        (["--port", "70000"], "port 70000 is out of range"),  # was: listening on 70000 % 65536
        (["--port", "-5"], "port -5 is out of range"),  # was: a traceback
        (["--vllm-port", "0"], "decoder port 0 is out of range"),  # was: silently 8200
        (["--vllm-port", "70000"], "decoder-url 'http://127.0.0.1:70000': Port out of range"),  # was: all 502s
        (["--decoder-url", "http://127.0.0.1:99999"], "decoder-url 'http://127.0.0.1:99999': Port out of range"),
    ):
        with pytest.raises(SystemExit):
            options_from_args(bad)
        assert reason in capsys.readouterr().err, bad
    assert SidecarOptions(port=0).port == 0  # any free port (tests)
    assert options_from_args(["--port", "65535", "--vllm-port", "1"])[0].decoder_url == "http://127.0.0.1:1"


def test_decoder_tls_without_an_explicit_vllm_port() -> None:
    # was: the default decoder (port 8200) stayed plain http under --enable-tls decoder
    assert options_from_args(["--enable-tls", "decoder"])[0].decoder_url == "https://127.0.0.1:8200"
    assert options_from_args([])[0].decoder_url == "http://127.0.0.1:8200"


async def test_a_prefiller_that_never_answers_is_one_timeout_not_one_per_retry(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        connections: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)  # accepts the connection and the request, never answers
            await reader.read()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        hung = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        p, d, sidecar = await started(prefill_timeout=0.3, prefill_max_retries=2, prefill_retry_backoff=0.01)
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            async with http.post(f"{sidecar.url}/v1/completions", json=BODY,
                                 headers={"x-prefiller-host-port": hung}) as resp:  # fmt: skip
                assert resp.status == 504 and resp.headers["x-pd-failed-stage"] == "prefill"
                assert "timed out" in (await resp.json())["error"]["message"]
            # was: the whole timeout again per retry (3 x --prefill-timeout, 15 minutes with the defaults),
            # each retry queueing the same prefill once more on a pod that is stuck or overloaded
            assert loop.time() - start < 0.55
            assert len(connections) == 1 and d.seen == []
        finally:
            await stopped(sidecar, p, d)
            server.close()
            await server.wait_closed()

    await on_a_punctual_loop(measure)


async def test_several_prefiller_header_lines_are_refused_not_first_wins(http: aiohttp.ClientSession) -> None:
    # Two lines mean "a, b" (RFC 9110 5.3), refused above as one value. Was: the first line was used,
    # so a client's value sent ahead of the one a gateway appended chose the prefill pod.
    p, d, sidecar = await started()
    elsewhere = await Fake(prefill_ok).start()
    try:
        for values in ((elsewhere.hostport, p.hostport), (elsewhere.hostport, ""), ("", elsewhere.hostport)):
            headers = CIMultiDict(("x-prefiller-host-port", v) for v in values)
            async with http.post(f"{sidecar.url}/v1/completions", json=BODY, headers=headers) as resp:
                assert resp.status == 400, values
                assert "x-prefiller-host-port" in (await resp.json())["error"]["message"]
        assert p.seen == [] and elsewhere.seen == [] and d.seen == []
        headers = CIMultiDict([("x-prefiller-host-port", p.hostport), ("x-prefiller-host-port", p.hostport)])
        async with http.post(f"{sidecar.url}/v1/completions", json=BODY, headers=headers) as resp:
            assert resp.status == 200  # the same value twice is still one prefill pod
        assert len(p.seen) == 1 and len(d.seen) == 1
    finally:
        await stopped(sidecar, p, d, elsewhere)


def test_a_zero_max_body_size_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    # was: accepted; aiohttp reads 0 as "no limit" (request bodies of any size were buffered whole)
    # while every prefill answer was "more than 0 bytes", so every P/D request was a 502
    with pytest.raises(SystemExit):
        options_from_args(["--max-body-size", "0"])
    assert "max-body-size must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max-body-size"):
        SidecarOptions(max_body_bytes=-1)
    assert options_from_args(["--max-body-size", "1KiB"])[0].max_body_bytes == 1024


async def test_an_idle_decoder_connection_is_dropped_before_uvicorn_would_close_it(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM's uvicorn closes a keep-alive connection idle for 5 s; one the sidecar reuses as it closes fails the
    # decode. The pool must expire idle connections first (its keep-alive scaled down here: 0.1 s).
    from llmepp import httpclient

    monkeypatch.setattr(httpclient, "KEEPALIVE_SECONDS", 0.1)
    peers: list[Any] = []

    async def decode(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"choices": [{"text": "y"}]})

    p, d, sidecar = await started(decode=decode)
    try:
        for pause in (0.0, 0.0, 0.4):
            await asyncio.sleep(pause)
            async with http.post(f"{sidecar.url}/v1/completions", json={"model": "m", "prompt": "x"}) as resp:
                assert resp.status == 200
        assert peers[0] == peers[1]  # reused while fresh
        assert peers[2] != peers[1]  # a new connection after the idle pause
    finally:
        await stopped(sidecar, p, d)


async def test_a_non_streamed_answer_longer_than_the_idle_timeout_is_not_cut(http: aiohttp.ClientSession) -> None:
    # A non-streamed generation is silent until it ends (a long reasoning answer runs for many minutes): the
    # decode idle timeout bounds the silences of a streamed answer, not the wait for the answer.
    async def slow(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.json_response({"choices": [{"text": "done"}]})

    p, d, sidecar = await started(decode=slow, decode_idle_timeout=0.2)
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json={"model": "m", "prompt": "x"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["text"] == "done"
    finally:
        await stopped(sidecar, p, d)


async def test_a_streamed_answer_silent_past_the_idle_timeout_is_cut(http: aiohttp.ClientSession) -> None:
    async def stalls(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {}\n\n")
        await asyncio.sleep(1.2)  # a hung decoder
        return response

    p, d, sidecar = await started(decode=stalls, decode_idle_timeout=0.2)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with http.post(f"{sidecar.url}/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # cut, not ended as if complete
                await r.read()
        assert loop.time() - t0 < 1
    finally:
        await stopped(sidecar, p, d)


async def test_by_default_the_sidecar_answers_on_ipv6_and_ipv4(http: aiohttp.ClientSession) -> None:
    """The reference listens on `:port`, every address; this one bound 0.0.0.0, refusing Envoy / the EPP on an
    IPv6 pod address (every data-parallel rank port too)."""
    d = await Fake(decode_stream).start()
    sidecar = Sidecar(SidecarOptions(port=0, decoder_url=f"http://{d.hostport}"))
    await sidecar.start()
    try:
        for host in ("127.0.0.1", "[::1]"):
            async with http.post(f"http://{host}:{sidecar.port}/v1/completions", json=BODY) as resp:
                assert resp.status == 200, host
                await resp.read()
    finally:
        await stopped(sidecar, d)


async def test_a_websocket_to_the_model_server_is_relayed(http: aiohttp.ClientSession) -> None:
    """vLLM's Realtime API is a WebSocket (/v1/realtime) on the port the sidecar owns: the upgrade was dropped
    as a hop-by-hop header, so no client reached it. Relayed now, text and binary, subprotocol and auth
    included; the decoder closing ends the client's socket."""
    seen: dict[str, str] = {}

    async def decode(request: web.Request, body: Any) -> web.StreamResponse:
        if request.path != "/v1/realtime":
            return web.json_response({"error": "no"}, status=404)
        seen["auth"] = request.headers.get("Authorization", "")
        ws = web.WebSocketResponse(protocols=("realtime",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT and message.data == "bye":
                break
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{message.data}")
            else:
                await ws.send_bytes(message.data[::-1])
        await ws.close()
        return ws

    p, d, sidecar = await started(decode=decode)
    try:
        headers = {"Authorization": "Bearer t"}
        async with http.ws_connect(f"{sidecar.url}/v1/realtime", protocols=("realtime",), headers=headers) as ws:
            assert ws.protocol == "realtime" and seen["auth"] == "Bearer t"
            await ws.send_str("hi")
            assert await ws.receive_str() == "echo:hi"
            await ws.send_bytes(b"\x01\x02")
            assert await ws.receive_bytes() == b"\x02\x01"
            await ws.send_str("bye")  # the decoder closes: so does the client's socket
            assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{sidecar.url}/v1/elsewhere")
        assert refused.value.status == 404
    finally:
        await stopped(sidecar, p, d)


async def test_the_decoders_close_code_and_reason_reach_the_client(http: aiohttp.ClientSession) -> None:
    """The model server ends a session with 1011 (internal error) and a reason: the client gets that code and
    reason, not 1000 "normal closure" (a failed session is no finished one). The reference's reverse proxy
    copies the upgraded bytes, Close frames included."""

    async def decode(request: web.Request, body: Any) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT and message.data == "fail":
                await ws.send_str("last words")
                await ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR, message=b"engine dead")
        return ws

    p, d, sidecar = await started(decode=decode)
    try:
        async with http.ws_connect(f"{sidecar.url}/v1/realtime") as ws:
            await ws.send_str("fail")
            assert (await ws.receive(timeout=5)).data == "last words"
            closing = await ws.receive(timeout=5)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert (closing.data, closing.extra) == (aiohttp.WSCloseCode.INTERNAL_ERROR, "engine dead")
    finally:
        await stopped(sidecar, p, d)


async def test_the_clients_close_code_reaches_the_decoder(http: aiohttp.ClientSession) -> None:
    """The client ends the session with an application close code (4000-4999): the model server sees 1000."""
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    async def decode(request: web.Request, body: Any) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        seen["code"] = ws.close_code
        done.set()
        return ws

    p, d, sidecar = await started(decode=decode)
    try:
        async with http.ws_connect(f"{sidecar.url}/v1/realtime") as ws:
            await ws.send_str("hello")
            await ws.close(code=4001, message=b"user hung up")
        await asyncio.wait_for(done.wait(), 5)
        assert seen["code"] == 4001
    finally:
        await stopped(sidecar, p, d)


async def test_a_decoder_dying_mid_session_is_not_a_normal_closure(http: aiohttp.ClientSession) -> None:
    """The model server's connection drops without a Close frame (crash, OOM kill): the client gets a clean
    1000 "normal closure" instead of an error code, as if the session had ended on purpose."""

    async def decode(request: web.Request, body: Any) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()  # the engine process dies
        return ws

    p, d, sidecar = await started(decode=decode)
    try:
        async with http.ws_connect(f"{sidecar.url}/v1/realtime") as ws:
            await ws.send_str("hello")
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code != aiohttp.WSCloseCode.OK, "an abnormal end is reported as a normal closure"
    finally:
        await stopped(sidecar, p, d)
