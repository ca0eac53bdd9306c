"""The ext_proc stream state machine: one stream per HTTP request (reference §1.1).

Reading order of one stream in FULL_DUPLEX_STREAMED mode (the deployment default):

    request_headers            → remember headers; nothing sent yet (body-less: route now; a path
                                 whose parser reads no body: route now, then echo each body chunk)
    request_body ... EoS       → buffer (bounded by max_body_bytes → 413)
                               → parse → director.handle_request
                               → ONE request_headers answer (routing header_mutation,
                                 clear_route_cache, dynamic_metadata envoy.lb)
                               → the body as streamed_response chunks ≤ 62,000 bytes
    request_trailers           → TrailersResponse (the body answers then end without EoS)
    response_headers           → answered at once (status, event-stream detection, plugins)
    response_body ...          → each chunk echoed at once as streamed_response (usage tail
                                 kept, model name rewritten back when needed)
    response_trailers / EoS    → director.response_complete, exactly once

BUFFERED request mode (detected from `protocol_config` on the first message): the headers
get an empty answer, and the routing mutation rides on the single body answer. STREAMED
response chunks get plain BodyResponses (a plain BodyResponse in FULL_DUPLEX_STREAMED mode
is a protocol error Envoy answers with 500, so it is never sent there). Request body modes
that cannot hold the headers until the body is known (NONE, STREAMED) are routed on the
headers alone, through the whole pipeline (flow control, profiles) with no prompt to read.

Every failure is an ImmediateResponse or a best-effort answer, never a broken stream, and
a routed request is released exactly once however the stream ends.

The machine does no I/O: `ExtProcStream.handle(kind, msg)` returns the answers to write
(synchronously for everything but routing, which comes back as a `Pending` coroutine to
await), and the transport calls `finish()` when the stream ends for any reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.errors import DROPPED_REASON_HEADER, BadRequest, Evicted, PayloadTooLarge, RequestError
from llmepp.framework.requestcontrol import DirectResponse
from llmepp.observability.logging import LogLimiter
from llmepp.observability.metrics import MAX_FAIRNESS_LABELS, OVERFLOW_LABEL, BoundedLabels, EppMetrics
from llmepp.request import grpcwire, parsers, slo
from llmepp.request.rewrite import ModelNameRewriter
from llmepp.request.types import InferenceRequest, RequestKind, ResponseInfo, TerminationCause, UsageReader
from llmepp.request.usage import UsageCollector
from llmepp.server import envoy
from llmepp.server.envoy import Answer
from llmepp.settings import Settings

if TYPE_CHECKING:
    from llmepp.director import RoutingDecision

log = logging.getLogger(__name__)

# What a handler returns: nothing, one answer, or several in order.
Answers = Answer | list[Answer] | None

# Request control headers: consumed by the EPP, never forwarded upstream.
CONTROL_HEADERS = (
    parsers.H_OBJECTIVE,
    parsers.H_OBJECTIVE_ALIAS,
    parsers.H_FAIRNESS,
    parsers.H_FAIRNESS_ALIAS,
    parsers.H_MODEL_REWRITE,
    parsers.H_MODEL_REWRITE_ALIAS,
    DROPPED_REASON_HEADER,
    *parsers.SIDECAR_HEADERS,
    # The rest of the reference's system-owned request headers (pkg/epp/util/request/headers.go): the SLO inputs
    # (read by SLO ordering, latency prediction and admission), the video inputs, the served-endpoint key.
    *slo.TTFT_SLO_HEADERS,
    *slo.TPOT_SLO_HEADERS,
    "x-llm-d-video-fps",
    "x-llm-d-video-duration-seconds",
    "x-llm-d-video-resolution",
    envoy.DESTINATION_HEADER + "-served",
)
_CONTROL_HEADER_SET = frozenset(CONTROL_HEADERS)  # most requests carry none: one C-level check
EVENT_STREAM = "text/event-stream"
# Distinct (model, target) label pairs kept before folding into "other" (reference cap).
MAX_LABEL_PAIRS = 1000
# Label sets (model, target, fairness id, priority) with series of their own: each value is bounded above,
# but their product is not (1,000 pairs x 1,000 fairness ids); past this, a new set reports as "other".
MAX_LABEL_SETS = 4096


class Director(Protocol):
    """What the stream needs from request control (llmepp.director.Director)."""

    async def handle_request(
        self, request: InferenceRequest, subset: Sequence[str] | None
    ) -> RoutingDecision | DirectResponse: ...

    def handle_bodyless(
        self, request: InferenceRequest, subset: Sequence[str] | None
    ) -> RoutingDecision | DirectResponse: ...

    def response_headers(
        self, request: InferenceRequest, response: ResponseInfo, headers: dict[str, str]
    ) -> dict[str, str] | None: ...

    def response_first_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None: ...

    @property
    def reports_metadata(self) -> bool: ...

    def response_metadata(self, request: InferenceRequest, response: ResponseInfo) -> dict[str, dict[str, Any]]: ...

    def response_complete(
        self, request: InferenceRequest, response: ResponseInfo, decision: RoutingDecision
    ) -> None: ...


def _content_length(headers: dict[str, str]) -> int:
    try:
        return max(0, int(headers.get("content-length", "0")))
    except ValueError:
        return 0


class InternalError(RequestError):
    status = 500
    code = "Internal"


def _grpc_status(headers: dict[str, str], default: int | None) -> int | None:
    value = headers.get("grpc-status")
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:  # gRPC clients fail such a call (grpc-go: INTERNAL, grpc-java: UNKNOWN)
        return grpcwire.GRPC_UNKNOWN


def error_body(err: RequestError) -> bytes:
    return msgspec.json.encode({"error": {"code": err.status, "type": err.code, "message": err.message}})


# Serialized error answers: a storm of 429s (saturation, eviction) repeats a handful of them. Messages of
# 400s can be unique per request, so only the first few hundred distinct ones are kept.
_ERROR_ANSWERS: dict[tuple[int, str, str | None, str, bool], bytes] = {}
_ERROR_ANSWERS_MAX = 256


def error_response(err: RequestError, *, grpc: bool = False) -> bytes:
    """The serialized ImmediateResponse of an error (see `_error_response`), built once per distinct error."""
    key = (err.status, err.code, err.reason, err.message, grpc)
    answer = _ERROR_ANSWERS.get(key)
    if answer is None:
        answer = _error_response(err, grpc).SerializeToString()
        if len(_ERROR_ANSWERS) < _ERROR_ANSWERS_MAX:
            _ERROR_ANSWERS[key] = answer
    return answer


def _error_response(err: RequestError, grpc: bool) -> pb.ProcessingResponse:
    """The ImmediateResponse of an error: a JSON body, or for a gRPC client a gRPC status with the
    message (Envoy sends it as a trailers-only answer, grpc-message carrying the body)."""
    details = f"llm_epp_{err.code}" + (f"_{err.reason}" if err.reason else "")
    headers: list[tuple[str, str | bytes]] = []
    if err.reason:
        headers.append((DROPPED_REASON_HEADER, err.reason))
    if grpc:
        code = grpcwire.grpc_status(err.status)
        return envoy.immediate_response(err.status, err.message.encode(), headers, details, grpc_status=code)
    headers.insert(0, ("content-type", "application/json"))
    return envoy.immediate_response(err.status, error_body(err), headers, details)


class _Labeled:
    """Metric children bound to one (model, target, fairness id, priority): `.labels()` once, not per
    request."""

    __slots__ = (
        "cached_tokens",
        "duration",
        "input_tokens",
        "itl",
        "labels",
        "ntpot",
        "output_tokens",
        "request_size",
        "request_total",
        "response_size",
        "running",
        "streaming_tpot",
        "ttft_non_streaming",
        "ttft_streaming",
    )

    def __init__(self, m: EppMetrics, model: str, target: str, fairness_id: str, priority: str) -> None:
        labels = self.labels = (model, target, fairness_id, priority)
        self.request_total = m.request_total.labels(*labels)
        self.duration = m.request_duration.labels(*labels)
        self.ttft_streaming = m.request_ttft.labels(*labels, "true")
        self.ttft_non_streaming = m.request_ttft.labels(*labels, "false")
        self.ntpot = m.request_ntpot.labels(*labels)
        self.streaming_tpot = m.request_streaming_tpot.labels(*labels)
        self.itl = m.request_streaming_itl.labels(*labels)
        self.request_size = m.request_size.labels(*labels)
        self.response_size = m.response_size.labels(*labels)
        self.input_tokens = m.input_tokens.labels(*labels)
        self.output_tokens = m.output_tokens.labels(*labels)
        self.cached_tokens = m.cached_tokens.labels(*labels)
        self.running = m.request_running.labels(*labels)


class StreamContext:
    """What every stream of one server shares: the director, limits, metric children.

    Transports (grpc.aio in extproc.py, HTTP/2 in h2.py) subclass it and run one
    `ExtProcStream` per ext_proc stream.
    """

    def __init__(
        self,
        director: Director,
        metrics: EppMetrics,
        settings: Settings | None = None,
        *,
        time_response_chunks: bool = True,
        destination_list: bool = False,
        request_parsers: parsers.RequestParsers | None = None,
        out_of_band: bool = False,
    ) -> None:
        settings = settings or Settings()
        self.director = director
        self.parsers = request_parsers or parsers.default_parsers()
        self.metrics = metrics
        self.max_body_bytes = settings.max_body_bytes
        self.chunk_bytes = settings.body_chunk_bytes
        # One perf_counter pair per response chunk; off saves ~0.2 µs per chunk.
        self.time_response_chunks = time_response_chunks
        # Envoy's ORIGINAL_DST cluster parses exactly one ip:port (a list → 503 UH, header
        # and metadata alike), so by default only the primary endpoint is sent. Enable for
        # gateways that implement the comma-separated fallback list.
        self.destination_list = destination_list
        # Streams may be answered outside a message handler (flow control's in-flight eviction): the
        # transport gives each stream a `push` only then.
        self.out_of_band = out_of_band
        self._labeled: dict[tuple[str, str, str, int], _Labeled] = {}
        self._pairs = BoundedLabels(MAX_LABEL_PAIRS)  # (model, target) pairs with series of their own
        self._fairness = BoundedLabels(MAX_FAIRNESS_LABELS)  # fairness ids with series of their own
        self._streams_inflight = metrics.extproc_streams_inflight
        # --enable-grpc-stream-metrics: (duration histogram, totals by gRPC code), else no work per stream.
        self._stream_metrics = metrics.stream_metrics() if settings.grpc_stream_metrics else None
        # Open ext_proc streams, for the drain (the gauge above is for Prometheus).
        self.active_streams = 0
        self._request_processing = metrics.request_processing
        self._response_processing = metrics.response_processing
        self._protocol_errors = metrics.extproc_protocol_errors
        # An outage (no endpoints, shutting down) refuses every request: a line per kind of refusal per 10 s.
        self._reject_log = LogLimiter(log, interval=10.0)
        # A bug on the request path fails every request alike: its traceback once per 30 s per site.
        self._bug_log = LogLimiter(log, interval=30.0)

    def labeled(
        self, model: str, target: str, fairness_id: str = parsers.DEFAULT_FAIRNESS_ID, priority: int = 0
    ) -> _Labeled:
        key = (model, target, fairness_id, priority)
        lab = self._labeled.get(key)
        if lab is None:
            lab = self._bounded(key)
        return lab

    def _bounded(self, key: tuple[str, str, str, int]) -> _Labeled:
        """Client input bounds the label values as in the reference: MAX_LABEL_PAIRS (model, target)
        pairs and MAX_FAIRNESS_LABELS fairness ids, later ones reported as "other"; and MAX_LABEL_SETS
        combinations of them, later ones all "other" (with their priority)."""
        model, target, fairness_id, priority = key
        if not self._pairs.admits((model, target)):
            model = target = OVERFLOW_LABEL
        fairness_id = self._fairness(fairness_id)
        bounded = (model, target, fairness_id, priority)
        lab = self._labeled.get(bounded)
        if lab is None and len(self._labeled) >= MAX_LABEL_SETS:
            bounded = (OVERFLOW_LABEL, OVERFLOW_LABEL, OVERFLOW_LABEL, priority)
            model, target, fairness_id = bounded[:3]
            lab = self._labeled.get(bounded)
        if lab is None:
            lab = self._labeled[bounded] = _Labeled(self.metrics, model, target, fairness_id, str(priority))
        return lab

    def destination(self, decision: RoutingDecision) -> str:
        dest = decision.destination
        if not self.destination_list and "," in dest:
            return dest.split(",", 1)[0].strip()
        return dest

    def protocol_error(self, kind: str) -> None:
        self._protocol_errors.labels(kind).inc()

    def stream_opened(self) -> None:
        self.active_streams += 1
        self._streams_inflight.inc()

    def stream_closed(self, stream: Any) -> None:
        self.active_streams -= 1
        self._streams_inflight.dec()
        if self._stream_metrics is not None:
            started = getattr(stream, "received_at", 0.0)
            if started:
                self._stream_metrics[0].observe(time.monotonic() - started)
            self._stream_metrics[1].labels(code=_stream_code(stream)).inc()


def _stream_code(stream: Any) -> str:
    """A stream's code in `extproc_streams_total` (Go's codes.Code names): `Canceled` when the peer reset it
    before its request was answered to the end. Envoy resets the ext_proc stream after every request, a
    finished one included: those are `OK`."""
    if not getattr(stream, "cancelled", False):
        return "OK"
    if getattr(stream, "closed", False):
        # The EPP answered the request to its end (a refusal, a direct answer, an eviction's 429): Envoy's reset
        # after that is how it ends every stream. h2 ends such a stream OK before the reset comes; grpc.aio's
        # handler is still reading (a pushed answer) and sees the reset.
        return "OK"
    info = getattr(stream, "info", None)
    finished = getattr(stream, "completed", False) and info is not None and info.cause is TerminationCause.NATURAL
    return "OK" if finished else "Canceled"


def _stream_cancelled() -> bool:
    """Whether a CancelledError seen while routing is the stream's own cancellation (the transport cancelled
    the task running the step: Envoy reset the stream) rather than one raised by a plugin (a future it
    awaits cancelled by someone else), which is an error like any other. A step run eagerly, outside any
    task (h2's first step), cannot have been cancelled from outside."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _ended() -> bool:
    """`InferenceRequest.evict` of a request that has ended: there is nothing left to revoke."""
    return False


# -- per-stream state machine ------------------------------------------------------------------
_START = 0  # waiting for request headers
_BODY = 1  # buffering the request body
_ROUTED = 2  # request side answered (routed); response side may follow
_UNROUTED = 3  # request side abandoned (Envoy moved to a local reply before we routed)


class Pending:
    """A routing step that must be awaited; the transport awaits `coro` for the answers, or
    runs it eagerly with `step()`."""

    __slots__ = ("coro",)

    def __init__(self, coro: Coroutine[Any, Any, Answers]) -> None:
        self.coro = coro

    def step(self) -> tuple[bool, Any]:
        """Run the routing step until it first waits.

        Returns (True, answers) when it finished without waiting, the common case (no flow-control
        queueing, no async producer): the caller writes them in the same batch, with no task and no
        extra loop turn. Otherwise (False, awaitable): awaiting it (in a task) continues the step
        exactly where it stopped. Exceptions of the step propagate, as an await would raise them."""
        coro = self.coro
        try:
            waiting_on = coro.send(None)
        except StopIteration as done:
            return True, done.value
        return False, _Resumed(coro, waiting_on)


class _Resumed:
    """Awaitable continuing a coroutine that already yielded `waiting_on` on its first step.

    The awaiting task receives that yield (a future to wait on, or None for a bare yield) as if
    it had started the coroutine itself; every later send and throw (a cancellation) is passed
    through. This is what Python 3.12's eager tasks do inside the Task; on 3.11 it is done here."""

    __slots__ = ("coro", "waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, Answers], waiting_on: Any) -> None:
        self.coro = coro
        self.waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Answers]:
        coro = self.coro
        yielded = self.waiting_on
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation (or another throw) goes to the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as done:
                    return done.value


class ExtProcStream:
    """One ext_proc stream. `handle` is synchronous; only routing (the director) awaits,
    returned as a `Pending`. The transport writes the answers in order."""

    __slots__ = (
        "body_maybe_cut",
        "body_size",
        "body_streamed",
        "body_unread",
        "cancelled",
        "chunks",
        "closed",
        "completed",
        "completing",
        "decision",
        "ended_at",
        "finished",
        "headers",
        "info",
        "lab",
        "last_chunk_at",
        "phase",
        "push",
        "received_at",
        "req_mode",
        "request",
        "request_answered",
        "request_id",
        "request_trailers",
        "resp_mode",
        "resp_started",
        "response_time",
        "rewriter",
        "rewriter_flushed",
        "rid_generated",
        "subset",
        "svc",
        "usage",
    )

    def __init__(self, svc: StreamContext, push: Callable[[Answers], None] | None = None) -> None:
        self.svc = svc
        # The transport's way to send answers outside a message handler (in-flight eviction).
        self.push = push
        self.phase = _START
        self.req_mode = envoy.MODE_FULL_DUPLEX_STREAMED
        self.resp_mode = envoy.MODE_FULL_DUPLEX_STREAMED
        self.headers: dict[str, str] = {}
        self.request_id = ""
        self.rid_generated = False
        self.received_at = 0.0
        self.request_answered = False  # the request side got its routing answer
        self.subset: list[str] | None = None
        self.chunks: list[bytes] = []
        self.body_size = 0
        self.body_unread = False  # routed on the headers (STREAMED / NONE modes, or no parser reads it)
        self.body_streamed = False  # FULL_DUPLEX_STREAMED and unread: body chunks are echoed as they come
        self.body_maybe_cut = False  # BUFFERED_PARTIAL, no content-length, no EoS: the body may be cut short
        self.request: InferenceRequest | None = None
        self.decision: RoutingDecision | None = None
        self.info: ResponseInfo | None = None
        self.usage: UsageReader | None = None
        self.rewriter: ModelNameRewriter | None = None
        self.rewriter_flushed = b""  # what the rewriter held before the body's last chunk (see fallback)
        self.lab: _Labeled | None = None
        self.last_chunk_at = 0.0  # a streamed answer's last body chunk (inter-token latency)
        self.request_trailers = False
        self.resp_started = False
        self.response_time = 0.0
        self.completed = False
        # The response ended naturally; accounting is queued to run after the answer is out.
        self.completing: TerminationCause | None = None
        self.ended_at = 0.0
        self.closed = False  # end the gRPC stream after the current answers
        self.cancelled = False
        self.finished = False  # the transport called finish(): the stream is over

    # -- dispatch --------------------------------------------------------------------------------
    def handle(self, kind: str | None, msg: pb.ProcessingRequest) -> Answers | Pending:
        if kind == "response_body":
            return self.on_response_body(msg.response_body)
        if kind == "request_body":
            return self.on_request_body(msg)
        if kind == "request_headers":
            return self.on_request_headers(msg)
        if kind == "response_headers":
            return self.on_response_headers(msg.response_headers)
        if kind == "request_trailers":
            return self.on_request_trailers(msg)
        if kind == "response_trailers":
            return self.on_response_trailers(msg.response_trailers)
        self.svc.protocol_error("unknown_message")
        return None

    # -- request side ------------------------------------------------------------------------------
    def on_request_headers(self, msg: pb.ProcessingRequest) -> Answers | Pending:
        if self.phase != _START:
            self.svc.protocol_error("duplicate_request_headers")
            return None
        if msg.HasField("protocol_config"):
            pc = msg.protocol_config
            self.req_mode = pc.request_body_mode
            self.resp_mode = pc.response_body_mode
        h = msg.request_headers
        self.received_at = time.monotonic()
        self.headers = envoy.headers_dict(h)
        self.request_id, self.rid_generated = parsers.request_id(self.headers)
        self.subset = envoy.subset_hint(msg)
        mode = self.req_mode
        if h.end_of_stream:
            return Pending(self.route_bodyless())
        self.phase = _BODY
        if mode == envoy.MODE_NONE or mode == envoy.MODE_STREAMED:
            # The body goes upstream without waiting for us (or never comes): route on the headers.
            self.body_unread = True
            return Pending(self.route(msg, end_of_stream=False))
        if mode == envoy.MODE_FULL_DUPLEX_STREAMED:
            if not self.svc.parsers.reads_body(parsers.request_path(self.headers)):
                self.body_unread = self.body_streamed = True
                return Pending(self.route(msg, end_of_stream=False))
            return None  # the answer waits for the body
        # BUFFERED: Envoy holds the body until this. The routing header is set (and the control headers
        # removed) on the body answer, but a request without a body (trailers only) is routed on the trailers
        # answer, which cannot change the headers: a client's routing or control headers go now.
        if envoy.DESTINATION_HEADER in self.headers or not _CONTROL_HEADER_SET.isdisjoint(self.headers):
            remove = [h for h in (envoy.DESTINATION_HEADER, *CONTROL_HEADERS) if h in self.headers]
            return pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(header_mutation=envoy.header_mutation(remove=remove))
                )
            )
        return envoy.REQUEST_HEADERS_CONTINUE

    def on_request_body(self, msg: pb.ProcessingRequest) -> Answers | Pending:
        if self.body_streamed:
            # Refused while routing (the stream is ending): the rest of the body goes nowhere.
            return self._stream_request_body(msg.request_body) if self.phase == _ROUTED else None
        if self.phase == _BODY:
            b = msg.request_body
            chunk = b.body
            if chunk:
                self.body_size += len(chunk)
                if self.body_size > self.svc.max_body_bytes:
                    self.chunks = []
                    return self.reject(PayloadTooLarge(f"request body exceeds {self.svc.max_body_bytes} bytes"), None)
                self.chunks.append(chunk)
            if b.end_of_stream or self.req_mode != envoy.MODE_FULL_DUPLEX_STREAMED:
                # BUFFERED sends the whole body in one message (even without EoS: trailers follow). BUFFERED_PARTIAL
                # too, unless it is larger than Envoy's buffer limit: then only its start comes, the rest goes
                # upstream without us. A cut body is no JSON to read: the request is routed on its headers.
                if self.req_mode == envoy.MODE_BUFFERED_PARTIAL and not b.end_of_stream:
                    if _content_length(self.headers) > self.body_size:
                        self.body_unread = True
                    elif "content-length" not in self.headers:
                        # No length to tell a body cut at the buffer limit from a whole one that trailers follow:
                        # a body that does not parse is taken as cut (routed on its headers; the server judges it).
                        self.body_maybe_cut = True
                return Pending(self.route(msg, end_of_stream=True))
            return None
        if self.phase == _ROUTED and self.req_mode == envoy.MODE_STREAMED:
            return envoy.REQUEST_BODY_CONTINUE
        if self.phase == _START:
            self.svc.protocol_error("request_body_before_headers")
            return self.reject(InternalError("ext_proc protocol error: request body before headers"), None)
        self.svc.protocol_error("unexpected_request_body")
        return None

    def _stream_request_body(self, b: pb.HttpBody) -> Answer:
        """A body routed without reading it: each chunk goes upstream as it comes."""
        chunk = b.body
        self.body_size += len(chunk)
        if b.end_of_stream and self.lab is not None and self.body_size:
            self.lab.request_size.observe(self.body_size)
        return envoy.streamed_request_body(chunk, b.end_of_stream)

    def on_request_trailers(self, msg: pb.ProcessingRequest) -> Answers | Pending:
        self.request_trailers = True
        if self.phase == _BODY and not self.body_streamed:
            # HTTP/2 request trailers end the body: route now; the body answers end without
            # EoS and the trailers answer closes the request side.
            return Pending(self._route_before_trailers(msg))
        if self.phase == _START:
            self.svc.protocol_error("request_trailers_before_headers")
        return envoy.REQUEST_TRAILERS_CONTINUE

    async def _route_before_trailers(self, msg: pb.ProcessingRequest) -> Answers:
        if self.req_mode != envoy.MODE_FULL_DUPLEX_STREAMED:
            # BUFFERED with no body at all: Envoy sent the trailers instead of a body message and waits for
            # their answer alone (a body answer is spurious: 500).
            return await self.route(msg, end_of_stream=False, on_trailers=True)
        routed = await self.route(msg, end_of_stream=False)
        if self.closed:
            return routed
        out = routed if isinstance(routed, list) else [routed] if routed is not None else []
        out.append(envoy.REQUEST_TRAILERS_CONTINUE)
        return out

    async def route_bodyless(self) -> Answers:
        req = parsers.headers_request(self.headers, request_id=self.request_id, received_at=self.received_at)
        self.request = req
        decision, answer = await self._schedule(req, bodyless=True)
        if decision is None:
            return answer
        answer = self._routing_answer(decision, on_body=False, new_body=None)
        self.request_answered = True
        return answer

    async def route(self, msg: pb.ProcessingRequest, *, end_of_stream: bool, on_trailers: bool = False) -> Answers:
        subset = envoy.subset_hint(msg)
        if subset is not None:
            self.subset = subset
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        if self.body_unread:
            req = parsers.headers_request(
                self.headers, request_id=self.request_id, received_at=self.received_at, kind=RequestKind.PASSTHROUGH
            )
            req.unread_body_size = _content_length(self.headers)
        else:
            try:
                req = self.svc.parsers.parse(
                    self.headers, body, request_id=self.request_id, received_at=self.received_at
                )
            except BadRequest as e:
                if not self.body_maybe_cut:
                    return self.reject(e, None)
                self.body_unread = True
                req = parsers.headers_request(
                    self.headers, request_id=self.request_id, received_at=self.received_at, kind=RequestKind.PASSTHROUGH
                )
        self.request = req
        decision, answer = await self._schedule(req, bodyless=False)
        if decision is None:
            return answer
        if on_trailers:
            # The request headers cannot change any more: the routing rides on the trailers answer's
            # envoy.lb metadata only (an Envoy routing by the header answers 503, as for no routing).
            self.request_answered = True
            return envoy.trailers_routing_answer(self.svc.destination(decision), decision.scores)
        if self.body_unread:
            self.request_answered = True
            # The body follows on its own; a BUFFERED_PARTIAL body cut at the buffer limit is answered here.
            on_body = self.req_mode == envoy.MODE_BUFFERED_PARTIAL
            return self._routing_answer(decision, on_body=on_body, new_body=None)
        if self.req_mode == envoy.MODE_FULL_DUPLEX_STREAMED:
            out_body = decision.body if decision.body is not None else body
            answers: list[Answer] = [self._routing_answer(decision, on_body=False, new_body=None)]
            if end_of_stream:
                answers += envoy.streamed_request_chunks(out_body, self.svc.chunk_bytes)
            elif out_body:
                # Trailers follow: every chunk without EoS.
                for start in range(0, len(out_body), self.svc.chunk_bytes):
                    piece = out_body[start : start + self.svc.chunk_bytes]
                    answers.append(envoy.streamed_request_body(piece, False))
            self.request_answered = True
            return answers
        # BUFFERED: routing (and a rewritten body, with its length) on the body answer.
        answer = self._routing_answer(decision, on_body=True, new_body=decision.body)
        self.request_answered = True
        return answer

    async def _schedule(self, req: InferenceRequest, *, bodyless: bool) -> tuple[RoutingDecision | None, Answers]:
        """Request control for `req`. Routed: (the decision, None); the caller builds the routing answer, which
        depends on where the body is. Otherwise (None, the answer): a rejection, a director failure (fail
        closed) or a plugin's direct response."""
        director = self.svc.director
        try:
            if bodyless:
                decision = director.handle_bodyless(req, self.subset)
            else:
                decision = await director.handle_request(req, self.subset)
        except RequestError as e:
            return None, self.reject(e, req)
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError) and _stream_cancelled():
                raise
            self.svc._bug_log.error("routing", "director failed (request %s)", self.request_id, exc_info=True)
            return None, self.reject(InternalError("internal error while routing the request"), req)
        # From the request headers, as the reference: the body's arrival and the queue wait included.
        self.svc._request_processing.observe(time.monotonic() - self.received_at)
        # Counted after the director: its InferenceModelRewrite sets the target model the labels carry.
        self._count_request(req)
        if isinstance(decision, DirectResponse):
            return None, self.answer_directly(decision)
        self._routed(decision)
        return decision, None

    def _routing_answer(self, decision: RoutingDecision, *, on_body: bool, new_body: bytes | None) -> bytes:
        """header_mutation (destination, request id, plugin headers; control headers removed)
        + clear_route_cache + envoy.lb dynamic metadata, on the headers or the body answer."""
        destination = self.svc.destination(decision)
        set_headers: list[tuple[str, str | bytes]] = [(envoy.DESTINATION_HEADER, destination)]
        if self.rid_generated:
            set_headers.append((envoy.REQUEST_ID_HEADER, self.request_id))
        if decision.headers:
            set_headers.extend(decision.headers.items())
        if new_body is not None:
            set_headers.append(("content-length", str(len(new_body))))
        headers = self.headers
        sets = decision.headers
        remove = (
            [h for h in CONTROL_HEADERS if h in headers and h not in sets]
            if not _CONTROL_HEADER_SET.isdisjoint(headers)
            else []
        )
        if "traceparent" in sets and "tracestate" in headers and "tracestate" not in sets:
            # The EPP's span continues the trace upstream; the client's tracestate belonged to the client's
            # traceparent (or to an invalid one, which W3C says to discard along with it).
            remove.append("tracestate")
        metadata = envoy.lb_metadata_bytes(destination, decision.scores)
        return envoy.routing_answer(set_headers, remove, metadata, on_body=on_body, body=new_body)

    def _count_request(self, req: InferenceRequest) -> None:
        """A routed request (as the reference's request_total: refused ones only count as errors)."""
        lab = self.svc.labeled(req.model, req.target_model, req.fairness_id, req.priority)
        self.lab = lab
        lab.request_total.inc()
        if req.body:
            lab.request_size.observe(len(req.body))

    def _routed(self, decision: RoutingDecision) -> None:
        self.decision = decision
        self.phase = _ROUTED
        if self.push is not None and self.request is not None:
            self.request.evict = self.evict
        if self.lab is not None:
            self.lab.running.inc()
        if self.finished:
            # Routing outlived the stream (a cancellation swallowed on the way, e.g. by 3.11's wait_for
            # when a producer finishes as the stream is reset): nobody will answer or finish it again.
            self.complete(TerminationCause.CLIENT_DISCONNECT)
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "routed to %s",
                decision.destination,
                extra={"request_id": self.request_id},
            )

    def answer_directly(self, response: DirectResponse) -> Answer:
        """A responder answered in the EPP: an ImmediateResponse, and the stream ends (nothing upstream)."""
        self.closed = True
        self.phase = _UNROUTED
        self.request_answered = True
        headers = [("content-type", response.content_type)]
        return envoy.immediate_response(response.status, response.body, headers, "llm_epp_responder")

    def reject(self, err: RequestError, req: InferenceRequest | None) -> Answer:
        """Answer with an ImmediateResponse and end the stream."""
        self.closed = True
        self.phase = _UNROUTED
        svc = self.svc
        if self.decision is None and self.received_at:  # refused while routing: request processing ends
            svc._request_processing.observe(time.monotonic() - self.received_at)
        lab = self.lab
        if lab is None:  # the capped labels ("other" past the caps): models and fairness ids are client input
            if req is not None:
                lab = svc.labeled(req.model, req.target_model, req.fairness_id, req.priority)
            else:  # never parsed (400/413)
                lab = svc.labeled("", "")
        svc.metrics.request_error_total.labels(*lab.labels, err.code).inc()
        if err.status >= 500:
            key = f"{err.status} {err.reason or err.code}"
            svc._reject_log.warning(
                key, "request rejected: %s %s", err.status, err.message, extra={"request_id": self.request_id}
            )
        elif log.isEnabledFor(logging.DEBUG):
            # 4xx are the client's or the pool's state, not ours: no log line per request.
            log.debug(
                "request rejected: %s %s",
                err.status,
                err.message,
                extra={"request_id": self.request_id},
            )
        return error_response(err, grpc=grpcwire.is_grpc(self.headers))

    # -- response side -----------------------------------------------------------------------------
    def on_response_headers(self, h: pb.HttpHeaders) -> Answer:
        t0 = time.perf_counter()
        if self.resp_started:
            self.svc.protocol_error("duplicate_response_headers")
            return envoy.RESPONSE_HEADERS_CONTINUE
        self.resp_started = True
        self._request_side_over()
        headers = envoy.headers_dict(h)
        info = ResponseInfo()
        try:
            info.status = int(headers.get(":status", "0"))
        except ValueError:
            info.status = 0
        req = self.request
        if req is not None and req.usage_reader is not None:
            # A gRPC API: its parser reads the response messages.
            info.streaming = req.stream
            self.usage = req.usage_reader(headers)
        else:
            info.streaming = EVENT_STREAM in headers.get("content-type", "").lower()  # media types ignore case
            self.usage = UsageCollector(info.streaming)
        self.info = info
        set_headers: list[tuple[str, str | bytes]] = []
        remove: list[str] = []
        if req is not None and self.decision is not None:
            extra = self.svc.director.response_headers(req, info, headers)
            if extra:
                set_headers.extend(extra.items())
            if (
                req.target_model
                and req.target_model != req.model
                and req.usage_reader is None
                # An encoded body (gzip, br, ...) is passed as it came: its bytes are no JSON to rewrite.
                and headers.get("content-encoding", "identity").strip().lower() in ("identity", "")
            ):
                # STREAMED mode answers each message once: held bytes would have no answer to go out in if
                # trailers end the body, so a response announcing trailers is rewritten chunk by chunk.
                hold = self.resp_mode != envoy.MODE_STREAMED or "trailer" not in headers
                self.rewriter = ModelNameRewriter(req.target_model, req.model, hold_tails=hold)
                if self.resp_mode != envoy.MODE_FULL_DUPLEX_STREAMED and "content-length" in headers:
                    # Non-FDS modes keep content-length; the rewrite may change the length.
                    remove.append("content-length")
        answer: Answer = (
            envoy.response_headers_response(set_headers, remove)
            if set_headers or remove
            else envoy.RESPONSE_HEADERS_CONTINUE
        )
        if h.end_of_stream:
            if grpcwire.is_grpc(self.headers):  # a trailers-only gRPC answer
                info.grpc_status = _grpc_status(headers, None)
            # The response's last message: its answer carries the reporters' metadata (as a last body chunk's).
            answer = self._with_metadata(answer)
            self._response_ended()
        if self.svc.time_response_chunks:
            self.response_time += time.perf_counter() - t0
        return answer

    def on_response_body(self, b: pb.HttpBody) -> Answer:
        timed = self.svc.time_response_chunks
        if timed:
            t0 = time.perf_counter()
        chunk = b.body
        eos = b.end_of_stream
        info = self.info
        usage = self.usage
        if info is None or usage is None:
            # Body before headers (the stream may even have completed already, which leaves an info without
            # headers): answer it anyway so Envoy is never left waiting.
            self.svc.protocol_error("response_body_before_headers")
            if info is None:
                info = self.info = ResponseInfo()
            usage = self.usage = UsageCollector(False)
            self.resp_started = True
            self._request_side_over()
        if chunk:
            if not info.bytes:
                info.whole_body = self.resp_mode not in (envoy.MODE_FULL_DUPLEX_STREAMED, envoy.MODE_STREAMED)
                info.first_byte_at = self.last_chunk_at = time.monotonic()
                if self.decision is not None and self.request is not None:
                    self.svc.director.response_first_chunk(self.request, info)
            elif info.streaming and self.lab is not None:  # the gaps between a streamed answer's chunks
                now = time.monotonic()
                self.lab.itl.observe(now - self.last_chunk_at)
                self.last_chunk_at = now
            info.bytes += len(chunk)
            usage.feed(chunk)
        rewriter = self.rewriter
        mode = self.resp_mode
        if mode == envoy.MODE_FULL_DUPLEX_STREAMED:
            if rewriter is not None:
                if eos:  # once per response: the held bytes this feed returns, should a later step fail
                    self.rewriter_flushed = rewriter.held
                chunk = rewriter.feed(chunk, eos)
            answer: Answer = envoy.streamed_response_body(chunk, eos)
        elif rewriter is not None and (chunk or eos):
            buffered = mode != envoy.MODE_STREAMED
            answer = envoy.replaced_response_body(rewriter.feed(chunk, eos or buffered))
        else:
            answer = envoy.RESPONSE_BODY_CONTINUE
        if eos or (mode != envoy.MODE_FULL_DUPLEX_STREAMED and mode != envoy.MODE_STREAMED):
            # BUFFERED / BUFFERED_PARTIAL deliver the whole body in one message.
            answer = self._with_metadata(answer)
            self._response_ended()
        if timed:
            self.response_time += time.perf_counter() - t0
        return answer

    def on_response_trailers(self, t: pb.HttpTrailers) -> Answers:
        if not self.resp_started:
            self.svc.protocol_error("response_trailers_before_headers")
            self._request_side_over()
        info = self.info
        if info is not None and grpcwire.is_grpc(self.headers):  # any gRPC answer, its usage read or not
            info.grpc_status = _grpc_status(envoy.header_map_dict(t.trailers), info.grpc_status)
        answer = self._with_metadata(envoy.RESPONSE_TRAILERS_CONTINUE)
        self._response_ended()
        rewriter = self.rewriter
        if rewriter is not None and rewriter.held:
            if self.resp_mode == envoy.MODE_FULL_DUPLEX_STREAMED:
                # The body ended without an end-of-stream chunk: what the rewriter held back goes out before the
                # trailers (the body's last answer, without EoS: the trailers end the stream).
                return [envoy.streamed_response_body(rewriter.feed(b"", True), False), answer]
            # STREAMED mode, trailers unannounced: no answer can carry the bytes any more.
            self.svc.protocol_error("rewrite_bytes_lost_at_trailers")
            self.svc._reject_log.warning(
                "rewrite_lost",
                "ext_proc: the response of request %s ended in unannounced trailers in STREAMED mode; %d bytes the "
                "model-name rewrite held back are lost (FULL_DUPLEX_STREAMED has no such loss)",
                self.request_id,
                len(rewriter.held),
            )
        return answer

    def _request_side_over(self) -> None:
        """The response side started before the request was routed (Envoy's local reply: a timeout,
        ...): the request side will never be answered, and nothing may be routed from now on."""
        if self.phase == _BODY or self.phase == _START:
            self.phase = _UNROUTED
            self.chunks = []

    def _with_metadata(self, answer: Answer) -> Answer:
        """The answer to a response's last message, with the ResponseMetadataProcessors' dynamic metadata
        (their usage is read now, not after the answer, only while one is configured)."""
        director = self.svc.director
        req, info = self.request, self.info
        if self.decision is None or req is None or info is None or self.completed or self.completing is not None:
            return answer
        if not director.reports_metadata:
            return answer
        if self.usage is not None and info.usage is None:
            try:
                info.usage = self.usage.result()
            except Exception:
                self.svc._bug_log.error("usage", "usage extraction failed (request %s)", self.request_id, exc_info=True)
        metadata = director.response_metadata(req, info)
        return envoy.with_dynamic_metadata(answer, metadata) if metadata else answer

    def _response_ended(self) -> None:
        """Natural end: account right after the final answer is written, not before it.

        Usage parsing, histograms and director.response_complete (plugins) then run off the
        client's latency path. `finish()` runs a still-queued completion synchronously, so
        it stays exactly once and keeps its cause.
        """
        if self.completed or self.completing is not None:
            return
        self.completing = TerminationCause.NATURAL
        self.ended_at = time.monotonic()
        try:
            asyncio.get_running_loop().call_soon(self._complete_queued)
        except RuntimeError:  # no running loop (direct use of the state machine)
            self._complete_queued()

    def _complete_queued(self) -> None:
        if self.completing is not None:
            self.complete(self.completing)

    def evict(self) -> bool:
        """Flow control revoked this routed request: release it now and answer 429 (Envoy replies to
        the client, or resets the stream if the response has started, and resets the upstream request
        either way). False if the request has ended already."""
        push = self.push
        if push is None or self.closed or self.completed or self.completing is not None or self.decision is None:
            return False
        err = Evicted()
        lab = self.lab or self.svc.labeled("", "")
        self.svc.metrics.request_error_total.labels(*lab.labels, err.code).inc()
        self.closed = True
        self.complete(TerminationCause.EVICTED)
        push(error_response(err, grpc=grpcwire.is_grpc(self.headers)))
        return True

    # -- failures ------------------------------------------------------------------------------------
    def fallback(self, msg: pb.ProcessingRequest) -> Answers:
        """An unexpected exception while handling `msg`: log it and answer safely."""
        kind = msg.WhichOneof("request")
        self.svc._bug_log.error(
            "handling", "ext_proc: error handling %s (request %s)", kind, self.request_id, exc_info=True
        )
        self.svc.protocol_error("internal_error")
        request_side = kind in ("request_headers", "request_body", "request_trailers")
        if request_side and not self.request_answered and self.phase != _UNROUTED:
            if self.decision is not None:
                # Routed, but the answer could not be built: release, then fail closed.
                self.complete(TerminationCause.ERROR)
            return self.reject(InternalError("internal error while processing the request"), self.request)
        if kind == "request_body" and self.phase == _ROUTED:
            # A routed body's chunk still goes upstream: Envoy waits for each streamed chunk's echo.
            if self.req_mode == envoy.MODE_FULL_DUPLEX_STREAMED and self.body_streamed:
                b = msg.request_body
                return envoy.streamed_request_body(b.body, b.end_of_stream)
            if self.req_mode == envoy.MODE_STREAMED:
                return envoy.REQUEST_BODY_CONTINUE
            return None
        if kind == "request_trailers":
            return envoy.REQUEST_TRAILERS_CONTINUE
        if kind == "response_headers":
            self.resp_started = True
            return envoy.RESPONSE_HEADERS_CONTINUE
        if kind == "response_body":
            b = msg.response_body
            if b.end_of_stream:
                self.complete(TerminationCause.ERROR)
            if self.resp_mode == envoy.MODE_FULL_DUPLEX_STREAMED:
                body = b.body
                rewriter = self.rewriter
                if rewriter is not None:
                    # Echo raw from now on, the bytes the rewriter held back first (no answer carried them). Only
                    # the body's last chunk has a step after its feed (the response's metadata and completion).
                    held = rewriter.held or (self.rewriter_flushed if b.end_of_stream else b"")
                    body = held + body
                    self.rewriter = None
                return envoy.streamed_response_body(body, b.end_of_stream)
            return envoy.RESPONSE_BODY_CONTINUE
        if kind == "response_trailers":
            self.complete(TerminationCause.ERROR)
            rewriter = self.rewriter
            if rewriter is not None and rewriter.held and self.resp_mode == envoy.MODE_FULL_DUPLEX_STREAMED:
                self.rewriter = None  # what it held goes out before the trailers, as on_response_trailers sends it
                return [envoy.streamed_response_body(rewriter.held, False), envoy.RESPONSE_TRAILERS_CONTINUE]
            return envoy.RESPONSE_TRAILERS_CONTINUE
        return None

    # -- completion --------------------------------------------------------------------------------
    def finish(self) -> None:
        """The gRPC stream is over: release whatever was not released yet."""
        self.finished = True
        if self.completed:
            return
        if self.completing is not None:
            self.complete(self.completing)
            return
        if self.decision is not None or self.resp_started:
            if self.resp_started and self.resp_mode == envoy.MODE_NONE and not self.cancelled:
                self.complete(TerminationCause.NATURAL)
            else:
                self.complete(TerminationCause.CLIENT_DISCONNECT)

    def complete(self, cause: TerminationCause) -> None:
        if self.completed:
            return
        self.completed = True
        self.completing = None
        svc = self.svc
        info = self.info
        if info is None:
            info = self.info = ResponseInfo()
        info.cause = cause
        now = self.ended_at or time.monotonic()
        info.finished_at = now
        usage = self.usage
        if usage is not None and cause is TerminationCause.NATURAL and info.usage is None:
            try:
                info.usage = usage.result()
            except Exception:
                svc._bug_log.error("usage", "usage extraction failed (request %s)", self.request_id, exc_info=True)
        lab = self.lab
        req = self.request
        if req is not None and req.evict is not None:
            # Nothing left to revoke; and the bound method (request -> stream -> request) would keep both alive
            # after the stream ends, until a cyclic GC run, which a serving process makes rare (gctuning).
            req.evict = _ended
        if lab is not None and req is not None and self.decision is not None:
            lab.running.dec()
        # As the reference, latency, size and token histograms are recorded at the response's natural end only: a
        # request the client abandoned, Envoy reset or flow control evicted has no end-to-end latency or TTFT (its
        # release above and the plugins' response_complete below still run).
        if lab is not None and req is not None and cause is TerminationCause.NATURAL:
            elapsed = now - req.received_at
            lab.duration.observe(elapsed)
            # A streamed answer Envoy delivered in one message (BUFFERED response modes): its arrival is the whole
            # generation, not a first token, and it has no token gaps: no streaming TTFT or TPOT sample.
            timed = info.bytes and not (info.streaming and info.whole_body)
            if info.bytes:
                lab.response_size.observe(info.bytes)
            if timed:
                ttft = lab.ttft_streaming if info.streaming else lab.ttft_non_streaming
                ttft.observe(info.first_byte_at - req.received_at)
            u = info.usage
            if u is not None:  # as the reference: token counts only when there are some
                if u.prompt_tokens > 0:
                    lab.input_tokens.observe(u.prompt_tokens)
                out = u.completion_tokens
                if out > 0:
                    lab.output_tokens.observe(out)
                    lab.ntpot.observe(elapsed / out)
                    if out > 1 and info.streaming and timed:
                        lab.streaming_tpot.observe((now - info.first_byte_at) / (out - 1))
                lab.cached_tokens.observe(u.cached_tokens)
        if (info.status >= 400 or info.grpc_status) and cause is not TerminationCause.EVICTED:
            # (An evicted request was counted by evict(), once: its 429 is the answer the client got.)
            code = "ModelServerError" if self.decision is not None else "ProxyError"
            svc.metrics.request_error_total.labels(*(lab or svc.labeled("", "")).labels, code).inc()
        if self.resp_started and svc.time_response_chunks:
            svc._response_processing.observe(self.response_time)
        decision = self.decision
        if decision is not None and req is not None:
            try:
                svc.director.response_complete(req, info, decision)
            except Exception:
                svc._bug_log.error(
                    "completion", "director.response_complete failed (request %s)", self.request_id, exc_info=True
                )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request complete: status=%s cause=%s bytes=%s usage=%s",
                info.status,
                cause.value,
                info.bytes,
                info.usage,
                extra={"request_id": self.request_id},
            )
