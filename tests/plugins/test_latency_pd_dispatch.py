"""P/D and predicted latency: a prefill pod running this EPP's prefills is not idle (its dispatched_requests count
them until their first byte), so latency-slo-admitter sheds in a P/D pool where no pod can meet the SLO."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from helpers import endpoint, request

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import Saturated
from llmepp.framework.datakeys import LATENCY_PREDICTION_INFO, scoped
from llmepp.framework.plugin import PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import ResponseInfo

ROLE = "llm-d.ai/role"


def build(**params: Any) -> tuple[Any, Any]:
    """A predicted-latency-producer whose predictor answers every row (5000 ms TTFT, 10 ms TPOT), and a
    latency-slo-admitter reading it."""
    producer: Any = registry.build(  # its predictor client is stubbed below
        "predicted-latency-producer",
        "plp",
        {"predictionServerURL": "http://127.0.0.1:9", "trainingServerURL": "http://127.0.0.1:9", **params},
    )
    admitter = registry.build("latency-slo-admitter", "admit", None)
    prefix = registry.build("approx-prefix-cache-producer", "approx", None)
    ctx = PluginContext({p.name: p for p in (producer, admitter, prefix)}, None, None, EppMetrics())
    for p in (producer, admitter, prefix):
        p.setup(ctx)

    async def predict_bulk(rows: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
        return [(5000.0, 10.0) for _ in rows]

    producer.client.predict_bulk = predict_bulk
    producer.client.add_training = lambda entries: None
    return producer, admitter


def pd(decode: Endpoint, prefill: Endpoint) -> SchedulingResult:
    return SchedulingResult(
        "decode", {"decode": ProfileResult([decode]), "prefill": ProfileResult([prefill])}, prefill_profile="prefill"
    )


def sheddable() -> Any:
    r = request(b"x" * 400, priority=-1)
    r.headers["x-llm-d-slo-ttft-ms"] = "100"
    return r


async def test_a_pd_prefill_pod_busy_with_this_epps_requests_is_not_idle() -> None:
    """With P/D, the requests this EPP sends are charged to the decode pod only: the prefill pod's
    LatencyPredictionInfo.dispatched_requests stays 0 however many of this EPP's prefills it is running,
    so every prefill pod reads as idle (LatencyPredictionInfo's docstring: dispatched_requests "counts the
    requests this EPP has sent the endpoint and not seen finish")."""
    producer, _ = build()
    decode = endpoint(0, kv=0.6, running=8, labels={ROLE: "decode"})
    prefill = endpoint(1, kv=0.6, running=8, queue=5, labels={ROLE: "prefill"})
    for _ in range(5):  # five requests in flight, all still prefilling on the prefill pod
        r = request(b"a" * 4000)
        await producer.produce(r, [decode, prefill])
        producer.pre_request(r, pd(decode, prefill))
    assert producer.prefill_tokens(prefill) == 5000  # the EPP knows the prefill pod is working for it
    req = sheddable()
    await producer.produce(req, [decode, prefill])
    infos = req.data[scoped(LATENCY_PREDICTION_INFO, "plp")]
    assert infos[decode].dispatched_requests == 5
    assert infos[prefill].dispatched_requests == 5, "the prefill pod running 5 of this EPP's prefills reads as idle"


async def test_the_admitter_sheds_in_a_pd_pool_where_no_pod_can_meet_the_slo() -> None:
    """latency-slo-admitter on a P/D pool: every pod is busy with this EPP's requests, warm (KV 60%) and
    predicted at 5 s against a 100 ms TTFT SLO. A sheddable request must be shed, as it is in the same pool
    without disaggregation; it is admitted because the prefill pod reads dispatched_requests == 0 ("idle")."""
    producer, admitter = build()
    decode = endpoint(0, kv=0.6, running=8, labels={ROLE: "decode"})
    prefill = endpoint(1, kv=0.6, running=8, queue=5, labels={ROLE: "prefill"})
    # Control: the same two pods, each running requests of this EPP without disaggregation: shed.
    for ep in (decode, prefill):
        r = request(b"a" * 4000)
        await producer.produce(r, [decode, prefill])
        producer.pre_request(r, SchedulingResult("default", {"default": ProfileResult([ep])}))
    control = sheddable()
    await producer.produce(control, [decode, prefill])
    with pytest.raises(Saturated):
        admitter.admit(control, [decode, prefill])

    producer2, admitter2 = build()
    for _ in range(5):
        r = request(b"a" * 4000)
        await producer2.produce(r, [decode, prefill])
        producer2.pre_request(r, pd(decode, prefill))
    req = sheddable()
    await producer2.produce(req, [decode, prefill])
    with pytest.raises(Saturated):
        admitter2.admit(req, [decode, prefill])


async def test_a_prefill_pod_is_idle_again_once_its_prefills_are_over() -> None:
    """The prefill pod's share ends with the prefill (the decode pod's first byte), not with the response."""
    producer, _ = build()
    decode = endpoint(0, kv=0.6, running=8, labels={ROLE: "decode"})
    prefill = endpoint(1, kv=0.6, running=8, labels={ROLE: "prefill"})
    r = request(b"a" * 4000)
    await producer.produce(r, [decode, prefill])
    producer.pre_request(r, pd(decode, prefill))
    producer.first_response_chunk(r, ResponseInfo(status=200, streaming=True, first_byte_at=time.monotonic(), bytes=9))
    req = sheddable()
    await producer.produce(req, [decode, prefill])
    infos = req.data[scoped(LATENCY_PREDICTION_INFO, "plp")]
    assert (infos[decode].dispatched_requests, infos[prefill].dispatched_requests) == (1, 0)
