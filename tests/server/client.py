"""Speaks ext_proc to the servicer the way Envoy does, over a real gRPC channel."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from llmepp.observability.metrics import EppMetrics
from llmepp.server.extproc import ExtProcServicer, create_server
from llmepp.server.h2 import create_h2_server
from llmepp.server.tls import ServingCert
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

FDS = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED

ENDPOINTS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
READ_TIMEOUT = 5.0


def header_map(headers: Mapping[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def request_headers(
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "/v1/completions",
    method: str = "POST",
    eos: bool = False,
    req_mode: int = FDS,
    resp_mode: int = FDS,
    subset: Sequence[str] | None = None,
) -> pb.ProcessingRequest:
    h = {":method": method, ":path": path, ":authority": "gw", "content-type": "application/json"}
    h.update(headers or {})
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=header_map(h), end_of_stream=eos),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=req_mode, response_body_mode=resp_mode),
    )
    if subset is not None:
        add_subset(msg, subset)
    return msg


def add_subset(msg: pb.ProcessingRequest, subset: Sequence[str]) -> None:
    s = struct_pb2.Struct()
    s.update({"x-gateway-destination-endpoint-subset": list(subset)})
    msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(s)


def request_body(data: bytes, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def request_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers(trailers=header_map({"x-t": "1"})))


def response_headers(
    status: int = 200, content_type: str = "application/json", eos: bool = False, **extra: str
) -> pb.ProcessingRequest:
    h = {":status": str(status), "content-type": content_type, **extra}
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(h), end_of_stream=eos))


def response_body(data: bytes, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


def response_trailers(grpc_status: str = "0") -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers(trailers=header_map({"grpc-status": grpc_status})))


def set_headers(common: pb.CommonResponse) -> dict[str, bytes]:
    return {o.header.key: o.header.raw_value for o in common.header_mutation.set_headers}


def lb_metadata(resp: pb.ProcessingResponse) -> dict[str, Any]:
    md = dict(resp.dynamic_metadata)
    lb = md["envoy.lb"]
    return {k: v for k, v in lb.items()}


def streamed(resp: pb.ProcessingResponse, phase: str) -> tuple[bytes, bool]:
    body_resp = getattr(resp, phase)
    sr = body_resp.response.body_mutation.streamed_response
    assert body_resp.response.body_mutation.WhichOneof("mutation") == "streamed_response", resp
    return sr.body, sr.end_of_stream


class Stream:
    """One Process call: write Envoy messages, read the servicer's answers."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def send(self, *msgs: pb.ProcessingRequest) -> None:
        for m in msgs:
            await self.call.write(m)

    async def recv(self) -> pb.ProcessingResponse:
        msg = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        assert msg is not grpc.aio.EOF, "stream ended"
        return msg

    async def recv_eof(self) -> None:
        msg = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        assert msg is grpc.aio.EOF, f"expected end of stream, got {msg}"

    async def close(self) -> None:
        await self.call.done_writing()

    async def status(self) -> grpc.StatusCode:
        return await asyncio.wait_for(self.call.code(), READ_TIMEOUT)

    def cancel(self) -> None:
        self.call.cancel()

    async def route(self, body: bytes, headers: Mapping[str, str] | None = None, **kw: Any) -> list[Any]:
        """Request headers + one body chunk with EoS; returns [headers answer, *body answers]."""
        await self.send(request_headers(headers, **kw), request_body(body, eos=True))
        first = await self.recv()
        if first.WhichOneof("response") == "immediate_response":
            return [first]
        out = [first]
        while True:
            r = await self.recv()
            out.append(r)
            if streamed(r, "request_body")[1]:
                return out


@dataclass
class Harness:
    servicer: ExtProcServicer
    director: FakeDirector
    metrics: EppMetrics
    stub: pb_grpc.ExternalProcessorStub
    port: int

    def open(self) -> Stream:
        return Stream(self.stub.Process())

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        v = self.metrics.registry.get_sample_value(name, dict(labels or {}))
        return 0.0 if v is None else v


# Which transport `serve` runs: "grpc" (grpc.aio) or "h2" (llmepp.server.h2).
TRANSPORT: contextvars.ContextVar[str] = contextvars.ContextVar("transport", default="grpc")


@contextlib.asynccontextmanager
async def serve(
    director: FakeDirector | None = None,
    settings: Settings | None = None,
    tls: ServingCert | None = None,
    **servicer_kw: Any,
) -> AsyncIterator[Harness]:
    """The servicer on the TRANSPORT in use; with `tls`, a TLS port and a client trusting its certificate."""
    settings = settings or Settings()
    director = director or FakeDirector(list(ENDPOINTS))
    metrics = EppMetrics()
    servicer = ExtProcServicer(director, metrics, settings, **servicer_kw)
    server: Any
    if TRANSPORT.get() == "h2":
        server = create_h2_server(servicer, settings, address="127.0.0.1:0", ssl=tls.ssl_context() if tls else None)
        await server.start()
        port = server.port
    else:
        credentials = tls.grpc_credentials() if tls else None
        server, port = create_server(servicer, settings, address="127.0.0.1:0", credentials=credentials)
        await server.start()
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    if tls is None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    else:  # the self-signed certificate names localhost
        creds = grpc.ssl_channel_credentials(root_certificates=tls.cert_pem)
        channel = grpc.aio.secure_channel(f"localhost:{port}", creds, options=options)
    try:
        yield Harness(servicer, director, metrics, pb_grpc.ExternalProcessorStub(channel), port)
    finally:
        await channel.close()
        await server.stop(None)
