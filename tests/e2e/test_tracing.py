"""Tracing end to end: a real Envoy, the `epp` program exporting over OTLP/gRPC to a collector this test
runs (a real gRPC server receiving the real export), and a simulated pod. A request carrying a W3C
`traceparent` becomes a `gateway.request` span in the client's trace, with the flow-control and
scheduling spans under it, and the request reaches the model server with a `traceparent` whose
parent is that span (read from Envoy's access log of the forwarded headers)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from llmepp.testing.ports import free_port
from llmepp.testing.stack import Stack, StackOptions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.services: set[str] = set()

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.name":
                    self.services.add(attr.value.string_value)
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced() -> AsyncIterator[tuple[Stack, Collector]]:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    try:
        async with Stack(StackOptions(pods=1, first_host=114, epp_env=env)) as stack:
            yield stack, collector
    finally:
        await server.stop(None)


def _hex(raw: bytes) -> str:
    return raw.hex()


async def test_a_request_is_traced_in_the_clients_trace(
    traced: tuple[Stack, Collector], http: aiohttp.ClientSession
) -> None:
    stack, collector = traced
    headers = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "x-request-id": "traced-1"}
    body = {"model": "sim-model", "prompt": "trace this request", "max_tokens": 3}
    async with http.post(f"{stack.url}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
    for _ in range(100):
        roots = [s for s in collector.spans if s.name == "gateway.request" and _hex(s.trace_id) == TRACE_ID]
        if roots:
            break
        await asyncio.sleep(0.05)
    assert roots, [s.name for s in collector.spans]
    (root,) = roots
    assert _hex(root.parent_span_id) == CLIENT_SPAN and collector.services == {"llm-d-epp"}
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["gen_ai.request.id"].string_value == "traced-1"
    assert attrs["gen_ai.request.model"].string_value == "sim-model"
    assert attrs["llm_d.epp.destination"].string_value == stack.pods[0].address
    assert attrs["gen_ai.usage.output_tokens"].int_value == usage["completion_tokens"] == 3
    children = {s.name for s in collector.spans if s.parent_span_id == root.span_id}
    assert children == {"llm_d.epp.admission", "llm_d.epp.scheduling"}
    # What Envoy forwarded to the pod: the trace goes on from the EPP's span.
    assert stack.envoy is not None
    for _ in range(50):
        line = next((ln for ln in stack.envoy.access_log() if "rid=traced-1" in ln), "")
        if line:
            break
        await asyncio.sleep(0.1)
    forwarded = re.search(r"tp=(\S+)", line)
    assert forwarded is not None
    assert forwarded.group(1) == f"00-{TRACE_ID}-{_hex(root.span_id)}-01"
