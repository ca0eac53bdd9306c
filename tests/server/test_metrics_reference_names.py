"""Our /metrics against the reference's metric catalogue (llm-d-router docs/metrics.md and pkg/epp/metrics):
operators reuse its Grafana dashboards and alerts, so every series they read must exist here under the same
name, type and label names, with every bucket boundary the reference's histograms have (an alert on
`le="1.25"` needs that bucket; extra finer ones do not hurt a dashboard).

One EPP runs in process (file discovery over two fake vLLM pods, flow control, the approximate prefix
producer, the in-flight load producer, --enable-grpc-stream-metrics) and its /metrics page is read over HTTP
while requests wait in flow control and again after all of them ended. Flow control's eviction series and
the plugins' own series are pinned in tests/flowcontrol/test_metrics_reference.py and the plugins' tests;
where we deliberately differ, README.md says so (checked below).
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from llmepp.app import App
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector
from llmepp.testing.ports import free_port

from .client import TRANSPORT, Stream, request_body, request_headers, response_body, response_headers, serve

# -- the reference's buckets (pkg/common/observability/metrics, pkg/epp/metrics) ---------------------------
GENERAL_LATENCY = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120, 180,
    240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
REQUEST_SIZE = tuple(float(1 << i) for i in range(6, 31))  # 64 B .. 1 GiB
# 32778 (sic): the reference's literal boundary, which its dashboards name.
RESPONSE_SIZE = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
TOKEN_COUNT = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144, 524288, 1048576,
)  # fmt: skip
OUTPUT_TOKENS = (1, 8, *(float(1 << i) for i in range(4, 14)))  # 1, 8, 16 .. 8192
NTPOT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TTFT = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120)
STREAMING_TPOT = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 2,
)  # fmt: skip
ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
FAST = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # scheduler, plugins, dispatch cycle
REQUEST_PROCESSING = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RESPONSE_PROCESSING = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
STREAM_DURATION = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)
HIT_RATIO = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
HIT_BYTES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
QUEUE_DURATION = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQ = ("model_name", "target_model_name", "fairness_id", "priority")
POOL = ("name",)
FLOW = ("fairness_id", "priority", "inference_pool", "model_name", "target_model_name")

# Full name as Prometheus stores it (counters with `_total`) -> (type, label names, reference buckets).
REFERENCE: dict[str, tuple[str, tuple[str, ...], tuple[float, ...] | None]] = {
    # Request and latency.
    "llm_d_epp_request_total": ("counter", REQ, None),
    "llm_d_epp_request_error_total": ("counter", (*REQ, "error_code"), None),
    "llm_d_epp_request_duration_seconds": ("histogram", REQ, GENERAL_LATENCY),
    "llm_d_epp_request_size_bytes": ("histogram", REQ, REQUEST_SIZE),
    "llm_d_epp_response_size_bytes": ("histogram", REQ, RESPONSE_SIZE),
    "llm_d_epp_request_input_tokens": ("histogram", REQ, TOKEN_COUNT),
    "llm_d_epp_request_output_tokens": ("histogram", REQ, OUTPUT_TOKENS),
    "llm_d_epp_request_cached_tokens": ("histogram", REQ, TOKEN_COUNT),
    "llm_d_epp_request_running": ("gauge", REQ, None),
    "llm_d_epp_request_ntpot_seconds": ("histogram", REQ, NTPOT),
    "llm_d_epp_request_ttft_seconds": ("histogram", (*REQ, "streaming"), TTFT),
    "llm_d_epp_request_streaming_tpot_seconds": ("histogram", REQ, STREAMING_TPOT),
    "llm_d_epp_request_streaming_itl_seconds": ("histogram", REQ, ITL),
    # Inference pool.
    "llm_d_epp_average_kv_cache_utilization": ("gauge", POOL, None),
    "llm_d_epp_average_queue_size": ("gauge", POOL, None),
    "llm_d_epp_average_running_requests": ("gauge", POOL, None),
    "llm_d_epp_std_dev_kv_cache_utilization": ("gauge", POOL, None),
    "llm_d_epp_std_dev_queue_size": ("gauge", POOL, None),
    "llm_d_epp_std_dev_running_requests": ("gauge", POOL, None),
    "llm_d_epp_ready_endpoints": ("gauge", POOL, None),
    "llm_d_epp_per_endpoint_queue_size": ("gauge", ("name", "model_server_endpoint"), None),
    # Scheduler.
    "llm_d_epp_scheduler_e2e_duration_seconds": ("histogram", (), FAST),
    "llm_d_epp_scheduler_attempts_total": (
        "counter",
        ("status", "target_model_name", "endpoint_name", "namespace", "port"),
        None,
    ),
    # EPP processing overhead.
    "llm_d_epp_request_processing_duration_seconds": ("histogram", (), REQUEST_PROCESSING),
    "llm_d_epp_response_processing_duration_seconds": ("histogram", (), RESPONSE_PROCESSING),
    # Plugins and info.
    "llm_d_epp_plugin_duration_seconds": ("histogram", ("extension_point", "plugin_type", "plugin_name"), FAST),
    "llm_d_epp_info": ("gauge", ("commit", "build_ref"), None),
    # Data layer.
    "llm_d_epp_datalayer_poll_errors_total": ("counter", ("source_type",), None),
    "llm_d_epp_datalayer_extract_errors_total": ("counter", ("source_type", "extractor_type"), None),
    # Approximate prefix index.
    "llm_d_epp_prefix_indexer_size": ("gauge", (), None),
    "llm_d_epp_prefix_indexer_hit_ratio": ("histogram", (), HIT_RATIO),
    "llm_d_epp_prefix_indexer_hit_bytes": ("histogram", (), HIT_BYTES),
    # Flow control.
    "llm_d_epp_flow_control_request_queue_duration_seconds": (
        "histogram",
        ("fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name"),
        QUEUE_DURATION,
    ),
    "llm_d_epp_flow_control_dispatch_cycle_duration_seconds": ("histogram", (), FAST),
    "llm_d_epp_flow_control_request_enqueue_duration_seconds": (
        "histogram",
        ("fairness_id", "priority", "outcome"),
        FAST,
    ),
    "llm_d_epp_flow_control_queue_size": ("gauge", FLOW, None),
    "llm_d_epp_flow_control_queue_bytes": ("gauge", FLOW, None),
    "llm_d_epp_flow_control_pool_saturation": ("gauge", ("inference_pool", "stage"), None),
    "llm_d_epp_flow_control_stale_endpoints": ("gauge", ("detector",), None),
    "llm_d_epp_flow_control_capacity_utilization_requests": ("gauge", ("priority", "inference_pool"), None),
    "llm_d_epp_flow_control_capacity_utilization_bytes": ("gauge", ("priority", "inference_pool"), None),
    "llm_d_epp_flow_control_global_capacity_utilization_requests": ("gauge", ("inference_pool",), None),
    "llm_d_epp_flow_control_global_capacity_utilization_bytes": ("gauge", ("inference_pool",), None),
    "llm_d_epp_flow_control_requests_total": ("counter", ("outcome", "priority", "inference_pool"), None),
    # ext_proc streams (--enable-grpc-stream-metrics).
    "llm_d_epp_extproc_streams_inflight": ("gauge", (), None),
    "llm_d_epp_extproc_stream_duration_seconds": ("histogram", (), STREAM_DURATION),
    "llm_d_epp_extproc_streams_total": ("counter", ("code",), None),
}

# Reference series we deliberately do not match (or do not emit): README.md's metrics text names each.
DOCUMENTED_DIFFERENCES = (
    "llm_d_epp_inflight_requests",  # no fairness_id / priority split
    "llm_d_epp_kv_cache_index_",  # precise prefix index: our llm_d_epp_kv_events_* / llm_d_epp_kv_* instead
    "llm_d_epp_encoder_cache_",  # not emitted
    "moriio_dns_",  # no MoRI-IO connector in the sidecar
    "llm_d_epp_flow_control_reclaim_target",  # not emitted: revocations are counted, not a deficit
    "llm_d_epp_prefix_indexer_",  # no plugin_name / plugin_type labels
    "llm_d_epp_plugin_duration_seconds",  # sampled
    "llm_d_epp_request_cached_tokens",  # observed whenever there is usage
    "llm_d_epp_extproc_streams_inflight",  # always exported; grpc.aio transport: cancels count as OK
)

VLLM_PAGE = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="m"}} {queue}
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="m"}} {running}
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{model_name="m"}} {kv}
"""
PODS = [{"queue": 1, "running": 0, "kv": 0.1}, {"queue": 2, "running": 4, "kv": 0.2}]

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: file-discovery
  parameters: {{path: {endpoints}}}
