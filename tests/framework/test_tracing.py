"""Request tracing: the spans the director records, the trace context the model server gets, and the
environment that turns it on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import cast

import pytest
from helpers import endpoint, request
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, StatusCode

from llmepp.config.loader import build, load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.datastore import Datastore
from llmepp.director import Director, RoutingDecision
from llmepp.errors import RequestError, ServiceUnavailable
from llmepp.framework.requestcontrol import PreRequest
from llmepp.framework.scheduling import SchedulingResult
from llmepp.observability import tracing
from llmepp.observability.metrics import EppMetrics
from llmepp.observability.tracing import SERVICE_NAME, RequestTracing, configure
from llmepp.request.types import InferenceRequest, RequestKind, ResponseInfo, Usage

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
FLOW_CONTROL = (
    DEFAULT_CONFIG.replace(
        "kind: EndpointPickerConfig\n", "kind: EndpointPickerConfig\nfeatureGates: [flowControl]\n"
    ).replace("plugins:\n", "plugins:\n- type: concurrency-detector\n", 1)
    + "flowControl: {saturationDetector: {pluginRef: concurrency-detector}}\n"
)


def traced(config: str = DEFAULT_CONFIG, pods: int = 3) -> tuple[Director, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # always on: the default sampler without OTEL_TRACES_SAMPLER
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ds = Datastore()
    for i in range(pods):
        ds.upsert(endpoint(i).spec)
    metrics = EppMetrics()
    c = build(load_config(config), datastore=ds, metrics=metrics)
    return Director(ds, c.pipeline, metrics, tracing=RequestTracing(provider.get_tracer("test"))), exporter


def with_traceparent(req: InferenceRequest, sampled: bool = True) -> InferenceRequest:
    req.headers["traceparent"] = f"00-{TRACE_ID}-{CLIENT_SPAN}-{'01' if sampled else '00'}"
    return req


async def test_a_request_is_a_server_span_in_the_clients_trace_and_the_model_server_continues_it() -> None:
    d, exporter = traced(FLOW_CONTROL)
    req = with_traceparent(request(b"a traced prompt"))
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    # The model server gets a traceparent in the same trace, its parent being the EPP's span.
    traceparent = decision.headers["traceparent"]
    _, trace_id, parent, flags = traceparent.split("-")
    assert trace_id == TRACE_ID and flags == "01"
    d.response_complete(req, ResponseInfo(status=200, usage=Usage(7, 3, 4, 10)), decision)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"gateway.request", "llm_d.epp.admission", "llm_d.epp.scheduling"}
    root = spans["gateway.request"]
    assert format(root.context.trace_id, "032x") == TRACE_ID and format(root.context.span_id, "016x") == parent
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN
    assert root.attributes is not None
    assert root.attributes["gen_ai.request.model"] == "m"
    assert root.attributes["llm_d.epp.destination"] == decision.destination
    assert root.attributes["http.response.status_code"] == 200
    assert (root.attributes["gen_ai.usage.input_tokens"], root.attributes["gen_ai.usage.output_tokens"]) == (7, 3)
    for child in ("llm_d.epp.admission", "llm_d.epp.scheduling"):
        assert (
            spans[child].parent is not None and cast(SpanContext, spans[child].parent).span_id == root.context.span_id
        )
    assert spans["llm_d.epp.scheduling"].attributes == {"llm_d.epp.primary_profile": "default",
                                                       "llm_d.epp.candidates": 3}  # fmt: skip


async def test_an_unsampled_trace_records_nothing_but_passes_the_decision_on() -> None:
    d, exporter = traced()
    req = with_traceparent(request(), sampled=False)
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.headers["traceparent"].startswith(f"00-{TRACE_ID}-") and decision.headers["traceparent"].endswith(
        "-00"
    )
    d.response_complete(req, ResponseInfo(status=200), decision)
    assert exporter.get_finished_spans() == ()


async def test_a_refused_request_ends_its_span_with_the_error() -> None:
    d, exporter = traced(pods=0)
    with pytest.raises(ServiceUnavailable):
        await d.handle_request(request(), None)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"llm_d.epp.admission", "gateway.request"}  # admitted, then no endpoint to schedule on
    span = spans["gateway.request"]
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 503
    assert span.attributes["error.type"] == "rejected-no-endpoints"


class _Boom(PreRequest):
    type = "boom-test-pre-request"

    def __init__(self, error: Exception) -> None:
        super().__init__("boom")
        self.error = error

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "error_type", "description"),
    [
        (RuntimeError("plugin bug"), 500, "Internal", "pre-request plugins failed: boom: RuntimeError"),
        (ServiceUnavailable("no capacity", reason="rejected-capacity"), 503, "rejected-capacity", "no capacity"),
    ],
)
async def test_a_failing_pre_request_plugin_ends_the_span_with_the_error(
    error: Exception, status: int, error_type: str, description: str
) -> None:
    """Scheduled, then refused by a PreRequest plugin: the span records the error as every refusal does
    (status ERROR, error.type, the status code), not as a response that ended without a status."""
    d, exporter = traced()
    d.pipeline.pre_request.append(_Boom(error))
    with pytest.raises(RequestError):
        await d.handle_request(request(), None)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"llm_d.epp.scheduling", "gateway.request"} <= set(spans)  # scheduled, then refused
    span = spans["gateway.request"]
    assert span.status.status_code is StatusCode.ERROR and span.status.description == description
    assert span.attributes is not None
    assert span.attributes["error.type"] == error_type and span.attributes["http.response.status_code"] == status


async def test_a_body_less_request_is_traced_until_its_response_ends() -> None:
    d, exporter = traced()
    req = InferenceRequest(request_id="r", path="/v1/models", headers={}, kind=RequestKind.BODYLESS)
    decision = d.handle_bodyless(req, None)
    assert isinstance(decision, RoutingDecision) and "traceparent" in decision.headers
    assert exporter.get_finished_spans() == ()
    d.response_complete(req, ResponseInfo(status=200), decision)
    assert [s.name for s in exporter.get_finished_spans()] == ["gateway.request"]


def test_the_environment_decides_whether_and_where_spans_go(caplog: pytest.LogCaptureFixture) -> None:
    assert configure(True, {}) is None  # no exporter named: nothing to trace for
    assert configure(True, {"OTEL_TRACES_EXPORTER": "none"}) is None
    assert configure(False, {"OTEL_TRACES_EXPORTER": "console"}) is None  # --tracing=false
    console = configure(True, {"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(console, RequestTracing)
    console.shutdown()
    with caplog.at_level(logging.WARNING):
        assert configure(True, {"OTEL_TRACES_EXPORTER": "zipkin"}) is None
    assert "OTEL_TRACES_EXPORTER=zipkin is not supported" in caplog.text


class StuckExporter(SpanExporter):
    """An OTLP collector that does not answer: the SDK's exporter retries for up to 30 s."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        return SpanExportResult.FAILURE


