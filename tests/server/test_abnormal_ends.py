"""Requests that end abnormally, through the HTTP/2 transport and the real director: whatever the phase,
what a request holds is released exactly once."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence

from helpers import endpoint

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint
from llmepp.director import Director
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import InferenceRequest
from llmepp.server.extproc import ExtProcServicer
from llmepp.server.h2 import RST_STREAM, create_h2_server
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
    # The reset lands while the producer's result is on its way to the routing step: Python 3.11's
    # wait_for then swallows the cancellation and routing completes after the stream was released.
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    components = build(load_config(CONFIG), datastore=ds, metrics=metrics)
    gated = GatedProducer()
    components.pipeline.producers.append(gated)  # type: ignore[arg-type]
    director = Director(ds, components.pipeline, metrics)
    settings = Settings()
    server = create_h2_server(ExtProcServicer(director, metrics, settings), settings, address="127.0.0.1:0")
    await server.start()
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
        await server.stop(None)


async def test_a_reset_in_the_same_read_as_the_body_cancels_the_waiting_producer() -> None:
    # The body's last chunk starts routing, which waits in an async producer (its step continues in a
    # task), and the reset comes in the same read: the task is cancelled before it ever ran.
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    components = build(load_config(CONFIG), datastore=ds, metrics=metrics)
    gated = GatedProducer()  # never let go: only the cancellation ends it
    components.pipeline.producers.append(gated)  # type: ignore[arg-type]
    director = Director(ds, components.pipeline, metrics)
    settings = Settings()
    server = create_h2_server(ExtProcServicer(director, metrics, settings), settings, address="127.0.0.1:0")
    await server.start()
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
        await server.stop(None)
