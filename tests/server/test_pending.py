"""`Pending.step`: routing runs eagerly and is continued in a task only when it waits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

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
from llmepp.server.h2 import create_h2_server
from llmepp.server.stream import Pending
from llmepp.settings import Settings

from .client import request_body, request_headers


async def test_a_step_that_never_waits_finishes_at_once() -> None:
    async def route() -> str:
        return "answer"

    assert Pending(route()).step() == (True, "answer")


async def test_a_step_that_waits_continues_where_it_stopped() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    trace: list[str] = []

    async def route() -> str:
        trace.append("before")
        got = await gate
        trace.append(got)
        await asyncio.sleep(0)  # a bare yield after the first wait is passed through too
        return "answer " + got

    done, rest = Pending(route()).step()
    assert not done and trace == ["before"]
    task = asyncio.get_running_loop().create_task(_await(rest))
    await asyncio.sleep(0.01)
    assert not task.done()
    gate.set_result("opened")
    assert await asyncio.wait_for(task, 1.0) == "answer opened"
    assert trace == ["before", "opened"]


async def test_cancelling_the_continuation_cancels_the_step() -> None:
    cleaned: list[bool] = []

    async def route() -> str:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)
        return "never"

    done, rest = Pending(route()).step()
    assert not done
    task = asyncio.get_running_loop().create_task(_await(rest))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_errors_propagate_from_the_first_step_and_after_a_wait() -> None:
    async def fails_at_once() -> str:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):
        Pending(fails_at_once()).step()

    async def fails_later() -> str:
        await asyncio.sleep(0)
        raise ValueError("later")

    done, rest = Pending(fails_later()).step()
    assert not done
    with pytest.raises(ValueError, match="later"):
        await _await(rest)


async def _await(awaitable: object) -> object:
    return await awaitable  # type: ignore[misc]


_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
"""
_BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()


class _RecordingProducer:
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
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    components = build(load_config(_CONFIG), datastore=ds, metrics=metrics)
    producer = _RecordingProducer()
    components.pipeline.producers.append(producer)  # type: ignore[arg-type]
    director = Director(ds, components.pipeline, metrics)
    settings = Settings()
    server = create_h2_server(ExtProcServicer(director, metrics, settings), settings, address="127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(request_headers({"x-request-id": "r1"}))
        await call.write(request_body(_BODY, eos=True))
        first = await asyncio.wait_for(call.read(), 5)
        assert first.WhichOneof("response") == "request_headers", first
        assert producer.produced == ["r1"], "the async producer was skipped for this request"
        call.cancel()
    finally:
        await channel.close()
        await server.stop(None)
