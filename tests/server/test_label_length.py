"""Label values from client input (model names from the body, fairness ids from a header) are bounded in count and
in length: a label value is repeated on every line of its series (13 families, histograms with 20-70 bucket lines
each), so one request with a 64 KB model name would add ~500x its size to every /metrics scrape for the life of
the process (a 1 MB name: a ~500 MB page, ~8 s of CPU per scrape, and a scrape Prometheus refuses). A value
longer than MAX_LABEL_VALUE_CHARS is reported as "other"."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from collections.abc import Awaitable, Callable

from helpers import endpoint
from prometheus_client import CollectorRegistry, generate_latest

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.director import Director
from llmepp.flowcontrol.metrics import FlowChildren, FlowControlMetrics
from llmepp.flowcontrol.types import Outcome
from llmepp.observability.metrics import MAX_LABEL_VALUE_CHARS, OVERFLOW_LABEL, BoundedLabels, EppMetrics
from llmepp.server.stream import ExtProcStream, Pending, StreamContext
from llmepp.settings import Settings
from llmepp.testing.fakes import FakeDirector

from .client import ENDPOINTS, request_body, request_headers, response_body, response_headers

LONG = 64 * 1024  # well within any request-body limit, and within Envoy's default 60 KiB header limit for a header


async def _one(ctx: StreamContext, model: str, fairness: str) -> None:
    stream = ExtProcStream(ctx)
    stream.handle("request_headers", request_headers({"x-llm-d-inference-fairness-id": fairness}))
    out = stream.handle("request_body", request_body(json.dumps({"model": model, "prompt": "hi"}).encode(), eos=True))
    if isinstance(out, Pending):
        await out.coro
    stream.handle("response_headers", response_headers())
    usage = {"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    stream.handle("response_body", response_body(json.dumps(usage).encode(), eos=True))
    await asyncio.sleep(0)
    stream.finish()


async def _growth(model: str, fairness: str) -> int:
    metrics = EppMetrics()
    ctx = StreamContext(FakeDirector(list(ENDPOINTS), record=False), metrics, Settings())
    await _one(ctx, "warm", "warm")
    before = len(generate_latest(metrics.registry))
    await _one(ctx, model, fairness)
    return len(generate_latest(metrics.registry)) - before


async def test_one_request_with_a_long_model_name_does_not_blow_up_the_scrape() -> None:
    growth = await _growth("m" * LONG, "tenant")
    # A normal new model adds ~30 KB of series; a 64 KB name adds ~33 MB (500x the request's size).
    assert growth < 1_000_000, f"one {LONG}-byte model name added {growth / 1e6:.1f} MB to every scrape"


async def test_one_request_with_a_long_fairness_id_does_not_blow_up_the_scrape() -> None:
    growth = await _growth("m", "f" * (60 * 1024 - 100))
    assert growth < 1_000_000, f"one 60 KB fairness id added {growth / 1e6:.1f} MB to every scrape"


def test_bounded_labels_report_an_over_long_value_as_other() -> None:
    labels = BoundedLabels(10)
    ok = "m" * MAX_LABEL_VALUE_CHARS
    assert labels(ok) == ok
    assert labels(ok + "m") == OVERFLOW_LABEL
    assert not labels.admits(("model", "t" * (MAX_LABEL_VALUE_CHARS + 1)))
    assert labels.admits(("model", "target"))


# -- the caches from labels to metric children are keyed after the bound --------------------------------------
NAME_BYTES = 1024 * 1024
NAMES = 40


async def _retained(step: Callable[[str], Awaitable[None]]) -> int:
    """Bytes still allocated after NAMES calls of `step(model)`, each with its own 1 MiB model name."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(NAMES):
            await step(f"{i:04d}" + "m" * NAME_BYTES)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()


async def test_scheduled_requests_do_not_keep_their_model_names() -> None:
    """A finished request's model name is not kept (scheduler_attempts' child cache, up to 10,000 keys, held each
    whole: a client sending a few hundred multi-MiB names, an unknown model still scheduled, pinned gigabytes)."""
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    metrics = EppMetrics()
    director = Director(ds, build(load_config("plugins:\n- type: queue-scorer\n"), datastore=ds).pipeline, metrics)
    ctx = StreamContext(director, metrics, Settings())

    async def one(model: str) -> None:
        stream = ExtProcStream(ctx)
        body = json.dumps({"model": model, "prompt": "hi"}).encode()
        for msg in (request_headers(), request_body(body, eos=True), response_headers(404)):
            out = stream.handle(msg.WhichOneof("request"), msg)
            if isinstance(out, Pending):
                await out.coro
        stream.handle("response_body", response_body(b'{"error":"model not found"}', eos=True))
        stream.finish()
        await asyncio.sleep(0)

    await one("warm")  # every lazily made child and cache exists
    retained = await _retained(one)
    assert retained < 4 * NAME_BYTES, f"{retained / 2**20:.1f} MiB held after {NAMES} finished requests"


async def test_flow_control_wait_series_do_not_keep_model_names() -> None:
    """A flow's queue-duration children (up to 1,000 keys per flow; the default flow lives for ever)."""
    children = FlowChildren(FlowControlMetrics(CollectorRegistry()), "default-flow", "0", "pool")
    children.wait(Outcome.DISPATCHED, "warm", "warm").observe(0.0)

    async def step(model: str) -> None:
        children.wait(Outcome.DISPATCHED, model, model).observe(0.01)

    retained = await _retained(step)
    assert retained < 4 * NAME_BYTES, f"{retained / 2**20:.1f} MiB held after {NAMES} requests left flow control"
