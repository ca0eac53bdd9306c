"""The P/D sidecar against recording fake upstreams (in process): the exact prefill and decode
requests, retries, error passing, streaming pass-through, chunked uploads, the SSRF guard."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import write_cert_pair

from llmepp.httpclient import MAX_HEADER_LINE_BYTES
from llmepp.server.tls import CERT_FILE, KEY_FILE
from llmepp.sidecar.cli import duration, options_from_args
from llmepp.sidecar.proxy import Sidecar, SidecarOptions, prefill_request

Handler = Callable[[web.Request, dict[str, Any] | None], Awaitable[web.StreamResponse]]
KV = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "p", "remote_block_ids": [1, 2],
      "remote_host": "127.0.0.1", "remote_port": 1}  # fmt: skip


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Fake:
    """A model server that records every request and answers with `handler`."""

    handler: Handler
    seen: list[Seen] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0
    ssl_context: ssl.SSLContext | None = None  # https

    async def start(self) -> Fake:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.seen.append(
                Seen(request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()}, body)
            )
            parsed = json.loads(body) if body else None
            return await self.handler(request, parsed)

        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(
            app, access_log=None, max_line_size=MAX_HEADER_LINE_BYTES, max_field_size=MAX_HEADER_LINE_BYTES
        )  # the sidecar forwards long headers
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def prefill_ok(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
    return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": KV},
                             headers={"x-inference-pod": "prefill-0"})  # fmt: skip


async def decode_stream(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
    """SSE when asked to stream (three events, 20 ms apart), JSON otherwise."""
    headers = {"x-inference-pod": "decode-0", "x-extra": "kept"}
    if body is None or not body.get("stream"):
        return web.json_response({"choices": [{"text": "full"}], "echo": body}, headers=headers)
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(3):
        await resp.write(f'data: {{"i": {i}}}\n\n'.encode())
        await asyncio.sleep(0.02)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def started(
    prefill: Handler = prefill_ok, decode: Handler = decode_stream, **opts: Any
) -> tuple[Fake, Fake, Sidecar]:
    p = await Fake(prefill).start()
    d = await Fake(decode).start()
    sidecar = Sidecar(SidecarOptions(host="127.0.0.1", port=0, decoder_url=f"http://{d.hostport}", **opts))
    await sidecar.start()
    return p, d, sidecar


async def stopped(*parts: Fake | Sidecar) -> None:
    for part in parts:
        await part.stop()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50, "min_tokens": 5,
        "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


def test_prefill_request_shape() -> None:
    body = prefill_request(CHAT, chat=True)
    assert body["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False,
                                          "remote_engine_id": None, "remote_block_ids": None,
                                          "remote_host": None, "remote_port": None}  # fmt: skip
    assert body["stream"] is False and "stream_options" not in body and "min_tokens" not in body
    assert body["max_tokens"] == 1 and body["max_completion_tokens"] == 1
    assert CHAT["max_tokens"] == 50 and CHAT["stream"] is True  # the original is untouched
    completion = prefill_request({"model": "m", "prompt": "p"}, chat=False)
    assert completion["max_tokens"] == 1 and "max_completion_tokens" not in completion
    assert prefill_request({"prompt": "p", "max_completion_tokens": 9}, chat=False)["max_completion_tokens"] == 1


async def test_disaggregated_chat_streams_the_decoders_answer(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started()
    try:
        headers = {"x-prefiller-host-port": p.hostport, "x-request-id": "rid-1", "authorization": "Bearer t"}
        async with http.post(f"{sidecar.url}/v1/chat/completions?x=1", json=CHAT, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["x-inference-pod"] == "decode-0" and resp.headers["x-extra"] == "kept"
            assert resp.headers["content-type"].startswith("text/event-stream")
            loop = asyncio.get_running_loop()
            arrivals = [(loop.time(), chunk) async for chunk in resp.content.iter_any()]
        text = b"".join(c for _, c in arrivals).decode()
        assert text == "".join(f'data: {{"i": {i}}}\n\n' for i in range(3)) + "data: [DONE]\n\n"
        assert arrivals[-1][0] - arrivals[0][0] > 0.03  # streamed as produced, not buffered to the end
        (pre,) = p.seen
        assert pre.path == "/v1/chat/completions?x=1"
        assert pre.json == prefill_request(CHAT, chat=True)
        assert pre.headers["x-request-id"] == "rid-1" and pre.headers["authorization"] == "Bearer t"
        assert "x-prefiller-host-port" not in pre.headers
        (dec,) = d.seen
        assert dec.json == {**CHAT, "kv_transfer_params": KV}  # the original request + remote KV params
        assert "x-prefiller-host-port" not in dec.headers
    finally:
        await stopped(sidecar, p, d)


async def test_disaggregated_non_streaming_completion(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started()
    try:
        body = {"model": "m", "prompt": "once upon", "max_tokens": 7}
        async with http.post(f"{sidecar.url}/v1/completions", json=body,
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 200
            answer = await resp.json()
        assert answer["echo"] == {**body, "kv_transfer_params": KV}
        assert p.seen[0].json["max_tokens"] == 1 and "max_completion_tokens" not in p.seen[0].json
    finally:
        await stopped(sidecar, p, d)


async def test_chunked_request_body_is_read_whole(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started()
    try:
        payload = json.dumps({"model": "m", "prompt": "z" * 300_000, "max_tokens": 2}).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 7000):
                yield payload[i : i + 7000]

        for headers in ({"x-prefiller-host-port": p.hostport}, {}):
            async with http.post(f"{sidecar.url}/v1/completions", data=chunks(), headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.json())["echo"]["prompt"] == "z" * 300_000
        assert len(p.seen) == 1 and len(d.seen) == 2
        assert d.seen[1].body == payload  # pass-through forwards the bytes unchanged
    finally:
        await stopped(sidecar, p, d)


async def test_no_or_empty_header_passes_straight_through(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started()
    try:
        for headers in ({}, {"x-prefiller-host-port": ""}, {"x-prefiller-host-port": "  "}):
            async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        assert p.seen == [] and [s.json for s in d.seen] == [CHAT] * 3
        async with http.get(f"{sidecar.url}/metrics") as resp:  # the EPP scrapes through the sidecar
            assert resp.status == 200 and d.seen[-1].method == "GET" and d.seen[-1].path == "/metrics"
        # Other paths are never disaggregated, header or not.
        async with http.post(f"{sidecar.url}/tokenize", json={"prompt": "a"},
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 200
        assert p.seen == []
    finally:
        await stopped(sidecar, p, d)


async def test_decoder_status_and_gzip_bytes_pass_unchanged(http: aiohttp.ClientSession) -> None:
    import gzip

    blob = gzip.compress(b'{"error": "nope"}')

    async def decode(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.Response(status=418, body=blob, headers={"Content-Encoding": "gzip", "Content-Type": "x/y"})

    p, d, sidecar = await started(decode=decode)
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json={"prompt": "a"}, auto_decompress=False) as resp:
            assert resp.status == 418 and resp.headers["Content-Encoding"] == "gzip"
            assert int(resp.headers["Content-Length"]) == len(blob) and await resp.read() == blob
    finally:
        await stopped(sidecar, p, d)


async def test_transient_prefill_errors_are_retried(http: aiohttp.ClientSession) -> None:
    failures = [503, 502]

    async def flaky(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        if failures:
            return web.json_response({"error": "busy"}, status=failures.pop(0))
        return await prefill_ok(request, body)

    p, d, sidecar = await started(prefill=flaky, prefill_max_retries=2, prefill_retry_backoff=0.01)
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json={"prompt": "a", "max_tokens": 3},
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 200
        assert len(p.seen) == 3 and d.seen[0].json["kv_transfer_params"] == KV
    finally:
        await stopped(sidecar, p, d)


async def test_prefill_retries_are_bounded_and_the_last_answer_returned(http: aiohttp.ClientSession) -> None:
    async def busy(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    p, d, sidecar = await started(prefill=busy, prefill_max_retries=1, prefill_retry_backoff=0.01)
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json={"prompt": "a"},
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 503 and resp.headers["x-pd-failed-stage"] == "prefill"
            assert (await resp.json()) == {"error": {"message": "overloaded"}}
        assert len(p.seen) == 2 and d.seen == []
    finally:
        await stopped(sidecar, p, d)


async def test_non_transient_prefill_error_is_returned_as_is(http: aiohttp.ClientSession) -> None:
    error = {"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}

    async def reject(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.json_response(error, status=400)

    async def plain_500(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.Response(status=500, text="Internal Server Error")

    for handler, status in ((reject, 400), (plain_500, 500)):
        p, d, sidecar = await started(prefill=handler, prefill_max_retries=3, prefill_retry_backoff=0.01)
        try:
            async with http.post(f"{sidecar.url}/v1/completions", json={"prompt": "a"},
                                 headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
                assert resp.status == status
                body = await resp.json()
            if status == 400:
                assert body == error
            else:  # a non-JSON error is wrapped in a JSON one naming the prefill pod
                assert body["error"]["code"] == 500
                assert f"prefill pod {p.hostport} returned 500: Internal Server Error" in body["error"]["message"]
            assert len(p.seen) == 1 and d.seen == []  # not retried, decode never called
        finally:
            await stopped(sidecar, p, d)


async def test_dead_prefill_pod_is_a_502_json_error(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started(prefill_max_retries=1, prefill_retry_backoff=0.01)
    dead = p.hostport
    await p.stop()  # nothing listens there any more
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json={"prompt": "a"},
                             headers={"x-prefiller-host-port": dead}) as resp:  # fmt: skip
            assert resp.status == 502 and resp.headers["x-pd-failed-stage"] == "prefill"
            message = (await resp.json())["error"]["message"]
        assert f"prefill pod {dead} unreachable" in message and "2 attempt(s)" in message
        assert d.seen == []
    finally:
        await stopped(sidecar, d)


async def test_dead_decoder_is_a_502_json_error(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started()
    await d.stop()
    try:
        async with http.post(f"{sidecar.url}/v1/completions", json={"prompt": "a"}) as resp:
            assert resp.status == 502 and "decoder at" in (await resp.json())["error"]["message"]
    finally:
        await stopped(sidecar, p)


async def test_prefill_without_kv_params_falls_back_to_local_prefill(http: aiohttp.ClientSession) -> None:
    async def bare(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        return web.json_response({"choices": [{"text": "x"}]})

    p, d, sidecar = await started(prefill=bare)
    try:
        body = {"prompt": "a", "kv_transfer_params": {"client": "junk"}}
        async with http.post(f"{sidecar.url}/v1/completions", json=body,
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 200
        assert d.seen[0].json == {"prompt": "a"}  # no stale transfer params reach the decoder
    finally:
        await stopped(sidecar, p, d)


async def test_bad_inputs(http: aiohttp.ClientSession) -> None:
    p, d, sidecar = await started(allowed_prefill_networks=["127.0.0.0/8"], max_body_bytes=1000)
    try:
        url = f"{sidecar.url}/v1/completions"
        cases = [
            ({"x-prefiller-host-port": "no-port"}, b'{"prompt": "a"}', 400, "must be host:port"),
            ({"x-prefiller-host-port": "10.0.0.1:80"}, b'{"prompt": "a"}', 403, "not in the allowed networks"),
            ({"x-prefiller-host-port": "evil.example:80"}, b'{"prompt": "a"}', 403, "not an allowed address"),
            ({"x-prefiller-host-port": p.hostport}, b"{nope", 400, "not valid JSON"),
            ({"x-prefiller-host-port": p.hostport}, b"[1]", 400, "JSON object"),
            ({"x-prefiller-host-port": p.hostport}, b"x" * 2000, 413, "exceeds 1000 bytes"),
            ({}, b"x" * 2000, 413, "exceeds 1000 bytes"),
        ]
        for headers, data, status, message in cases:
            async with http.post(url, data=data, headers={**headers, "content-type": "application/json"}) as resp:
                assert resp.status == status, (headers, data[:20])
                assert message in (await resp.json())["error"]["message"]
        assert p.seen == [] and d.seen == []
    finally:
        await stopped(sidecar, p, d)


def test_cli_options() -> None:
    options, level = options_from_args(
        ["--port", "9000", "--vllm-port", "8201", "--prefill-retry-backoff", "250ms", "--prefill-timeout", "2m",
         "--max-body-size", "8MiB", "--allowed-prefill-networks", "10.0.0.0/8, 192.168.0.0/16", "--log-level", "debug"]
    )  # fmt: skip
    assert options.port == 9000 and options.decoder_url == "http://127.0.0.1:8201"
    assert options.prefill_retry_backoff == 0.25 and options.prefill_timeout == 120.0
    assert options.max_body_bytes == 8 << 20 and len(options.networks) == 2 and level == "debug"
    assert options_from_args(["--decoder-url", "http://10.0.0.5:8200/"])[0].decoder_url == "http://10.0.0.5:8200"
    for bad in (["--prefill-max-retries", "-1"], ["--decoder-url", "ftp://x"], ["--prefill-retry-backoff", "1y"]):
        with pytest.raises(SystemExit):
            options_from_args(bad)


def test_the_reference_sidecar_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # What a reference Deployment passes: accepted, and honoured.
    options, _ = options_from_args(
        ["--port=8000", "--vllm-port=8200", "--kv-connector=nixlv2", "--enable-tls=prefiller,decoder",
         "--tls-insecure-skip-verify", "--enable-ssrf-protection=true", "--allowed-prefill-networks=10.0.0.0/8",
         "--data-parallel-size=1", "--decode-chunk-size=0", "--metrics-port=0"]
    )  # fmt: skip
    assert options.prefill_scheme == "https" and options.decoder_url == "https://127.0.0.1:8200"
    assert not options.tls_verify_prefill and not options.tls_verify_decoder and len(options.networks) == 1
    assert options_from_args([])[0].tls_verify_prefill and options_from_args([])[0].tls_verify_decoder
    # Booleans take Go's flag syntax, like the reference binary; the newer reference names stages.
    verify = lambda argv: ((o := options_from_args(argv)[0]).tls_verify_prefill, o.tls_verify_decoder)  # noqa: E731
    assert verify(["--tls-insecure-skip-verify=t"]) == (False, False)
    assert verify(["--tls-insecure-skip-verify=F"]) == (True, True)
    assert verify(["--tls-insecure-skip-verify=prefiller"]) == (False, True)
    assert verify(["--tls-insecure-skip-verify=prefiller,decoder"]) == (False, False)
    with pytest.raises(SystemExit):
        options_from_args(["--tls-insecure-skip-verify=maybe"])
    assert "invalid 'maybe'" in capsys.readouterr().err
    # What this sidecar does not do is refused with the reason, not ignored.
    for bad, reason in (
        (["--kv-connector", "mooncake"], "only nixlv2"),
        (["--ec-connector", "ec-nixl"], "runs no encoders"),
        (["--enable-tls", "encoder"], "only prefiller and decoder"),
        (["--enable-ssrf-protection"], "--allowed-prefill-networks"),
        (["--decode-chunk-size", "256"], "chunked decode is not implemented"),
        (["--metrics-port", "9090"], "serves no metrics"),
    ):
        with pytest.raises(SystemExit):
            options_from_args(bad)
        assert reason in capsys.readouterr().err


def test_reference_deployment_args_start_this_sidecar(capsys: pytest.CaptureFixture[str]) -> None:
    """Args from real reference Deployments (llm-d guides, KServe): they were unrecognized arguments, a repeated
    --enable-tls dropped the first, and Go durations such as 1m30s were refused."""
    options, level = options_from_args(
        ["--port=8000", "--vllm-port=8200", "--connector=nixlv2", "--secure-proxy=false", "--secure-serving=false",
         "--cert-path=/certs", "--inference-pool=pool", "--pool-group=inference.networking.k8s.io",
         "--max-idle-conns-per-host=100", "--zap-log-level=debug", "--enable-tls=prefiller", "--enable-tls=decoder",
         "--prefill-retry-backoff=1m30s"]
    )  # fmt: skip
    assert (options.prefill_scheme, options.decoder_url) == ("https", "https://127.0.0.1:8200")
    assert options.prefill_retry_backoff == 90.0 and level == "debug"
    assert options_from_args(["--prefiller-use-tls", "--decoder-use-tls=false"])[0].prefill_scheme == "https"
    assert options_from_args(["-v", "4"])[1] == "debug" and options_from_args(["-v", "2"])[1] == "info"
    assert options_from_args(["--zap-log-level=2", "--log-level=error"])[1] == "error"
    with pytest.raises(SystemExit):
        options_from_args(["--secure-proxy"])  # TLS on its own port: refused with the reason, not ignored
    assert "serves plain HTTP" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0.2", 0.2), ("200ms", 0.2), ("5s", 5.0), ("1m30s", 90.0), ("1h30m", 5400.0), ("250us", 0.00025),
     ("1.5h", 5400.0), ("100ns", 1e-7)],
)  # fmt: skip
def test_durations_take_gos_syntax(text: str, seconds: float) -> None:
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "1m30", "-1s", "1 m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


async def test_certificate_checks_are_skipped_per_stage(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """--tls-insecure-skip-verify=prefiller skips the prefill pod's check only: a self-signed decoder is still
    refused (before, one switch covered every upstream)."""
    write_cert_pair(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / CERT_FILE, tmp_path / KEY_FILE)
    p = await Fake(prefill_ok, ssl_context=context).start()
    d = await Fake(decode_stream, ssl_context=context).start()
    headers = {"x-prefiller-host-port": p.hostport}
    for verify_decoder, status in ((True, 502), (False, 200)):
        options = SidecarOptions(host="127.0.0.1", port=0, decoder_url=f"https://{d.hostport}", prefill_scheme="https",
                                 tls_verify_prefill=False, tls_verify_decoder=verify_decoder)  # fmt: skip
        sidecar = Sidecar(options)
        await sidecar.start()
        try:
            async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
                assert resp.status == status, await resp.text()
                await resp.read()
        finally:
            await stopped(sidecar)
        assert len(p.seen) == (1 if verify_decoder else 2)  # the prefill ran both times
    await stopped(p, d)


async def test_a_prefill_pod_whose_certificate_does_not_verify_is_not_retried(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A certificate that fails verification fails every attempt: 502 at once, not after the retries' backoff."""
    write_cert_pair(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / CERT_FILE, tmp_path / KEY_FILE)
    p = await Fake(prefill_ok, ssl_context=context).start()
    d = await Fake(decode_stream).start()
    options = SidecarOptions(host="127.0.0.1", port=0, decoder_url=f"http://{d.hostport}", prefill_scheme="https",
                             prefill_retry_backoff=1.0)  # fmt: skip
    sidecar = Sidecar(options)
    await sidecar.start()
    try:
        t0 = time.monotonic()
        headers = {"x-prefiller-host-port": p.hostport}
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
            assert resp.status == 502, await resp.text()
            assert "after 1 attempt" in await resp.text()
        assert time.monotonic() - t0 < 1.0  # no retry backoff waited
    finally:
        await stopped(sidecar)
    await stopped(p, d)
