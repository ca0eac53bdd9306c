"""The HTTP/2 transport under the REAL Envoy 1.40 with non-default HTTP/2 settings on the `epp` cluster.

Envoy's `http2_protocol_options` change what it announces in SETTINGS; the EPP's answers must still
decode. `hpack_table_size: 0` makes Envoy's HPACK decoder demand a dynamic table size update at the
start of the first header block after it (RFC 7541 §4.2); without one it fails the whole connection
(COMPRESSION_ERROR) and every request through it is a 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from llmepp.observability.metrics import EppMetrics
from llmepp.server.extproc import ExtProcServicer
from llmepp.settings import Settings
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.fakes import FakeDirector
from llmepp.testing.ports import free_port, free_shared_port

from .modelserver import ModelServer
from .test_envoy_protocol import start_epp

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

HOST = "127.0.0.7"


def _with_epp_http2_options(config: str, **options: Any) -> str:
    cfg = yaml.safe_load(config)
    (epp,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "epp"]
    opts = epp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    opts["explicit_http_config"]["http2_protocol_options"].update(options)
    return yaml.safe_dump(cfg, sort_keys=False, width=1000)


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["grpc", "h2"])
async def envoy_port(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    pod = ModelServer(HOST, free_shared_port([HOST]), events=3, gap=0.01)
    await pod.start()
    settings = Settings()
    servicer = ExtProcServicer(FakeDirector([pod.hostport]), EppMetrics(), settings)
    server, epp_port = await start_epp(servicer, settings, request.param, "127.0.0.1:0")
    port, admin = free_port(), free_port()
    config = render_envoy_config(port, epp_port, admin, listen_address="127.0.0.1", epp_tls=False)
    env = EnvoyProcess(_with_epp_http2_options(config, hpack_table_size=0), admin)
    await env.start()
    try:
        yield port
    finally:
        await env.stop()
        await server.stop(None)
        await pod.stop()


async def test_requests_pass_when_envoy_disables_its_hpack_table(envoy_port: int, http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "prompt": "hello", "max_tokens": 4}
    for _ in range(3):  # the first answer on the connection, and later ones
        async with http.post(f"http://127.0.0.1:{envoy_port}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"]
