"""OpenTelemetry tracing of requests (the reference's `--tracing`).

One server span `gateway.request` per request, parented on the client's W3C `traceparent`, from its
arrival to the end of its response, with child spans for the flow-control wait
(`llm_d.epp.admission`) and for scheduling (`llm_d.epp.scheduling`); the model server gets the
request's own `traceparent`, so its spans join the same trace. Attributes: `gen_ai.request.id`,
`gen_ai.request.model`, `llm_d.epp.target_model`, `llm_d.epp.destination`,
`http.response.status_code`, `gen_ai.usage.input_tokens` / `output_tokens`,
`llm_d.epp.cached_tokens`, `llm_d.epp.termination` (natural, client-disconnect, error, evicted), and
`error.type` for refused requests.

Configured the standard way, by environment:
    OTEL_TRACES_EXPORTER       otlp (gRPC, OTEL_EXPORTER_OTLP_* apply) | console | none (default: none,
                               so nothing is traced; the reference prints to the console)
    OTEL_TRACES_SAMPLER(_ARG)  default parentbased_traceidratio 0.1, as the reference (which takes
                               OTEL_TRACES_SAMPLER_ARG alone as that default's ratio)
    OTEL_SERVICE_NAME          default llm-d-epp
    OTEL_SDK_DISABLED          true: nothing is traced (as the spec says)
Spans are exported from a background thread (BatchSpanProcessor); an unsampled request costs a
non-recording span and the traceparent it passes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmepp.errors import RequestError
from llmepp.framework.plugin import ConfigError
from llmepp.request.types import InferenceRequest, ResponseInfo

log = logging.getLogger(__name__)

_w3c = TraceContextTextMapPropagator()  # W3C trace context only: the reference propagates no baggage
SERVICE_NAME = "llm-d-epp"
DEFAULT_SAMPLE_RATIO = 0.1
# How long the exit waits for batched spans to go out. The SDK's own bound is 30 s, which an exporter whose
# collector is down spends retrying: after the drain, that would outlast Kubernetes' grace period.
SHUTDOWN_TIMEOUT = 5.0
# Attribute values from client input (model names, request and fairness ids) are cut to this many characters:
# a span waits in the export queue (up to 2048 of them) and goes to the collector.
MAX_ATTRIBUTE_LENGTH = 256

# The W3C propagator warns, quoting it, about each tracestate it cannot parse and each traceparent too long:
# client input, a line per request. It ignores them, as the spec says; so does the log.
for _name in ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def _service_name(env: Mapping[str, str]) -> str:
    """OTEL_SERVICE_NAME, else a service.name in OTEL_RESOURCE_ATTRIBUTES (the spec's order), else ours."""
    if env.get("OTEL_SERVICE_NAME", "").strip():
        return env["OTEL_SERVICE_NAME"].strip()
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return urllib.parse.unquote(value.strip())
    return SERVICE_NAME


def _exporter(name: str) -> SpanExporter | None:
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            # xds-protos ships an older copy of opentelemetry-proto's modules; installed after it, it wins.
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER=otlp: the OTLP exporter cannot load ({e}); xds-protos' older "
                "opentelemetry-proto modules shadow the package's: pip install --force-reinstall --no-deps "
                "opentelemetry-proto"
            ) from None
        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    return None


def configure(enabled: bool, env: Mapping[str, str] = os.environ) -> RequestTracing | None:
    """The request tracer the environment asks for; None when tracing is off or exports nowhere."""
    if not enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":  # the spec's off switch
        return None
    name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    exporter = _exporter(name)
    if exporter is None:
        if name != "none":
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none): tracing is off", name)
        return None
    sampler = _sampler(env)
    resource = Resource.create({"service.name": _service_name(env)})
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing: exporting spans with %s", name)
    return RequestTracing(provider.get_tracer("llmepp"), provider)


_OTHER_SAMPLERS: dict[str, Sampler] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": ParentBased(ALWAYS_ON),
    "parentbased_always_off": ParentBased(ALWAYS_OFF),
}


