"""A P/D config from before llm-d v0.7 (`pd-profile-handler` without parameters, `prefill-header-handler`,
as deployed by operators that generated those configs) end to end: a real Envoy, the `epp` program,
one simulated prefill pod and one decode pod behind its `epp-pd-sidecar`. It loads unchanged and
disaggregates as it did then (threshold 0: every request): the prefill pod computes the prompt, the
decode pod decodes after pulling the KV cache."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.pdstack import LEGACY_PD_CONFIG, PDStack, PDStackOptions, scrape, total

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--prefill-time-per-token", "2.0"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[PDStack]:
    options = PDStackOptions(prefill=1, decode=1, sim_args=SIM, first_host=107, epp_config=LEGACY_PD_CONFIG)
    async with PDStack(options) as st:
        yield st


async def test_a_legacy_pd_config_disaggregates(stack: PDStack) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:

        async def served() -> dict[str, float]:
            out = {}
            for pod in stack.pods:
                samples = await scrape(client, f"{pod.url}/metrics")
                out[pod.name] = total(samples, "vllm:generation_tokens_total")
            return out

        before = await served()
        body = {"model": MODEL, "prompt": "a short prompt, disaggregated all the same", "max_tokens": 6}
        async with client.post(f"{stack.url}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-inference-pod"].startswith("decode-")
        after = await served()
    generated = {name: after[name] - before[name] for name in after}
    # The prefill pod produced the first token only; the decode pod all six.
    assert {n: v for n, v in generated.items() if v} == {"prefill-0": 1, "decode-0": 6}, generated
