"""A Responses-API `function_call_output` whose parts carry a `type` that is not a string (a list, an object)
is the client's malformed input: the parser skips such a part (never a TypeError out of it),
and the stream never answers it as the EPP's own failure (500)."""

from __future__ import annotations

import json

import pytest

from llmepp.observability.metrics import EppMetrics
from llmepp.request.parsers import parse_request
from llmepp.server.stream import ExtProcStream, Pending, StreamContext
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, request_body, request_headers

BAD_TYPES = [["text"], {"a": 1}]


def _body(part_type: object) -> bytes:
    item = {"type": "function_call_output", "call_id": "c", "output": [{"type": part_type, "text": "x"}]}
    return json.dumps({"model": "m", "input": [item]}).encode()


@pytest.mark.parametrize("part_type", BAD_TYPES, ids=["list", "object"])
def test_the_parser_skips_the_part(part_type: object) -> None:
    req = parse_request({":path": "/v1/responses"}, _body(part_type), request_id="r")
    assert req.model == "m"


@pytest.mark.parametrize("part_type", BAD_TYPES, ids=["list", "object"])
async def test_the_stream_does_not_answer_500(part_type: object) -> None:
    stream = ExtProcStream(StreamContext(FakeDirector(list(ENDPOINTS)), EppMetrics(), Settings()))
    assert stream.handle("request_headers", request_headers(path="/v1/responses")) is None
    msg = request_body(_body(part_type), eos=True)
    try:  # as both transports: an exception from the handler or the routing step goes to fallback()
        out = stream.handle("request_body", msg)
        if isinstance(out, Pending):
            out = await out.coro
    except Exception:
        out = stream.fallback(msg)
    for answer in out if isinstance(out, list) else [out]:
        assert answer is not None
        if not isinstance(answer, bytes) and answer.WhichOneof("response") == "immediate_response":
            assert answer.immediate_response.status.code < 500, answer.immediate_response.body
