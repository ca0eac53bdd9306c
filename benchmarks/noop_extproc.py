"""A minimal no-op ext_proc processor: the baseline the EPP's protocol overhead is compared to.

FULL_DUPLEX_STREAMED both ways. It routes every request to one fixed endpoint and echoes
bodies: request body chunks are echoed as they arrive (no buffering, no parsing), the
routing header answer goes out before the first body answer, response messages are
echoed one for one. It runs on the same runtimes as the EPP, with the same server options,
serializer and hand-encoded body answers, so the difference to the EPP is the EPP's work:

    --transport grpc   grpc.aio (the EPP's opt-in transport, --extproc-transport grpc)
    --transport h2     llmepp.server.h2 (the EPP's default HTTP/2 transport)

    .venv/bin/python -m benchmarks.noop_extproc --port 9002 --endpoint 127.0.0.2:8000
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.observability.metrics import EppMetrics
from llmepp.server import envoy
from llmepp.server.extproc import server_options
from llmepp.server.h2 import H2ExtProcServer, create_h2_server
from llmepp.server.stream import StreamContext
from llmepp.settings import Settings


def _route_answer(endpoint: str) -> bytes:
    return envoy.routing_answer([(envoy.DESTINATION_HEADER, endpoint)], (), envoy.lb_metadata_bytes(endpoint))


class NoopStream:
    """The no-op protocol for one stream (the `ExtProcStream` interface the h2 server runs)."""

    __slots__ = ("cancelled", "closed", "route", "routed")

    def __init__(self, route: bytes) -> None:
        self.route = route
        self.routed = False
        self.closed = False
        self.cancelled = False

    def handle(self, kind: str | None, msg: pb.ProcessingRequest) -> Any:
        if kind == "response_body":
            b = msg.response_body
            return envoy.streamed_response_body(b.body, b.end_of_stream)
        if kind == "request_body":
            b = msg.request_body
            answer = envoy.streamed_request_body(b.body, b.end_of_stream)
            if not self.routed:
                self.routed = True
                return [self.route, answer]
            return answer
        if kind == "request_headers":
            if msg.request_headers.end_of_stream:
                self.routed = True
                return self.route
            return None
        if kind == "response_headers":
            return envoy.RESPONSE_HEADERS_CONTINUE
        if kind == "request_trailers":
            return envoy.REQUEST_TRAILERS_CONTINUE
        if kind == "response_trailers":
            return envoy.RESPONSE_TRAILERS_CONTINUE
        return None

    def fallback(self, msg: pb.ProcessingRequest) -> Any:
        return None

    def finish(self) -> None:
        pass


class NoopProcessor:
    """The same protocol as a grpc.aio servicer."""

    def __init__(self, endpoint: str) -> None:
        self._route = _route_answer(endpoint)

    async def Process(self, request_iterator: Any, context: Any) -> None:
        read, write, eof = context.read, context.write, grpc.aio.EOF
        stream = NoopStream(self._route)
        while True:
            msg = await read()
            if msg is eof:
                return
            out = stream.handle(msg.WhichOneof("request"), msg)
            if out is None:
                continue
            if out.__class__ is list:
                for answer in out:
                    await write(answer)
            else:
                await write(out)


def create_noop_server(
    endpoint: str, address: str, options: Sequence[tuple[str, Any]] = ()
) -> tuple[grpc.aio.Server, int]:
    # The EPP's own server options, so the comparison is like for like.
    server = grpc.aio.server(options=[*server_options(Settings()), *options])
    handler = grpc.method_handlers_generic_handler(
        envoy.SERVICE_NAME,
        {
            "Process": grpc.stream_stream_rpc_method_handler(
                NoopProcessor(endpoint).Process,
                request_deserializer=pb.ProcessingRequest.FromString,
                response_serializer=envoy.serialize_response,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    return server, port


def create_noop_h2_server(endpoint: str, address: str) -> H2ExtProcServer:
    route = _route_answer(endpoint)
    settings = Settings()
    context = StreamContext(_NoDirector(), EppMetrics(), settings)  # type: ignore[arg-type]
    return create_h2_server(context, settings, address=address, stream_factory=lambda push: NoopStream(route))  # type: ignore[arg-type,return-value]


class _NoDirector:
    """The h2 server needs a context for its gauges; the no-op never calls a director."""


async def _main(port: int, endpoint: str, transport: str) -> None:
    address = f"127.0.0.1:{port}"
    if transport == "h2":
        h2 = create_noop_h2_server(endpoint, address)
        await h2.start()
        await h2.wait_for_termination()
    else:
        server, _ = create_noop_server(endpoint, address)
        await server.start()
        await server.wait_for_termination()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=9002)
    ap.add_argument("--endpoint", required=True, help="ip:port every request is routed to")
    ap.add_argument("--transport", choices=("grpc", "h2"), default="grpc")
    args = ap.parse_args()
    import uvloop

    uvloop.run(_main(args.port, args.endpoint, args.transport))
