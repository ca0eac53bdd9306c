"""The Envoy ext_proc service on grpc.aio: `ExternalProcessor/Process`, one stream per request.

The protocol itself (what is answered when) lives in stream.py; this module runs one
`ExtProcStream` per gRPC stream and owns the server setup:

    server, port = create_server(ExtProcServicer(director, metrics, settings), settings)
    await server.start()

Answers are written as prebuilt / hand-encoded bytes where possible (`add_to_server`
registers a serializer that passes bytes through).

grpc.aio spends 50-70 µs of CPU per message in thread hand-offs on a 2-vCPU VM; h2.py
serves the same streams on the event loop at a fraction of that (benchmarks/EXTPROC.md):

    server = create_h2_server(ExtProcServicer(director, metrics, settings), settings)
    await server.start()   # server.port; server.stop(grace)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmepp.server import envoy
from llmepp.server.listen import grpc_address
from llmepp.server.stream import (
    CONTROL_HEADERS,
    Answers,
    Director,
    ExtProcStream,
    InternalError,
    Pending,
    StreamContext,
    error_body,
    error_response,
)
from llmepp.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "CONTROL_HEADERS",
    "Director",
    "ExtProcServicer",
    "InternalError",
    "add_to_server",
    "create_server",
    "error_body",
    "error_response",
    "server_options",
]


class ExtProcServicer(StreamContext):
    """`envoy.service.ext_proc.v3.ExternalProcessor` on grpc.aio.

    Register with `add_to_server` (not the generated helper): its serializer lets prebuilt
    answers go out as bytes.
    """

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any) -> None:
        # grpc.aio allows one write at a time: answers pushed outside a message handler (in-flight
        # eviction's 429) take turns with the loop's through a lock; only then is there one.
        lock = asyncio.Lock() if self.out_of_band else None
        pushes: list[asyncio.Task[None]] = []
        stream = ExtProcStream(self, _pusher(context, lock, pushes) if lock is not None else None)
        self.stream_opened()
        try:
            read = context.read
            write = context.write if lock is None else _locked(context.write, lock)
            eof = grpc.aio.EOF
            while True:
                msg = await read()
                if pushes:  # answered out of band while we waited (an eviction's 429): this message comes too late
                    break
                if msg is eof:
                    if self._stream_metrics is not None:
                        # A client's cancel reaches a handler waiting here as this same EOF (the failed read
                        # is swallowed); grpc.aio injects its CancelledError only from the call's close
                        # event, which comes before one more read completes: a cancelled stream raises here,
                        # a half-closed one reads EOF again at once. A core round trip, so only when counted.
                        await read()
                    break
                try:
                    kind = msg.WhichOneof("request")
                    out: Any = stream.handle(kind, msg)
                    if out.__class__ is Pending:
                        out = await out.coro
                except asyncio.CancelledError:
                    raise
                except Exception:
                    out = stream.fallback(msg)
                if pushes:  # answered out of band (an eviction's 429): the stream is over, nothing follows it
                    break
                if out is not None:
                    if out.__class__ is list:
                        for answer in out:
                            if pushes:
                                break
                            await write(answer)
                    else:
                        await write(out)
                if stream.closed:
                    break
            for task in pushes:  # a pushed answer goes out before the stream ends
                await task
        except asyncio.CancelledError:
            stream.cancelled = True
            raise
        except Exception:
            # The transport failed (e.g. a write after Envoy reset the stream).
            if log.isEnabledFor(logging.DEBUG):
                log.debug("ext_proc stream ended by transport error", exc_info=True)
            stream.cancelled = True
        finally:
            try:
                stream.finish()
            finally:
                self.stream_closed(stream)  # after finish(): the code depends on how the request ended


def _locked(write: Callable[[Any], Awaitable[None]], lock: asyncio.Lock) -> Callable[[Any], Awaitable[None]]:
    async def locked_write(answer: Any) -> None:
        async with lock:
            await write(answer)

    return locked_write


def _pusher(context: Any, lock: asyncio.Lock, pushes: list[asyncio.Task[None]]) -> Callable[[Answers], None]:
    """The stream's `push`: writes `answers` from a task of its own, in turn with the handler loop."""

    async def write_all(answers: Answers) -> None:
        async with lock:
            try:
                for answer in answers if isinstance(answers, list) else [answers]:
                    await context.write(answer)
            except Exception:  # Envoy reset the stream meanwhile: nothing left to answer
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("pushed ext_proc answer not written", exc_info=True)

    def push(answers: Answers) -> None:
        if answers is not None:
            pushes.append(asyncio.get_running_loop().create_task(write_all(answers)))

    return push


def add_to_server(servicer: ExtProcServicer, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        envoy.SERVICE_NAME,
        {
            "Process": grpc.stream_stream_rpc_method_handler(
                servicer.Process,
                request_deserializer=pb.ProcessingRequest.FromString,
                response_serializer=envoy.serialize_response,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """grpc.aio server options for the ext_proc port.

    Message limits follow max_body_bytes (a BUFFERED body, or a rewritten one, travels in one
    message) unless --grpc-max-recv-msg-size / --grpc-max-send-msg-size set them. SO_REUSEPORT is
    off so a second process cannot silently share the port.
    """
    limit = settings.max_body_bytes + 1024 * 1024
    return [
        ("grpc.max_receive_message_length", settings.grpc_max_recv_msg_size or limit),
        ("grpc.max_send_message_length", settings.grpc_max_send_msg_size or limit),
        ("grpc.so_reuseport", 0),
        # Envoy keeps one HTTP/2 connection and multiplexes every request on it.
        ("grpc.max_concurrent_streams", 100_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def create_server(
    servicer: ExtProcServicer,
    settings: Settings,
    *,
    address: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the ext_proc service bound (not started) and its bound port.

    `options` are appended to `server_options(settings)` (later entries win); `credentials` make it
    a TLS port (tls.ServingCert.grpc_credentials), else plaintext.
    """
    server = grpc.aio.server(options=[*server_options(settings), *options])
    add_to_server(servicer, server)
    address = address or grpc_address(settings.bind_address, settings.grpc_port)
    if credentials is not None:
        return server, server.add_secure_port(address, credentials)
    return server, server.add_insecure_port(address)
