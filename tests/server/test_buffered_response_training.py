"""A streamed answer Envoy delivers in one message (response body mode BUFFERED / BUFFERED_PARTIAL) trains no
TTFT or TPOT sample in the predicted-latency producer's streamingMode: its arrival is the whole generation, not
a first token, and it has no token gaps (the reference trains nothing from such a response either)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest

from llmepp.datalayer.endpoint import EndpointMetrics
from llmepp.director import RoutingDecision
from llmepp.framework.plugin import PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import InferenceRequest, ResponseInfo
from llmepp.testing.fakes import FakeDirector

from .client import BUFFERED, FDS, response_body, response_headers, serve

BODY = json.dumps({"model": "m", "prompt": "hello world", "max_tokens": 50, "stream": True}).encode()
SSE = (
    b"".join(b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % i for i in range(50))
    + b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":50,"total_tokens":53}}\n\ndata: [DONE]\n\n'
)
GENERATION = 0.3  # seconds between the response headers and the end of the answer


class ProducerDirector(FakeDirector):
    """FakeDirector that runs a real predicted-latency-producer's hooks, as the Director does."""

    def __init__(self, producer: Any) -> None:
        super().__init__(["10.0.0.1:8000"])
        self.producer = producer

    async def handle_request(self, request: InferenceRequest, subset: Sequence[str] | None) -> RoutingDecision:
        decision = self._decide(request, subset)
        ep = decision.targets[0]

        ep.metrics = EndpointMetrics(running_requests_size=2, kv_cache_usage_percent=0.3, update_time=time.monotonic())
        await self.producer.produce(request, [ep])
        self.producer.pre_request(request, SchedulingResult("default", {"default": ProfileResult([ep])}))
        return decision

    def response_first_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None:
        super().response_first_chunk(request, response)
        self.producer.first_response_chunk(request, response)

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, decision: RoutingDecision) -> None:
        super().response_complete(request, response, decision)
        self.producer.response_complete(request, response, SchedulingResult("default", {}))


def streaming_producer() -> tuple[Any, list[dict[str, Any]]]:
    p: Any = registry.build(  # its predictor client is stubbed below
        "predicted-latency-producer",
        "plp",
        {"streamingMode": True, "predictionServerURL": "http://127.0.0.1:9", "trainingServerURL": "http://127.0.0.1:9"},
    )
    prefix = registry.build("approx-prefix-cache-producer", "approx", None)
    ctx = PluginContext({x.name: x for x in (p, prefix)}, None, None, EppMetrics())
    p.setup(ctx)

    async def predict_bulk(rows: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
        return [(100.0, 10.0) for _ in rows]

    p.client.predict_bulk = predict_bulk
    sent: list[dict[str, Any]] = []
    p.client.add_training = sent.extend
    return p, sent


async def run(resp_mode: int) -> list[dict[str, Any]]:
    """One streamed completion whose 50 tokens take GENERATION seconds; the training samples it produced."""
    producer, sent = streaming_producer()
    director = ProducerDirector(producer)
    async with serve(director) as h:
        s = h.open()
        await s.route(BODY, resp_mode=resp_mode)
        await s.send(response_headers(200, "text/event-stream"))
        await s.recv()
        if resp_mode == FDS:  # tokens as they come
            chunks = SSE.split(b"\n\n")
            step = GENERATION / len(chunks)
            for i, c in enumerate(chunks):
                await asyncio.sleep(step)
                await s.send(response_body(c + b"\n\n", eos=i == len(chunks) - 1))
                await s.recv()
        else:  # Envoy buffers the whole answer and sends it once it is complete
            await asyncio.sleep(GENERATION)
            await s.send(response_body(SSE, eos=True))
            await s.recv()
        for _ in range(200):
            if director.completions:
                break
            await asyncio.sleep(0.01)
    return sent


async def test_control_a_streamed_answer_trains_a_sane_ttft_and_tpot() -> None:
    sent = await run(FDS)
    ttft = [e["actual_ttft_ms"] for e in sent if e["actual_ttft_ms"] > 0]
    tpot = [e["actual_tpot_ms"] for e in sent if e["actual_tpot_ms"] > 0]
    assert len(ttft) == 1 and ttft[0] < GENERATION * 1000 / 5
    assert tpot and all(t > 1.0 for t in tpot)  # ~6 ms per token


@pytest.mark.parametrize("mode", [BUFFERED, 3], ids=["BUFFERED", "BUFFERED_PARTIAL"])
async def test_an_answer_delivered_in_one_message_trains_no_per_token_latency(mode: int) -> None:
    """In BUFFERED / BUFFERED_PARTIAL response mode the EPP sees the whole SSE body at once: its arrival is
    not the first token and there are no inter-token gaps to measure. The producer still sends a TTFT sample
    of the whole generation (~300 ms) and TPOT samples of microseconds per token (0.3 s of generation / 49
    gaps is ~6 ms): the TPOT model learns that the pod decodes for free. The reference trains neither from a
    response body that came as one end-of-stream message in streaming mode."""
    sent = await run(mode)
    tpot = [e["actual_tpot_ms"] for e in sent if e["actual_tpot_ms"] > 0]
    ttft = [e["actual_ttft_ms"] for e in sent if e["actual_ttft_ms"] > 0]
    assert tpot == [], f"TPOT samples of {tpot} ms per token from an answer that took {GENERATION * 1000:.0f} ms"
    assert ttft == [], f"TTFT sample of {ttft} ms: the whole generation, not a first token"
