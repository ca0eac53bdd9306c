"""Flow control inside the real director: queueing, the completion hook, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import FILE_CONFIG, endpoint, request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.director import Director, RoutingDecision
from llmepp.errors import RequestError
from llmepp.flowcontrol.controller import FlowController
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import ResponseInfo

from .kit import until

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: round-robin-fairness-policy
flowControl:
  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}
  saturationDetector: {pluginRef: concurrency-detector}
"""


def director() -> tuple[Director, FlowController]:
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    c = build(load_config(CONFIG), datastore=ds, metrics=metrics)
    fc = c.pipeline.admission
    assert isinstance(fc, FlowController)
    # Only completions (no poll ticks) may release queued work in these tests.
    fc._poll = 10.0
    return Director(ds, c.pipeline, metrics), fc


async def test_completion_of_a_routed_request_dispatches_the_next() -> None:
    d, fc = director()
    first = request(fairness_id="a")
    decision = await d.handle_request(first, None)  # idle pool: straight through
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].inflight.requests == 1
    second = asyncio.create_task(d.handle_request(request(fairness_id="b"), None))
    await until(lambda: fc.queued == 1)
    await asyncio.sleep(0.01)
    assert not second.done()  # the only slot is taken
    d.response_complete(first, ResponseInfo(status=200), decision)  # director → hook → dispatcher
    decision2 = await asyncio.wait_for(second, 1.0)
    assert isinstance(decision2, RoutingDecision)
    assert decision2.targets[0].inflight.requests == 1 and fc.queued == 0
    await fc.aclose()


async def test_client_disconnect_while_queued_frees_the_slot() -> None:
    d, fc = director()
    await d.handle_request(request(), None)
    waiting = asyncio.create_task(d.handle_request(request(body=b"x" * 500), None))
    await until(lambda: fc.queued == 1)
    assert fc.queued_bytes == 500
    waiting.cancel()  # what the ext_proc stream does when Envoy resets it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (fc.queued, fc.queued_bytes) == (0, 0)
    await fc.aclose()


async def test_shutdown_answers_queued_requests_with_503() -> None:
    d, fc = director()
    await d.handle_request(request(), None)
    waiting = asyncio.create_task(d.handle_request(request(), None))
    await until(lambda: fc.queued == 1)
    await fc.aclose()
    with pytest.raises(RequestError) as err:
        await waiting
    assert (err.value.status, err.value.reason) == (503, "rejected-shutting-down")


EVICTION_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 4}
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
  enableEviction: true
"""


async def test_an_admitted_request_that_is_never_routed_is_released() -> None:
    # Admission dispatched it (in-flight eviction now tracks it as revocable), then routing failed:
    # no endpoint matches the subset hint. Nothing will ever complete it, so the director must.
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    c = build(load_config(EVICTION_CONFIG), datastore=ds, metrics=metrics)
    fc = c.pipeline.admission
    assert isinstance(fc, FlowController) and fc.evictor is not None
    fc.objectives.replace({"batch": -1})
    d = Director(ds, c.pipeline, metrics)
    for _ in range(3):
        with pytest.raises(RequestError) as err:
            await d.handle_request(request(objective="batch"), ["10.9.9.9:8000"])
        assert err.value.status == 503
    assert len(fc.evictor) == 0  # not kept (with its body) forever
    routed = request(objective="batch")
    decision = await d.handle_request(routed, None)
    assert isinstance(decision, RoutingDecision)
    assert len(fc.evictor) == 1
    d.response_complete(routed, ResponseInfo(status=200), decision)
    assert len(fc.evictor) == 0
    await fc.aclose()


async def test_the_app_starts_flow_control_with_the_servers_not_at_the_first_request(tmp_path: Path) -> None:
    """The objectives-file watcher and flow GC run from start-up (they started at the first admitted request)."""
    from llmepp.app import App
    from llmepp.settings import Settings

    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    config = FILE_CONFIG.replace("/nonexistent/endpoints.yaml", str(endpoints)) + "featureGates: [flowControl]\n"
    settings = Settings(config_text=config, grpc_port=0, grpc_health_port=0, metrics_port=0,
                        bind_address="127.0.0.1", secure_serving=False)  # fmt: skip
    app = App(settings)
    try:
        await app.start()
        admission = app.components.pipeline.admission
        assert isinstance(admission, FlowController)
        assert admission._task is not None and not admission._task.done()
    finally:
        await app.shutdown()