- type: metrics-data-source
- type: core-metrics-extractor
- type: queue-scorer
- type: approx-prefix-cache-producer
- type: prefix-cache-scorer
- type: inflight-load-producer
- type: concurrency-detector
  parameters: {{maxConcurrency: 1}}
- type: round-robin-fairness-policy
dataLayer:
  discovery: {{pluginRef: file-discovery}}
  sources:
  - pluginRef: metrics-data-source
    extractors: [{{pluginRef: core-metrics-extractor}}]
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: prefix-cache-scorer
flowControl:
  maxRequests: 100
  maxBytes: 1G
  saturationDetector: {{pluginRef: concurrency-detector}}
  priorityBands:
  - {{priority: 0, fairnessPolicyRef: round-robin-fairness-policy}}
"""
FAIRNESS = {"x-llm-d-inference-fairness-id": "tenant-a"}
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}
SCRAPE: dict[str, Any] = {}


def _body(i: int, stream: bool = False) -> bytes:
    return json.dumps({"model": "m", "prompt": f"tell me about item {i} " * 8, "stream": stream}).encode()


async def _complete(s: Stream, *, streaming: bool = False) -> None:
    """The model server's answer to a routed stream: JSON, or SSE in four chunks (usage in the last)."""
    if not streaming:
        await s.send(response_headers())
        await s.recv()
        await s.send(response_body(json.dumps({"choices": [{"text": "ok"}], "usage": USAGE}).encode(), eos=True))
        await s.recv()
    else:
        await s.send(response_headers(content_type="text/event-stream"))
        await s.recv()
        for _ in range(3):
            await s.send(response_body(b'data: {"choices":[{"text":"x"}]}\n\n'))
            await s.recv()
            await asyncio.sleep(0.01)
        last = f"data: {json.dumps({'choices': [], 'usage': USAGE})}\n\ndata: [DONE]\n\n".encode()
        await s.send(response_body(last, eos=True))
        await s.recv()
    await s.close()


