"""Requests that end abnormally, through the HTTP/2 transport and the real director: whatever the phase,
what a request holds is released exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from helpers import endpoint

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint
from llmepp.director import Director
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import InferenceRequest
from llmepp.server.extproc import ExtProcServicer
from llmepp.server.h2 import RST_STREAM, H2ExtProcServer, create_h2_server
from llmepp.settings import Settings

from .client import request_body, request_headers
from .test_h2 import RawClient, frame, open_stream

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
"""
BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()
LABELS = {"model_name": "m", "target_model_name": "m", "fairness_id": "default-flow", "priority": "0"}


@contextlib.asynccontextmanager
async def serving(producer: object) -> AsyncIterator[tuple[H2ExtProcServer, Datastore, EppMetrics]]:
    """The h2 ext_proc server with the real director over one endpoint and `producer` as an async data producer."""
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    components = build(load_config(CONFIG), datastore=ds, metrics=metrics)
    components.pipeline.producers.append(producer)  # type: ignore[arg-type]
    director = Director(ds, components.pipeline, metrics)
    settings = Settings()
    server = create_h2_server(ExtProcServicer(director, metrics, settings), settings, address="127.0.0.1:0")
    await server.start()
    try:
        yield server, ds, metrics
    finally:
        await server.stop(None)


class GatedProducer:
    """An async data producer (a remote tokenizer, a latency predictor) that returns when told to, then
    runs `at_end` as its next loop callback."""

    name = "gated"
    produce_timeout = 5.0

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = asyncio.Event()
        self.at_end: object = None

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        self.started.set()
        await self.go.wait()
        asyncio.get_running_loop().call_soon(self.at_end)  # type: ignore[arg-type]


async def test_a_reset_as_an_async_producer_returns_releases_the_routed_request() -> None:
    # The reset lands while the producer's result is on its way to the routing step: Python 3.11's wait_for
    # (the director's before) swallowed the cancellation, and routing completed after the stream was released.
    gated = GatedProducer()
    async with serving(gated) as (server, ds, metrics):
        client = await RawClient.connect(server.port, window=10_000_000)
        try:
            client.send(open_stream(1, request_headers(), request_body(BODY, eos=True)))
            await asyncio.wait_for(gated.started.wait(), 5)
            (conn,) = server.connections
            gated.at_end = lambda: conn.data_received(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))  # CANCEL
            gated.go.set()
            for _ in range(50):
                await asyncio.sleep(0.01)
            ep = ds.endpoints[0]
            assert (ep.inflight.requests, ep.inflight.tokens) == (0, 0)
            sample = metrics.registry.get_sample_value
            assert sample("llm_d_epp_request_running", LABELS) in (None, 0)
            assert sample("llm_d_epp_extproc_streams_inflight") == 0
            assert not [t for t in asyncio.all_tasks() if "_await_pending" in repr(t)]
        finally:
            client.close()


async def test_a_reset_in_the_same_read_as_the_body_cancels_the_waiting_producer() -> None:
    # The body's last chunk starts routing, which waits in an async producer (its step continues in a
    # task), and the reset comes in the same read: the task is cancelled before it ever ran.
    gated = GatedProducer()  # never let go: only the cancellation ends it
    async with serving(gated) as (server, ds, metrics):
        client = await RawClient.connect(server.port, window=10_000_000)
        try:
            reset = frame(RST_STREAM, 0, 1, struct.pack(">I", 8))
            client.send(open_stream(1, request_headers(), request_body(BODY, eos=True)) + reset)
            await asyncio.wait_for(gated.started.wait(), 5)
            for _ in range(20):
                await asyncio.sleep(0.01)
            assert not [t for t in asyncio.all_tasks() if "GatedProducer.produce" in repr(t)]  # not orphaned
            assert metrics.registry.get_sample_value("llm_d_epp_extproc_streams_inflight") == 0
            assert ds.endpoints[0].inflight.requests == 0
        finally:
            client.close()


class RecordingProducer:
    """An async data producer (a remote tokenizer): yields to the loop once, then records the request."""

    name = "recording"
    produce_timeout = 5.0

    def __init__(self) -> None:
        self.produced: list[str] = []

    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        await asyncio.sleep(0)
        self.produced.append(request.request_id)


async def _wait_for_312(fut, timeout):  # type: ignore[no-untyped-def]  # noqa: ASYNC109 (wait_for's signature)
    # CPython 3.12 Lib/asyncio/tasks.py wait_for, timeout > 0 branch.
    async with asyncio.timeout(timeout):
        return await fut


@pytest.mark.parametrize("as_on_312", [False, True])
async def test_an_async_producer_runs_when_the_routing_step_is_eager(
    as_on_312: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The h2 transport runs the routing step's first stretch outside any task (Pending.step). From Python 3.12
    `asyncio.wait_for` is `asyncio.timeout`, which refuses that ("Timeout should be used inside a task"): every
    async producer (tokenizer, precise prefix, predicted latency) was skipped as failed. `as_on_312` swaps in
    3.12's wait_for (the venv runs 3.11)."""
    if as_on_312:
        monkeypatch.setattr(asyncio, "wait_for", _wait_for_312)
    producer = RecordingProducer()
    async with serving(producer) as (server, _, _):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(request_headers({"x-request-id": "r1"}))
            await call.write(request_body(BODY, eos=True))
            first = await asyncio.wait_for(call.read(), 5)
            assert first.WhichOneof("response") == "request_headers", first
            assert producer.produced == ["r1"], "the async producer was skipped for this request"
            call.cancel()
        finally:
            await channel.close()
