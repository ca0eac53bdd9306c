"""The reference sidecar's flags a Deployment may pass: repeated --tls-insecure-skip-verify adds up, and the
deprecated and logging flags it still registers are accepted."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import write_cert_pair

from llmepp.server.tls import CERT_FILE, KEY_FILE
from llmepp.sidecar.cli import options_from_args
from llmepp.sidecar.proxy import Sidecar

KV = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "p", "remote_block_ids": [1],
      "remote_host": "127.0.0.1", "remote_port": 1}  # fmt: skip
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _serve(handler: Any, context: ssl.SSLContext | None) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- a repeated --tls-insecure-skip-verify adds up ----------------------------------------------------------
def test_repeated_tls_insecure_skip_verify_accumulates_like_the_reference() -> None:
    """The reference binds --tls-insecure-skip-verify with pflag StringSliceVar ("Can be specified multiple
    times or as comma-separated values"), exactly as --enable-tls: were the second occurrence to replace the
    first, the prefill pod's self-signed certificate would still be verified."""
    options, _ = options_from_args(
        ["--enable-tls=prefiller,decoder", "--tls-insecure-skip-verify=prefiller", "--tls-insecure-skip-verify=decoder"]
    )
    assert (options.tls_verify_prefill, options.tls_verify_decoder) == (False, False)


async def test_repeated_skip_verify_flags_let_a_self_signed_prefill_pod_serve(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """End to end: with the reference-style repeated flags every disaggregated request fails (502, TLS
    verification of the prefill pod) although the operator asked to skip it."""
    write_cert_pair(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / CERT_FILE, tmp_path / KEY_FILE)

    async def prefill(request: web.Request) -> web.StreamResponse:
        return web.json_response({"choices": [], "kv_transfer_params": KV})

    async def decode(request: web.Request) -> web.StreamResponse:
        return web.json_response({"choices": [{"message": {"content": "ok"}}]})

    p_runner, p_port = await _serve(prefill, context)
    d_runner, d_port = await _serve(decode, context)
    options, _ = options_from_args(
        ["--host=127.0.0.1", "--port=0", f"--vllm-port={d_port}", "--enable-tls=prefiller,decoder",
         "--tls-insecure-skip-verify=prefiller", "--tls-insecure-skip-verify=decoder"]
    )  # fmt: skip
    sidecar = Sidecar(options)
    await sidecar.start()
    try:
        headers = {"x-prefiller-host-port": f"127.0.0.1:{p_port}"}
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    finally:
        await sidecar.stop()
        await p_runner.cleanup()
        await d_runner.cleanup()


# -- reference flags a Deployment may pass must not stop start-up -----------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        # Deprecated, still registered by the reference (pkg/sidecar/proxy/options.go) and migrated in Complete().
        ["--prefiller-tls-insecure-skip-verify"],
        ["--decoder-tls-insecure-skip-verify=true"],
        ["--inference-pool-namespace=ns", "--inference-pool-name=pool"],
        # controller-runtime zap flags the reference binds next to --zap-log-level (zap.Options.BindFlags).
        ["--zap-encoder=json"],
        ["--zap-devel=false"],
        ["--zap-stacktrace-level=error"],
        ["--zap-time-encoding=iso8601"],
    ],
)
def test_reference_flags_are_accepted(argv: list[str]) -> None:
    """cli.py: "The reference sidecar's flags are accepted so its Deployment args start this one". These are
    argparse "unrecognized arguments": the sidecar exits at start, the decode pod never becomes ready."""
    options_from_args(["--port=8000", "--vllm-port=8200", *argv])


def test_deprecated_skip_verify_flags_are_honoured() -> None:
    """The reference migrates --prefiller-/--decoder-tls-insecure-skip-verify into the per-stage setting."""
    options, _ = options_from_args(["--enable-tls=prefiller,decoder", "--prefiller-tls-insecure-skip-verify"])
    assert (options.tls_verify_prefill, options.tls_verify_decoder) == (False, True)
    options, _ = options_from_args(["--enable-tls=prefiller,decoder", "--decoder-tls-insecure-skip-verify=true"])
    assert (options.tls_verify_prefill, options.tls_verify_decoder) == (True, False)


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "9000", "--vllm-port", "9000"],
        ["--port", "9000", "--vllm-port", "9001", "--data-parallel-size", "2"],  # rank 0 forwards to rank 1's port
        ["--host", "127.0.0.1", "--port", "9000", "--vllm-port", "9000"],
    ],
)
def test_a_decoder_port_the_sidecar_listens_on_is_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        options_from_args(argv)
    assert "it would call itself" in capsys.readouterr().err


def test_a_decoder_port_on_loopback_is_not_the_sidecar_listening_elsewhere() -> None:
    # The decoder is 127.0.0.1:9000; a sidecar on 127.0.0.2:9000 is another socket (was refused).
    options, _ = options_from_args(["--host", "127.0.0.2", "--port", "9000", "--vllm-port", "9000"])
    assert (options.host, options.port, options.decoder_url) == ("127.0.0.2", 9000, "http://127.0.0.1:9000")


def test_a_port_in_use_is_a_message_not_a_traceback() -> None:
    with socket.socket() as taken:  # the program in a process of its own: main() installs uvloop's policy
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--host", "127.0.0.1", "--port", str(port), "--vllm-port", str(port + 1)]
        run = subprocess.run([sys.executable, "-m", "llmepp.sidecar.cli", *argv], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("epp-pd-sidecar: [Errno 98]"), run.stderr
