"""The simulator's gRPC face (vLLM's VllmEngine, Vertex AI's PredictionService): a real grpc.aio client over
loopback, on the same engine as the HTTP routes (usage, prefix cache, metrics, seats)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import pytest
from google.api import httpbody_pb2

from llmepp.protocols import vertexai_prediction_pb2 as vertex_pb
from llmepp.protocols import vertexai_prediction_pb2_grpc as vertex_grpc
from llmepp.protocols import vllm_engine_pb2 as pb
from llmepp.protocols import vllm_engine_pb2_grpc as pb_grpc
from llmepp_sim import PodConfig, SimCluster, SimProcess
from llmepp_sim.cli import config_from_args
from llmepp_sim.cluster import parse_pod_line

from .simkit import pod, running, sample, scrape, started, words

PROMPT = list(range(100, 400))  # 300 token ids: 18 full blocks of 16


def grpc_pod(host: str = "127.0.0.2", **overrides: Any) -> PodConfig:
    return pod(host, **{"grpc_port": 0, **overrides})


@asynccontextmanager
async def serving(*configs: PodConfig) -> AsyncIterator[tuple[SimCluster, list[grpc.aio.Channel]]]:
    cluster = await started(list(configs or [grpc_pod()]))
    channels = [grpc.aio.insecure_channel(p.grpc_address) for p in cluster.pods]
    try:
        yield cluster, channels
    finally:
        for channel in channels:
            await channel.close()
        await cluster.stop()


def gen_request(
    ids: list[int] | None = None, *, text: str | None = None, max_tokens: int | None = 4, n: int = 0, **fields: Any
) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_tokens=max_tokens, n=n) if max_tokens is not None else pb.SamplingParams(n=n)
    if text is not None:
        return pb.GenerateRequest(text=text, sampling_params=params, **fields)
    return pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=ids or []), sampling_params=params, **fields)


async def generate(channel: grpc.aio.Channel, request: pb.GenerateRequest) -> tuple[list[Any], dict[str, str]]:
    call = pb_grpc.VllmEngineStub(channel).Generate(request)
    answers = [answer async for answer in call]
    return answers, dict(await call.initial_metadata())


async def grpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value


async def http_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as response:
        if body.get("stream"):
            return response.status, await response.read()
        return response.status, await response.json(content_type=None)


def normalized(value: Any) -> Any:
    """A JSON answer without what differs between two runs: the request id and the creation time."""
    if isinstance(value, dict):
        return {k: ("<x>" if k in ("id", "created") else normalized(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def sse_events(raw: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in raw.split(b"\n\n") if event]


def event_json(event: bytes) -> Any:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n"), event
    payload = event[len(b"data: ") : -2]
    return payload.decode() if payload == b"[DONE]" else normalized(json.loads(payload))


def http_body(body: dict[str, Any]) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(body).encode())


# ---------------------------------------------------------------------------- VllmEngine.Generate
async def test_generate_token_ids_matches_the_http_route_and_hits_the_prefix_cache(
    http: aiohttp.ClientSession,
) -> None:
    async with serving() as (cluster, [channel]):
        url = cluster.urls[0]
        status, over_http = await http_json(
            http, url + "/inference/v1/generate", {"token_ids": PROMPT, "sampling_params": {"max_tokens": 5}}
        )
        assert status == 200
        hits_before = sample(await scrape(http, url), "vllm:prefix_cache_hits")

        answers, metadata = await generate(channel, gen_request(PROMPT, max_tokens=5))
        assert metadata["x-inference-pod"] == "sim-0"
        assert metadata["x-inference-port"] == str(cluster.pods[0].grpc_port)
        [answer] = answers
        assert answer.WhichOneof("response") == "complete"
        done = answer.complete
        assert list(done.output_ids) == over_http["choices"][0]["token_ids"]  # same engine, same filler
        assert done.finish_reason == "length" == over_http["choices"][0]["finish_reason"]
        assert (done.prompt_tokens, done.completion_tokens) == (len(PROMPT), 5)
        assert done.prompt_tokens == over_http["usage"]["prompt_tokens"]
        # The HTTP request cached the prompt's 18 full blocks; the gRPC one reused them.
        assert done.cached_tokens == 18 * 16
        hits_after = sample(await scrape(http, url), "vllm:prefix_cache_hits")
        assert hits_after - hits_before == done.cached_tokens
        assert sample(await scrape(http, url), "vllm:request_success", finished_reason="length") == 2


async def test_generate_text_streams_chunks_then_a_complete_with_the_totals(http: aiohttp.ClientSession) -> None:
    async with serving() as (cluster, [channel]):
        text = words(40)
        status, over_http = await http_json(http, cluster.urls[0] + "/v1/completions", {"prompt": text})
        assert status == 200
        # No max_tokens: the completions default (16).
        answers, metadata = await generate(channel, gen_request(text=text, max_tokens=None, stream=True))
        assert metadata["x-inference-pod"] == "sim-0"
        *chunks, last = answers
        assert chunks and all(a.WhichOneof("response") == "chunk" for a in chunks)
        assert last.WhichOneof("response") == "complete"
        streamed = [t for a in chunks for t in a.chunk.token_ids]
        assert [a.chunk.completion_tokens for a in chunks] == list(
            itertools.accumulate(len(a.chunk.token_ids) for a in chunks)
        )
        assert all(a.chunk.prompt_tokens == over_http["usage"]["prompt_tokens"] for a in chunks)
        done = last.complete
        assert list(done.output_ids) == streamed and done.completion_tokens == len(streamed) == 16
        assert done.prompt_tokens == over_http["usage"]["prompt_tokens"] and done.finish_reason == "length"
        assert done.cached_tokens > 0 and all(a.chunk.cached_tokens == done.cached_tokens for a in chunks)

        # Same text, same tokens: the non-streaming answer has the same ids.
        [again], _ = await generate(channel, gen_request(text=text, max_tokens=16))
        assert list(again.complete.output_ids) == streamed


async def test_bad_generate_requests_are_invalid_argument() -> None:
    async with serving(grpc_pod(max_model_len=256)) as (_, [channel]):
        stub = pb_grpc.VllmEngineStub(channel)
        cases = {
            "no input": (pb.GenerateRequest(), "needs an input"),
            "empty ids": (gen_request([]), "input_ids` must not be empty"),
            "empty text": (gen_request(text=""), "`text` must not be empty"),
            "prompt too long": (gen_request(PROMPT), "maximum context length is 256"),
            "output too long": (gen_request([1, 2, 3], max_tokens=300), "maximum context length is 256"),
            "token out of range": (gen_request([1, 10**6]), "out of vocabulary"),
            "zero max_tokens": (gen_request([1, 2], max_tokens=0), "at least 1"),
            "n > 1": (gen_request([1, 2], n=2), "n=1"),
        }
        for name, (request, message) in cases.items():
            call = stub.Generate(request)
            error = await grpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert message in (error.details() or ""), (name, error.details())
            assert dict(await call.initial_metadata())["x-inference-pod"] == "sim-0"


async def test_forced_errors_and_a_starting_pod_map_to_grpc_codes() -> None:
    async with serving(grpc_pod(), grpc_pod("127.0.0.3", startup_duration=30.0)) as (_, [ready, starting]):
        call = pb_grpc.VllmEngineStub(ready).Generate(gen_request([1, 2]), metadata=(("x-return-error", "429"),))
        assert (await grpc_error(call)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        stub = pb_grpc.VllmEngineStub(starting)
        health = await stub.HealthCheck(pb.HealthCheckRequest())
        assert not health.healthy and health.message
        error = await grpc_error(stub.Generate(gen_request([1, 2])))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "starting up" in (error.details() or "")
        error = await grpc_error(stub.Embed(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=[1]))))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------- cancellation and Abort
async def test_cancelling_a_call_frees_its_seat() -> None:
    slow = grpc_pod(max_num_seqs=1, inter_token_latency=200.0)
    async with serving(slow) as (cluster, [channel]):
        engine = cluster.pods[0].engine
        stub = pb_grpc.VllmEngineStub(channel)
        call = stub.Generate(gen_request(PROMPT, max_tokens=500, stream=True))
        first = await call.read()
        assert first.WhichOneof("response") == "chunk"
        assert len(engine.running) == 1
        call.cancel()
        for _ in range(100):
            if not engine.running and not engine.waiting:
                break
            await asyncio.sleep(0.01)
        assert not engine.running and not engine.waiting
        assert engine.stats.finished.get("abort") == 1
        # The one seat serves the next request.
        cluster.pods[0].update_config({"inter_token_latency": 1.0})
        [answer], _ = await asyncio.wait_for(generate(channel, gen_request([5, 6, 7], max_tokens=2)), 5)
        assert answer.complete.completion_tokens == 2


async def test_abort_by_request_id_ends_the_generation_with_finish_reason_abort() -> None:
    async with serving(grpc_pod(inter_token_latency=200.0)) as (cluster, [channel]):
        stub = pb_grpc.VllmEngineStub(channel)
        task = asyncio.ensure_future(generate(channel, gen_request(PROMPT, max_tokens=500, request_id="job-1")))
        engine = cluster.pods[0].engine
        for _ in range(100):
            if engine.running:
                break
            await asyncio.sleep(0.01)
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.active_requests == 1 and info.server_type == "vllm-grpc" and info.uptime_seconds > 0
        await stub.Abort(pb.AbortRequest(request_ids=["job-1", "unknown"]))
        [answer], _ = await asyncio.wait_for(task, 5)
        assert answer.complete.finish_reason == "abort" and answer.complete.completion_tokens < 500
        assert not engine.running
        assert (await stub.GetServerInfo(pb.GetServerInfoRequest())).active_requests == 0


# ---------------------------------------------------------------------------- Embed and the info RPCs
async def test_embed_and_info_rpcs(http: aiohttp.ClientSession) -> None:
    async with serving(grpc_pod(max_model_len=2048, model="org/model-x")) as (cluster, [channel]):
        stub = pb_grpc.VllmEngineStub(channel)
        call = stub.Embed(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=PROMPT)))
        embedded = await call
        assert dict(await call.initial_metadata())["x-inference-pod"] == "sim-0"
        assert embedded.prompt_tokens == len(PROMPT) and embedded.embedding_dim == len(embedded.embedding) > 0
        assert math.isclose(math.fsum(x * x for x in embedded.embedding), 1.0, rel_tol=1e-4)
        again = await stub.Embed(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=PROMPT)))
        assert list(again.embedding) == list(embedded.embedding)  # deterministic
        # An embedding is a prefill on the engine: the second one hit the prefix cache.
        assert sample(await scrape(http, cluster.urls[0]), "vllm:prefix_cache_hits") == 18 * 16
        error = await grpc_error(stub.Embed(pb.EmbedRequest()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

        health = await stub.HealthCheck(pb.HealthCheckRequest())
        assert health.healthy
        model = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (model.model_path, model.is_generation, model.max_context_length) == ("org/model-x", True, 2048)
        assert model.vocab_size == cluster.pods[0].tokenizer.vocab_size
        server = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert (server.active_requests, server.server_type) == (0, "vllm-grpc")
        assert server.uptime_seconds > 0 and server.last_receive_timestamp > 0


# ---------------------------------------------------------------------------- Vertex AI PredictionService
async def test_vertex_chat_completions_stream_is_the_http_stream_one_event_per_message(
    http: aiohttp.ClientSession,
) -> None:
    # Two identical pods: HTTP on one, gRPC on the other, so both answers start from an empty cache.
    async with serving(grpc_pod(), grpc_pod("127.0.0.3")) as (cluster, [_, channel]):
        body = {
            "model": "sim-model",
            "messages": [{"role": "user", "content": words(30)}],
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        status, raw = await http_json(http, cluster.urls[0] + "/v1/chat/completions", body)
        assert status == 200
        expected = sse_events(raw)

        call = vertex_grpc.PredictionServiceStub(channel).ChatCompletions(
            vertex_pb.ChatCompletionsRequest(endpoint="projects/p/endpoints/e", http_body=http_body(body))
        )
        messages = [message async for message in call]
        assert dict(await call.initial_metadata())["x-inference-pod"] == "sim-1"
        assert all(m.content_type == "text/event-stream" for m in messages)
        assert messages[-1].data == b"data: [DONE]\n\n"
        assert [event_json(m.data) for m in messages] == [event_json(e) for e in expected]
        usage = event_json(messages[-2].data)["usage"]
        assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] > 0


async def test_vertex_raw_predict_answers_the_http_json(http: aiohttp.ClientSession) -> None:
    async with serving(grpc_pod(), grpc_pod("127.0.0.3")) as (cluster, [_, channel]):
        stub = vertex_grpc.PredictionServiceStub(channel)
        bodies = {
            "/v1/completions": {"model": "sim-model", "prompt": words(20), "max_tokens": 3},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": words(20, "hi ")}], "max_tokens": 3},
        }
        for path, body in bodies.items():
            status, expected = await http_json(http, cluster.urls[0] + path, body)
            assert status == 200
            call = stub.RawPredict(vertex_pb.RawPredictRequest(http_body=http_body(body)))
            answer = await call
            assert dict(await call.initial_metadata())["x-inference-pod"] == "sim-1"
            assert answer.content_type == "application/json"
            assert normalized(json.loads(answer.data)) == normalized(expected), path

        # x-request-id metadata names the request, as the HTTP header does.
        named = await stub.RawPredict(
            vertex_pb.RawPredictRequest(http_body=http_body(bodies["/v1/completions"])),
            metadata=(("x-request-id", "vertex-7"),),
        )
        assert json.loads(named.data)["id"] == "vertex-7"

        # A streamed raw prediction: one HttpBody per event; RawPredict (unary) puts them all in one.
        body = {**bodies["/v1/completions"], "stream": True}
        request = vertex_pb.StreamRawPredictRequest(http_body=http_body(body))
        streamed = [m async for m in stub.StreamRawPredict(request)]
        assert [m.content_type for m in streamed] == ["text/event-stream"] * 4  # 3 tokens, then [DONE]
        assert streamed[-1].data == b"data: [DONE]\n\n"
        assert "".join(event_json(m.data)["choices"][0]["text"] for m in streamed[:-1])
        whole = await stub.RawPredict(vertex_pb.RawPredictRequest(http_body=http_body(body)))
        assert whole.content_type == "text/event-stream"
        assert [event_json(e) for e in sse_events(whole.data)] == [event_json(m.data) for m in streamed]

        bad: dict[str, Any]
        for bad in ({"input": "responses API"}, {"messages": []}):
            error = await grpc_error(stub.RawPredict(vertex_pb.RawPredictRequest(http_body=http_body(bad))))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details()
        not_json = httpbody_pb2.HttpBody(content_type="application/json", data=b"{nope")
        error = await grpc_error(stub.ChatCompletions(vertex_pb.ChatCompletionsRequest(http_body=not_json)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "Invalid JSON" in (error.details() or "")


# ---------------------------------------------------------------------------- lifecycle and configuration
async def test_kill_takes_the_grpc_face_down_and_revive_brings_it_back_on_the_same_port() -> None:
    async with serving(grpc_pod(inter_token_latency=200.0)) as (cluster, [channel]):
        victim = cluster.pods[0]
        port = victim.grpc_port
        assert port and victim.describe()["grpc_address"] == f"127.0.0.2:{port}"
        in_flight = pb_grpc.VllmEngineStub(channel).Generate(gen_request(PROMPT, max_tokens=500, stream=True))
        await in_flight.read()
        await victim.kill()
        assert await in_flight.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        stub = pb_grpc.VllmEngineStub(channel)
        error = await grpc_error(stub.HealthCheck(pb.HealthCheckRequest(), timeout=1.0))
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

        await victim.revive()
        assert victim.grpc_port == port
        victim.update_config({"inter_token_latency": 1.0})
        # A fresh channel with its own subchannel: the shared one backs off (about 1 s) after refused reconnects.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(victim.grpc_address, options=options) as fresh:
            answers, metadata = await generate(fresh, gen_request([1, 2, 3], max_tokens=2))
        assert metadata["x-inference-pod"] == "sim-0" and answers[-1].complete.completion_tokens == 2


async def test_a_taken_grpc_port_fails_the_start_and_releases_the_http_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))
        busy.listen()
        cluster = SimCluster([grpc_pod(grpc_port=busy.getsockname()[1])])
        with pytest.raises(OSError, match="gRPC: cannot listen"):
            await cluster.start()
    victim = cluster.pods[0]
    assert not victim.alive
    with socket.socket() as again:
        again.bind(("127.0.0.2", victim.port))  # the HTTP listener was closed


async def test_pods_without_grpc_port_have_no_grpc_face() -> None:
    async with running([pod()]) as cluster:
        assert cluster.pods[0].grpc_port is None and cluster.pods[0].grpc_address == ""
        assert " grpc=" not in cluster.pod_lines()[0]


def test_grpc_port_flag_and_pod_line() -> None:
    config = config_from_args(["--pods", "2", "--port", "8000", "--grpc-port", "9000"])
    assert config is not None and [p.grpc_port for p in config.pods] == [9000, 9000]
    single = config_from_args(["--port", "8000"])
    assert single is not None and single.pods[0].grpc_port is None
    with pytest.raises(ValueError, match="must differ"):
        config_from_args(["--port", "8000", "--grpc-port", "8000"])
    line = "epp-sim: pod p http=127.0.0.2:1 role=both kv-events=- replay=- topic=- grpc=127.0.0.2:2"
    info = parse_pod_line(line)
    assert info is not None and info.grpc_address == "127.0.0.2:2" and info.address == "127.0.0.2:1"
    plain = parse_pod_line(line.removesuffix(" grpc=127.0.0.2:2"))
    assert plain is not None and plain.grpc_address == ""


async def test_epp_sim_process_serves_grpc() -> None:
    with SimProcess(["--pods", "1", "--port", "0", "--grpc-port", "0", "--time-scale", "10"]) as process:
        [info] = process.pods
        assert info.grpc_address.startswith("127.0.0.2:")
        async with grpc.aio.insecure_channel(info.grpc_address) as channel:
            answers, metadata = await generate(channel, gen_request([1, 2, 3], max_tokens=3))
        assert metadata["x-inference-pod"] == info.name and answers[-1].complete.completion_tokens == 3
