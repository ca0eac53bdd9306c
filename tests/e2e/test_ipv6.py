"""An IPv6 pool end to end: two simulated pods on ::1 (each on a port of its own), in the endpoints file by
IPv6 address, behind a real Envoy; Envoy and the EPP listen on ::1 too (an IPv6-only cluster). The EPP's
pick goes out as `[::1]:<port>` (Go's net.JoinHostPort), the form Envoy's ORIGINAL_DST cluster parses, and
an IPv6 subset hint entry (`[::1]:<port>`) is matched on its IP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
import yaml

from llmepp.datalayer.endpoint import split_hostport
from llmepp.server.envoy import SUBSET_KEY, SUBSET_NAMESPACE
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.ports import free_port
from llmepp.testing.stack import Stack, StackOptions, epp_metric, serves_tls

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--time-scale", "10", "--max-num-seqs", "8"]
HINT_HEADER = "x-test-subset-hint"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=2, ipv6=True, sim_args=SIM)) as st:
        yield st


async def complete(http: aiohttp.ClientSession, url: str, prompt: str, **headers: str) -> aiohttp.ClientResponse:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    resp = await http.post(f"{url}/v1/completions", json=body, headers=headers)
    await resp.read()
    return resp


async def access_line(envoy: EnvoyProcess, resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The fields of Envoy's access-log line for `resp` (upstream, dest = the header, lb_md = the metadata)."""
    # The pod's id is "cmpl-" + the x-request-id Envoy sent it (as vLLM names it).
    rid = resp.headers.get("x-request-id") or json.loads(await resp.read())["id"].removeprefix("cmpl-")
    for _ in range(40):  # Envoy flushes its log every 200 ms
        line = next((ln for ln in envoy.access_log() if rid in ln), "")
        if line:
            return dict(part.split("=", 1) for part in line.split() if "=" in part)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no access-log line for {rid}")


async def test_ipv6_pods_serve_completions_through_envoy(stack: Stack, http: aiohttp.ClientSession) -> None:
    assert stack.url.startswith("http://[::1]:")
    entries = yaml.safe_load(stack.endpoints_file.read_text())["endpoints"]
    assert [e["address"] for e in entries] == ["::1", "::1"]
    addresses = {p.name: p.address for p in stack.pods}  # "[::1]:<port>", the ports differ
    assert len(set(addresses.values())) == 2 and all(a.startswith("[::1]:") for a in addresses.values())
    resp = await complete(http, stack.url, "hello over IPv6")
    assert resp.status == 200, await resp.text()
    pod = resp.headers["x-inference-pod"]
    assert json.loads(await resp.read())["usage"]["completion_tokens"] == 2
    # The EPP's header and envoy.lb metadata are bracketed, and Envoy went there.
    assert stack.envoy is not None
    fields = await access_line(stack.envoy, resp)
    assert fields["dest"] == fields["lb_md"] == fields["upstream"] == addresses[pod]
    # Both pods are reachable (GET /v1/models goes to a random ready pod).
    seen = set()
    for _ in range(16):
        async with http.get(f"{stack.url}/v1/models") as models:
            assert models.status == 200
            seen.add(models.headers["x-inference-pod"])
    assert seen == set(addresses)
    # The EPP scrapes both pods' /metrics over IPv6.
    assert await epp_metric(http, stack.metrics_url, "llm_d_epp_ready_endpoints") == 2
    assert await epp_metric(http, stack.metrics_url, "llm_d_epp_datalayer_poll_errors_total") == 0


def with_subset_hint_from_header(config_text: str) -> str:
    """The Envoy bootstrap with a gateway-style subset hint: header `x-test-subset-hint` becomes the
    `envoy.lb.subset_hint` metadata, which ext_proc forwards to the EPP."""
    config = yaml.safe_load(config_text)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    ext_proc["typed_config"]["metadata_options"]["forwarding_namespaces"] = {"untyped": [SUBSET_NAMESPACE]}
    rule = {
        "header": HINT_HEADER,
        "on_header_present": {"metadata_namespace": SUBSET_NAMESPACE, "key": SUBSET_KEY, "type": "STRING"},
        "remove": True,
    }
    hcm["http_filters"].insert(
        0,
        {
            "name": "envoy.filters.http.header_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
                "request_rules": [rule],
            },
        },
    )
    return yaml.safe_dump(config, sort_keys=False, width=1000)


async def test_bracketed_ipv6_subset_hint_is_matched_on_the_ip(stack: Stack, http: aiohttp.ClientSession) -> None:
    port, admin = free_port("::1"), free_port()
    base = render_envoy_config(
        port, stack.epp_port, admin, listen_address="::1", epp_address="::1", epp_tls=serves_tls(stack.options.epp_args)
    )
    async with EnvoyProcess(with_subset_hint_from_header(base), admin) as envoy:
        url = f"http://[::1]:{port}"
        first = stack.pods[0].address
        # The hint names the IP (any port: the reference matches on the IP only); both pods are on ::1.
        for hint in (first, "[::1]:1", f"{first}, [fd00::9]:8000"):
            resp = await complete(http, url, f"hinted {hint}", **{HINT_HEADER: hint})
            assert resp.status == 200, (hint, await resp.text())
            fields = await access_line(envoy, resp)
            assert split_hostport(fields["dest"])[0] == "::1" and fields["dest"] == fields["upstream"]
        # An IPv6 hint naming no pool address leaves no candidates.
        resp = await complete(http, url, "hinted elsewhere", **{HINT_HEADER: "[fd00::9]:8000"})
        assert resp.status == 503, await resp.text()
