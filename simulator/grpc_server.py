"""The gRPC face of one simulated pod (``PodConfig.grpc_port``): h2c on its own port, grpc.aio, same engine.

Two services, served on the engine, tokenizer, prefix cache, KV events and metrics the HTTP face uses
(requests go through ``server.submit``, answers through the HTTP routes' own renderers):

* ``vllm.grpc.engine.VllmEngine`` (vLLM's gRPC API, protos/llmepp/protocols/vllm_engine.proto):

  - ``Generate``: the prompt is ``tokenized.input_ids`` (served like ``POST /inference/v1/generate``) or
    ``text`` (tokenised like a completions prompt); ``sampling_params.max_tokens`` (default as the HTTP
    routes: ``min(16, max_model_len - prompt)``); ``n`` > 1 is refused; other sampling fields are ignored.
    ``stream``: one ``GenerateStreamChunk`` per batch of new tokens (``token_ids`` = the new ids,
    ``completion_tokens`` = tokens so far), then a ``GenerateComplete``; otherwise one ``GenerateComplete``.
    ``GenerateComplete`` always holds every output id and the totals; ``finish_reason`` is the engine's
    (``length``: the simulator has no EOS, so never ``stop``; ``abort`` after an out-of-band ``Abort``).
    ``request_id`` (else ``x-request-id`` metadata, else a fresh id) names the engine request.
  - ``Embed``: a prefill on the engine (one seat, the prefix cache, one sampled token that is dropped);
    the embedding is a deterministic unit vector of ``EMBEDDING_DIM`` floats derived from the token ids.
  - ``HealthCheck`` (``healthy`` = the pod is ready), ``Abort`` (aborts the engine requests with those
    ids), ``GetModelInfo``, ``GetServerInfo`` (``server_type`` ``vllm-grpc``).

* ``google.cloud.aiplatform.v1.PredictionService`` (Vertex AI): ``http_body.data`` is an OpenAI JSON body.
  ``ChatCompletions`` is ``POST /v1/chat/completions``; ``RawPredict`` / ``StreamRawPredict`` are chat
  completions when the JSON has ``messages``, completions when it has ``prompt``. Non-streaming: one
  ``HttpBody`` (``application/json``) holding the HTTP route's JSON. ``"stream": true``: one ``HttpBody``
  (``text/event-stream``) per SSE event, byte for byte what the HTTP route writes, ``data: [DONE]`` last;
  ``RawPredict`` (unary) then answers every event in one ``HttpBody``.

Every answer starts with initial metadata ``x-inference-pod: <pod name>`` and ``x-inference-port: <gRPC
port>``. Metadata ``x-return-error: <status>`` forces an error as the HTTP header does. Errors are the HTTP
face's, as gRPC status codes (``HTTP_TO_GRPC``): 400 INVALID_ARGUMENT (missing/empty input, prompt too
long, ...), 404 NOT_FOUND (unknown model), 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE (pod not ready), ...
A client that cancels its call (or whose deadline passes) aborts the engine request, freeing its seat.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import random
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.api import httpbody_pb2

from llmepp.protocols import vertexai_prediction_pb2 as vertex_pb
from llmepp.protocols import vertexai_prediction_pb2_grpc as vertex_grpc
from llmepp.protocols import vllm_engine_pb2 as pb
from llmepp.protocols import vllm_engine_pb2_grpc as pb_grpc
from llmepp_sim.errors import ApiError, bad_request
from llmepp_sim.faults import FORCE_ERROR_HEADER
from llmepp_sim.protocol import decode_json_body
from llmepp_sim.server import (
    Api,
    Submission,
    aborted_error,
    check_admission,
    complete_body,
    output_growth,
    stream_events,
    submit,
)

if TYPE_CHECKING:
    from llmepp_sim.pod import SimPod

EMBEDDING_DIM = 256
SERVER_TYPE = "vllm-grpc"
JSON = "application/json"
SSE = "text/event-stream"
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.so_reuseport", 0),  # a taken port is an error, as for the HTTP listener
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10000),
]
# The google.rpc mapping of HTTP statuses (the HTTP face's errors and forced statuses).
HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

R = TypeVar("R")
Q = TypeVar("Q")
S = TypeVar("S", bound="_Face")


def grpc_status(http_status: int) -> grpc.StatusCode:
    if http_status in HTTP_TO_GRPC:
        return HTTP_TO_GRPC[http_status]
    return grpc.StatusCode.INTERNAL if http_status >= 500 else grpc.StatusCode.FAILED_PRECONDITION


def embedding(token_ids: Sequence[int], dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for a token sequence (same ids, same vector)."""
    digest = hashlib.sha256(struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()
    rng = random.Random(digest)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    key = key.lower()
    for item in context.invocation_metadata() or ():
        if item.key == key and isinstance(item.value, str):
            return item.value
    return None


# Every handler: identity metadata first, then ApiError -> gRPC status.
def _unary(
    method: Callable[[S, Q, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[S, Q, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(method)
    async def handler(self: S, request: Q, context: grpc.aio.ServicerContext) -> R:
        await context.send_initial_metadata(self.identity())
        try:
            return await method(self, request, context)
        except ApiError as error:
            await context.abort(grpc_status(error.status), error.message)
            raise  # not reached: abort() raises

    return handler


def _streaming(
    method: Callable[[S, Q, grpc.aio.ServicerContext], AsyncGenerator[R, None]],
) -> Callable[[S, Q, grpc.aio.ServicerContext], AsyncGenerator[R, None]]:
    @functools.wraps(method)
    async def handler(self: S, request: Q, context: grpc.aio.ServicerContext) -> AsyncGenerator[R, None]:
        await context.send_initial_metadata(self.identity())
        try:
            async with contextlib.aclosing(method(self, request, context)) as answers:
                async for answer in answers:
                    yield answer
        except ApiError as error:
            await context.abort(grpc_status(error.status), error.message)

    return handler


class _Face:
    def __init__(self, pod: SimPod, face: GrpcFace) -> None:
        self.pod = pod
        self.face = face

    def identity(self) -> tuple[tuple[str, str], ...]:
        return (("x-inference-pod", self.pod.name), ("x-inference-port", str(self.face.port)))

    def admit(self, context: grpc.aio.ServicerContext) -> None:
        self.face.last_receive = time.time()
        check_admission(self.pod, _metadata(context, FORCE_ERROR_HEADER))

    def request_id(self, given: str, context: grpc.aio.ServicerContext) -> str | None:
        return given or _metadata(context, "x-request-id")


class VllmEngineService(_Face, pb_grpc.VllmEngineServicer):
    @_streaming
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        self.admit(context)
        body, chat, api = self._generate_body(request)
        sub = await submit(self.pod, body, chat, api, self.request_id(request.request_id, context))
        try:
            async for answer in self._generate_answers(sub, request.stream):
                yield answer
        finally:
            sub.abort()  # no-op when finished; frees the seat when the client cancelled

    @staticmethod
    def _generate_body(request: pb.GenerateRequest) -> tuple[dict[str, Any], bool, Api]:
        """The equivalent body of a tokens-in (``/inference/v1/generate``) or completions request."""
        params = request.sampling_params
        max_tokens = params.max_tokens if params.HasField("max_tokens") else None
        if params.n > 1:
            raise bad_request("Generate: the simulator only supports n=1.", param="sampling_params.n")
        which = request.WhichOneof("input")
        if which == "tokenized":
            ids = list(request.tokenized.input_ids)
            if not ids:
                raise bad_request("Generate: `tokenized.input_ids` must not be empty.", param="tokenized.input_ids")
            body: dict[str, Any] = {"token_ids": ids}
            if max_tokens is not None:
                body["sampling_params"] = {"max_tokens": max_tokens}
            return body, False, "vllm-generate"
        if which == "text":
            if not request.text:
                raise bad_request("Generate: `text` must not be empty.", param="text")
            body = {"prompt": request.text}
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            return body, False, "openai"
        raise bad_request("Generate: the request needs an input: `tokenized.input_ids` or `text`.", param="input")

    async def _generate_answers(self, sub: Submission, stream: bool) -> AsyncGenerator[pb.GenerateResponse, None]:
        sim_request = sub.sim_request
        if stream:
            async for sent, available, finished in output_growth(sim_request):
                if available > sent:
                    chunk = pb.GenerateStreamChunk(
                        token_ids=sim_request.output_ids[sent:available],
                        prompt_tokens=len(sim_request.prompt_ids),
                        completion_tokens=available,
                        cached_tokens=sim_request.num_cached_tokens or 0,
                    )
                    yield pb.GenerateResponse(chunk=chunk)
                if finished:
                    break
        else:
            await sim_request.wait_finished()
        if sim_request.finish_reason == "abort" and not (self.pod.alive and sub.engine is self.pod.engine):
            raise aborted_error()  # the pod is going down (the server is stopping too)
        complete = pb.GenerateComplete(
            output_ids=sim_request.output_ids,
            finish_reason=sim_request.finish_reason or "length",
            prompt_tokens=len(sim_request.prompt_ids),
            completion_tokens=len(sim_request.output_ids),
            cached_tokens=sim_request.num_cached_tokens or 0,
        )
        yield pb.GenerateResponse(complete=complete)

    @_unary
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        self.admit(context)
        ids = list(request.tokenized.input_ids)
        if not ids:
            raise bad_request("Embed: `tokenized.input_ids` must not be empty.", param="tokenized.input_ids")
        body = {"token_ids": ids, "sampling_params": {"max_tokens": 1}}
        sub = await submit(self.pod, body, False, "vllm-generate", self.request_id(request.request_id, context))
        try:
            await sub.sim_request.wait_finished()
        finally:
            sub.abort()
        if sub.sim_request.finish_reason == "abort":
            raise aborted_error()
        vector = embedding(sub.sim_request.prompt_ids)
        return pb.EmbedResponse(embedding=vector, prompt_tokens=len(ids), embedding_dim=len(vector))

    @_unary
    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        ready = self.pod.ready
        return pb.HealthCheckResponse(healthy=ready, message="Healthy" if ready else "The server is starting up.")

    @_unary
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self.pod.engine.abort_ids(request.request_ids)
        return pb.AbortResponse()

    @_unary
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        cfg = self.pod.config
        return pb.GetModelInfoResponse(
            model_path=cfg.model,
            is_generation=True,
            max_context_length=cfg.max_model_len,
            vocab_size=self.pod.tokenizer.vocab_size,
            supports_vision=False,
        )

    @_unary
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        engine = self.pod.engine
        return pb.GetServerInfoResponse(
            active_requests=len(engine.running) + len(engine.waiting),
            is_paused=False,
            last_receive_timestamp=self.face.last_receive,
            uptime_seconds=self.pod.uptime,
            server_type=SERVER_TYPE,
        )


class PredictionService(_Face, vertex_grpc.PredictionServiceServicer):
    @_streaming
    async def ChatCompletions(
        self, request: vertex_pb.ChatCompletionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        async for body in self._serve(request.http_body, context, chat=True):
            yield body

    @_unary
    async def RawPredict(
        self, request: vertex_pb.RawPredictRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        bodies = [body async for body in self._serve(request.http_body, context, chat=None)]
        if len(bodies) == 1:
            return bodies[0]
        return httpbody_pb2.HttpBody(content_type=SSE, data=b"".join(b.data for b in bodies))

    @_streaming
    async def StreamRawPredict(
        self, request: vertex_pb.StreamRawPredictRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        async for body in self._serve(request.http_body, context, chat=None):
            yield body

    async def _serve(
        self, http_body: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext, chat: bool | None
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        """``chat=None``: a raw prediction, chat or completions by the JSON's shape."""
        self.admit(context)
        body = decode_json_body(http_body.data)
        if chat is None:
            if "messages" in body:
                chat = True
            elif "prompt" in body:
                chat = False
            else:
                raise bad_request("The JSON body needs `messages` (chat completions) or `prompt` (completions).")
        sub = await submit(self.pod, body, chat, "openai", _metadata(context, "x-request-id"))
        try:
            if not sub.parsed.stream:
                yield httpbody_pb2.HttpBody(content_type=JSON, data=await complete_body(sub))
                return
            async with contextlib.aclosing(stream_events(sub)) as events:
                async for parts, finished in events:
                    for part in parts:
                        yield httpbody_pb2.HttpBody(content_type=SSE, data=part)
                    if finished:
                        return
            raise aborted_error()
        finally:
            sub.abort()


class GrpcFace:
    """One pod's grpc.aio server; a killed pod's server is stopped, a revived pod gets a new one on the
    same port (grpc.aio servers cannot restart)."""

    def __init__(self, pod: SimPod) -> None:
        self.pod = pod
        self.port = 0
        self.last_receive = 0.0
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_VllmEngineServicer_to_server(VllmEngineService(self.pod, self), server)
        vertex_grpc.add_PredictionServiceServicer_to_server(PredictionService(self.pod, self), server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
            raise OSError(f"gRPC: cannot listen on {address}: {exc}") from exc
        if not bound:
            raise OSError(f"gRPC: cannot listen on {address}")
        await server.start()
        self._server, self.port = server, bound
        return bound

    async def stop(self) -> None:
        """Cancel every call in flight and close the listener (a crash, not a drain)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(None)
