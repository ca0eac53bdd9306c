"""The ext_proc stream state machine against any message sequence (property-based): whatever Envoy sends,
in whatever order, every handler returns answers (never raises), and however the stream ends, every
routed request is released exactly once."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.director import RoutingDecision
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import InferenceRequest, ResponseInfo
from llmepp.server.stream import ExtProcStream, Pending, StreamContext
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import BUFFERED, FDS, STREAMED, header_map

NONE_MODE, BUFFERED_PARTIAL = 0, 3
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


class CountingDirector(FakeDirector):
    """Counts completions per request id (the fake's own double-completion check is swallowed by the
    stream's exception guard, so it could not fail a test)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.completed: Counter[str] = Counter()
        self.routed: Counter[str] = Counter()

    def _decide(self, request: InferenceRequest, subset: Any) -> RoutingDecision:
        decision = super()._decide(request, subset)
        self.routed[request.request_id] += 1
        return decision

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, decision: RoutingDecision) -> None:
        self.completed[request.request_id] += 1
        super().response_complete(request, response, decision)


modes = st.sampled_from([FDS, BUFFERED, STREAMED, NONE_MODE, BUFFERED_PARTIAL])
bodies = st.sampled_from(
    [
        b"",
        json.dumps({"model": "m", "prompt": "hello", "max_tokens": 3}).encode(),
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode(),
        b'{"model": ',
        b"\xff\xfe not json",
        b"x" * 300,
    ]
)
response_chunks = st.sampled_from(
    [
        b"",
        json.dumps({"id": "x", "usage": USAGE}).encode(),
        b'data: {"choices": [{"text": "a"}]}\n\n',
        b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\ndata: [DONE]\n\n",
        b"\x00\x01garbage",
    ]
)


@st.composite
def request_headers(draw: st.DrawFn) -> pb.ProcessingRequest:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/models"]))
    headers = {":method": draw(st.sampled_from(["POST", "GET"])), ":path": path}
    extra = draw(
        st.sampled_from(
            [{}, {"content-length": "12"}, {"x-test-error": "429:rejected-saturated"}, {"x-test-delay-ms": "1"},
             {"x-test-crash": "1"}, {"x-request-id": "client-id"}]
        )
    )  # fmt: skip
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=header_map({**headers, **extra}), end_of_stream=draw(st.booleans()))
    )
    if draw(st.booleans()):
        msg.protocol_config.request_body_mode = draw(modes)
        msg.protocol_config.response_body_mode = draw(modes)
    return msg


@st.composite
def response_headers(draw: st.DrawFn) -> pb.ProcessingRequest:
    status = draw(st.sampled_from(["200", "429", "500", "not-a-status"]))
    ctype = draw(st.sampled_from(["application/json", "text/event-stream"]))
    headers = header_map({":status": status, "content-type": ctype})
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers, end_of_stream=draw(st.booleans())))


def _body(field: str, chunks: st.SearchStrategy[bytes]) -> st.SearchStrategy[pb.ProcessingRequest]:
    return st.builds(
        lambda b, e: pb.ProcessingRequest(**{field: pb.HttpBody(body=b, end_of_stream=e)}), chunks, st.booleans()
    )


messages = st.one_of(
    request_headers(),
    _body("request_body", bodies),
    st.just(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())),
    response_headers(),
    _body("response_body", response_chunks),
    st.just(pb.ProcessingRequest(response_trailers=pb.HttpTrailers())),
    st.just(pb.ProcessingRequest()),  # no message at all: a newer Envoy's, or garbage
)


def _answers(out: Any) -> list[Any]:
    if out is None:
        return []
    return out if isinstance(out, list) else [out]


async def _drive(msgs: list[pb.ProcessingRequest], out_of_band: bool, evict_at: int) -> CountingDirector:
    director = CountingDirector(["10.0.0.1:8000", "10.0.0.2:8000"])
    ctx = StreamContext(director, EppMetrics(), Settings(max_body_bytes=256), out_of_band=out_of_band)
    pushed: list[Any] = []
    stream = ExtProcStream(ctx, pushed.append if out_of_band else None)
    for i, msg in enumerate(msgs):
        out = stream.handle(msg.WhichOneof("request"), msg)  # must not raise, whatever the message
        if isinstance(out, Pending):
            out = await out.coro
        for answer in _answers(out):
            assert isinstance(answer, bytes | pb.ProcessingResponse), answer
        if i == evict_at and stream.request is not None and stream.request.evict is not None:
            stream.request.evict()
        if stream.closed:
            break
    stream.finish()
    await asyncio.sleep(0)  # completions queued right after a final answer
    return director


@settings(max_examples=400, deadline=None)
@given(st.lists(messages, max_size=10), st.booleans(), st.integers(min_value=0, max_value=10))
def test_any_message_sequence_is_answered_and_every_routed_request_released_once(
    msgs: list[pb.ProcessingRequest], out_of_band: bool, evict_at: int
) -> None:
    director = asyncio.run(_drive(msgs, out_of_band, evict_at))
    assert director.inflight == {}
    for rid, n in director.routed.items():
        assert director.completed[rid] == n, (rid, n, director.completed[rid])


def test_a_response_body_after_the_stream_completed_without_headers_is_answered() -> None:
    # complete() (a reset, an eviction) leaves a ResponseInfo without response headers; a body arriving after
    # that raised AttributeError on the missing usage collector (found by the h2 any-input property test).
    from llmepp.request.types import TerminationCause

    ctx = StreamContext(CountingDirector(["10.0.0.1:8000"]), EppMetrics(), Settings())
    stream = ExtProcStream(ctx)
    stream.complete(TerminationCause.CLIENT_DISCONNECT)
    msg = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"late", end_of_stream=True))
    out = stream.handle("response_body", msg)
    assert isinstance(out, bytes | pb.ProcessingResponse)