def test_shutdown_gives_up_on_an_exporter_that_cannot_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit (after the drain) must not wait out the exporter's retries past Kubernetes' grace period."""
    monkeypatch.setattr(tracing, "SHUTDOWN_TIMEOUT", 0.3, raising=False)
    exporter = StuckExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    t = RequestTracing(provider.get_tracer("test"), provider)
    t.tracer.start_span("gateway.request").end()
    started = time.monotonic()
    try:
        t.shutdown()
        assert time.monotonic() - started < 2.0
    finally:
        exporter.release.set()


def test_the_reference_flags_around_tracing_and_grpc_are_accepted() -> None:
    from llmepp.cli import settings_from_args

    s = settings_from_args(
        ["--tracing=false", "--enable-pprof=false", "--health-checking", "--enable-grpc-stream-metrics",
         "--grpc-max-recv-msg-size", "10MiB", "--grpc-max-send-msg-size", "20MiB"]
    )  # fmt: skip
    assert not s.tracing and s.grpc_stream_metrics
    assert (s.grpc_max_recv_msg_size, s.grpc_max_send_msg_size) == (10 << 20, 20 << 20)
    defaults = settings_from_args([])
    assert defaults.tracing and not defaults.grpc_stream_metrics and defaults.grpc_max_recv_msg_size is None


def test_the_sampling_ratio_alone_sets_the_default_samplers_ratio(caplog: pytest.LogCaptureFixture) -> None:
    """As the reference: OTEL_TRACES_SAMPLER_ARG without OTEL_TRACES_SAMPLER is the ratio of the default
    parentbased_traceidratio (e.g. 1.0 to trace every request); an unusable one leaves the default 0.1."""

    def ratio(env: dict[str, str]) -> str:
        t = configure(True, {"OTEL_TRACES_EXPORTER": "console", **env})
        assert t is not None and t.provider is not None
        try:
            return t.provider.sampler.get_description()
        finally:
            t.shutdown()

    assert ratio({}).startswith("ParentBased{root:TraceIdRatioBased{0.1}")
    assert ratio({"OTEL_TRACES_SAMPLER_ARG": "1.0"}).startswith("ParentBased{root:TraceIdRatioBased{1.0}")
    assert ratio({"OTEL_TRACES_SAMPLER_ARG": "0.25"}).startswith("ParentBased{root:TraceIdRatioBased{0.25}")
    with caplog.at_level(logging.WARNING):
        for bad in ("ten percent", "5", "-1", "nan"):
            assert ratio({"OTEL_TRACES_SAMPLER_ARG": bad}).startswith("ParentBased{root:TraceIdRatioBased{0.1}")
    assert "OTEL_TRACES_SAMPLER_ARG=ten percent" in caplog.text
    # Named, the reference's sampler keeps the reference's 0.1 without a usable ratio (the SDK's is 1.0), and
    # an unsupported name falls back to it (the SDK's fallback traces every request).
    for env in ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"},
                {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "ten percent"},
                {"OTEL_TRACES_SAMPLER": "parentbased_tracidratio"}):  # fmt: skip
        assert ratio(env).startswith("ParentBased{root:TraceIdRatioBased{0.1}"), env
    assert ratio({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}) == "TraceIdRatioBased{0.5}"
    assert ratio({"OTEL_TRACES_SAMPLER": "always_on"}) == "AlwaysOnSampler"


async def test_client_supplied_strings_are_bounded_in_spans() -> None:
    """A 1 MB model name (or request id, or fairness id) must not ride in every span: spans wait in the
    export queue (2048 of them) and go to the collector."""
    d, exporter = traced(FLOW_CONTROL)
    huge = "m" * (1 << 20)
    req = request(model=huge)
    req.request_id = "r" * (1 << 20)
    req.fairness_id = "f" * (1 << 20)
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    d.response_complete(req, ResponseInfo(status=200), decision)
    spans = exporter.get_finished_spans()
    assert {s.name for s in spans} == {"gateway.request", "llm_d.epp.admission", "llm_d.epp.scheduling"}
    for span in spans:
        for key, value in (span.attributes or {}).items():
            assert not isinstance(value, str) or len(value) <= 1024, key
    root = next(s for s in spans if s.name == "gateway.request")
    assert root.attributes is not None and str(root.attributes["gen_ai.request.model"]).startswith("mmm")


async def test_malformed_trace_headers_from_clients_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """The W3C propagator warns about every tracestate it cannot parse (quoting it) and every traceparent too
    long: client input, one line per request. The spec says to ignore them, and so does the EPP."""
    d, exporter = traced()
    bad = [
        {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "tracestate": "@@@not valid," + "x" * 200},
        {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "tracestate": ",".join(f"k{i}=v" for i in range(40))},
        {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "tracestate": "a=1,a=2"},
        {"traceparent": "00-" + "a" * 600},
        {"traceparent": "garbage", "tracestate": "a=1"},
    ]
    with caplog.at_level(logging.INFO):
        for headers in bad:
            req = request()
            req.headers.update(headers)
            decision = await d.handle_request(req, None)
            assert isinstance(decision, RoutingDecision)
            d.response_complete(req, ResponseInfo(status=200), decision)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    spans = [s for s in exporter.get_finished_spans() if s.name == "gateway.request"]
    assert len(spans) == len(bad)
    # A valid traceparent still parents the span, whatever its tracestate.
    assert sum(1 for s in spans if s.parent is not None and format(s.parent.span_id, "016x") == CLIENT_SPAN) == 3


def test_otel_sdk_disabled_turns_tracing_off_and_no_invalid_traceparent_goes_upstream() -> None:
    """OTEL_SDK_DISABLED=true (the spec's switch) makes the SDK's tracers no-ops: the EPP then traces
    nothing, and above all does not send the model server the all-zero traceparent of a no-op span,
    which would replace the client's."""
    from opentelemetry.trace import NoOpTracer

    assert configure(True, {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None
    assert configure(True, {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": " TRUE "}) is None
    t = RequestTracing(NoOpTracer())
    req = request()
    t.start(req)
    assert "traceparent" not in req.upstream_headers
    t.end(req, ResponseInfo(status=200))


def test_a_bad_otel_variable_checked_as_the_sdk_loads_is_a_configuration_error_and_harmless_without_tracing() -> None:
    # A fresh interpreter: the SDK reads OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT once, as it is imported.
    import subprocess
    import sys

    probe = (
        "from llmepp.app import request_tracing\n"
        "from llmepp.framework.plugin import ConfigError\n"
        "assert request_tracing(False) is None\n"
        "import sys\n"
        "assert not any(m.startswith('opentelemetry.sdk') for m in sys.modules)\n"
        "try:\n"
        "    request_tracing(True)\n"
        "except ConfigError as e:\n"
        "    print('ConfigError:', e)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "-1", "OTEL_TRACES_EXPORTER": "console"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ConfigError:") and "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT" in out.stdout


def test_the_service_name_follows_the_otel_environment() -> None:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES (the spec's order), else the EPP's own:
    the attribute was overridden by the EPP's default."""

    def service(env: dict[str, str]) -> object:
        t = configure(True, {"OTEL_TRACES_EXPORTER": "console", **env})
        assert t is not None and t.provider is not None
        try:
            return t.provider.resource.attributes["service.name"]
        finally:
            t.shutdown()

    assert service({"OTEL_RESOURCE_ATTRIBUTES": "team=ml,service.name=epp%20east"}) == "epp east"
    assert service({"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "b"}) == "b"
    assert service({}) == SERVICE_NAME
