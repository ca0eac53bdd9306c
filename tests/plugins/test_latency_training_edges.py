"""Latency-predictor training and dispatch bookkeeping at the edges: a gRPC API's failed answers, streams
that outlive contextTTL."""

from __future__ import annotations

import time
from typing import Any

from helpers import endpoint, request

from llmepp.framework.plugin import PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.request.types import ResponseInfo, Usage


def _producer(**params: Any) -> Any:
    # predictInProduce false: produce records the request's context without calling any predictor, so the
    # training path is driven with no network (samples are captured instead of uploaded).
    p: Any = registry.build(
        "predicted-latency-producer",
        "plp",
        {
            "predictionServerURL": "http://127.0.0.1:9",
            "trainingServerURL": "http://127.0.0.1:9",
            "predictInProduce": False,
            **params,
        },
    )
    approx = registry.build("approx-prefix-cache-producer", "approx", None)
    p.setup(PluginContext({p.name: p, approx.name: approx}, None, None, None))
    sent: list[dict[str, Any]] = []
    p.client.add_training = sent.extend
    return p, sent


def _result(ep: Any) -> SchedulingResult:
    return SchedulingResult("default", {"default": ProfileResult([ep])})


async def test_a_grpc_error_answer_is_not_trained_on_non_streaming_mode() -> None:
    """A gRPC model server (vllmgrpc-parser) reports failure in grpc-status with HTTP 200; the stream marks it
    (ResponseInfo.grpc_status, counted as a ModelServerError in request_error_total). The producer documents
    "training only for responses that ended naturally with a status < 400", yet it trains the failed call's
    end-to-end time as a TTFT sample: a fast failure teaches the predictor that the pod is fast."""
    p, sent = _producer()
    ep = endpoint(0, running=2)
    req = request(b"x" * 400)
    await p.produce(req, [ep])
    p.pre_request(req, _result(ep))
    now = time.monotonic()
    info = ResponseInfo(
        status=200,
        streaming=True,
        first_byte_at=now + 0.01,
        finished_at=now + 0.02,
        bytes=40,
        grpc_status=13,
        usage=Usage(prompt_tokens=100, completion_tokens=3, total_tokens=103),
    )
    p.first_response_chunk(req, info)
    p.response_complete(req, info, _result(ep))
    assert sent == [], f"trained on a failed gRPC call: {sent}"
    await p.aclose()


async def test_a_grpc_stream_that_failed_midway_trains_no_tpot() -> None:
    """streamingMode: a Generate stream that died after a stall (grpc-status UNAVAILABLE after 30 s) must not
    become TPOT samples of (30 s / tokens) for the pod."""
    p, sent = _producer(streamingMode=True)
    ep = endpoint(0, running=2)
    req = request(b"x" * 400)
    await p.produce(req, [ep])
    p.pre_request(req, _result(ep))
    now = time.monotonic()
    info = ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.05, bytes=400)
    p.first_response_chunk(req, info)  # the first token was real: a TTFT sample is fine
    ttft_samples = list(sent)
    info.finished_at = now + 30.0
    info.grpc_status = 14
    info.usage = Usage(prompt_tokens=100, completion_tokens=11, total_tokens=111)
    p.response_complete(req, info, _result(ep))
    tpot = [e for e in sent[len(ttft_samples) :] if e["actual_tpot_ms"] > 0]
    assert tpot == [], f"TPOT trained from a failed gRPC stream: {[e['actual_tpot_ms'] for e in tpot]}"
    await p.aclose()


async def test_a_stream_still_generating_after_context_ttl_keeps_its_endpoint_busy() -> None:
    """contextTTL (5m) exists for lost responses ("as a lost response would leave them"). A live stream is not
    lost: the reference keeps its context while chunks keep coming (its TTL cache is touched on every
    ResponseBody chunk). Were the sweep to drop a request still streaming 5 minutes after dispatch (a long
    reasoning answer), its endpoint would read as idle (dispatched 0) and its TPOT SLO leave the endpoint's
    budget: latency-slo-admitter would then admit a sheddable request it must shed."""
    p, _ = _producer(streamingMode=True, predictInProduce=True)

    async def slow(rows: Any) -> list[tuple[float, float]]:
        return [(5000.0, 80.0)] * len(rows)  # every endpoint predicted far outside the SLOs below

    p.client.predict_bulk = slow
    ep = endpoint(0, running=1, kv=0.5)
    long = request(b"x" * 400)
    long.headers["x-llm-d-slo-tpot-ms"] = "20"
    await p.produce(long, [ep])
    p.pre_request(long, _result(ep))
    now = time.monotonic()
    p.first_response_chunk(long, ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.1, bytes=10))
    # Six minutes later the stream is still producing tokens (no response_complete yet); a periodic sweep runs.
    p._sweep(now + 360.0)
    assert p.dispatched(ep) == 1, "a live streaming request was dropped from its endpoint's dispatch records"
    await p.aclose()


async def test_after_the_sweep_the_admitter_sheds_what_it_should() -> None:
    from llmepp.framework.datakeys import LATENCY_PREDICTION_INFO, scoped
    from llmepp.plugins.admitters.latency_slo import LatencySLOAdmitter

    p, _ = _producer(streamingMode=True, predictInProduce=True)

    async def slow(rows: Any) -> list[tuple[float, float]]:
        return [(5000.0, 80.0)] * len(rows)

    p.client.predict_bulk = slow
    ep = endpoint(0, running=1, kv=0.5)
    long = request(b"x" * 400)
    await p.produce(long, [ep])
    p.pre_request(long, _result(ep))
    now = time.monotonic()
    p.first_response_chunk(long, ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.1, bytes=10))
    p._sweep(now + 360.0)  # the long stream goes on
    sheddable = request(b"y" * 400, priority=-1)
    sheddable.headers["x-llm-d-slo-ttft-ms"] = "100"
    await p.produce(sheddable, [ep])
    info = sheddable.data[scoped(LATENCY_PREDICTION_INFO, "plp")][ep]
    assert not info.valid
    admitter = LatencySLOAdmitter("a", LatencySLOAdmitter.Params())
    admitter.key = scoped(LATENCY_PREDICTION_INFO, "plp")
    import pytest

    from llmepp.errors import Saturated

    with pytest.raises(Saturated):  # busy (one request in flight), warm, predicted 5 s against 100 ms
        admitter.admit(sheddable, [ep])
    await p.aclose()
