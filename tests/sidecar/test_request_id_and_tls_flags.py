"""The P/D sidecar: one request id for both stages, client disconnects closing the upstream connection, and
the reference's TLS default (--cert-path without --secure-proxy=false) refused rather than ignored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from llmepp.sidecar.cli import options_from_args
from llmepp.sidecar.proxy import Sidecar, SidecarOptions

from .test_proxy import Fake, prefill_ok, started, stopped


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


async def test_prefill_and_decode_share_one_request_id(http: aiohttp.ClientSession) -> None:
    """vLLM's NixlConnector (before vLLM PR #29665, i.e. every vLLM without remote_request_id in
    kv_transfer_params) pairs the decode's "blocks read" notification with the prefill request by request
    id, which vLLM takes from X-Request-Id. The reference sidecar adds one uuid to both requests
    (connector_nixlv2.go: preq/dreq.Header.Add(requestHeaderRequestID, uuidStr)); without it the two get
    different random ids and the prefill pod holds the KV blocks until VLLM_NIXL_ABORT_REQUEST_TIMEOUT."""
    p, d, sidecar = await started()
    try:
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT,
                             headers={"x-prefiller-host-port": p.hostport}) as resp:  # fmt: skip
            assert resp.status == 200
            await resp.read()
        (pre,), (dec,) = p.seen, d.seen
        assert pre.headers.get("x-request-id"), "the prefill request carries no X-Request-Id"
        assert dec.headers.get("x-request-id") == pre.headers["x-request-id"]
    finally:
        await stopped(sidecar, p, d)


async def test_a_client_supplied_request_id_is_kept_for_both(http: aiohttp.ClientSession) -> None:
    """The client's (Envoy's) x-request-id is the one both stages see."""
    p, d, sidecar = await started()
    try:
        headers = {"x-prefiller-host-port": p.hostport, "x-request-id": "rid-7"}
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
        assert [s.headers.get("x-request-id") for s in (*p.seen, *d.seen)] == ["rid-7", "rid-7"]
    finally:
        await stopped(sidecar, p, d)


# -- client disconnects --------------------------------------------------
class RawUpstream:
    """A TCP server that reads one request and never answers (or streams forever), recording whether its
    peer (the sidecar) closed the connection."""

    def __init__(self, stream: bool = False) -> None:
        self.stream = stream
        self.got_request = asyncio.Event()
        self.peer_closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def hostport(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.got_request.set()
        if self.stream:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                while True:
                    writer.write(b"7\r\ndata: x\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
            except (ConnectionError, OSError):
                self.peer_closed.set()
                return
        while await reader.read(65536):
            pass
        self.peer_closed.set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def _post_completion(port: int, prefiller: str, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 completions request to the sidecar (the test then drops the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"x-prefiller-host-port: {prefiller}\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    return reader, writer


async def test_a_client_gone_during_the_prefill_closes_the_prefill_connection() -> None:
    prefill = await RawUpstream().start()
    p, d, sidecar = await started()
    try:
        _, writer = await _post_completion(
            sidecar.port, prefill.hostport, b'{"model": "m", "prompt": "p", "max_tokens": 3}'
        )
        await asyncio.wait_for(prefill.got_request.wait(), 5)
        writer.close()
        await asyncio.wait_for(prefill.peer_closed.wait(), 5)
        assert d.seen == []
    finally:
        await stopped(sidecar, p, d)
        await prefill.stop()


async def test_a_client_gone_mid_stream_closes_the_decoder_connection() -> None:
    decoder = await RawUpstream(stream=True).start()
    p = await Fake(prefill_ok).start()
    sidecar = Sidecar(SidecarOptions(host="127.0.0.1", port=0, decoder_url=f"http://{decoder.hostport}"))
    await sidecar.start()
    try:
        body = b'{"model": "m", "prompt": "p", "max_tokens": 3, "stream": true}'
        reader, writer = await _post_completion(sidecar.port, p.hostport, body)
        await asyncio.wait_for(reader.readuntil(b"data: x"), 5)
        writer.close()
        await asyncio.wait_for(decoder.peer_closed.wait(), 5)
    finally:
        await sidecar.stop()
        await p.stop()
        await decoder.stop()


def test_cert_path_without_secure_proxy_false_is_refused_not_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    """The reference's --secure-proxy defaults to true (pkg/sidecar/proxy/options.go NewOptions:
    SecureServing: true) and serves TLS with --cert-path's tls.crt/tls.key. Args that omit --secure-proxy
    and name a certificate ask for an HTTPS port; this sidecar starts plain HTTP without a word, and the
    gateway's TLS origination to the pod then fails every request. `--secure-proxy=true` is refused at
    start (cli._unsupported), and so is the same request made through the reference's default."""
    with pytest.raises(SystemExit):
        options_from_args(["--port", "8000", "--vllm-port", "8200", "--cert-path", "/var/run/kserve/tls"])
    assert "secure-proxy" in capsys.readouterr().err
    options_from_args(["--secure-proxy=false", "--cert-path", "/var/run/kserve/tls"])  # explicit: accepted
