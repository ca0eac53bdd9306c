"""The product end to end: a real Envoy, the `epp` program with the default profile, and
simulated vLLM pods on distinct 127.0.0.x addresses (llmepp.testing.stack)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2

from llmepp.testing.stack import Stack, StackOptions, epp_metric

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
# Small time scale keeps the pods realistic (queues, prefill cost) while the suite stays fast.
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--max-num-seqs", "8", "--kv-cache-size", "2048"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    async with Stack(StackOptions(pods=4, first_host=60, sim_args=SIM, epp_args=["--max-body-size", "1MiB"])) as st:
        yield st


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def complete(client: aiohttp.ClientSession, stack: Stack, prompt: str, **extra: object) -> aiohttp.ClientResponse:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}
    resp = await client.post(f"{stack.url}/v1/completions", json=body)
    await resp.read()
    return resp


async def test_non_streaming_completion_routed_to_a_pod(stack: Stack, client: aiohttp.ClientSession) -> None:
    resp = await complete(client, stack, "hello there")
    assert resp.status == 200
    assert resp.headers["x-inference-pod"] in {p.name for p in stack.pods}
    body = json.loads(await resp.read())
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 4
    # Envoy's access log shows the upstream equal to the EPP's header and metadata choice.
    assert stack.envoy is not None
    rid = resp.headers.get("x-request-id") or body["id"].removeprefix("cmpl-")  # the pod's id: "cmpl-" + Envoy's
    line = ""
    for _ in range(40):  # Envoy flushes its log every 200 ms
        line = next((ln for ln in stack.envoy.access_log() if rid in ln), "")
        if line:
            break
        await asyncio.sleep(0.1)
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    assert fields["upstream"] == fields["dest"] == fields["lb_md"]


async def test_streaming_chat_is_intact(stack: Stack, client: aiohttp.ClientSession) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.post(f"{stack.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([c for c in content if c]) == 6
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_continuous_usage_stats_are_accounted_once_from_the_last_usage(
    stack: Stack, client: aiohttp.ClientSession
) -> None:
    """vLLM's continuous_usage_stats put a running usage in every chunk: the EPP's token metrics take the
    last one (the whole answer's), not the first or a sum."""
    labels = {"model_name": MODEL, "target_model_name": MODEL}
    metric = "llm_d_epp_request_output_tokens_sum"
    before = await epp_metric(client, stack.metrics_url, metric, **labels)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "count for me"}],
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    async with client.post(f"{stack.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    running = [json.loads(ln[6:])["usage"]["completion_tokens"] for ln in text.splitlines() if ln.startswith("data: {")]
    assert running == [0, 1, 2, 3, 4, 5, 6, 7, 7]  # role chunk, 7 tokens, final usage chunk
    after = before
    for _ in range(50):  # the EPP accounts right after its last answer
        after = await epp_metric(client, stack.metrics_url, metric, **labels)
        if after > before:
            break
        await asyncio.sleep(0.02)
    assert after - before == 7


async def test_lax_scalars_pass_as_vllm_reads_them(stack: Stack, client: aiohttp.ClientSession) -> None:
    # vLLM's pydantic (lax) models serve "stream": "true" and "max_tokens": "5"; the EPP must not refuse them
    # and must account the answer as the stream it is.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5", "stream": "true"}
    async with client.post(f"{stack.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    assert text.rstrip().endswith("data: [DONE]")
    async with client.post(
        f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": "maybe"}
    ) as resp:
        assert resp.status == 400
        assert '"stream" must be a boolean' in (await resp.json())["error"]["message"]


async def test_get_models_goes_to_a_ready_pod(stack: Stack, client: aiohttp.ClientSession) -> None:
    seen = set()
    for _ in range(12):
        async with client.get(f"{stack.url}/v1/models") as resp:
            assert resp.status == 200
            assert (await resp.json())["data"][0]["id"] == MODEL
            seen.add(resp.headers["x-inference-pod"])
    assert len(seen) >= 2  # random, not pinned


async def test_bad_requests_get_json_400(stack: Stack, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{stack.url}/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert "invalid JSON" in (await resp.json())["error"]["message"]
    async with client.post(f"{stack.url}/v1/chat/completions", json={"model": MODEL}) as resp:
        assert resp.status == 400
        assert "messages" in (await resp.json())["error"]["message"]
    async with client.post(f"{stack.url}/v1/completions", json={"prompt": "no model"}) as resp:
        assert resp.status == 400
        assert "model" in (await resp.json())["error"]["message"]


async def test_body_over_limit_is_413(stack: Stack, client: aiohttp.ClientSession) -> None:
    prompt = "x" * (1024 * 1024 + 10)
    async with client.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": prompt}) as resp:
        assert resp.status == 413
        assert "error" in await resp.json()


async def test_client_sent_destination_header_is_overwritten(stack: Stack, client: aiohttp.ClientSession) -> None:
    headers = {"x-gateway-destination-endpoint": "127.0.0.1:1"}  # a dead port: would fail if honoured
    async with client.post(
        f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, headers=headers
    ) as resp:
        assert resp.status == 200


async def test_prefix_affinity_with_even_load(stack: Stack, client: aiohttp.ClientSession) -> None:
    """Requests sharing a long prefix land on one pod; different prefixes spread out."""
    families = [f"family {i}: " + f"shared system prompt {i} " * 150 for i in range(4)]
    placement: dict[int, Counter[str]] = {i: Counter() for i in range(4)}
    for round_ in range(5):
        for i, prefix in enumerate(families):
            resp = await complete(client, stack, prefix + f" question {round_}")
            assert resp.status == 200
            placement[i][resp.headers["x-inference-pod"]] += 1
    for i, counts in placement.items():
        hits = counts.most_common(1)[0][1]
        assert hits >= 4, f"family {i} spread over {dict(counts)}"
    # Affinity must not pile every family on one pod when load is even.
    assert len({c.most_common(1)[0][0] for c in placement.values()}) >= 2


async def test_pod_removed_from_endpoints_file_stops_receiving_traffic(
    stack: Stack, client: aiohttp.ClientSession
) -> None:
    keep = stack.pods[:2]
    stack.write_endpoints(keep)
    try:
        await asyncio.sleep(1.0)  # file-discovery polls the file
        pods = {(await complete(client, stack, f"spread {i}")).headers["x-inference-pod"] for i in range(16)}
        assert pods <= {p.name for p in keep}
        stack.write_endpoints([])
        await asyncio.sleep(1.0)
        async with client.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
            assert resp.status == 503
            assert resp.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
    finally:
        stack.write_endpoints(stack.pods)
        await asyncio.sleep(1.0)


async def test_epp_metrics_are_exported(stack: Stack, client: aiohttp.ClientSession) -> None:
    await complete(client, stack, "count me")
    async with client.get(stack.metrics_url) as resp:
        text = await resp.text()
    for name in (
        "llm_d_epp_request_total",
        "llm_d_epp_scheduler_e2e_duration_seconds_bucket",
        "llm_d_epp_request_processing_duration_seconds_bucket",
        "llm_d_epp_ready_endpoints",
        "llm_d_epp_average_kv_cache_utilization",
        # The reference's series this EPP had missed (tests/server/test_metrics_reference_names.py has them all).
        "llm_d_epp_std_dev_queue_size",
        "llm_d_epp_info{",
        "llm_d_epp_request_ntpot_seconds_bucket",
        'llm_d_epp_request_total{fairness_id="default-flow",model_name=',
        'llm_d_epp_scheduler_attempts_total{endpoint_name="',
    ):
        assert name in text, name


async def test_epp_restart_while_envoy_stays_up(stack: Stack, client: aiohttp.ClientSession) -> None:
    assert stack.epp is not None
    await stack.epp.stop()
    async with client.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
        assert resp.status == 500  # failure_mode_allow: false → fail closed, immediately
        # Envoy's local reply, in the EPP's error shape (an empty body without local_reply_config).
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["code"] == 500 and error["type"] == "endpoint_picker_error", error
    assert error["message"].startswith("the endpoint picker failed: ext_proc_error_gRPC_error_14"), error
    await stack.restart_epp()
    resp = await complete(client, stack, "back again")
    assert resp.status == 200


async def test_sigterm_drains_in_flight_streams(stack: Stack, client: aiohttp.ClientSession) -> None:
    """SIGTERM: readiness goes NOT_SERVING at once, a running stream still completes."""
    assert stack.epp is not None
    body = {"model": MODEL, "prompt": "long answer please", "max_tokens": 120, "stream": True}
    async with client.post(f"{stack.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        stack.epp.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await stack.epp.health("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await stack.epp.health("liveness") == health_pb2.HealthCheckResponse.SERVING
        rest = await resp.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert await stack.epp.exit_code(within=15) == 0
    await stack.restart_epp()
    assert (await complete(client, stack, "after drain")).status == 200


async def test_sigterm_at_low_traffic_still_serves_a_gateway_routing_here(
    stack: Stack, client: aiohttp.ClientSession
) -> None:
    """Envoy's `epp` cluster still lists this EPP after SIGTERM (static here; an EDS-fed gateway until it
    learns of the removal): a request a few seconds later must be served within --drain-timeout."""
    assert stack.epp is not None
    assert (await complete(client, stack, "before the signal")).status == 200
    stack.epp.signal(signal.SIGTERM)
    await asyncio.sleep(2.5)
    assert (await complete(client, stack, "still routed here")).status == 200
    await stack.restart_epp()
    assert (await complete(client, stack, "after the restart")).status == 200
