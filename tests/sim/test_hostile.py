"""A hostile client: undecodable and oversized bodies, wrong routes, bad template inputs, lax scalars. Every
answer is a status with a JSON error in the OpenAI shape (as vLLM's), never a plain-text 500."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiohttp
import grpc
import pytest
from google.api import httpbody_pb2
from helpers import on_a_punctual_loop

from llmepp.protocols import vertexai_prediction_pb2 as vertex_pb
from llmepp.protocols import vertexai_prediction_pb2_grpc as vertex_grpc
from llmepp_sim.clock import SimClock
from llmepp_sim.config import SimConfig
from llmepp_sim.server import MAX_BODY_BYTES

from .simkit import pod, running, sample, scrape
from .test_api import CHATML, assert_vllm_error
from .test_grpc import grpc_pod, serving

DEEP = b"[" * 100_000 + b"]" * 100_000


async def post(http: aiohttp.ClientSession, url: str, raw: bytes) -> tuple[int, str, Any]:
    async with http.post(url, data=raw, headers={"Content-Type": "application/json"}) as response:
        return response.status, response.content_type, await response.read()


async def test_undecodable_bodies_are_a_json_400(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/admin/config"):
            for raw in (DEEP, b'{"prompt": "\xff"}', b"\xef\xbb\xbf{}"):
                status, content_type, body = await post(http, url + path, raw)
                assert (status, content_type) == (400, "application/json"), (path, raw[:20], body[:200])
                assert_vllm_error(json.loads(body), 400, "BadRequestError")


async def test_long_headers_up_to_envoys_limit_are_served(http: aiohttp.ClientSession) -> None:
    """Envoy passes request headers up to 60 KiB in all; aiohttp's defaults refused any line over 8,190 bytes
    with a plain-text 400 (and a traceback per request)."""
    async with running([pod()]) as cluster:
        body = json.dumps({"model": "sim-model", "prompt": "hi", "max_tokens": 1}).encode()
        for size in (9_000, 50_000):
            headers = {"Content-Type": "application/json", "x-long": "a" * size}
            async with http.post(cluster.urls[0] + "/v1/completions", data=body, headers=headers) as response:
                assert response.status == 200, (size, await response.text())


async def test_undecodable_vertex_bodies_are_invalid_argument() -> None:
    async with serving(grpc_pod()) as (_, [channel]):
        stub = vertex_grpc.PredictionServiceStub(channel)
        for raw in (DEEP, b'{"prompt": "\xff"}'):
            request = vertex_pb.RawPredictRequest(http_body=httpbody_pb2.HttpBody(data=raw))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RawPredict(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


async def test_http_level_refusals_use_the_openai_error_shape(http: aiohttp.ClientSession) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        oversized = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
        status, content_type, body = await post(http, url + "/v1/completions", oversized)
        assert (status, content_type) == (413, "application/json")
        assert_vllm_error(json.loads(body), 413, "BadRequestError")
        status, content_type, body = await post(http, url + "/v1/no-such-route", b"{}")
        assert (status, content_type) == (404, "application/json")
        assert_vllm_error(json.loads(body), 404, "NotFoundError")
        async with http.get(url + "/v1/completions") as response:
            assert (response.status, response.content_type) == (405, "application/json")
            assert "POST" in response.headers["Allow"]
            assert_vllm_error(await response.json(), 405, "BadRequestError")
        # The pod still serves.
        status, _, body = await post(http, url + "/v1/completions", b'{"prompt": "hi", "max_tokens": 1}')
        assert status == 200, body


async def test_an_unexpected_failure_is_a_json_500_and_frees_nothing_it_did_not_take(
    http: aiohttp.ClientSession,
) -> None:
    async with running([pod()]) as cluster:
        sim = cluster.pods[0]

        async def broken(prompt: object) -> list[int]:
            raise RuntimeError("tokenizer blew up")

        sim.tokenizer = type(sim.tokenizer).__new__(type(sim.tokenizer))
        sim.tokenizer.vocab_size = 4096
        sim.tokenizer.encode_prompt = broken  # type: ignore[method-assign]
        status, content_type, body = await post(http, cluster.urls[0] + "/v1/completions", b'{"prompt": "hi"}')
        assert (status, content_type) == (500, "application/json"), body
        assert_vllm_error(json.loads(body), 500, "InternalServerError")
        assert not sim.engine.running and not sim.engine.waiting


async def test_wrongly_typed_chat_template_inputs_are_a_400(http: aiohttp.ClientSession) -> None:
    async with running([pod(chat_template=str(CHATML))]) as cluster:
        url = cluster.urls[0]
        messages = [{"role": "user", "content": "hi"}]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
            ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
            ({"tools": 5}, "tools"),
        ]
        for extra, param in cases:
            for path in ("/v1/chat/completions", "/tokenize"):
                raw = json.dumps({"messages": messages, "max_tokens": 1, **extra}).encode()
                if path == "/tokenize":
                    raw = json.dumps({"messages": messages, **extra}).encode()
                status, content_type, body = await post(http, url + path, raw)
                assert (status, content_type) == (400, "application/json"), (path, extra, body[:200])
                error = json.loads(body)
                assert_vllm_error(error, 400, "BadRequestError")
                assert error["error"]["param"] == param, error
        # A template that fails at render time on what the client sent is the client's error too.
        bad_tool_calls = [*messages, {"role": "assistant", "content": "a", "tool_calls": 5}, *messages]
        raw = json.dumps({"messages": bad_tool_calls, "max_tokens": 1}).encode()
        status, content_type, body = await post(http, url + "/v1/chat/completions", raw)
        assert (status, content_type) == (400, "application/json"), body[:300]
        assert not cluster.pods[0].engine.running and not cluster.pods[0].engine.waiting


async def stream_lines(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    async with http.post(url + "/v1/completions", json=body) as response:
        raw = await response.read()
        return response.status, [line for line in raw.decode().split("\n") if line]


async def test_stream_options_include_usage_is_read_as_vllms_pydantic_model_reads_it(
    http: aiohttp.ClientSession,
) -> None:
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        base = {"prompt": "hi", "max_tokens": 2, "stream": True}
        # vLLM's StreamOptions: include_usage is a lax bool that defaults to true.
        for options, usage in (({"include_usage": "false"}, False), ({"include_usage": 0}, False),
                               ({"include_usage": None}, False), ({"include_usage": "true"}, True),
                               ({}, True)):  # fmt: skip
            status, lines = await stream_lines(http, url, {**base, "stream_options": options})
            assert status == 200, lines
            assert any('"usage"' in line for line in lines) is usage, (options, lines)
            assert lines[-1] == "data: [DONE]"
        status, content_type, body = await post(
            http, url + "/v1/completions", json.dumps({**base, "stream_options": {"include_usage": "maybe"}}).encode()
        )
        assert (status, content_type) == (400, "application/json")
        assert json.loads(body)["error"]["param"] == "stream_options.include_usage"


async def test_raising_max_num_seqs_at_runtime_admits_the_waiting_requests_at_once(
    http: aiohttp.ClientSession,
) -> None:
    # Real time: a decode step is 3 s, so no engine event happens while the patch should take effect.
    async with running(
        [pod(max_num_seqs=1, inter_token_latency=3000.0, prefill_overhead=1.0)], time_scale=1.0
    ) as cluster:
        url, engine = cluster.urls[0], cluster.pods[0].engine
        body = {"prompt": "hi", "max_tokens": 3}
        tasks = [asyncio.ensure_future(post(http, url + "/v1/completions", json.dumps(body).encode())) for _ in (0, 1)]
        for _ in range(100):
            if len(engine.running) == 1 and len(engine.waiting) == 1:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the running request is in its first decode step
        assert (len(engine.running), len(engine.waiting)) == (1, 1)
        async with http.post(url + "/admin/config", json={"max_num_seqs": 2}) as response:
            assert response.status == 200
        await asyncio.sleep(0.3)
        assert (len(engine.running), len(engine.waiting)) == (2, 0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_non_finite_runtime_knobs_are_refused(http: aiohttp.ClientSession) -> None:
    # A NaN step time made the engine loop spin without ever awaiting: every pod of the process froze.
    async with running([pod()]) as cluster:
        url = cluster.urls[0]
        for key in ("inter_token_latency", "prefill_overhead", "time_factor_under_load", "metrics_delay"):
            for value in ("nan", "inf", "Infinity"):
                async with http.post(url + "/admin/config", json={key: value}) as response:
                    assert response.status == 400, (key, value, await response.text())
                    assert_vllm_error(await response.json(), 400, "BadRequestError")
        result = await asyncio.wait_for(post(http, url + "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}'), 5)
        assert result[0] == 200


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -1.0])
def test_a_non_finite_or_non_positive_time_scale_is_refused(scale: float) -> None:
    with pytest.raises(ValueError, match="time_scale"):
        SimClock(scale)
    with pytest.raises(ValueError, match="time_scale"):
        SimConfig(time_scale=scale).validate()


async def test_clients_leaving_at_every_stage_give_back_every_seat_and_block(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        # One seat, a 2 s overhead: the first request sits in its prefill while the second is queued.
        config = pod(max_num_seqs=1, prefill_overhead=2000.0, inter_token_latency=200.0, kv_cache_size=64)
        async with running([config], time_scale=1.0) as cluster:
            url, engine = cluster.urls[0], cluster.pods[0].engine
            prompt = "cache request server model token prefix queue batch " * 5

            async def read(path: str, body: dict[str, Any], lines: int | None = None) -> None:
                async with http.post(url + path, json=body) as response:
                    if lines is None:
                        await response.read()
                        return
                    async for _ in response.content:
                        lines -= 1
                        if lines <= 0:
                            return  # leaving mid-stream closes the connection

            async def idle() -> bool:
                for _ in range(100):
                    if not engine.running and not engine.waiting and engine.pool.num_free == engine.pool.num_blocks:
                        return True
                    await asyncio.sleep(0.01)
                return False

            prefilling = asyncio.ensure_future(read("/v1/completions", {"prompt": prompt, "max_tokens": 50}))
            queued = asyncio.ensure_future(
                read("/v1/completions", {"prompt": prompt, "max_tokens": 50, "stream": True})
            )
            await asyncio.sleep(0.5)
            assert (len(engine.running), len(engine.waiting)) == (
                1,
                1,
            ) and engine.pool.num_free < engine.pool.num_blocks
            prefilling.cancel()
            queued.cancel()
            await asyncio.gather(prefilling, queued, return_exceptions=True)
            assert await idle()
            cluster.pods[0].update_config({"prefill_overhead": 1.0})
            decoding = [
                ("/v1/completions", {"prompt": prompt, "max_tokens": 50, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 50,
                                          "stream": True}),
                ("/v1/messages", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 50, "stream": True}),
                ("/inference/v1/generate", {"token_ids": list(range(100, 180)), "sampling_params": {"max_tokens": 50},
                                            "stream": True}),
            ]  # fmt: skip
            for path, body in decoding:
                await asyncio.wait_for(read(path, body, lines=4), 5)
                assert await idle(), path
            families = await scrape(http, url)
            assert sample(families, "vllm:num_requests_running") == 0
            assert sample(families, "vllm:num_requests_waiting") == 0
            assert sample(families, "vllm:kv_cache_usage_perc") == 0
            assert sample(families, "vllm:request_success", finished_reason="abort") == 6

    await on_a_punctual_loop(measure)


async def test_a_stream_the_engine_aborts_ends_with_an_error_event(http: aiohttp.ClientSession) -> None:
    """A failed engine step aborts what is in flight: a stream already answered 200 says so in its body (vLLM's
    stream generators send the error, then `[DONE]`), so a router cannot count the cut answer as a success."""
    config = pod(inter_token_latency=200.0)
    prompt = "cache request server model token prefix queue batch"
    streams = [
        ("/v1/completions", {"prompt": prompt, "max_tokens": 50, "stream": True}, b"data: [DONE]\n\n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 50, "stream": True},
         b"data: [DONE]\n\n"),
        ("/inference/v1/generate", {"token_ids": list(range(100, 140)), "sampling_params": {"max_tokens": 50},
                                    "stream": True}, b"data: [DONE]\n\n"),
        ("/v1/messages", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 50, "stream": True}, b""),
    ]  # fmt: skip
    async with running([config], time_scale=1.0) as cluster:
        url, engine = cluster.urls[0], cluster.pods[0].engine
        for path, body, last in streams:
            async with http.post(url + path, json=body) as response:
                assert response.status == 200
                await response.content.readline()  # under way
                engine.abort_all()
                text = await asyncio.wait_for(response.read(), 5)
            events = [e for e in text.split(b"\n\n") if e]
            tail = events[-2] if last else events[-1]
            error = json.loads(tail.split(b"data: ", 1)[1])
            if path == "/v1/messages":
                assert tail.startswith(b"event: error\n") and error["type"] == "error"
                assert error["error"]["type"] == "ServiceUnavailableError", error
            else:
                assert_vllm_error(error, 503, "ServiceUnavailableError")
                assert text.endswith(last), text[-200:]
