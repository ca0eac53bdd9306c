"""Request-control extension points around scheduling (reference `requestcontrol`).

Order per request: the Parser claiming the path reads the body → RequestHeaderProcessors →
Responders (may answer the request themselves) → admission → Screeners (narrow the candidates) → DataProducers (write
request.data) → Admitters → scheduling → PreRequest (bookkeeping for the chosen targets) → ...
response: ResponseHeaderProcessor on the response headers, FirstResponseChunkProcessor at the
first body bytes, ResponseMetadataProcessor on its last message (before that is answered),
ResponseCompleteProcessor once when the response ends, however it ends.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import Plugin
from llmepp.framework.scheduling import SchedulingResult
from llmepp.request.types import InferenceRequest, ResponseInfo

# InferencePool `appProtocol` values (GIE v1 `AppProtocolHTTP` / `AppProtocolH2C`).
APP_PROTOCOL_HTTP = "http"
APP_PROTOCOL_H2C = "kubernetes.io/h2c"
HTTP_AND_H2C: frozenset[str] = frozenset({APP_PROTOCOL_HTTP, APP_PROTOCOL_H2C})
H2C_ONLY: frozenset[str] = frozenset({APP_PROTOCOL_H2C})


class Parser(Plugin):
    """A `requestHandler.parsers` entry: claims request paths and reads their bodies.

    The longest claimed path suffix (on a segment boundary) picks the parser; a parser that
    claims nothing is the fallback for unclaimed paths (llmepp.request.parsers.RequestParsers).
    """

    sync_hooks: ClassVar[tuple[str, ...]] = ("parse",)

    # Path suffixes, e.g. "chat/completions"; empty: the fallback.
    claims: ClassVar[tuple[str, ...]] = ()
    # The pool `appProtocol`s it can read; None: any. A pool whose appProtocol one configured parser
    # does not support keeps the EPP unready (reference `Claims().Protocols`, health.go).
    protocols: ClassVar[frozenset[str] | None] = None
    # False: `parse` never reads the body, so its requests are routed on their headers and the body
    # streams through the EPP unbuffered (FULL_DUPLEX_STREAMED).
    reads_body: ClassVar[bool] = True

    @classmethod
    def supports(cls, app_protocol: str) -> bool:
        return cls.protocols is None or app_protocol in cls.protocols

    @abstractmethod
    def parse(self, request: InferenceRequest, suffix: str) -> None:
        """Fill `request` (kind, model, prompt, messages, stream, max_tokens, ...) from
        `request.body`, read as the `suffix` it was claimed for ("" for the fallback).
        A body the API does not accept raises BadRequest with a precise message."""


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """An answer the EPP gives the client itself; the request never reaches a model server."""

    status: int
    body: bytes
    content_type: str = "application/json"


class RequestHeaderProcessor(Plugin):
    """Reads a request's headers before anything else (admission included) and may set request
    attributes from them, e.g. the flow-control fairness id of an agent's session."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("process_headers",)

    @abstractmethod
    def process_headers(self, request: InferenceRequest) -> None: ...


class Responder(Plugin):
    """May answer a request in the EPP (e.g. a pool-wide `GET /v1/models`) before admission.

    Returns the answer, or None to let the request be routed as usual. Called for every request,
    body-less ones included, so declining must be cheap."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("respond",)

    @abstractmethod
    def respond(self, request: InferenceRequest) -> DirectResponse | None: ...


class Screener(Plugin):
    """Narrows a request's candidate endpoints before producers and scheduling see them
    (e.g. to the pods that serve the requested model). An empty result answers 503.

    Called for body-less requests too (GET /v1/models and the like: no payload, no model, headers
    only), before the director picks one of the candidates kept: such a request must not fail."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("screen",)

    @abstractmethod
    def screen(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]: ...


class DataProducer(Plugin):
    """Computes per-request data (`request.data[key]`) that scorers consume.

    May be `async def produce` when it must wait (e.g. a remote tokenizer); the director
    awaits it with a timeout (`produce_timeout` seconds; 0: the default 400 ms) and cancels it then.
    A plain `def` may return an awaitable for the requests that must wait and a done future for those
    it finished at once: a done future costs the request no task and no event-loop turn.
    Declare written keys in `produces`, read keys in `consumes`.
    """

    produce_timeout: float = 0.0

    @abstractmethod
    def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Awaitable[None] | None: ...


class Admitter(Plugin):
    """May reject a request before scheduling by raising a RequestError."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("admit",)

    @abstractmethod
    def admit(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None: ...


class PreRequest(Plugin):
    """Runs after a successful schedule, before the request goes upstream."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("pre_request",)

    @abstractmethod
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None: ...


class ResponseHeaderProcessor(Plugin):
    """Sees the response status and headers; may return headers to set on the client response."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("response_headers",)

    @abstractmethod
    def response_headers(
        self, request: InferenceRequest, response: ResponseInfo, headers: dict[str, str]
    ) -> dict[str, str] | None: ...


class FirstResponseChunkProcessor(Plugin):
    """Called once when the first response body bytes arrive (the model server has finished
    prefill: the request's prompt no longer loads the server). Not called per chunk."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("first_response_chunk",)

    @abstractmethod
    def first_response_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None: ...


class ResponseMetadataProcessor(Plugin):
    """Reports on a response as Envoy dynamic metadata (e.g. its token cost, for rate limiting or
    billing): called once, when the response's last message arrives, with its usage read; the
    returned {namespace: {key: value}} rides on the answer to that message. Only while one is
    configured does the EPP read usage before answering instead of after."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("response_metadata",)

    @abstractmethod
    def response_metadata(
        self, request: InferenceRequest, response: ResponseInfo
    ) -> Mapping[str, Mapping[str, Any]] | None: ...


class ResponseCompleteProcessor(Plugin):
    """Called exactly once per scheduled request when its response ends (naturally or not)."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("response_complete",)

    @abstractmethod
    def response_complete(
        self, request: InferenceRequest, response: ResponseInfo, result: SchedulingResult
    ) -> None: ...
