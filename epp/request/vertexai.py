"""Vertex AI's PredictionService over gRPC (protos/llmepp/protocols/vertexai_prediction.proto).

`ChatCompletions`, `RawPredict` and `StreamRawPredict` carry an OpenAI JSON body in a
`google.api.HttpBody` (vertexai-parser, gRPC over h2c only). The request message is unwrapped
and its JSON read by the OpenAI parser: ChatCompletions as `chat/completions`; the raw methods by
what the JSON holds (`messages`: chat/completions, `input`: responses, `prompt`: completions).
A raw body of any other shape is a custom prediction the EPP cannot read: it is routed on load,
like a passthrough request.

What goes upstream is the client's gRPC body, unless the model name is rewritten: then the
message is re-encoded with the new JSON (every other field kept). The answer is a stream of
HttpBody messages (one JSON, or one SSE event each); their `data` feed the OpenAI usage reader.
Response bodies are not model-rewritten (the gRPC framing would break): the client sees the
served model's name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import msgspec
from google.api import httpbody_pb2
from google.protobuf.message import DecodeError

from llmepp.errors import BadRequest
from llmepp.protocols import vertexai_prediction_pb2 as pb
from llmepp.request import grpcwire, parsers
from llmepp.request.types import InferenceRequest, RequestKind, Usage
from llmepp.request.usage import UsageCollector

CHAT = "PredictionService/ChatCompletions"
RAW = "PredictionService/RawPredict"
STREAM_RAW = "PredictionService/StreamRawPredict"
CLAIMS = (CHAT, RAW, STREAM_RAW)
MAX_RESPONSE_MESSAGE = 16 * 1024 * 1024


class _Shape(msgspec.Struct):
    """Which OpenAI API a raw body is: only the presence of these fields is looked at."""

    messages: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()


_SHAPE = msgspec.json.Decoder(_Shape)


def _api(suffix: str, data: bytes) -> str | None:
    if suffix == CHAT:
        return "chat/completions"
    try:
        shape = parsers.decode_body(_SHAPE, data)  # read as the OpenAI parser reads it (a lone surrogate too)
    except BadRequest:
        return None  # not an OpenAI JSON object: a custom prediction
    if shape.messages:
        return "chat/completions"
    if shape.input:
        return "responses"
    if shape.prompt:
        return "completions"
    return None


def parse(req: InferenceRequest, suffix: str) -> None:
    method = suffix.rsplit("/", 1)[1]
    if not grpcwire.is_grpc(req.headers):
        raise BadRequest(f"{method} is a gRPC method: the request must be content-type application/grpc")
    raw = grpcwire.unary_message(req.body, req.headers.get("grpc-encoding", "identity"), method)
    # The three request messages have the same fields (endpoint = 1, http_body = 2).
    message = pb.ChatCompletionsRequest()
    try:
        message.ParseFromString(raw)
    except DecodeError as e:
        raise BadRequest(f"{method}: request is not a {method}Request: {e}") from None
    data = message.http_body.data
    api = _api(suffix, data)
    if api is None:
        req.kind = RequestKind.PASSTHROUGH  # routed on load; the body goes upstream as it came
        return
    if suffix == CHAT:
        req.body = data
        parsers.parse_openai(req, api)
    else:
        # A raw body only resembles an OpenAI request: one the OpenAI rules refuse (an embeddings `input` list, a
        # custom prediction with a `prompt` and no `model`) is a custom prediction too, routed on load.
        probe = dataclasses.replace(req, body=data)
        try:
            parsers.parse_openai(probe, api)
        except BadRequest:
            req.kind = RequestKind.PASSTHROUGH
            return
        for f in dataclasses.fields(req):
            setattr(req, f.name, getattr(probe, f.name))
    req.wrap_body = functools.partial(_rewrapped, message)
    req.usage_reader = functools.partial(_HttpBodyUsage, streaming=req.stream)


def _rewrapped(message: pb.ChatCompletionsRequest, data: bytes) -> bytes:
    out = pb.ChatCompletionsRequest()
    out.CopyFrom(message)
    out.http_body.data = data
    return grpcwire.frame(out.SerializeToString())


class _HttpBodyUsage:
    """The response's HttpBody messages → their `data` → the OpenAI JSON / SSE usage reader."""

    __slots__ = ("_inner", "_reader")

    def __init__(self, response_headers: Mapping[str, str], *, streaming: bool) -> None:
        self._reader = grpcwire.MessageReader(response_headers.get("grpc-encoding", "identity"), MAX_RESPONSE_MESSAGE)
        self._inner = UsageCollector(streaming)

    def feed(self, chunk: bytes) -> None:
        for message in self._reader.feed(chunk):
            try:
                body = httpbody_pb2.HttpBody.FromString(message)
            except DecodeError:
                self._reader.broken = "a response message is not an HttpBody"
                return
            self._inner.feed(body.data)

    def result(self) -> Usage | None:
        return None if self._reader.broken else self._inner.result()