def _sampler(env: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER read here, not by the SDK: the reference's parentbased_traceidratio (its default) takes
    OTEL_TRACES_SAMPLER_ARG with 0.1 when that is unset or unusable (the SDK's default ratio is 1.0), and an
    unknown name falls back to it at 0.1 (the SDK's fallback is parentbased_always_on: every request traced)."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name in ("", "parentbased_traceidratio"):
        return ParentBased(TraceIdRatioBased(_default_ratio(env)))
    if name == "traceidratio":
        return TraceIdRatioBased(_default_ratio(env))
    found = _OTHER_SAMPLERS.get(name)
    if found is None:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported: sampling parentbased_traceidratio %s", name,
                    DEFAULT_SAMPLE_RATIO)  # fmt: skip
        return ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))
    return found


def _default_ratio(env: Mapping[str, str]) -> float:
    """The default sampler's ratio: OTEL_TRACES_SAMPLER_ARG as the reference reads it, else 0.1."""
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not arg:
        return DEFAULT_SAMPLE_RATIO
    try:
        ratio = float(arg)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:  # NaN included
        log.warning("OTEL_TRACES_SAMPLER_ARG=%s is not a ratio in [0, 1]: sampling %s", arg, DEFAULT_SAMPLE_RATIO)
        return DEFAULT_SAMPLE_RATIO
    return ratio


def _bounded(value: str) -> str:
    return value[:MAX_ATTRIBUTE_LENGTH]  # the same string when it is short enough


def _take(request: InferenceRequest) -> Span | None:
    """The request's span, which is then no longer the request's: a span ends once."""
    span: Span | None = request.span
    request.span = None
    return span


def _epoch_ns(monotonic: float) -> int:
    """A time.monotonic() instant on the wall clock OpenTelemetry wants."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class RequestTracing:
    """Spans of requests. `start` opens a request's span; `stage` records a child span over a measured
    interval; `end` closes it at the response's end, `fail` when the EPP refused the request."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self.provider = provider

    def start(self, request: InferenceRequest) -> None:
        parent = _w3c.extract(request.headers) if "traceparent" in request.headers else None
        start = _epoch_ns(request.received_at) if request.received_at else None
        span = self.tracer.start_span("gateway.request", context=parent, kind=SpanKind.SERVER, start_time=start)
        request.span = span
        if span.is_recording():
            span.set_attribute("gen_ai.request.id", _bounded(request.request_id))
            if request.model:
                span.set_attribute("gen_ai.request.model", _bounded(request.model))
        # The model server continues this trace (the sampling decision travels in the flags); written
        # directly: the propagator's inject costs more than the rest of an unsampled request's tracing.
        sc = span.get_span_context()
        if not sc.is_valid:  # a no-op tracer's span: the client's traceparent, if any, goes on as it came
            return
        headers = request.upstream_headers
        headers["traceparent"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
        if sc.trace_state:
            headers["tracestate"] = sc.trace_state.to_header()

    def stage(self, request: InferenceRequest, name: str, started: float, attributes: Mapping[str, Any]) -> None:
        """A child span `name` from `started` (time.monotonic()) to now."""
        span: Span | None = request.span
        if span is None or not span.is_recording():
            return
        context: Context = set_span_in_context(span)
        child = self.tracer.start_span(name, context=context, start_time=_epoch_ns(started))
        for key, value in attributes.items():
            child.set_attribute(key, _bounded(value) if isinstance(value, str) else value)
        child.end()

    def routed(self, request: InferenceRequest, destination: str) -> None:
        span: Span | None = request.span
        if span is not None and span.is_recording():
            if request.target_model:
                span.set_attribute("llm_d.epp.target_model", _bounded(request.target_model))
            span.set_attribute("llm_d.epp.destination", destination)

    def end(self, request: InferenceRequest, response: ResponseInfo) -> None:
        span = _take(request)
        if span is None:
            return
        if span.is_recording():
            if response.status:
                span.set_attribute("http.response.status_code", response.status)
            span.set_attribute("llm_d.epp.termination", response.cause.value)
            usage = response.usage
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
                span.set_attribute("llm_d.epp.cached_tokens", usage.cached_tokens)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()

    def fail(self, request: InferenceRequest, error: BaseException) -> None:
        span = _take(request)
        if span is None:
            return
        if span.is_recording():
            if isinstance(error, RequestError):
                span.set_attribute("http.response.status_code", error.status)
                span.set_attribute("error.type", error.reason or error.code)
            else:
                span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, _bounded(str(error))))
        span.end()

    def shutdown(self) -> None:
        """Flush what is batched, for at most SHUTDOWN_TIMEOUT; spans not out by then are dropped."""
        if self.provider is not None:
            flush = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
            flush.start()
            flush.join(SHUTDOWN_TIMEOUT)
