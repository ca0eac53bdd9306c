"""gRPC model servers end to end: a real Envoy speaking h2c to two simulated pods' gRPC faces, the `epp`
program with deploy/config/grpc-epp-config.yaml (`vllmgrpc-parser`, `vertexai-parser`), real grpcio clients.

vLLM's `Generate` with token ids that grow turn by turn stays on the pod holding its prefix (the EPP
hashed the ids it read from the gRPC message), streamed and unary; the EPP's token metrics come from the
gRPC answers; a request the EPP refuses reaches the client as a gRPC status with the EPP's message, and
never reaches a pod. Vertex AI's ChatCompletions (streamed HttpBody events) and RawPredict (one JSON)
are served through the same path, their usage counted too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from google.api import httpbody_pb2

from llmepp.protocols import vertexai_prediction_pb2 as vx
from llmepp.protocols import vertexai_prediction_pb2_grpc as vx_grpc
from llmepp.protocols import vllm_engine_pb2 as vl
from llmepp.protocols import vllm_engine_pb2_grpc as vl_grpc
from llmepp.testing.stack import Stack, StackOptions, epp_metric

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
SIM = ["--latency-profile", "llama-8b-h100", "--time-scale", "4", "--kv-cache-size", "4096"]
CONFIG = (Path(__file__).parents[2] / "deploy" / "config" / "grpc-epp-config.yaml").read_text()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    options = StackOptions(pods=2, first_host=150, sim_args=SIM, epp_config=CONFIG, grpc_pods=True)
    async with Stack(options) as st:
        yield st


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy_port}") as ch:
        yield ch


def generate(ids: list[int], max_tokens: int, *, stream: bool) -> vl.GenerateRequest:
    return vl.GenerateRequest(
        tokenized=vl.TokenizedInput(input_ids=ids),
        sampling_params=vl.SamplingParams(max_tokens=max_tokens),
        stream=stream,
    )


async def call_generate(
    channel: grpc.aio.Channel, request: vl.GenerateRequest
) -> tuple[str, list[vl.GenerateResponse]]:
    call = vl_grpc.VllmEngineStub(channel).Generate(request, timeout=30)
    answers = [answer async for answer in call]
    pod = dict(await call.initial_metadata())["x-inference-pod"]
    return str(pod), answers


async def test_a_growing_token_prompt_stays_where_its_prefix_is_cached(channel: grpc.aio.Channel) -> None:
    prompt = list(range(3000, 3800))
    pods = []
    for turn in range(4):
        pod, answers = await call_generate(channel, generate(prompt, 4, stream=turn % 2 == 1))
        pods.append(pod)
        done = answers[-1].complete
        assert answers[-1].WhichOneof("response") == "complete" and done.completion_tokens == 4
        assert done.prompt_tokens == len(prompt)
        if turn:
            assert done.cached_tokens >= 700, done
        else:
            assert done.cached_tokens == 0
        if turn % 2:
            assert [a.WhichOneof("response") for a in answers[:-1]] == ["chunk"] * (len(answers) - 1)
        prompt = prompt + list(done.output_ids) + list(range(4000 + turn * 10, 4010 + turn * 10))
    assert len(set(pods)) == 1, pods


async def test_usage_reaches_the_token_metrics(
    stack: Stack, channel: grpc.aio.Channel, http: aiohttp.ClientSession
) -> None:
    labels = {"model_name": "", "target_model_name": ""}  # vLLM's gRPC API names no model
    before_in = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_input_tokens_sum", **labels)
    before_out = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
    await call_generate(channel, generate(list(range(50, 90)), 6, stream=True))
    for _ in range(50):  # the EPP accounts right after its last answer
        after_out = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
        if after_out > before_out:
            break
        await asyncio.sleep(0.02)
    assert after_out - before_out == 6
    after_in = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_input_tokens_sum", **labels)
    assert after_in - before_in == 40


async def test_a_refused_request_is_a_grpc_status_and_reaches_no_pod(
    stack: Stack, channel: grpc.aio.Channel, http: aiohttp.ClientSession
) -> None:
    served_before = [await pod_requests(http, pod.url) for pod in stack.pods]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call_generate(channel, vl.GenerateRequest(sampling_params=vl.SamplingParams(max_tokens=3)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs an input (tokenized or text)" in (err.value.details() or "")
    assert [await pod_requests(http, pod.url) for pod in stack.pods] == served_before


async def pod_requests(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total") or line.startswith("vllm:num_requests_running")
    )


def vertex_request(doc: dict[str, object]) -> vx.ChatCompletionsRequest:
    body = httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(doc).encode())
    return vx.ChatCompletionsRequest(endpoint="projects/p/locations/l/endpoints/e", http_body=body)


async def test_vertex_chat_completions_stream_and_raw_predict(
    stack: Stack, channel: grpc.aio.Channel, http: aiohttp.ClientSession
) -> None:
    stub = vx_grpc.PredictionServiceStub(channel)
    labels = {"model_name": MODEL, "target_model_name": MODEL}
    before = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = [body async for body in stub.ChatCompletions(vertex_request(chat), timeout=30)]
    assert events[-1].data == b"data: [DONE]\n\n"
    assert all(e.content_type == "text/event-stream" for e in events)
    usage = json.loads(events[-2].data.removeprefix(b"data: "))["usage"]
    assert usage["completion_tokens"] == 5

    raw = vx.RawPredictRequest(
        endpoint="projects/p/locations/l/endpoints/e",
        http_body=httpbody_pb2.HttpBody(
            content_type="application/json",
            data=json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 3}).encode(),
        ),
    )
    answer = await stub.RawPredict(raw, timeout=30)
    assert json.loads(answer.data)["usage"]["completion_tokens"] == 3
    for _ in range(50):
        after = await epp_metric(http, stack.metrics_url, "llm_d_epp_request_output_tokens_sum", **labels)
        if after - before >= 8:
            break
        await asyncio.sleep(0.02)
    assert after - before == 8
