"""Skip response processing (reference §1.1): a parser may mark a request `skip_response_processing`
(anthropic-parser's `messages/count_tokens`). Once the routing
answers are out, the EPP ends the ext_proc stream with OK, so Envoy calls it no more for the response;
the request completes (naturally) as the stream closes, releasing everything it held."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from helpers import endpoint

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.director import Director
from llmepp.framework.plugin import registry
from llmepp.observability.metrics import EppMetrics
from llmepp.protocols import vertexai_prediction_pb2 as vx
from llmepp.request import grpcwire
from llmepp.request.parsers import RequestParsers, parse_request
from llmepp.request.types import TerminationCause
from llmepp.settings import Settings

from .client import (
    BUFFERED,
    TRANSPORT,
    Stream,
    request_body,
    request_headers,
    request_trailers,
    serve,
    set_headers,
    streamed,
)

COUNT_TOKENS = "/v1/messages/count_tokens"
MESSAGES_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
RAW = "/google.cloud.aiplatform.v1.PredictionService/RawPredict"
CHAT = "/google.cloud.aiplatform.v1.PredictionService/ChatCompletions"
GRPC = {"content-type": "application/grpc", "te": "trailers"}
LABELS = {"model_name": "", "target_model_name": "", "fairness_id": "default-flow", "priority": "0"}


@pytest.fixture(params=["grpc", "h2"])
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    token = TRANSPORT.set(request.param)
    yield request.param
    TRANSPORT.reset(token)


def vertex(body: dict[str, Any] | bytes) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    http = httpbody_pb2.HttpBody(content_type="application/json", data=data)
    return grpcwire.frame(vx.ChatCompletionsRequest(endpoint="e", http_body=http).SerializeToString())


def vertex_table() -> RequestParsers:
    types = ("vertexai-parser", "openai-parser", "passthrough-parser")
    return RequestParsers([registry.build(t, t, None) for t in types])  # type: ignore[misc]


async def wait_until(cond: Any, within: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def ends_cleanly(s: Stream) -> None:
    """The EPP ends the stream by itself (Envoy never half-closes it), with gRPC status OK."""
    await s.recv_eof()
    assert await s.status() == grpc.StatusCode.OK


# -- parsers ---------------------------------------------------------------------------------------------
def test_count_tokens_skips_response_processing_and_messages_does_not() -> None:
    count = parse_request({":path": COUNT_TOKENS}, MESSAGES_BODY, request_id="r")
    assert count.skip_response_processing
    messages = parse_request({":path": "/v1/messages"}, MESSAGES_BODY, request_id="r")
    assert not messages.skip_response_processing
    completions = parse_request({":path": "/v1/completions"}, b'{"model":"m","prompt":"x"}', request_id="r")
    assert not completions.skip_response_processing


def test_a_vertex_prediction_keeps_its_response_processing_custom_or_not() -> None:
    """Unlike count_tokens, a custom prediction is a generation that may run for minutes: its endpoint's
    in-flight load and its flow-control slot must last until the answer ends, so its response is still seen."""
    table = vertex_table()
    custom = table.parse({":path": RAW, **GRPC}, vertex({"instances": [1, 2]}), request_id="r")
    assert not custom.skip_response_processing
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for path in (RAW, CHAT):
        assert not table.parse({":path": path, **GRPC}, vertex(chat), request_id="r").skip_response_processing


# -- through the ext_proc stream -------------------------------------------------------------------------
async def test_count_tokens_ends_the_stream_after_routing_and_completes_naturally(transport: str) -> None:
    async with serve(settings=Settings(grpc_stream_metrics=True)) as h:
        s = h.open()
        answers = await s.route(MESSAGES_BODY, path=COUNT_TOKENS)
        assert answers[0].WhichOneof("response") == "request_headers"
        assert set_headers(answers[0].request_headers.response)["x-gateway-destination-endpoint"]
        assert b"".join(streamed(a, "request_body")[0] for a in answers[1:]) == MESSAGES_BODY
        await ends_cleanly(s)
        await wait_until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 0)
        (c,) = h.director.completions
        assert c.response.cause is TerminationCause.NATURAL
        assert h.director.inflight == {} and h.director.response_headers_calls == []
        assert h.sample("llm_d_epp_request_running", LABELS) == 0
        assert h.sample("llm_d_epp_request_total", LABELS) == 1
        assert h.sample("llm_d_epp_request_error_total", {**LABELS, "error_code": "ModelServerError"}) == 0
        await wait_until(lambda: h.sample("llm_d_epp_extproc_streams_total", {"code": "OK"}) == 1)
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "Canceled"}) == 0


async def test_a_messages_request_keeps_its_stream_open_for_the_response(transport: str) -> None:
    async with serve() as h:
        s = h.open()
        await s.route(MESSAGES_BODY, path="/v1/messages")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(s.call.read()), 0.2)
        assert h.director.completions == [] and len(h.director.inflight) == 1


async def test_count_tokens_with_request_trailers_answers_them_before_ending(transport: str) -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(path=COUNT_TOKENS), request_body(MESSAGES_BODY), request_trailers())
        assert (await s.recv()).WhichOneof("response") == "request_headers"
        assert streamed(await s.recv(), "request_body") == (MESSAGES_BODY, False)
        assert (await s.recv()).WhichOneof("response") == "request_trailers"
        await ends_cleanly(s)
        await wait_until(lambda: len(h.director.completions) == 1)
        assert h.director.completions[0].response.cause is TerminationCause.NATURAL
        assert h.director.inflight == {}


async def test_count_tokens_in_buffered_mode_ends_after_the_body_answer(transport: str) -> None:
    async with serve() as h:
        s = h.open()
        await s.send(request_headers(path=COUNT_TOKENS, req_mode=BUFFERED), request_body(MESSAGES_BODY, eos=True))
        assert (await s.recv()).WhichOneof("response") == "request_headers"  # BUFFERED: empty headers answer
        routed = await s.recv()
        assert set_headers(routed.request_body.response)["x-gateway-destination-endpoint"]
        await ends_cleanly(s)
        await wait_until(lambda: len(h.director.completions) == 1)
        assert h.director.inflight == {}


async def test_a_refused_count_tokens_request_is_answered_as_any_other(transport: str) -> None:
    async with serve() as h:
        s = h.open()
        (answer,) = await s.route(MESSAGES_BODY, {"x-test-error": "429"}, path=COUNT_TOKENS)
        assert answer.immediate_response.status.code == 429
        await ends_cleanly(s)
        assert h.director.completions == [] and h.director.inflight == {}


async def test_the_real_directors_in_flight_load_returns_to_zero(transport: str) -> None:
    config = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: inflight-load-producer
"""
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    components = build(load_config(config), datastore=ds, metrics=metrics)
    director = Director(ds, components.pipeline, metrics)
    async with serve(director) as h:  # type: ignore[arg-type]
        s = h.open()
        await s.route(MESSAGES_BODY, path=COUNT_TOKENS)
        await ends_cleanly(s)
        await wait_until(lambda: h.sample("llm_d_epp_extproc_streams_inflight") == 0)
        ep = ds.endpoints[0]
        assert (ep.inflight.requests, ep.inflight.tokens) == (0, 0)
        assert h.sample("llm_d_epp_request_running", LABELS) == 0
        assert h.sample("llm_d_epp_request_total", LABELS) == 1
