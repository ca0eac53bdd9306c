"""vLLM's gRPC API (`vllm.grpc.engine.VllmEngine`, protos/llmepp/protocols/vllm_engine.proto).

Requests (vllmgrpc-parser, gRPC over h2c only):

- `Generate`: the prompt is `tokenized.input_ids` (token ids, packed like a token-id completions
  prompt, so prefix routing hashes the real ids) or `text`; `sampling_params.max_tokens`; `stream`.
- `Embed`: `tokenized.input_ids`.

The API names no model (a gRPC pool serves one), so no model rewrite applies. Usage comes from the
response's last message: a `GenerateStreamChunk` or `GenerateComplete` carries the running totals
(prompt, completion and cached tokens), an `EmbedResponse` its prompt tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

from google.protobuf.message import DecodeError

from llmepp.errors import BadRequest
from llmepp.protocols import vllm_engine_pb2 as pb
from llmepp.request import grpcwire, parsers
from llmepp.request.types import InferenceRequest, RequestKind, Usage

SERVICE = "vllm.grpc.engine.VllmEngine"
GENERATE = f"{SERVICE}/Generate"
EMBED = f"{SERVICE}/Embed"
CLAIMS = (GENERATE, EMBED)
# Usage is in the last message; a Generate answer's messages are small, but a non-streaming
# GenerateComplete holds every output id: bounded like any response body the EPP reads.
MAX_RESPONSE_MESSAGE = 16 * 1024 * 1024


def _message(req: InferenceRequest, method: str) -> bytes:
    if not grpcwire.is_grpc(req.headers):
        raise BadRequest(f"{method} is a gRPC method: the request must be content-type application/grpc")
    return grpcwire.unary_message(req.body, req.headers.get("grpc-encoding", "identity"), method)


def _token_ids(ids: Iterable[int], method: str) -> bytes:
    if not ids:
        raise BadRequest(f"{method}: tokenized.input_ids must not be empty")
    return parsers.pack_token_ids(ids, "tokenized.input_ids", uint32=True)


def parse(req: InferenceRequest, suffix: str) -> None:
    if suffix == GENERATE:
        _parse_generate(req)
        req.usage_reader = _GenerateUsage
    else:
        _parse_embed(req)
        req.usage_reader = _EmbedUsage


def _parse_generate(req: InferenceRequest) -> None:
    gen = pb.GenerateRequest()
    try:
        gen.ParseFromString(_message(req, "Generate"))
    except DecodeError as e:
        raise BadRequest(f"Generate: request is not a GenerateRequest: {e}") from None
    req.kind = RequestKind.GENERATE
    which = gen.WhichOneof("input")
    if which == "tokenized":
        req.prompt = _token_ids(gen.tokenized.input_ids, "Generate")
        req.prompt_is_token_ids = True
    elif which == "text":
        if not gen.text:
            raise BadRequest("Generate: text must not be empty")
        req.prompt = gen.text.encode()
    else:
        raise BadRequest("Generate: the request needs an input (tokenized or text)")
    params = gen.sampling_params
    if gen.HasField("sampling_params") and params.HasField("max_tokens"):
        req.max_tokens = params.max_tokens
    req.stream = gen.stream


def _parse_embed(req: InferenceRequest) -> None:
    emb = pb.EmbedRequest()
    try:
        emb.ParseFromString(_message(req, "Embed"))
    except DecodeError as e:
        raise BadRequest(f"Embed: request is not an EmbedRequest: {e}") from None
    if not emb.HasField("tokenized"):
        raise BadRequest("Embed: the request needs tokenized input")
    req.kind = RequestKind.EMBEDDINGS
    req.prompt = _token_ids(emb.tokenized.input_ids, "Embed")
    req.prompt_is_token_ids = True


class _LastMessage(ABC):
    """Keeps a response's last complete message; `result` decodes it once at the end."""

    __slots__ = ("_last", "_reader")

    def __init__(self, response_headers: Mapping[str, str]) -> None:
        self._reader = grpcwire.MessageReader(response_headers.get("grpc-encoding", "identity"), MAX_RESPONSE_MESSAGE)
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        done = self._reader.feed(chunk)
        if done:
            self._last = done[-1]

    def result(self) -> Usage | None:
        if not self._last or self._reader.broken:
            return None
        try:
            return self._usage(self._last)
        except DecodeError:
            return None

    @abstractmethod
    def _usage(self, message: bytes) -> Usage | None: ...


class _GenerateUsage(_LastMessage):
    """A GenerateStreamChunk or GenerateComplete: the running totals."""

    def _usage(self, message: bytes) -> Usage | None:
        gen = pb.GenerateResponse.FromString(message)
        which = gen.WhichOneof("response")
        if which is None:
            return None
        part = gen.chunk if which == "chunk" else gen.complete
        return Usage(
            prompt_tokens=part.prompt_tokens,
            completion_tokens=part.completion_tokens,
            cached_tokens=part.cached_tokens,
            total_tokens=part.prompt_tokens + part.completion_tokens,
        )


class _EmbedUsage(_LastMessage):
    def _usage(self, message: bytes) -> Usage | None:
        tokens = pb.EmbedResponse.FromString(message).prompt_tokens
        return Usage(prompt_tokens=tokens, total_tokens=tokens) if tokens else None
