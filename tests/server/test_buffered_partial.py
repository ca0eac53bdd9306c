"""BUFFERED and BUFFERED_PARTIAL request modes. BUFFERED_PARTIAL: Envoy sends the body in one message, but only up
to its buffer limit; a larger body arrives cut (end_of_stream false, content-length larger than the bytes, or no
content-length) and its rest goes upstream without the processor. Such a request is routed on its headers (as one
whose body is not read), with the routing answer on the body message: a cut body is no JSON to parse, and a valid
request must not be refused as invalid JSON. Both modes route a request without a body (trailers only) on the
trailers answer, so the client's routing and control headers are removed on the headers answer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.observability.metrics import EppMetrics
from llmepp.server.stream import ExtProcStream, Pending, StreamContext
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import BUFFERED, ENDPOINTS, request_body, request_headers, request_trailers, set_headers

BUFFERED_PARTIAL = 3
DESTINATION = "x-gateway-destination-endpoint"


def _stream() -> ExtProcStream:
    return ExtProcStream(StreamContext(FakeDirector(list(ENDPOINTS)), EppMetrics(), Settings()))


async def _answers(stream: ExtProcStream, msg: pb.ProcessingRequest) -> list[Any]:
    out = stream.handle(msg.WhichOneof("request"), msg)
    if isinstance(out, Pending):
        out = await out.coro
    items = [] if out is None else out if isinstance(out, list) else [out]
    return [pb.ProcessingResponse.FromString(a) if isinstance(a, bytes) else a for a in items]


async def test_a_body_cut_at_the_buffer_limit_is_not_called_invalid_json() -> None:
    body = json.dumps({"model": "m", "prompt": "x" * 200_000}).encode()
    limit = 64 * 1024  # Envoy's per-connection buffer limit (1 MiB by default; any limit below the body)
    ctx = StreamContext(FakeDirector(list(ENDPOINTS)), EppMetrics(), Settings())
    stream = ExtProcStream(ctx)
    hdr = request_headers({"content-length": str(len(body))}, req_mode=BUFFERED_PARTIAL)
    stream.handle("request_headers", hdr)  # answered CONTINUE at once (as BUFFERED)
    out = stream.handle("request_body", request_body(body[:limit], eos=False))
    if isinstance(out, Pending):
        out = await out.coro
    assert out is not None and not isinstance(out, list)
    answer = pb.ProcessingResponse.FromString(out) if isinstance(out, bytes) else out
    if answer.WhichOneof("response") == "immediate_response":
        ir = answer.immediate_response
        assert ir.status.code != 400, f"a valid {len(body)}-byte request refused: {ir.body.decode()}"
    # Routed: the mutation rides on the answer to this body message (as in BUFFERED mode).
    assert answer.WhichOneof("response") == "request_body", answer
    assert "x-gateway-destination-endpoint" in set_headers(answer.request_body.response)


async def test_a_cut_body_without_content_length_is_routed_on_its_headers() -> None:
    """A chunked HTTP/1.1 upload or an HTTP/2 client sends no content-length: the cut body was parsed and the
    valid request refused 400 "invalid JSON". Without a length, a body Envoy did not end that does not parse
    is taken as cut."""
    body = json.dumps({"model": "m", "prompt": "x" * 200_000}).encode()
    stream = _stream()
    await _answers(stream, request_headers(req_mode=BUFFERED_PARTIAL))
    (answer,) = await _answers(stream, request_body(body[: 64 * 1024], eos=False))
    assert answer.WhichOneof("response") == "request_body", answer
    assert DESTINATION in set_headers(answer.request_body.response)


@pytest.mark.parametrize("mode", [BUFFERED, BUFFERED_PARTIAL])
async def test_a_clients_routing_and_control_headers_go_when_trailers_come_without_a_body(mode: int) -> None:
    """Buffered modes answer the headers with CONTINUE and set the routing header on the body answer. A request
    with trailers and no body is routed on the trailers answer (envoy.lb metadata only), which cannot change
    the headers: the client's own x-gateway-destination-endpoint reached Envoy's ORIGINAL_DST cluster, which
    routes by it, and its control headers went upstream."""
    stream = _stream()
    sent = {DESTINATION: "169.254.169.254:80", "x-gateway-inference-objective": "premium"}
    answers = await _answers(stream, request_headers(sent, path="/passthrough", req_mode=mode))
    answers += await _answers(stream, request_trailers())
    assert stream.decision is not None
    headers_answer = answers[0]
    assert headers_answer.WhichOneof("response") == "request_headers"
    assert set(headers_answer.request_headers.response.header_mutation.remove_headers) == set(sent)
    assert answers[-1].WhichOneof("response") == "request_trailers"
    lb = answers[-1].dynamic_metadata.fields["envoy.lb"].struct_value
    assert lb.fields[DESTINATION].string_value in ENDPOINTS
