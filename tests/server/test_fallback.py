"""`fallback()`: a bug while handling one message still gets that message a safe answer. Past routing, a
request body chunk must still go upstream, or Envoy waits for it until its message timeout."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.observability.metrics import EppMetrics
from llmepp.server.stream import ExtProcStream, Pending, StreamContext
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, FDS, STREAMED, request_body, request_headers, streamed


async def _answers(stream: ExtProcStream, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
    try:  # as both transports do
        out: Any = stream.handle(msg.WhichOneof("request"), msg)
        if isinstance(out, Pending):
            out = await out.coro
    except Exception:
        out = stream.fallback(msg)
    items = [] if out is None else out if isinstance(out, list) else [out]
    return [pb.ProcessingResponse.FromString(a) if isinstance(a, bytes) else a for a in items]


def _raise(self: ExtProcStream, msg: pb.ProcessingRequest) -> None:
    raise RuntimeError("bug")


async def _routed_on_headers(mode: int) -> ExtProcStream:
    stream = ExtProcStream(StreamContext(FakeDirector(list(ENDPOINTS)), EppMetrics(), Settings()))
    first = await _answers(stream, request_headers(path="/v1/unread", req_mode=mode))  # passthrough: not read
    assert [a.WhichOneof("response") for a in first] == ["request_headers"]
    return stream


@pytest.mark.parametrize("eos", [False, True])
async def test_a_streamed_chunk_is_echoed_when_its_handling_fails(monkeypatch: pytest.MonkeyPatch, eos: bool) -> None:
    stream = await _routed_on_headers(FDS)
    monkeypatch.setattr(ExtProcStream, "on_request_body", _raise)
    (answer,) = await _answers(stream, request_body(b"chunk", eos=eos))
    assert streamed(answer, "request_body") == (b"chunk", eos)


async def test_a_streamed_mode_chunk_continues_when_its_handling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = await _routed_on_headers(STREAMED)
    monkeypatch.setattr(ExtProcStream, "on_request_body", _raise)
    (answer,) = await _answers(stream, request_body(b"chunk", eos=True))
    assert answer.WhichOneof("response") == "request_body"
    assert not answer.request_body.response.HasField("body_mutation")
