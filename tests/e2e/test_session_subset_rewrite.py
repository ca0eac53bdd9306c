"""README claims about routing inputs, end to end through real Envoy + `epp` + simulated pods:

- `session-affinity-scorer`: "1 for the session's endpoint (`x-session-token` ...)"; the plugin's docstring:
  every response carries the chosen endpoint's token, which the client echoes back.
- "candidates (pool ∩ subset hint)": a gateway's subset hint (envoy.lb.subset_hint metadata,
  `x-gateway-destination-endpoint-subset`) narrows the candidates; a hint naming no pod leaves none (503).
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from e2e.test_ipv6 import HINT_HEADER, with_subset_hint_from_header
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.ports import free_port
from llmepp.testing.stack import Stack, StackOptions, serves_tls

from .answers import Answer, completion

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: session-affinity-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: session-affinity-scorer, weight: 1}
  - {pluginRef: max-score-picker}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=4, first_host=20, epp_config=CONFIG)) as st:
        yield st


async def post(http: aiohttp.ClientSession, url: str, prompt: str, headers: dict[str, str] | None = None) -> Answer:
    return await completion(http, url, MODEL, prompt, 2, headers)


def token_of(name: str) -> str:
    return base64.b64encode(f"default/{name}".encode()).decode()


async def test_session_token_is_returned_and_pins_the_session(stack: Stack, http: aiohttp.ClientSession) -> None:
    status, headers, text = await post(http, stack.url, "first turn")
    assert status == 200, text
    pod = headers["x-inference-pod"]
    # The response carries base64("<namespace>/<endpoint name>") of the pod that served it.
    assert "x-session-token" in headers, headers
    ns, _, name = base64.b64decode(headers["x-session-token"]).decode().partition("/")
    assert name == pod, (ns, name, pod)
    # Every later turn that echoes the token goes to that pod (without it: random tie-break over 4 pods).
    token = headers["x-session-token"]
    for i in range(12):
        status, h, text = await post(http, stack.url, f"turn {i}", {"x-session-token": token})
        assert status == 200, text
        assert h["x-inference-pod"] == pod
        assert h["x-session-token"] == token


async def test_each_pod_is_reachable_by_its_token(stack: Stack, http: aiohttp.ClientSession) -> None:
    for p in stack.pods:
        for _ in range(3):
            status, h, text = await post(http, stack.url, "pinned", {"x-session-token": token_of(p.name)})
            assert status == 200, text
            assert h["x-inference-pod"] == p.name


async def test_undecodable_token_is_no_session(stack: Stack, http: aiohttp.ClientSession) -> None:
    seen: Counter[str] = Counter()
    for i in range(24):
        status, h, text = await post(http, stack.url, f"junk {i}", {"x-session-token": "%%%not-base64"})
        assert status == 200, text
        seen[h["x-inference-pod"]] += 1
    assert len(seen) >= 2, seen  # no pin: ties broken at random


async def test_ipv4_subset_hint_narrows_the_candidates(stack: Stack, http: aiohttp.ClientSession) -> None:
    port, admin = free_port(), free_port()
    base = render_envoy_config(
        port, stack.epp_port, admin, listen_address="127.0.0.1", epp_tls=serves_tls(stack.options.epp_args)
    )
    async with EnvoyProcess(with_subset_hint_from_header(base), admin) as envoy:
        url = f"http://127.0.0.1:{port}"
        two = stack.pods[1:3]
        hint = ", ".join(p.address for p in two)
        seen: Counter[str] = Counter()
        for i in range(20):
            status, h, text = await post(http, url, f"hinted {i}", {HINT_HEADER: hint})
            assert status == 200, text
            seen[h["x-inference-pod"]] += 1
        assert set(seen) <= {p.name for p in two}, seen
        assert len(seen) == 2, seen
        # A hint naming no pool address leaves no candidates: 503, not a routing to some pod.
        status, h, text = await post(http, url, "hinted elsewhere", {HINT_HEADER: "10.9.9.9:8000"})
        assert status == 503, (status, text)
        assert envoy.proc is not None


async def test_model_rewrite_header_with_the_real_epp(stack: Stack, http: aiohttp.ClientSession) -> None:
    """README: the `x-llm-d-model-name-rewrite` header rewrites the model before scheduling; "Responses still
    show the client's model name"; request series are labelled `model_name, target_model_name`."""
    from llmepp.testing.stack import epp_metric

    # Without the rewrite the pods refuse the unknown alias (vLLM: 404), so a 200 proves the pod got sim-model.
    async with http.post(f"{stack.url}/v1/completions", json={"model": "alias", "prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 404, (r.status, await r.text())
    labels = {"model_name": "alias", "target_model_name": MODEL}
    before = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_total", **labels)
    for stream in (False, True):
        body = {"model": "alias", "prompt": "rewrite me", "max_tokens": 3, "stream": stream}
        async with http.post(
            f"{stack.url}/v1/completions", json=body, headers={"x-llm-d-model-name-rewrite": MODEL}
        ) as r:
            text = await r.text()
            assert r.status == 200, text
        compact = text.replace(" ", "")
        assert '"model":"alias"' in compact and MODEL not in text, text
    for _ in range(50):
        after = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_total", **labels)
        if after >= before + 2:
            break
        await asyncio.sleep(0.02)
    assert after - before == 2


async def test_lax_scalars_and_a_400_naming_the_field(stack: Stack, http: aiohttp.ClientSession) -> None:
    """README: "`"max_tokens": 10.0` is 10; what vLLM would refuse is a 400 naming the field.\""""
    body = {"model": MODEL, "prompt": "lax", "max_tokens": 3.0}
    async with http.post(f"{stack.url}/v1/completions", json=body) as r:
        doc = await r.json()
        assert r.status == 200, doc
        assert doc["usage"]["completion_tokens"] == 3
    for bad in (3.5, "three", [3]):
        async with http.post(f"{stack.url}/v1/completions", json={**body, "max_tokens": bad}) as r:
            doc = await r.json()
            assert r.status == 400, (bad, doc)
            assert "max_tokens" in doc["error"]["message"], (bad, doc)
            assert "x-inference-pod" not in r.headers
