"""BUFFERED_PARTIAL request mode: Envoy sends the body in one message, but only up to its buffer limit; a larger
body arrives cut (end_of_stream false, content-length larger than the bytes) and its rest goes upstream without
the processor. Such a request is routed on its headers (as one whose body is not read), with the routing answer
on the body message: a cut body is no JSON to parse, and a valid request must not be refused as invalid JSON."""

from __future__ import annotations

import json

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.observability.metrics import EppMetrics
from llmepp.server.stream import ExtProcStream, Pending, StreamContext
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, request_body, request_headers, set_headers

BUFFERED_PARTIAL = 3


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
