"""gRPC APIs: message framing, vllmgrpc-parser and vertexai-parser, their usage readers, and gRPC status
answers through the ext_proc stream."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.errors import BadRequest, PreconditionFailed, RequestError
from llmepp.framework.plugin import registry
from llmepp.protocols import vertexai_prediction_pb2 as vx
from llmepp.protocols import vllm_engine_pb2 as vl
from llmepp.request import grpcwire
from llmepp.request.parsers import RequestParsers
from llmepp.request.types import RequestKind

from .client import TRANSPORT, request_body, request_headers, response_body, response_headers, response_trailers, serve

GRPC = {"content-type": "application/grpc", "te": "trailers"}
GENERATE = "/vllm.grpc.engine.VllmEngine/Generate"
EMBED = "/vllm.grpc.engine.VllmEngine/Embed"
CHAT = "/google.cloud.aiplatform.v1.PredictionService/ChatCompletions"
RAW = "/google.cloud.aiplatform.v1.PredictionService/RawPredict"


# The request series' labels of a request without model, fairness id or priority (the reference's defaults).
UNPARSED = {"model_name": "", "target_model_name": "", "fairness_id": "default-flow", "priority": "0"}


def table() -> RequestParsers:
    types = ("vllmgrpc-parser", "vertexai-parser", "openai-parser", "passthrough-parser")
    return RequestParsers([registry.build(t, t, None) for t in types])  # type: ignore[misc]


def parse(path: str, body: bytes, **headers: str) -> Any:
    return table().parse({":path": path, **GRPC, **headers}, body, request_id="r")


def generate(**kw: Any) -> bytes:
    return grpcwire.frame(vl.GenerateRequest(request_id="g", **kw).SerializeToString())


def vertex(body: dict[str, Any] | bytes, endpoint: str = "projects/p/locations/l/endpoints/e") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    http = httpbody_pb2.HttpBody(content_type="application/json", data=data)
    return grpcwire.frame(vx.ChatCompletionsRequest(endpoint=endpoint, http_body=http).SerializeToString())


# -- framing -----------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6), st.lists(st.integers(1, 40), max_size=30))
def test_frames_survive_any_split(payloads: list[bytes], cuts: list[int]) -> None:
    body = b"".join(grpcwire.frame(p) for p in payloads)
    assert grpcwire.messages(body) == payloads
    reader = grpcwire.MessageReader()
    got: list[bytes] = []
    pos = 0
    for cut in cuts:
        got += reader.feed(body[pos : pos + cut])
        pos += cut
    got += reader.feed(body[pos:])
    assert got == payloads and not reader.broken


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["identity", "gzip", "deflate"]))
def test_any_bytes_are_messages_or_a_bad_request(body: bytes, encoding: str) -> None:
    try:
        grpcwire.messages(body, encoding)
    except BadRequest as e:
        assert e.status == 400 and "gRPC" in e.message
    grpcwire.MessageReader(encoding).feed(body)  # never raises


def test_compressed_messages() -> None:
    payload = b"hello" * 50
    gz = gzip.compress(payload)
    body = b"\x01" + len(gz).to_bytes(4, "big") + gz
    assert grpcwire.messages(body, "gzip") == [payload]
    with pytest.raises(BadRequest, match="unsupported grpc-encoding 'snappy'"):
        grpcwire.messages(body, "snappy")
    with pytest.raises(BadRequest, match="does not decompress"):
        grpcwire.messages(b"\x01\x00\x00\x00\x03abc", "gzip")
    reader = grpcwire.MessageReader("snappy")
    assert reader.feed(body) == [] and "snappy" in reader.broken


def gzip_frame(payload: bytes) -> bytes:
    gz = gzip.compress(payload)
    return b"\x01" + len(gz).to_bytes(4, "big") + gz


def test_a_compressed_message_may_not_expand_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A gzip bomb: ~1 KB on the wire, 1 MB once decompressed (1,000x; 16 MiB would be 16 GiB).
    monkeypatch.setattr(grpcwire, "MAX_MESSAGE_BYTES", 4096)
    assert grpcwire.messages(gzip_frame(b"\0" * 4096), "gzip") == [b"\0" * 4096]
    bomb = gzip_frame(b"\0" * (1 << 20))
    assert len(bomb) < 2048
    with pytest.raises(BadRequest, match="gRPC message decompresses to more than 4096 bytes") as e:
        grpcwire.unary_message(bomb, "gzip", "Generate")
    assert e.value.status == 400
    deflated = zlib.compress(b"\0" * (1 << 20))
    with pytest.raises(BadRequest, match="decompresses to more than 4096 bytes"):
        grpcwire.messages(b"\x01" + len(deflated).to_bytes(4, "big") + deflated, "deflate")
    reader = grpcwire.MessageReader("gzip", max_bytes=4096)
    assert reader.feed(gzip_frame(b"ok") + bomb + gzip_frame(b"after")) == [b"ok"]
    assert "decompresses to more than 4096 bytes" in reader.broken
    assert reader.feed(gzip_frame(b"more")) == []


# Random bytes hardly compress: repeated ones expand past limits they were under on the wire.
_PAYLOADS = st.binary(max_size=600) | st.builds(bytes.__mul__, st.binary(min_size=1, max_size=4), st.integers(0, 300))


@settings(max_examples=200, deadline=None)
@given(_PAYLOADS, st.integers(0, 600), st.sampled_from(["gzip", "deflate"]))
def test_a_compressed_message_is_read_whole_or_refused_by_its_decompressed_size(
    payload: bytes, limit: int, encoding: str
) -> None:
    packed = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
    framed = b"\x01" + len(packed).to_bytes(4, "big") + packed
    reader = grpcwire.MessageReader(encoding, max_bytes=limit)
    got = [m for i in range(0, len(framed), 7) for m in reader.feed(framed[i : i + 7])]
    if len(payload) <= limit and len(packed) <= limit:
        assert got == [payload] and not reader.broken
    else:
        assert got == [] and reader.broken
    truncated = b"\x01" + (len(packed) - 1).to_bytes(4, "big") + packed[:-1]
    with pytest.raises(BadRequest, match="does not decompress"):
        grpcwire.messages(truncated, encoding)


def test_every_request_error_has_its_grpc_status() -> None:
    """A gRPC client gets the code for the EPP's answer (grpc/doc/statuscodes.md), never UNKNOWN: 412 of a
    conditional decode that found nothing cached is FAILED_PRECONDITION."""

    def subclasses(cls: type[RequestError]) -> set[type[RequestError]]:
        return {cls}.union(*(subclasses(c) for c in cls.__subclasses__()))

    for cls in subclasses(RequestError):
        assert grpcwire.grpc_status(cls.status) != grpcwire.GRPC_UNKNOWN, cls
    assert grpcwire.grpc_status(PreconditionFailed.status) == 9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00\x00\x00", "ends inside a message prefix (3 of 5 bytes)"),
        (b"\x00\x00\x00\x00\x09abc", "truncated: 3 of 9 bytes"),
        (b"\x07\x00\x00\x00\x00", "invalid compressed flag 7"),
    ],
)
def test_bad_frames(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        grpcwire.messages(body)


# -- vllmgrpc-parser -------------------------------------------------------------------------------------------
def test_generate_token_ids() -> None:
    req = parse(
        GENERATE,
        generate(
            tokenized=vl.TokenizedInput(input_ids=[5, 6, 70000]),
            sampling_params=vl.SamplingParams(max_tokens=9),
            stream=True,
        ),
    )
    assert req.kind is RequestKind.GENERATE and req.prompt_is_token_ids
    assert req.prompt == struct.pack("<3I", 5, 6, 70000)
    assert req.max_tokens == 9 and req.stream and req.model == ""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200))
def test_any_token_ids_are_the_packed_prompt(ids: list[int]) -> None:
    req = parse(GENERATE, generate(tokenized=vl.TokenizedInput(input_ids=ids)))
    assert req.prompt == struct.pack(f"<{len(ids)}I", *ids)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([GENERATE, EMBED, CHAT, RAW]), st.binary(max_size=80))
def test_any_body_is_parsed_or_a_bad_request(path: str, body: bytes) -> None:
    try:
        parse(path, body)
    except BadRequest as e:
        assert e.status == 400 and e.message


def test_generate_text_without_max_tokens() -> None:
    req = parse(GENERATE, generate(text="The capital of France is", sampling_params=vl.SamplingParams()))
    assert req.prompt == b"The capital of France is" and not req.prompt_is_token_ids
    assert req.max_tokens is None and not req.stream


def test_embed() -> None:
    body = grpcwire.frame(vl.EmbedRequest(tokenized=vl.TokenizedInput(input_ids=[1, 2])).SerializeToString())
    req = parse(EMBED, body)
    assert req.kind is RequestKind.EMBEDDINGS and req.prompt == struct.pack("<2I", 1, 2)


@pytest.mark.parametrize(
    ("path", "body", "headers", "message"),
    [
        (GENERATE, generate(), {}, "needs an input (tokenized or text)"),
        (GENERATE, generate(tokenized=vl.TokenizedInput()), {}, "input_ids must not be empty"),
        (GENERATE, generate(text=""), {}, "text must not be empty"),
        (GENERATE, b"", {}, "exactly one request message, got 0"),
        (GENERATE, generate(text="a") * 2, {}, "exactly one request message, got 2"),
        (GENERATE, grpcwire.frame(b"\xff\xff\xff"), {}, "not a GenerateRequest"),
        (GENERATE, generate(text="a"), {"content-type": "application/json"}, "must be content-type application/grpc"),
        (EMBED, grpcwire.frame(b""), {}, "needs tokenized input"),
    ],
)
def test_vllm_grpc_errors(path: str, body: bytes, headers: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(path, body, **headers)


def test_generate_usage_from_the_last_message_split_anywhere() -> None:
    req = parse(GENERATE, generate(text="x", stream=True))
    assert req.usage_reader is not None
    chunks = [
        vl.GenerateResponse(chunk=vl.GenerateStreamChunk(token_ids=[1], prompt_tokens=12, completion_tokens=1)),
        vl.GenerateResponse(
            complete=vl.GenerateComplete(
                output_ids=[1, 2], finish_reason="stop", prompt_tokens=12, completion_tokens=2, cached_tokens=8
            )
        ),
    ]
    body = b"".join(grpcwire.frame(c.SerializeToString()) for c in chunks)
    reader = req.usage_reader({"content-type": "application/grpc"})
    for i in range(0, len(body), 3):
        reader.feed(body[i : i + 3])
    u = reader.result()
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.total_tokens) == (12, 2, 8, 14)


def test_embed_usage_and_garbage() -> None:
    body = grpcwire.frame(vl.EmbedRequest(tokenized=vl.TokenizedInput(input_ids=[1])).SerializeToString())
    req = parse(EMBED, body)
    reader = req.usage_reader({})
    reader.feed(grpcwire.frame(vl.EmbedResponse(embedding=[0.5], prompt_tokens=4).SerializeToString()))
    assert reader.result().prompt_tokens == 4
    broken = req.usage_reader({})
    broken.feed(grpcwire.frame(b"\xff\xff"))
    assert broken.result() is None
    assert req.usage_reader({}).result() is None


def test_usage_is_skipped_once_a_response_message_is_unreadable() -> None:
    req = parse(GENERATE, generate(text="x", stream=True))
    first = vl.GenerateResponse(chunk=vl.GenerateStreamChunk(token_ids=[1], prompt_tokens=12, completion_tokens=1))
    reader = req.usage_reader({"content-type": "application/grpc"})
    reader.feed(grpcwire.frame(first.SerializeToString()))
    assert reader.result() is not None
    reader.feed(b"\x07\x00\x00\x00\x01x")  # an unreadable message: the running totals before it are not the answer's
    assert reader.result() is None


# -- vertexai-parser -------------------------------------------------------------------------------------------
def test_vertex_chat_completions_reads_the_openai_json() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 7}
    req = parse(CHAT, vertex(doc))
    assert req.kind is RequestKind.CHAT_COMPLETIONS and req.model == "m" and req.stream and req.max_tokens == 7
    assert req.messages == [("user", "hi")]
    assert json.loads(req.body) == doc  # the JSON; what goes upstream is the stream's own copy


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, RequestKind.CHAT_COMPLETIONS),
        ({"model": "m", "input": "hi"}, RequestKind.RESPONSES),
        ({"model": "m", "prompt": "hi"}, RequestKind.COMPLETIONS),
        ({"instances": [1, 2]}, RequestKind.PASSTHROUGH),
        (b"\x00not json", RequestKind.PASSTHROUGH),
        # OpenAI-like but not readable by its rules (they were INVALID_ARGUMENT): custom predictions, routed on load.
        ({"model": "m", "input": ["first passage", "second passage"]}, RequestKind.PASSTHROUGH),  # an embeddings body
        ({"prompt": "Once upon a time", "max_tokens": 16}, RequestKind.PASSTHROUGH),  # vLLM /generate: no model
    ],
)
def test_vertex_raw_predict_by_shape(doc: dict[str, Any] | bytes, kind: RequestKind) -> None:
    req = parse(RAW, vertex(doc))
    assert req.kind is kind
    if kind is RequestKind.PASSTHROUGH:
        assert req.prompt is None and req.usage_reader is None


def test_vertex_bad_openai_json_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match='"messages" must contain at least one message'):
        parse(CHAT, vertex({"model": "m", "messages": []}))


def test_vertex_model_rewrite_rewraps_the_message() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = parse(CHAT, vertex(doc, endpoint="projects/p/e"), **{"x-gateway-model-name-rewrite": "m-v2"})
    assert req.target_model == "m-v2" and req.payload is not None and req.wrap_body is not None
    out = vx.ChatCompletionsRequest.FromString(grpcwire.messages(req.wrap_body(b'{"model":"m-v2"}'))[0])
    assert out.endpoint == "projects/p/e" and out.http_body.data == b'{"model":"m-v2"}'
    assert out.http_body.content_type == "application/json"


def test_vertex_usage_is_skipped_once_a_response_message_is_unreadable() -> None:
    req = parse(CHAT, vertex({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}))
    event = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}\n\n'
    reader = req.usage_reader({})
    reader.feed(grpcwire.frame(httpbody_pb2.HttpBody(data=event).SerializeToString()))
    assert reader.result() is not None
    reader.feed(grpcwire.frame(b"\xff\xff"))
    assert reader.result() is None


def test_vertex_usage_from_streamed_http_bodies() -> None:
    req = parse(CHAT, vertex({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}))
    events = [
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n',
        b"data: [DONE]\n\n",
    ]
    body = b"".join(
        grpcwire.frame(httpbody_pb2.HttpBody(content_type="text/event-stream", data=e).SerializeToString())
        for e in events
    )
    reader = req.usage_reader({})
    for i in range(0, len(body), 7):
        reader.feed(body[i : i + 7])
    u = reader.result()
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (9, 2)


# -- through the ext_proc stream -----------------------------------------------------------------------------
@pytest.fixture(params=["grpc", "h2"])
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    token = TRANSPORT.set(request.param)
    yield request.param
    TRANSPORT.reset(token)


async def test_a_bad_grpc_request_gets_a_grpc_status(transport: str) -> None:
    async with serve(request_parsers=table()) as h:
        s = h.open()
        await s.send(request_headers(GRPC, path=GENERATE), request_body(generate(), eos=True))
        resp = await s.recv()
        ir = resp.immediate_response
        assert ir.status.code == 400 and ir.grpc_status.status == 3  # INVALID_ARGUMENT
        assert b"needs an input" in ir.body
        assert "content-type" not in {o.header.key for o in ir.headers.set_headers}
        await s.recv_eof()
        assert await s.status() == grpc.StatusCode.OK


async def test_a_grpc_request_is_routed_and_its_usage_counted(transport: str) -> None:
    async with serve(request_parsers=table()) as h:
        s = h.open()
        body = generate(tokenized=vl.TokenizedInput(input_ids=[1, 2, 3]), stream=True)
        answers = await s.route(body, GRPC, path=GENERATE)
        assert answers[0].WhichOneof("response") == "request_headers"
        (req,) = h.director.requests
        assert req.kind is RequestKind.GENERATE and req.prompt == struct.pack("<3I", 1, 2, 3)
        await s.send(response_headers(200, "application/grpc"))
        await s.recv()
        done = vl.GenerateResponse(complete=vl.GenerateComplete(prompt_tokens=3, completion_tokens=5, cached_tokens=2))
        frame = grpcwire.frame(done.SerializeToString())
        await s.send(response_body(frame[:4]))
        await s.recv()
        await s.send(response_body(frame[4:]))
        await s.recv()
        await s.send(response_trailers())
        await s.recv()
        await s.close()
        await s.recv_eof()
        (c,) = h.director.completions
        assert c.response.streaming
        u = c.response.usage
        assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (3, 5, 2)
        assert h.sample("llm_d_epp_request_input_tokens_sum", UNPARSED) == 3


async def _answer_with_status(s: Any, status: str, trailers_only: bool) -> None:
    """The pod answers a gRPC call with `status`: in a trailers-only answer, or in trailers after headers."""
    if trailers_only:
        await s.send(response_headers(200, "application/grpc", eos=True, **{"grpc-status": status}))
    else:
        await s.send(response_headers(200, "application/grpc"))
        await s.recv()
        await s.send(response_trailers(status))
    await s.recv()
    await s.close()
    await s.recv_eof()


@pytest.mark.parametrize(("trailers_only", "status"), [(False, "14"), (True, "3"), (False, "0")])
async def test_a_grpc_error_from_the_pod_is_a_model_server_error(
    transport: str, trailers_only: bool, status: str
) -> None:
    async with serve(request_parsers=table()) as h:
        s = h.open()
        await s.route(generate(text="hi"), GRPC, path=GENERATE)
        await _answer_with_status(s, status, trailers_only)
        (c,) = h.director.completions
        assert c.response.grpc_status == int(status)
        labels = {**UNPARSED, "error_code": "ModelServerError"}
        assert h.sample("llm_d_epp_request_error_total", labels) == (0 if status == "0" else 1)


@pytest.mark.parametrize(("trailers_only", "status"), [(False, "abc"), (True, ""), (False, "14x")])
async def test_an_unreadable_grpc_status_is_a_model_server_error(
    transport: str, trailers_only: bool, status: str
) -> None:
    # gRPC clients fail a call whose grpc-status is no number (grpc-go: INTERNAL, grpc-java: UNKNOWN).
    async with serve(request_parsers=table()) as h:
        s = h.open()
        await s.route(generate(text="hi"), GRPC, path=GENERATE)
        await _answer_with_status(s, status, trailers_only)
        (c,) = h.director.completions
        assert c.response.grpc_status == grpcwire.GRPC_UNKNOWN
        labels = {**UNPARSED, "error_code": "ModelServerError"}
        assert h.sample("llm_d_epp_request_error_total", labels) == 1


@pytest.mark.parametrize("trailers_only", [False, True])
async def test_a_grpc_error_answering_a_custom_prediction_is_a_model_server_error(
    transport: str, trailers_only: bool
) -> None:
    # A RawPredict body of no OpenAI shape is routed on load, with no usage reader: its answer is still gRPC.
    async with serve(request_parsers=table()) as h:
        s = h.open()
        await s.route(vertex({"instances": [1, 2]}), GRPC, path=RAW)
        (req,) = h.director.requests
        assert req.kind is RequestKind.PASSTHROUGH
        await _answer_with_status(s, "14", trailers_only)
        (c,) = h.director.completions
        assert c.response.grpc_status == 14
        labels = {**UNPARSED, "error_code": "ModelServerError"}
        assert h.sample("llm_d_epp_request_error_total", labels) == 1