async def _scrape(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        assert resp.status == 200
        return {f.name: f for f in text_string_to_metric_families(await resp.text())}


def _page_handler(page: str) -> Any:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(text=page)

    return handler


async def _run(tmp: Path) -> dict[str, Any]:
    runners, ports = [], []
    for pod in PODS:
        page = VLLM_PAGE.format(**pod)
        app: web.Application | App
        app = web.Application()
        app.router.add_get("/metrics", _page_handler(page))
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports.append(port)
    endpoints = tmp / "endpoints.yaml"
    lines = [f"- {{name: pod-{i}, namespace: ns, address: 127.0.0.1, port: {p}}}" for i, p in enumerate(ports)]
    endpoints.write_text("endpoints:\n" + "\n".join(lines) + "\n")
    metrics_port = free_port()
    settings = Settings(
        config_text=CONFIG.format(endpoints=endpoints), grpc_port=0, grpc_health_port=0, metrics_port=metrics_port,
        bind_address="127.0.0.1", secure_serving=False, extproc_transport="grpc", grpc_stream_metrics=True,
        refresh_prometheus_metrics_interval=0.1,
    )  # fmt: skip
    app = App(settings)
    await app.start()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    stub = pb_grpc.ExternalProcessorStub(channel)
    try:
        for _ in range(100):  # both pods scraped
            if all(ep.metrics.update_time for ep in app.datastore.endpoints) and len(app.datastore.endpoints) == 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the pool gauges' refresh
        # 16 answered requests: plugin timing samples one request in 16.
        for i in range(16):
            s = Stream(stub.Process())
            await s.route(_body(i), FAIRNESS)
            await _complete(s)
        # Two routed and held (one per pod, maxConcurrency 1), a third waits in flow control.
        held = [Stream(stub.Process()) for _ in range(2)]
        for s in held:
            await s.route(_body(100, stream=True), FAIRNESS)
        waiting = Stream(stub.Process())
        queued = asyncio.ensure_future(waiting.route(_body(200), FAIRNESS))
        await asyncio.sleep(0.2)
        assert not queued.done()
        # Until the scrape shows it queued: a loaded machine may take longer than the sleep to bring its stream
        # to flow control, and it waits there until a held request completes.
        for _ in range(250):
            during = await _scrape(url)
            family = during.get("llm_d_epp_flow_control_queue_size")
            if family is not None and any(s.value for s in family.samples):
                break
            await asyncio.sleep(0.02)
        await _complete(held[0], streaming=True)
        await queued
        await _complete(held[1], streaming=True)
        await _complete(waiting)
        # A body that is not JSON: 400, counted in request_error_total.
        bad = Stream(stub.Process())
        await bad.send(request_headers(FAIRNESS), request_body(b"{not json", eos=True))
        await bad.recv()
        await bad.close()
        await asyncio.sleep(0.3)
        after = await _scrape(url)
    finally:
        await channel.close()
        await app.shutdown()
        for runner in runners:
            await runner.cleanup()
    return {"during": during, "after": after, "ports": ports}


@pytest.fixture(scope="module")
def scraped() -> Iterator[dict[str, Any]]:
    if not SCRAPE:
        with tempfile.TemporaryDirectory() as tmp:
            SCRAPE.update(asyncio.run(_run(Path(tmp))))
    yield SCRAPE


def _family(scraped: dict[str, Any], name: str) -> Any:
    """The family holding `name` (prometheus_client names a counter's family without `_total`), from the
    scrape where it has samples (queue gauges only have some while requests wait)."""
    base = name[: -len("_total")] if name.endswith("_total") else name
    found = None
    for key in ("after", "during"):
        family = scraped[key].get(base)
        if family is not None and (found is None or (family.samples and not found.samples)):
            found = family
    return found


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_metric_has_its_name_type_labels_and_buckets(scraped: dict[str, Any], name: str) -> None:
    kind, labels, buckets = REFERENCE[name]
    family = _family(scraped, name)
    assert family is not None, f"{name} is not exported"
    assert family.type == kind, f"{name}: {family.type}, the reference's is a {kind}"
    assert family.samples, f"{name}: no series after the scenario"
    if kind == "counter":
        assert any(s.name == name for s in family.samples), f"{name}: samples {[s.name for s in family.samples]}"
    for sample in family.samples:
        assert set(sample.labels) - {"le"} == set(labels), f"{name}: labels {sorted(sample.labels)}"
    if buckets is not None:
        bounds = {float(s.labels["le"]) for s in family.samples if s.name == name + "_bucket"}
        missing = sorted(set(map(float, buckets)) - bounds)
        assert not missing, f"{name}: the reference's buckets {missing} are missing"


def _value(scraped: dict[str, Any], name: str, scrape: str = "after", **labels: str) -> float:
    base = name[: -len("_total")] if name.endswith("_total") else name
    if name.endswith(("_count", "_sum")):
        base = name.rsplit("_", 1)[0]
    total = 0.0
    for sample in scraped[scrape][base].samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            total += sample.value
    return total


def test_request_series_carry_the_fairness_id_and_priority(scraped: dict[str, Any]) -> None:
    tenant = {"model_name": "m", "target_model_name": "m", "fairness_id": "tenant-a", "priority": "0"}
    # The reference counts a request once it is routed; one refused before (here: a body that is not
    # JSON, never parsed, so the default fairness id) is only in request_error_total.
    assert _value(scraped, "llm_d_epp_request_total", **tenant) == 19
    assert _value(scraped, "llm_d_epp_request_total") == 19
    unparsed = {"model_name": "", "target_model_name": "", "fairness_id": "default-flow", "priority": "0"}
    assert _value(scraped, "llm_d_epp_request_error_total", error_code="BadRequest", **unparsed) == 1
    assert _value(scraped, "llm_d_epp_request_running", **tenant) == 0


def test_per_token_latencies_are_recorded_as_the_reference_does(scraped: dict[str, Any]) -> None:
    # NTPOT = e2e / output tokens, every answered request with output tokens (19 - the 400).
    assert _value(scraped, "llm_d_epp_request_ntpot_seconds_count") == 19
    # Streaming TPOT = (e2e - TTFT) / (output tokens - 1): the two streamed answers only.
    assert _value(scraped, "llm_d_epp_request_streaming_tpot_seconds_count") == 2
    # ITL: the gaps between a streamed answer's non-empty body chunks (4 chunks, 3 gaps each).
    assert _value(scraped, "llm_d_epp_request_streaming_itl_seconds_count") == 6
    assert _value(scraped, "llm_d_epp_request_streaming_itl_seconds_sum") >= 6 * 0.009
    assert _value(scraped, "llm_d_epp_request_ttft_seconds_count", streaming="true") == 2
    assert _value(scraped, "llm_d_epp_request_ttft_seconds_count", streaming="false") == 17


def test_scheduler_attempts_name_the_endpoint_picked(scraped: dict[str, Any]) -> None:
    ports = {str(p) for p in scraped["ports"]}
    samples = [s for s in scraped["after"]["llm_d_epp_scheduler_attempts"].samples if s.name.endswith("_total")]
    picked = {(s.labels["endpoint_name"], s.labels["namespace"], s.labels["port"]) for s in samples if s.value}
    assert picked and all(ns == "ns" and port in ports and name.startswith("pod-") for name, ns, port in picked)
    assert all(s.labels["status"] == "success" and s.labels["target_model_name"] == "m" for s in samples if s.value)
    assert sum(s.value for s in samples) == 19


def test_pool_standard_deviations_are_the_sample_ones(scraped: dict[str, Any]) -> None:
    # Two pods: queue 1 and 2, running 0 and 4, KV 0.1 and 0.2; the reference divides by n - 1 and rounds
    # to two decimals.
    assert _value(scraped, "llm_d_epp_std_dev_queue_size") == pytest.approx(0.71)
    assert _value(scraped, "llm_d_epp_std_dev_running_requests") == pytest.approx(2.83)
    assert _value(scraped, "llm_d_epp_std_dev_kv_cache_utilization") == pytest.approx(0.07)


def test_build_info_and_stream_codes(scraped: dict[str, Any]) -> None:
    info = scraped["after"]["llm_d_epp_info"].samples
    assert len(info) == 1 and info[0].value == 1
    codes = {s.labels["code"] for s in scraped["after"]["llm_d_epp_extproc_streams"].samples}
    assert codes <= {"OK", "Canceled", "Unknown", "Internal", "DeadlineExceeded"}, codes


def test_queued_requests_are_labelled_with_their_models(scraped: dict[str, Any]) -> None:
    labels = {"fairness_id": "tenant-a", "priority": "0", "model_name": "m", "target_model_name": "m"}
    assert _value(scraped, "llm_d_epp_flow_control_queue_size", "during", **labels) == 1
    assert _value(scraped, "llm_d_epp_flow_control_queue_bytes", "during", **labels) > 0
    dispatched = {**labels, "outcome": "Dispatched"}
    assert _value(scraped, "llm_d_epp_flow_control_request_queue_duration_seconds_count", **dispatched) == 19
    assert _value(scraped, "llm_d_epp_flow_control_request_enqueue_duration_seconds_count") == 19


async def test_request_processing_runs_from_request_receipt_and_counts_rejections() -> None:
    """The reference times request processing from the request headers to the handled body, and records it for
    requests refused there too (flow-control rejections are its slowest samples)."""
    async with serve() as h:
        s = h.open()
        await s.send(request_headers())
        # The body is slow to come. Sent 0.3 s after the headers: the server may read the headers later than they
        # were sent (a loaded machine: 0.193 s was measured after a 0.2 s sleep), and the body at once.
        await asyncio.sleep(0.3)
        await s.send(request_body(_body(0), eos=True))
        await s.recv()
        assert h.sample("llm_d_epp_request_processing_duration_seconds_sum") >= 0.2
    from llmepp.errors import ResourceExhausted

    async with serve(FakeDirector(["10.0.0.1:8000"], fail_with=ResourceExhausted("busy"))) as h:
        s = h.open()
        await s.send(request_headers(), request_body(_body(0), eos=True))
        await s.recv()
        assert h.sample("llm_d_epp_request_processing_duration_seconds_count") == 1


async def test_a_cancelled_stream_is_counted_under_the_go_code_name() -> None:
    """extproc_streams_total{code} carries gRPC's Go names (codes.Canceled.String() is "Canceled"). On the
    default transport (h2): grpc.aio ends a cancelled stream's reads as if it had finished."""
    token = TRANSPORT.set("h2")
    try:
        await _cancel_one_stream()
    finally:
        TRANSPORT.reset(token)


async def _cancel_one_stream() -> None:
    async with serve(settings=Settings(grpc_stream_metrics=True)) as h:
        s = h.open()
        await s.send(request_headers())
        await asyncio.sleep(0.05)
        s.cancel()
        for _ in range(100):
            if h.sample("llm_d_epp_extproc_streams_total", {"code": "Canceled"}):
                break
            await asyncio.sleep(0.02)
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "Canceled"}) == 1
        assert h.sample("llm_d_epp_extproc_streams_total", {"code": "CANCELLED"}) == 0


def test_readme_names_every_deliberate_difference() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### Metrics") :]
    section = section[: re.search(r"\n## ", section).start()]  # type: ignore[union-attr]
    for name in DOCUMENTED_DIFFERENCES:
        assert name in section, f"README's metrics section does not mention {name}"
