"""The conformance suite's test plugins end to end (real Envoy, the `epp` program, three simulated pods):
`header-based-testing-filter` sends a request to the pod its header names, whatever the scorers
prefer, and `destination-endpoint-served-verifier` tells the client which endpoint served it; with
Envoy's FULL_DUPLEX_STREAMED and with its STREAMED request body mode (routed on the headers)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CONFIG = DEFAULT_CONFIG.replace(
    "plugins:\n", "plugins:\n- type: header-based-testing-filter\n- type: destination-endpoint-served-verifier\n", 1
).replace("  plugins:\n", "  plugins:\n  - pluginRef: header-based-testing-filter\n", 1)


# STREAMED request bodies go upstream as they arrive, so the EPP routes on the headers: through the
# whole pipeline all the same (filters, scorers, response plugins).
@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["FULL_DUPLEX_STREAMED", "STREAMED"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=3, first_host=115, epp_config=CONFIG, body_mode=request.param)) as st:
        yield st


async def served(http: aiohttp.ClientSession, stack: Stack, headers: dict[str, str]) -> tuple[int, str, str]:
    """(status, the pod that answered (its own x-inference-pod), the EPP's served-endpoint header)."""
    body = {"model": "sim-model", "prompt": "the same prompt every time " * 30, "max_tokens": 2}
    async with http.post(f"{stack.url}/v1/completions", json=body, headers=headers) as resp:
        await resp.read()
        header = resp.headers.get("x-conformance-test-served-endpoint", "")
        return resp.status, resp.headers.get("x-inference-pod", ""), header


async def test_a_request_goes_to_the_pod_its_header_names(stack: Stack, http: aiohttp.ClientSession) -> None:
    # Unforced, the repeated prompt sticks to one pod (prefix affinity); each forced pod serves it anyway.
    _, _, home = await served(http, stack, {})
    for pod in stack.pods:
        host = pod.address.rsplit(":", 1)[0]
        for _ in range(3):
            status, answered_by, header = await served(http, stack, {"test-epp-endpoint-selection": host})
            assert status == 200
            # The pods share one port: only the answering pod's own name shows where Envoy sent the request.
            assert (header, answered_by) == (pod.address, pod.name)
    assert home in {p.address for p in stack.pods}


async def test_a_header_naming_no_pod_is_refused_not_routed(stack: Stack, http: aiohttp.ClientSession) -> None:
    status, _, header = await served(http, stack, {"test-epp-endpoint-selection": "10.255.255.1"})
    assert status == 429 and header == ""  # every endpoint filtered out, as for any filter
