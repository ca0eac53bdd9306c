"""TLS between Envoy and the EPP through the real stack: the default (self-signed, h2 transport), grpc.aio,
a certificate from --cert-path, and plaintext with --secure-serving=false."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from helpers import write_cert_pair

from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e]

SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--max-num-seqs", "8", "--kv-cache-size", "1024"]


def _serving_line(stack: Stack) -> dict[str, object]:
    for line in (stack.workdir / "epp.log").read_text().splitlines():
        if '"epp serving"' in line:
            record: dict[str, object] = json.loads(line)
            return record
    raise AssertionError("no 'epp serving' line in the EPP log")


@pytest.mark.parametrize(
    ("epp_args", "tls"),
    [
        ([], "self-signed"),
        (["--extproc-transport", "grpc"], "self-signed"),
        (["--cert-path", "{certs}", "--enable-cert-reload"], "{certs}/tls.crt (reloaded on change)"),
        (["--secure-serving=false"], "off"),
    ],
    ids=["h2-self-signed", "grpc-self-signed", "cert-path", "plaintext"],
)
async def test_requests_route_through_envoy_over_each_tls_setting(
    epp_args: list[str], tls: str, tmp_path: Path
) -> None:
    write_cert_pair(tmp_path)
    args = [a.replace("{certs}", str(tmp_path)) for a in epp_args]
    async with (
        Stack(StackOptions(pods=2, first_host=140, sim_args=SIM, epp_args=args)) as stack,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client,
    ):
        assert _serving_line(stack)["tls"] == tls.replace("{certs}", str(tmp_path))
        for i in range(4):
            body = {"model": "sim-model", "prompt": f"hello {i}", "max_tokens": 3}
            async with client.post(f"{stack.url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["x-inference-pod"] in {p.name for p in stack.pods}
