"""Latency-predictor routing: predicted-latency-producer (headroom formulas, SLO headers, bounded calls to
a real predictor on loopback, training samples from responses), latency-scorer (headroom groups, buckets,
composite fallback), slo-headroom-tier-filter, latency-slo-admitter, prefix-cache-affinity-filter's
`ttftSource: latencyPredictor`, the preset config through the director."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from helpers import endpoint, on_a_punctual_loop, request
from prometheus_client import generate_latest

from llmepp.config.loader import DEFAULT_PRODUCERS, build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics
from llmepp.director import Director, RoutingDecision
from llmepp.errors import REASON_SATURATED, Saturated
from llmepp.framework.datakeys import (
    LATENCY_PREDICTION_INFO,
    PREFIX_CACHE_MATCH_INFO,
    LatencyPredictionInfo,
    PrefixMatchInfo,
    scoped,
)
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.latencypredictor.schema import TrainingEntry
from llmepp.latencypredictor.server import PredictorService, Settings
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.predicted_latency import decode_sample_positions
from llmepp.request.slo import request_slos
from llmepp.request.types import InferenceRequest, ResponseInfo, TerminationCause, Usage
from llmepp.testing.ports import free_port

PRESET = Path(__file__).parents[2] / "deploy" / "config" / "predicted-latency-file-discovery.yaml"
KEY = scoped(LATENCY_PREDICTION_INFO, "plp")
PREFIX_KEY = scoped(PREFIX_CACHE_MATCH_INFO, "approx")


def make(type_: str, params: dict[str, Any] | None = None, *others: Plugin, metrics: Any = None) -> Any:
    plugin = registry.build(type_, "plp" if type_ == "predicted-latency-producer" else type_, params)
    producers = others or (registry.build("approx-prefix-cache-producer", "approx", None),)
    if type_ != "predicted-latency-producer" and not any(p.type == "predicted-latency-producer" for p in others):
        producers = (*producers, registry.build("predicted-latency-producer", "plp", None))
    ctx = PluginContext({p.name: p for p in (plugin, *producers)}, None, None, metrics)
    plugin.setup(ctx)
    return plugin


def info(ttft_h: float, tpot_h: float = 0.0, dispatched: int = 1, ttft: float = 100.0) -> LatencyPredictionInfo:
    return LatencyPredictionInfo(
        ttft_ms=ttft, tpot_ms=10.0, ttft_headroom=ttft_h, tpot_headroom=tpot_h,
        ttft_valid=ttft_h > 0, tpot_valid=tpot_h >= 0, dispatched_requests=dispatched,
    )  # fmt: skip


def with_infos(eps: list[Endpoint], infos: dict[int, LatencyPredictionInfo], **kw: Any) -> InferenceRequest:
    req = request(**kw)
    req.data[KEY] = {eps[i]: v for i, v in infos.items()}
    return req


def result(ep: Endpoint) -> SchedulingResult:
    return SchedulingResult("default", {"default": ProfileResult([ep])})


# -- latency-scorer -------------------------------------------------------------------------------
def test_scorer_bin_packs_positive_headroom_and_ignores_the_negative() -> None:
    s = make("latency-scorer")
    eps = [endpoint(i) for i in range(4)]
    # TTFT headroom 100 / 300 / 500 ms (TPOT equal): least → the one closest to its SLO wins.
    req = with_infos(eps, {0: info(100), 1: info(300), 2: info(500), 3: info(-50)})
    scores = s.score(req, eps)
    assert scores == [1.0, 0.51, 0.01, 0.0]  # ⌊(1 − c)·100⌋ + 1 over 100, c = nTTFT (TPOT range 0)
    most = make("latency-scorer", {"headroomSelectionStrategy": "most"})
    assert most.score(req, eps) == [0.01, 0.51, 1.0, 0.0]


def test_scorer_blends_ttft_and_tpot_with_the_weights() -> None:
    s = make("latency-scorer")
    eps = [endpoint(i) for i in range(3)]
    req = with_infos(eps, {0: info(100, 10), 1: info(300, 0), 2: info(200, 5)})
    # nTTFT = 0, 1, 0.5; nTPOT = 1, 0, 0.5; c = 0.8·nTTFT + 0.2·nTPOT = 0.2, 0.8, 0.5.
    # (⌊(1 − c)·100⌋ + 1)/100; 1 − 0.8 is 0.1999… in binary, so the middle one is 0.20 (as the reference's).
    assert s.score(req, eps) == pytest.approx([0.81, 0.20, 0.51])
    even = make("latency-scorer", {"ttftWeight": 1, "tpotWeight": 1})
    assert even.score(req, eps) == pytest.approx([0.51, 0.51, 0.51])


def test_scorer_all_negative_prefers_idle_then_the_least_severe_deficit() -> None:
    s = make("latency-scorer")
    eps = [endpoint(i) for i in range(4)]
    idle = with_infos(eps, {0: info(-10, dispatched=3), 1: info(-500, dispatched=0), 2: info(-40, dispatched=0),
                            3: info(-1, dispatched=2)})  # fmt: skip
    # Only the idle ones are scored, with `least` on |headroom|: the smaller deficit wins.
    assert s.score(idle, eps) == [0.0, 0.01, 1.0, 0.0]
    busy = with_infos(eps, {0: info(-10, -5), 1: info(20, -3), 2: info(-5, 1), 3: info(30, -9)})
    # No idle endpoint: the TPOT-only-negative bucket {1, 3} (TTFT met) is the best; least |TTFT| there.
    assert s.score(busy, eps) == [0.0, 1.0, 0.0, 0.01]
    most = make("latency-scorer", {"headroomSelectionStrategy": "most"})
    assert most.score(busy, eps) == [0.0, 1.0, 0.0, 0.01]  # negative headroom is always `least`
    ttft_only = with_infos(eps, {0: info(-10, -5), 1: info(-20, 3), 2: info(-5, 1), 3: info(-30, -9)})
    assert s.score(ttft_only, eps) == [0.0, 0.01, 1.0, 0.0]


def test_scorer_without_predictions_uses_the_composite() -> None:
    s = make("latency-scorer")
    eps = [endpoint(0, queue=0, kv=0.2), endpoint(1, queue=4, kv=0.5), endpoint(2, queue=2, kv=0.0)]
    req = request()
    req.data[PREFIX_KEY] = PrefixMatchInfo(block_size=64, total_blocks=4, hits={eps[1]: 4}, hashes=[1, 2, 3, 4])
    # (1 − kv + (maxQ − q)/maxQ + prefix) / 3, rounded to 1/100.
    assert s.score(req, eps) == [round(100 * (0.8 + 1.0 + 0) / 3) / 100, round(100 * (0.5 + 0 + 1) / 3) / 100,
                                 round(100 * (1.0 + 0.5 + 0) / 3) / 100]  # fmt: skip
    req.data[KEY] = {}  # the producer ran but the predictor answered nothing
    assert s.score(req, eps)[0] == 0.6
    kv_only = make("latency-scorer", {"compositeQueueWeight": 0, "compositePrefixWeight": 0})
    assert kv_only.score(request(), eps) == [0.8, 0.5, 1.0]


def test_composite_rounds_half_up_as_the_reference() -> None:
    # The reference rounds with Go's math.Round (half away from zero); Python's round() rounds half to
    # even. KV usage 0.875 (7 of 8 blocks) gives exactly 12.5 hundredths: 0.13 there, not 0.12.
    kv_only = make("latency-scorer", {"compositeQueueWeight": 0, "compositePrefixWeight": 0})
    eps = [endpoint(0, kv=0.875), endpoint(1, kv=0.125), endpoint(2, kv=0.845)]
    assert kv_only.score(request(), eps) == [0.13, 0.88, 0.16]


@pytest.mark.parametrize("kv", [1e308, 6e306, float("nan"), float("inf"), -1e308])
def test_composite_stays_a_score_whatever_the_kv_usage(kv: float) -> None:
    # `vllm:kv_cache_usage_perc 1e308` is finite, so it reaches EndpointMetrics; 100·(1 − kv)/3 then
    # overflowed round() (OverflowError: every request failed while the predictor was down).
    s = make("latency-scorer")
    eps = [endpoint(0, queue=1, kv=kv), endpoint(1, queue=0, kv=0.5)]
    scores = s.score(request(), eps)
    assert scores[1] == round(100 * (0.5 + 1.0) / 3) / 100
    assert 0.0 <= scores[0] <= 1.0
    assert scores[0] == (0.0 if not kv < 0 else 1.0)


def test_scorer_parameters_are_validated() -> None:
    for params, message in [({"ttftWeight": -1}, "ttftWeight must be >= 0"),
                            ({"compositeKVWeight": -0.5}, "compositeKVWeight must be >= 0"),
                            ({"headroomSelectionStrategy": "best"}, "headroomSelectionStrategy must be")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message) as err:
            registry.build("latency-scorer", "ls", params)
        assert "plugin 'ls' (type latency-scorer)" in str(err.value)


# -- slo-headroom-tier-filter ---------------------------------------------------------------------
def test_tier_filter_keeps_the_positive_tier_and_explores_the_negative() -> None:
    f = make("slo-headroom-tier-filter")
    eps = [endpoint(i) for i in range(4)]
    req = with_infos(eps, {0: info(10, 1), 1: info(-10, 1), 2: info(10, -1)})  # 3 has no prediction
    f._rng = random.Random(5)
    kept = [tuple(ep.name for ep in f.filter(req, eps)) for _ in range(2000)]
    negative = kept.count(("pod-1", "pod-2", "pod-3"))
    assert kept.count(("pod-0",)) + negative == 2000 and 5 <= negative <= 40  # ε = 1%
    always = make("slo-headroom-tier-filter", {"epsilonExploreNeg": 1.0})
    assert [ep.name for ep in always.filter(req, eps)] == ["pod-1", "pod-2", "pod-3"]
    # One tier only (no SLO headers: every headroom negative), or no predictions: nothing removed.
    assert f.filter(with_infos(eps, {0: info(-1), 1: info(-2)}), eps) == [eps[0], eps[1], eps[2], eps[3]]
    assert f.filter(request(), eps) == eps
    assert f.filter(with_infos(eps, {0: info(5)}), eps[:1]) == eps[:1]
    with pytest.raises(ConfigError, match="epsilonExploreNeg must be in"):
        registry.build("slo-headroom-tier-filter", "t", {"epsilonExploreNeg": 2})


# -- latency-slo-admitter -------------------------------------------------------------------------
def test_admitter_sheds_sheddable_requests_no_endpoint_can_serve_in_time() -> None:
    a = make("latency-slo-admitter")
    eps = [endpoint(0, kv=0.5, running=3), endpoint(1, kv=0.6, running=2)]
    slo = {"x-llm-d-slo-ttft-ms": "200"}
    hopeless = {0: info(-5, dispatched=2), 1: info(-50, dispatched=1)}

    def admit(infos: dict[int, LatencyPredictionInfo], priority: int = -1, headers: Any = None,
              candidates: list[Endpoint] = eps) -> None:  # fmt: skip
        req = with_infos(eps, infos, priority=priority)
        req.headers.update(slo if headers is None else headers)
        a.admit(req, candidates)

    with pytest.raises(Saturated) as err:
        admit(hopeless)
    assert (err.value.status, err.value.reason) == (429, REASON_SATURATED)
    admit(hopeless, priority=0)  # not sheddable
    admit(hopeless, headers={})  # no SLO
    admit({})  # no predictions: fail open
    admit({**hopeless, 1: info(30, dispatched=4)})  # one endpoint meets the SLO
    admit({**hopeless, 1: info(-50, dispatched=0)})  # one endpoint is idle
    admit(hopeless, candidates=[eps[0], endpoint(2, kv=0.01, running=9)])  # a cold endpoint
    with pytest.raises(Saturated):
        admit(hopeless, headers={"x-slo-tpot-ms": "20"})  # the deprecated alias is an SLO too


# -- prefix-cache-affinity-filter, ttftSource: latencyPredictor -----------------------------------
def test_affinity_gate_reads_predicted_ttft() -> None:
    f = make("prefix-cache-affinity-filter", {"ttftSource": "latencyPredictor", "maxTTFTPenaltyMs": 1000},
             registry.build("approx-prefix-cache-producer", "approx", None),
             registry.build("predicted-latency-producer", "plp", None))  # fmt: skip
    assert f.consumes == {PREFIX_CACHE_MATCH_INFO, LATENCY_PREDICTION_INFO}
    eps = [endpoint(i) for i in range(3)]

    def req(ttfts: dict[int, float]) -> InferenceRequest:
        r = with_infos(eps, {i: info(0, ttft=t) for i, t in ttfts.items()})
        r.data[PREFIX_KEY] = PrefixMatchInfo(block_size=64, total_blocks=10, hits={eps[0]: 10}, hashes=list(range(10)))
        return r

    assert f.filter(req({0: 1500, 1: 800, 2: 900}), eps) == [eps[0]]  # 700 ms worse: still sticky
    assert f.filter(req({0: 2500, 1: 800, 2: 900}), eps) == eps  # 1700 ms worse: stickiness broken
    assert f.filter(req({}), eps) == eps  # no predictions: no signal, keep all
    assert f.filter(req({1: 100, 2: 100}), eps) == eps  # the sticky side has no prediction
    inflight = make("prefix-cache-affinity-filter", {"ttftSource": "inflight"},
                    registry.build("approx-prefix-cache-producer", "approx", None),
                    registry.build("inflight-load-producer", "ifl", None))  # fmt: skip
    assert LATENCY_PREDICTION_INFO not in inflight.consumes


# -- predicted-latency-producer -------------------------------------------------------------------
def test_slo_headers_and_sampling_positions() -> None:
    r = request()
    r.headers.update({"x-llm-d-slo-ttft-ms": "250", "x-slo-tpot-ms": "30"})
    assert request_slos(r) == (250.0, 30.0)
    for bad in ("fast", "-5", "inf", "nan"):
        r.headers["x-llm-d-slo-ttft-ms"] = bad
        assert request_slos(r)[0] == 0.0
    rng = random.Random(1)
    assert decode_sample_positions(1, 1000, 0, rng) == []
    assert decode_sample_positions(500, 1000, 0, rng)[0] == 2
    many = decode_sample_positions(100000, 1000, 0, rng)
    assert 70 < len(many) < 130  # a Poisson process of mean gap 1000 tokens
    assert len(decode_sample_positions(100000, 1000, 5, rng)) == 5
    # A finite mean near the float maximum draws infinite gaps now and then: sampling ends, never raises.
    assert all(decode_sample_positions(10_000, 1e308, 1000, random.Random(seed))[0] == 2 for seed in range(50))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"samplingMean": 0}, "samplingMean must be > 0"),
        ({"samplingMean": float("inf")}, "samplingMean must be > 0 and finite"),
        ({"sloBufferFactor": -1}, "sloBufferFactor must be > 0"),
        ({"maxDecodeTokenSamplesForPrediction": -1}, "maxDecodeTokenSamplesForPrediction must be >= 0"),
        ({"contextTTL": "soon"}, "contextTTL: invalid duration"),
        ({"predictionTimeout": "2s"}, "predictionTimeout must be > 0 and below"),
        ({"predictionServerURL": "localhost:8001"}, "predictionServerURL: 'localhost:8001' is not an http"),
        ({"streamingMode": "yes"}, "Expected `bool`, got `str` - at `parameters.streamingMode`"),
        ({"samplingMeen": 3}, "unknown field `samplingMeen`"),
    ],
)
def test_producer_parameter_errors_name_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="plugin 'p' \\(type predicted-latency-producer\\)") as err:
        registry.build("predicted-latency-producer", "p", params)
    assert message in str(err.value)


@pytest_asyncio.fixture
async def predictor() -> AsyncIterator[PredictorService]:
    svc = PredictorService(Settings(training_port=0, prediction_port=0, retraining_interval=0.05, min_samples=5))
    await svc.start()
    yield svc
    await svc.stop()


def producer(svc: PredictorService | str, **params: Any) -> Any:
    url = svc if isinstance(svc, str) else svc.urls["prediction"]
    train = svc if isinstance(svc, str) else svc.urls["training"]
    return make("predicted-latency-producer",
                {"predictionServerURL": url, "trainingServerURL": train, **params}, metrics=EppMetrics())  # fmt: skip


def train_tpot_on_running(svc: PredictorService) -> None:
    """TPOT = 10 + 2·running ms, TTFT = 50 + 100·waiting ms."""
    base: dict[str, Any] = {
        "kv_cache_percentage": 0.1,
        "input_token_length": 5,
        "num_tokens_generated": 0,
        "prefix_cache_score": 0.0,
    }
    entries = [
        TrainingEntry(**base, num_request_running=running, num_request_waiting=waiting,
                      actual_ttft_ms=50.0 + 100 * waiting, actual_tpot_ms=10.0 + 2 * running)
        for running in range(0, 30, 3)
        for waiting in range(3)
    ]  # fmt: skip
    svc.model.add(entries)
    svc.retrain()


async def test_producer_publishes_predictions_with_headroom(predictor: PredictorService) -> None:
    train_tpot_on_running(predictor)
    p = producer(predictor, streamingMode=True, sloBufferFactor=0.5)
    eps = [endpoint(0, running=0), endpoint(1, running=20, queue=2)]
    req = request(b"x" * 20)
    req.headers.update({"x-llm-d-slo-ttft-ms": "150", "x-llm-d-slo-tpot-ms": "60"})
    await p.produce(req, eps)
    infos: dict[Endpoint, LatencyPredictionInfo] = req.data[KEY]
    idle, busy = infos[eps[0]], infos[eps[1]]
    # Trained at KV 10%, asked at 0% (the prior's KV weight shifts it a little).
    assert 40 < idle.ttft_ms < 60 and 235 < busy.ttft_ms < 260
    assert 9 < idle.tpot_ms < 12 and 48 < busy.tpot_ms < 53
    assert idle.ttft_headroom == pytest.approx(150 - idle.ttft_ms) and idle.ttft_valid and not busy.ttft_valid
    # TPOT headroom against the buffered SLO: 60 · 0.5 = 30 ms.
    assert idle.tpot_headroom == pytest.approx(30 - idle.tpot_ms) and idle.tpot_valid and not busy.tpot_valid
    # A request with a tighter TPOT SLO dispatched to endpoint 0 lowers its TPOT budget for the others.
    tight = request(b"x" * 20)
    tight.headers["x-llm-d-slo-tpot-ms"] = "24"
    await p.produce(tight, eps)
    p.pre_request(tight, result(eps[0]))
    assert p.dispatched(eps[0]) == 1 and p.prefill_tokens(eps[0]) == 5
    again = request(b"x" * 20)
    again.headers.update({"x-llm-d-slo-ttft-ms": "150", "x-llm-d-slo-tpot-ms": "60"})
    await p.produce(again, eps)
    info0 = again.data[KEY][eps[0]]
    assert info0.tpot_headroom == pytest.approx(12 - info0.tpot_ms) and info0.dispatched_requests == 1
    p.response_complete(tight, ResponseInfo(status=200, cause=TerminationCause.CLIENT_DISCONNECT), result(eps[0]))
    assert p.dispatched(eps[0]) == 0 and p.prefill_tokens(eps[0]) == 0
    await p.aclose()


async def test_producer_neutralises_tpot_when_not_streaming_and_for_prefill_pods(predictor: PredictorService) -> None:
    eps = [endpoint(0), endpoint(1, labels={"llm-d.ai/role": "prefill"})]
    req = request()
    req.headers["x-llm-d-slo-tpot-ms"] = "1"  # unreachable, yet not counted against anyone
    plain = producer(predictor)
    await plain.produce(req, eps)
    assert all(i.tpot_headroom == 0 and i.tpot_valid for i in req.data[KEY].values())
    role = producer(predictor, streamingMode=True, endpointRoleLabel="llm-d.ai/role")
    await role.produce(req, eps)
    decode, prefill = req.data[KEY][eps[0]], req.data[KEY][eps[1]]
    assert not decode.tpot_valid and decode.tpot_headroom < 0
    assert prefill.tpot_valid and prefill.tpot_headroom == 0
    # Without an SLO every headroom is −predicted: nothing is valid, the lowest prediction is closest to 0.
    bare = request()
    await plain.produce(bare, eps)
    assert all(i.ttft_headroom == -i.ttft_ms and not i.ttft_valid for i in bare.data[KEY].values())
    await plain.aclose()
    await role.aclose()


async def answering(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    """A predictor stand-in on loopback answering every path with `handler`: (its runner, its URL)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def slow_predictor(delay: float) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response({"detail": "late"})

    return await answering(handler)


async def test_a_slow_or_dead_predictor_never_stalls_routing(caplog: pytest.LogCaptureFixture) -> None:
    async def measure() -> None:
        caplog.clear()  # a measurement counts its own warnings
        runner, url = await slow_predictor(5.0)
        try:
            p = producer(url, predictionTimeout="100ms")
            eps = [endpoint(0), endpoint(1)]
            t0 = time.monotonic()
            first = request()
            await p.produce(first, eps)
            assert time.monotonic() - t0 < 0.3 and KEY not in first.data  # bounded, then no prediction
            t1 = time.monotonic()
            for _ in range(20):  # backing off: routed at once, not one timeout each
                r = request()
                await p.produce(r, eps)
                assert KEY not in r.data
            assert time.monotonic() - t1 < 0.1
            counts = {k: c.value for k, c in p._metrics.unavailable._children.items()}
            assert counts[("plp", "timeout")] == 1 and counts[("plp", "skipped")] == 20
            warnings = [r for r in caplog.records if "latency predictor unavailable" in r.getMessage()]
            assert len(warnings) == 1  # logged once per interval, not per request
            await p.aclose()
        finally:
            await runner.cleanup()
        dead = producer(f"http://127.0.0.1:{free_port()}")
        r = request()
        t0 = time.monotonic()
        await dead.produce(r, [endpoint(0)])
        assert time.monotonic() - t0 < 0.3 and KEY not in r.data
        await dead.aclose()

    await on_a_punctual_loop(measure)


async def test_the_producer_trains_on_what_the_response_showed(predictor: PredictorService) -> None:
    # One TPOT sample: token 2's, always taken; the next is drawn a Poisson gap of samplingMean tokens later,
    # which with the default (1000) fell within these 21 tokens in ~2% of runs.
    p = producer(predictor, streamingMode=True, samplingMean=1e12)
    p.client.flush_interval = 0.02
    eps = [endpoint(0, running=4, queue=1, kv=0.3), endpoint(1)]
    req = request(b"y" * 400)
    req.headers["x-llm-d-slo-ttft-ms"] = "10"
    await p.produce(req, eps)
    p.pre_request(req, result(eps[0]))
    assert p.prefill_tokens(eps[0]) == 100
    now = time.monotonic()
    info = ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.05, bytes=10)
    p.first_response_chunk(req, info)
    assert p.prefill_tokens(eps[0]) == 0  # prefill is over
    info.finished_at = now + 0.05 + 0.2
    info.usage = Usage(prompt_tokens=100, completion_tokens=21, total_tokens=121)
    p.response_complete(req, info, result(eps[0]))
    for _ in range(100):
        if predictor.model.tpot.received and predictor.model.ttft.received:
            break
        await asyncio.sleep(0.02)
    ttft_x, ttft_y = next(iter(predictor.model.ttft.samples()))
    assert ttft_y == pytest.approx(50, abs=15)  # first byte − dispatch, ms
    assert (
        ttft_x[3] == 1 and ttft_x[4] == pytest.approx(0.4) and ttft_x[2] == pytest.approx(0.1)
    )  # waiting, running/10, tokens/1000
    (_, tpot_y), = list(predictor.model.tpot.samples())  # fmt: skip
    assert tpot_y == pytest.approx(10, abs=0.5)  # 200 ms over 20 gaps
    m = p._metrics
    assert (
        m.slo_violations.labels("plp", "predicted-latency-producer", "m", "m", "ttft").value == 1
    )  # 50 ms against a 10 ms SLO
    assert (
        sum(m.predicted_ttft.labels("plp", "predicted-latency-producer", "m", "m").counts) == 1
        and sum(m.ttft_prediction_duration.labels("plp", "predicted-latency-producer", "m", "m").counts) == 1
    )
    # An error response, a disconnect, a response with no bytes: no samples.
    before = predictor.model.ttft.received
    for status, cause in [(500, TerminationCause.NATURAL), (200, TerminationCause.CLIENT_DISCONNECT)]:
        r = request()
        await p.produce(r, eps)
        p.pre_request(r, result(eps[1]))
        p.response_complete(r, ResponseInfo(status=status, cause=cause, first_byte_at=time.monotonic(), bytes=5,
                                             finished_at=time.monotonic()), result(eps[1]))  # fmt: skip
    await asyncio.sleep(0.1)
    assert predictor.model.ttft.received == before and p.dispatched(eps[1]) == 0
    await p.aclose()


async def test_training_rows_carry_the_prefill_tokens_the_prediction_saw(predictor: PredictorService) -> None:
    """prefill_tokens_in_flight in a TTFT sample is the value of the request's own prediction row: the other
    requests' tokens when it was predicted, not its own as well (input_token_length carries those), and not
    what was dispatched between its prediction and its dispatch. Otherwise the model learns the feature with
    the request's own tokens in it and every prediction, made without them, comes out low."""
    p = producer(predictor, streamingMode=True)
    p.client.flush_interval = 0.02
    eps = [endpoint(0), endpoint(1)]
    first = request(b"a" * 400)  # 100 tokens, still prefilling throughout
    await p.produce(first, eps)
    p.pre_request(first, result(eps[0]))
    second = request(b"b" * 800)  # 200 tokens: predicted with 100 in flight on endpoint 0
    await p.produce(second, eps)
    third = request(b"c" * 200)  # 50 tokens, dispatched between the second's prediction and its dispatch
    await p.produce(third, eps)
    p.pre_request(third, result(eps[0]))
    p.pre_request(second, result(eps[0]))
    assert p.prefill_tokens(eps[0]) == 350
    now = time.monotonic()
    for req in (first, second):
        p.first_response_chunk(req, ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.05, bytes=10))
    for _ in range(100):
        if predictor.model.ttft.received >= 2:
            break
        await asyncio.sleep(0.02)
    in_flight = sorted(round(x[7] * 10000) for x, _ in predictor.model.ttft.samples())  # prefill_tokens/10000
    assert in_flight == [0, 100]
    await p.aclose()


async def test_a_pd_training_row_carries_the_prefill_pods_prefill_tokens(predictor: PredictorService) -> None:
    """With P/D the TTFT sample is the prefill pod's row (the reference's prefill-target branch: its metrics, prefix
    score and in-flight load at dispatch), so its prefill_tokens_in_flight is what the prefill pod's prediction row
    said: the 1,000 another request has in flight there, not this request's own 100."""
    p = producer(predictor, streamingMode=True)
    sent: list[dict[str, Any]] = []
    p.client.add_training = sent.extend
    decode, prefill = endpoint(0, running=3), endpoint(1, kv=0.7, queue=4)

    def pd() -> SchedulingResult:
        profiles: dict[str, ProfileResult | None] = {
            "decode": ProfileResult([decode]),
            "prefill": ProfileResult([prefill]),
        }
        return SchedulingResult("decode", profiles, prefill_profile="prefill")

    first = request(b"a" * 4000)  # 1,000 tokens, still prefilling on the prefill pod
    await p.produce(first, [decode, prefill])
    p.pre_request(first, pd())
    req = request(b"x" * 400)
    await p.produce(req, [decode, prefill])
    ctx = req.data[p._ctx_key]
    ctx.predictions = {
        ep: LatencyPredictionInfo(ms, 10.0, 0.0, 0.0, True, True) for ep, ms in ((decode, 900.0), (prefill, 40.0))
    }
    p.pre_request(req, pd())
    assert p.prefill_tokens(prefill) == 1100 and p.prefill_tokens(decode) == 0
    now = time.monotonic()
    info = ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.05, bytes=10, usage=Usage(100, 5, 105))
    p.first_response_chunk(req, info)
    (sample,) = sent
    assert (sample["num_request_running"], sample["prefill_tokens_in_flight"]) == (0, 1000)
    assert (sample["kv_cache_percentage"], sample["num_request_waiting"]) == (0.7, 4)
    # The predicted TTFT reported beside the actual one is the prefill pod's prediction, as the reference's.
    info.finished_at = now + 0.1
    p.response_complete(req, info, pd())
    assert p._metrics.last.labels("plp", "predicted-latency-producer", "m", "m", "predicted_ttft").value == 0.04
    await p.aclose()


async def test_the_context_ttl_sweep_releases_a_lost_requests_prefill_tokens(predictor: PredictorService) -> None:
    """A response that never completes leaves its dispatch record and its prefill charge: the sweep drops both.
    Before, the charge stayed for the life of the process, inflating every later row of that endpoint."""
    p = producer(predictor, streamingMode=True, contextTTL="1s")
    ep = endpoint(0)
    lost = request(b"x" * 4000)
    await p.produce(lost, [ep])
    p.pre_request(lost, result(ep))
    assert p.dispatched(ep) == 1 and p.prefill_tokens(ep) == 1000
    p._sweep(time.monotonic() + 3600.0)  # the periodic sweep, an hour later
    assert p.dispatched(ep) == 0 and p.prefill_tokens(ep) == 0
    await p.aclose()


async def test_streaming_mode_does_not_train_on_a_response_that_was_not_streamed(predictor: PredictorService) -> None:
    """A `"stream": false` answer's first byte comes when the whole answer does: taken as a TTFT sample it was the
    end-to-end latency, and (last byte − first byte) / (tokens − 1) a TPOT sample of ~0 ms."""
    p = producer(predictor, streamingMode=True)
    sent: list[dict[str, Any]] = []
    p.client.add_training = sent.extend
    ep = endpoint(0)
    req = request(b"z" * 400)
    req.headers.update({"x-llm-d-slo-ttft-ms": "100", "x-llm-d-slo-tpot-ms": "20"})
    await p.produce(req, [ep])
    p.pre_request(req, result(ep))
    now = time.monotonic()
    info = ResponseInfo(status=200, streaming=False, first_byte_at=now + 2.0, bytes=900,
                        usage=Usage(prompt_tokens=100, completion_tokens=200, total_tokens=300))  # fmt: skip
    p.first_response_chunk(req, info)
    info.finished_at = now + 2.0001
    p.response_complete(req, info, result(ep))
    assert sent == [] and p.dispatched(ep) == 0 and p.prefill_tokens(ep) == 0
    assert (
        p._metrics.slo_violations.labels("plp", "predicted-latency-producer", "m", "m", "ttft").value == 1
    )  # the client did wait 2 s for a token
    # The same answer streamed trains both targets.
    streamed = request(b"z" * 400)
    await p.produce(streamed, [ep])
    p.pre_request(streamed, result(ep))
    now = time.monotonic()
    info = ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.05, bytes=900,
                        usage=Usage(prompt_tokens=100, completion_tokens=200, total_tokens=300))  # fmt: skip
    p.first_response_chunk(streamed, info)
    info.finished_at = now + 2.0
    p.response_complete(streamed, info, result(ep))
    ttft, *tpot = sent  # one TTFT sample at the first byte, then TPOT samples at sampled positions
    assert ttft["actual_ttft_ms"] > 0 and tpot and all(e["actual_tpot_ms"] > 5 for e in tpot)
    await p.aclose()


async def test_a_predictor_answer_the_decoder_cannot_read_is_counted_and_backed_off() -> None:
    deep = b'{"predictions": [{"ttft_ms": 1, "tpot_ms": 1}], "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(body=deep, content_type="application/json")

    runner, url = await answering(handler)
    p = producer(url)
    try:
        for _ in range(3):
            r = request()
            await p.produce(r, [endpoint(0), endpoint(1)])  # was: RecursionError out of produce, every request
            assert KEY not in r.data
        counts = {k: c.value for k, c in p._metrics.unavailable._children.items()}
        assert calls == 1 and counts == {("plp", "invalid"): 1, ("plp", "skipped"): 2}
    finally:
        await p.aclose()
        await runner.cleanup()


async def test_non_streaming_mode_trains_end_to_end_latency(predictor: PredictorService) -> None:
    p = producer(predictor)
    p.client.flush_interval = 0.02
    ep = endpoint(0)
    req = request()
    await p.produce(req, [ep])
    p.pre_request(req, result(ep))
    now = time.monotonic()
    info = ResponseInfo(status=200, first_byte_at=now + 0.01, finished_at=now + 0.3, bytes=10,
                        usage=Usage(completion_tokens=50))  # fmt: skip
    p.first_response_chunk(req, info)
    p.response_complete(req, info, result(ep))
    for _ in range(100):
        if predictor.model.ttft.received:
            break
        await asyncio.sleep(0.02)
    (_, y), = list(predictor.model.ttft.samples())  # fmt: skip
    assert y == pytest.approx(300, abs=20) and predictor.model.tpot.received == 0
    await p.aclose()


async def test_training_samples_sent_and_dropped_are_counted(predictor: PredictorService) -> None:
    """Samples lost to a dead training server were only a log line (once per 30 s) and a private counter."""
    sample = {"kv_cache_percentage": 0.1, "input_token_length": 5, "num_request_waiting": 0,
              "num_request_running": 1, "num_tokens_generated": 0, "prefix_cache_score": 0.0,
              "actual_ttft_ms": 40.0, "actual_tpot_ms": 0.0}  # fmt: skip
    dead_url = f"http://127.0.0.1:{free_port()}"
    for url, outcome in ((predictor.urls["training"], "sent"), (dead_url, "dropped")):
        p = make("predicted-latency-producer", {"predictionServerURL": predictor.urls["prediction"],
                 "trainingServerURL": url}, metrics=(metrics := EppMetrics()))  # fmt: skip
        p.client.add_training([sample] * 3)
        assert await p.client.flush() == (3 if outcome == "sent" else 0)
        text = generate_latest(metrics.registry).decode()
        assert f'llm_d_epp_latency_training_samples_total{{outcome="{outcome}",plugin_name="plp"}} 3.0' in text
        await p.aclose()


def test_producer_metrics_are_registered_once_per_registry() -> None:
    metrics = EppMetrics()
    a = make("predicted-latency-producer", None, registry.build("approx-prefix-cache-producer", "approx", None),
             metrics=metrics)  # fmt: skip
    b = make("predicted-latency-producer", None, registry.build("approx-prefix-cache-producer", "approx", None),
             metrics=metrics)  # fmt: skip
    assert a._metrics is b._metrics
    plugin = ("p", "predicted-latency-producer", "m", "t")
    a._metrics.slo_violations.labels(*plugin, "ttft").inc()
    a._metrics.last.labels(*plugin, "ttft").set(0.25)
    a._metrics.predicted_tpot.labels(*plugin).observe(0.02)
    text = generate_latest(metrics.registry).decode()
    # The reference's names and labels (plugin_name, plugin_type, model_name, target_model_name).
    labels = 'model_name="m",plugin_name="p",plugin_type="predicted-latency-producer",target_model_name="t"'
    for name in (
        "llm_d_epp_request_predicted_ttft_seconds",
        "llm_d_epp_request_ttft_prediction_duration_seconds",
        "llm_d_epp_request_predicted_tpot_seconds",
        "llm_d_epp_request_tpot_prediction_duration_seconds",
        f'llm_d_epp_request_slo_violation_total{{{labels},type="ttft"}} 1.0',
        f'llm_d_epp_inference_request_metric{{{labels},type="ttft"}} 0.25',
        f'llm_d_epp_request_predicted_tpot_seconds_bucket{{le="0.00205",{labels}}} 0.0',  # its buckets
        f'llm_d_epp_request_predicted_tpot_seconds_bucket{{le="360.0",{labels}}} 1.0',
        "# TYPE llm_d_epp_inference_request_metric gauge",
    ):
        assert name in text
    assert text.count("# TYPE llm_d_epp_request_predicted_ttft_seconds histogram") == 1


# -- the preset through the loader and the director -----------------------------------------------
def test_the_preset_loads_and_consumers_get_the_producer_by_default() -> None:
    assert DEFAULT_PRODUCERS[LATENCY_PREDICTION_INFO] == "predicted-latency-producer"
    c = build(load_config(PRESET.read_text()))
    profile = c.pipeline.scheduler.profiles["default"]
    assert [f.name for f in profile.filters] == ["strict-affinity-filter", "slo-headroom-tier-filter",
                                                 "loose-affinity-filter"]  # fmt: skip
    assert [s.scorer.type for s in profile.scorers] == ["latency-scorer"]
    assert profile.picker.type == "weighted-random-picker"
    assert [p.type for p in c.pipeline.producers][-1] == "predicted-latency-producer"
    assert [a.type for a in c.pipeline.admitters] == ["latency-slo-admitter"]
    bare = build(load_config("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
                             "- type: latency-scorer\n- type: latency-slo-admitter\n"))  # fmt: skip
    assert {"predicted-latency-producer", "approx-prefix-cache-producer", "token-producer"} <= set(bare.plugins)


async def test_through_the_director_a_tight_slo_avoids_the_endpoint_predicted_slow(
    predictor: PredictorService,
) -> None:
    train_tpot_on_running(predictor)
    config = yaml.safe_load(PRESET.read_text())
    config["plugins"] = [p for p in config["plugins"] if p["type"] != "file-discovery"]
    del config["dataLayer"]
    for p in config["plugins"]:
        if p["type"] == "predicted-latency-producer":
            p["parameters"].update(predictionServerURL=predictor.urls["prediction"],
                                   trainingServerURL=predictor.urls["training"])  # fmt: skip
    ds = Datastore()
    for i in range(3):
        ds.upsert(endpoint(i).spec)
    for i, ep in enumerate(ds.endpoints):
        ep.metrics = EndpointMetrics(running_requests_size=25 if i == 1 else 1, kv_cache_usage_percent=0.05,
                                     update_time=time.monotonic())  # fmt: skip
    metrics = EppMetrics()
    c = build(load_config(yaml.safe_dump(config)), datastore=ds, metrics=metrics)
    d = Director(ds, c.pipeline, metrics)
    # Seeded: unseeded, 3+ explorations of the negative tier in 30 requests (P ≈ 0.33%) failed the bound below.
    # This seed explores once (the 5th of its first 30 draws is < 1%), so the negative tier is still reachable.
    c.plugins["slo-headroom-tier-filter"]._rng = random.Random(6)  # type: ignore[attr-defined]
    chosen = []
    for i in range(30):
        req = request(f"prompt {i}".encode())
        req.headers.update({"x-llm-d-slo-ttft-ms": "1000", "x-llm-d-slo-tpot-ms": "30"})  # pod-1: ~60 ms TPOT
        decision = await d.handle_request(req, None)
        assert isinstance(decision, RoutingDecision)
        chosen.append(decision.targets[0].name)
        d.response_complete(req, ResponseInfo(status=200), decision)
    assert chosen.count("pod-1") <= 2, chosen  # ε = 1% exploration of the negative tier
    for component in c.plugins.values():
        await component.aclose()


def test_counts_sent_to_the_predictor_are_whole_numbers() -> None:
    """The reference sidecars type them int (pydantic refuses 2.5); a hub's cluster averages are not whole."""
    from llmepp.plugins.producers.predicted_latency import _count

    assert [_count(v) for v in (2.5, 2.6, 0.4, -1.0, float("nan"), float("inf"), 7.0)] == [2, 3, 0, 0, 0, 0, 7]


async def test_a_huge_slo_header_never_breaks_the_scorer(predictor: PredictorService) -> None:
    """`x-llm-d-slo-tpot-ms: 1e308` is finite, but ·sloBufferFactor 2 overflowed to an infinite TPOT headroom;
    next to an endpoint whose budget a running request lowered, nTPOT was inf/inf = NaN and the scorer raised
    (ValueError: cannot convert float NaN to integer), failing the request."""
    p = producer(predictor, streamingMode=True, sloBufferFactor=2.0)
    scorer = make("latency-scorer", None, p, registry.build("approx-prefix-cache-producer", "approx", None))
    eps = [endpoint(0), endpoint(1)]
    tight = request(b"x" * 20)
    tight.headers["x-llm-d-slo-tpot-ms"] = "100"
    await p.produce(tight, eps)
    p.pre_request(tight, result(eps[0]))
    for huge in ("1e308", "1.7976931348623157e308", "1e30"):
        req = request(b"x" * 20)
        req.headers.update({"x-llm-d-slo-ttft-ms": huge, "x-llm-d-slo-tpot-ms": huge})
        await p.produce(req, eps)
        infos: dict[Endpoint, LatencyPredictionInfo] = req.data[KEY]
        assert all(i.ttft_headroom < float("inf") and i.tpot_headroom < float("inf") for i in infos.values())
        scores = scorer.score(req, eps)
        assert all(0.0 <= s <= 1.0 for s in scores), scores
        assert scores[1] < scores[0]  # least: endpoint 0's budget (200 ms) is the closest to its prediction
    await p.aclose()


def test_slo_buffer_factor_must_be_finite() -> None:
    # inf · an absent TPOT SLO (0) is NaN: every request without the header got a NaN headroom.
    with pytest.raises(ConfigError, match="sloBufferFactor must be > 0 and finite"):
        registry.build("predicted-latency-producer", "p", {"sloBufferFactor": float("inf")})


def test_latency_metric_labels_from_client_model_names_are_bounded() -> None:
    """model_name / target_model_name come from the request body: as every other series of this EPP, the first
    MAX_MODEL_LABELS (model, target) pairs get series of their own, the rest share "other" (each new name was a
    new set of histograms, held forever)."""
    from llmepp.observability.metrics import MAX_MODEL_LABELS, OVERFLOW_LABEL

    metrics = EppMetrics()
    p = make("predicted-latency-producer", {"predictInProduce": False, "streamingMode": False},
             registry.build("approx-prefix-cache-producer", "approx", None), metrics=metrics)  # fmt: skip
    ep = endpoint(0)
    loop = asyncio.new_event_loop()
    try:
        for i in range(MAX_MODEL_LABELS + 50):
            req = request(model=f"model-{i}")
            req.headers["x-llm-d-slo-ttft-ms"] = "1000"
            loop.run_until_complete(p.produce(req, [ep]))
            p.pre_request(req, result(ep))
            p.response_complete(req, ResponseInfo(status=200, bytes=10), result(ep))
    finally:
        loop.close()
    models = {key[2] for key in p._metrics.last._children}
    assert len(models) == MAX_MODEL_LABELS + 1 and OVERFLOW_LABEL in models
    assert {key[2] for key in p._metrics.slo_violations._children} <= models


async def test_one_endpoint_reporting_an_absurd_count_does_not_cost_every_endpoint_its_prediction(
    predictor: PredictorService,
) -> None:
    """A scraped count is accepted up to 2⁶³, the predictor's schema up to 2⁴⁰: one endpoint's 2⁴¹ waiting
    requests made the whole bulk call a 422, so no endpoint had a prediction (and the producer backed off)."""
    p = producer(predictor)
    eps = [endpoint(0, queue=2**41, running=2**50), endpoint(1)]
    req = request(b"x" * 20)
    await p.produce(req, eps)
    infos: dict[Endpoint, LatencyPredictionInfo] = req.data.get(KEY, {})
    assert set(infos) == set(eps)
    assert infos[eps[0]].ttft_ms > infos[eps[1]].ttft_ms
    await p.aclose()


def test_the_tpot_budget_of_a_busy_endpoint_costs_no_pass_over_its_running_requests() -> None:
    """Each prediction lowers the TPOT budget to the least TPOT SLO running on the endpoint: that was a pass over
    every request in flight there, per endpoint and per request (1 ms a request at 30k in flight), quadratic in
    load. The least SLO must still be right as requests come and go."""
    from llmepp.plugins.producers.predicted_latency import _Context

    p = make("predicted-latency-producer", {"streamingMode": True, "predictInProduce": False},
             registry.build("approx-prefix-cache-producer", "approx", None))  # fmt: skip
    quiet, busy = endpoint(0), endpoint(1)
    loop = asyncio.new_event_loop()

    def dispatch(ep: Endpoint, tpot_slo: str | None) -> InferenceRequest:
        req = request()
        if tpot_slo is not None:
            req.headers["x-llm-d-slo-tpot-ms"] = tpot_slo
        loop.run_until_complete(p.produce(req, [ep]))
        p.pre_request(req, result(ep))
        return req

    def budget(ep: Endpoint) -> float:
        return p._info(ep, 0.0, 0.0, _Context(0.0, 1000.0, 1, {})).tpot_headroom

    try:
        dispatch(quiet, "80")
        held = [dispatch(busy, slo) for slo in ("50", "40", "40", None, "60")]
        assert budget(busy) == 40.0 and budget(quiet) == 80.0
        p.response_complete(held[1], ResponseInfo(status=500), result(busy))
        assert budget(busy) == 40.0  # the other 40 ms request still runs
        p.response_complete(held[2], ResponseInfo(status=500), result(busy))
        assert budget(busy) == 50.0
        held.append(dispatch(busy, "45"))
        assert budget(busy) == 45.0
        held += [dispatch(busy, "45") for _ in range(20)]  # held: a request in flight is alive
    finally:
        loop.close()

    class NoScan(dict[int, tuple[float, float]]):
        """The running requests, which the budget must not walk."""

        def __iter__(self) -> Any:
            raise AssertionError("a pass over the running requests")

        values = items = keys = __iter__

    running = p._dispatched[busy]
    running.requests = NoScan(running.requests)
    assert budget(busy) == 45.0 and p.dispatched(busy) == 24


async def test_an_absurd_completion_count_costs_a_bounded_number_of_tpot_samples() -> None:
    """Usage is accepted up to 2**53 completion tokens; a TPOT sample was built for every sampled position (one per
    samplingMean tokens, no cap by default): a server reporting 10**8 tokens cost 10**5 samples (seconds of event
    loop and one response flooding the upload buffer), 2**53 froze the EPP. Positions past the predictor's count
    bound (2**40) also made the whole upload a 422."""
    p = make("predicted-latency-producer", {"streamingMode": True, "predictInProduce": False},
             registry.build("approx-prefix-cache-producer", "approx", None))  # fmt: skip
    sent: list[dict[str, Any]] = []
    p.client.add_training = sent.extend
    ep = endpoint(0)
    req = request(b"z" * 400)
    await p.produce(req, [ep])
    p.pre_request(req, result(ep))
    now = time.monotonic()
    info = ResponseInfo(status=200, streaming=True, first_byte_at=now + 0.05, bytes=900,
                        usage=Usage(prompt_tokens=100, completion_tokens=10**8, total_tokens=10**8 + 100))  # fmt: skip
    p.first_response_chunk(req, info)
    info.finished_at = now + 2.0
    t0 = time.perf_counter()
    p.response_complete(req, info, result(ep))
    tpot = [e for e in sent if e["actual_tpot_ms"] > 0]
    assert 0 < len(tpot) <= p.client.max_sample_size and time.perf_counter() - t0 < 1.0
    assert all(e["num_tokens_generated"] <= 2**40 for e in tpot)
    await p.aclose()


async def test_one_dead_prediction_server_of_several_does_not_cost_every_request_its_prediction(
    predictor: PredictorService,
) -> None:
    """PREDICTION_SERVER_URL lists replicas, used round robin; the back-off after a failure was the producer's, so
    one dead replica stopped every call for 0.5-5 s, each time the round robin came back to it: almost no request
    had a prediction while the other replica was fine. The dead one is skipped alone."""
    dead = f"http://127.0.0.1:{free_port()}"
    p = make("predicted-latency-producer",
             {"predictionServerURL": f"{dead},{predictor.urls['prediction']}",
              "trainingServerURL": predictor.urls["training"]}, metrics=EppMetrics())  # fmt: skip
    eps = [endpoint(0), endpoint(1)]
    predicted = 0
    for _ in range(20):
        r = request()
        await p.produce(r, eps)
        predicted += KEY in r.data
    assert predicted >= 19
    counts = {k: c.value for k, c in p._metrics.unavailable._children.items()}
    assert counts == {("plp", "error"): 1}
    await p.aclose()


async def test_when_every_prediction_server_is_backing_off_requests_are_routed_at_once() -> None:
    async def measure() -> None:
        p = producer(f"http://127.0.0.1:{free_port()},http://127.0.0.1:{free_port()}")
        eps = [endpoint(0), endpoint(1)]
        for _ in range(2):  # each fails once
            await p.produce(request(), eps)
        t0 = time.monotonic()
        for _ in range(10):
            r = request()
            await p.produce(r, eps)
            assert KEY not in r.data
        assert time.monotonic() - t0 < 0.1
        counts = {k: c.value for k, c in p._metrics.unavailable._children.items()}
        assert counts == {("plp", "error"): 2, ("plp", "skipped"): 10}
        await p.aclose()

    await on_a_punctual_loop(measure)


async def test_a_never_scraped_endpoint_is_unknown_load_not_the_fastest(predictor: PredictorService) -> None:
    """A pod whose /metrics never answered reads KV 0, queue 0, running 0: predicted as the idlest pod, it won every
    request (latency-scorer, with or without predictions) although its load is unknown, while the queue, KV and
    running-requests scorers leave it unscored. It gets no prediction and scores 0 while another has a known load."""
    train_tpot_on_running(predictor)
    p = producer(predictor)
    scorer = make("latency-scorer", None, p, registry.build("approx-prefix-cache-producer", "approx", None))
    eps = [endpoint(0, queue=2, running=6, kv=0.4), endpoint(1, scraped=False)]
    req = request(b"x" * 20)
    req.headers["x-llm-d-slo-ttft-ms"] = "1000"
    await p.produce(req, eps)
    assert set(req.data[KEY]) == {eps[0]}
    scores = scorer.score(req, eps)
    assert scores[0] > 0 and scores[1] == 0.0
    bare = request(b"x" * 20)  # no SLO: every headroom negative, the lowest prediction wins
    await p.produce(bare, eps)
    assert scorer.score(bare, eps)[1] == 0.0
    # Nothing scraped: no call, no prediction.
    unknown = request(b"x" * 20)
    await p.produce(unknown, [eps[1], endpoint(2, scraped=False)])
    assert KEY not in unknown.data
    # Without predictions, the composite fallback (KV, queue, prefix) leaves it unscored too.
    composite = scorer.score(request(), eps)
    assert composite[0] > 0 and composite[1] == 0.0
    await p.aclose()


def test_the_admitter_does_not_admit_on_a_never_scraped_endpoints_zeros() -> None:
    """Its KV 0 read as cold and its running 0 as idle: with one such pod in the pool no sheddable request was shed,
    and the request then went to the saturated pods (the scorers leave the unknown one unscored)."""
    a = make("latency-slo-admitter")
    busy = endpoint(0, kv=0.5, running=3)
    req = with_infos([busy], {0: info(-5, dispatched=2)}, priority=-1)
    req.headers["x-llm-d-slo-ttft-ms"] = "200"
    with pytest.raises(Saturated):
        a.admit(req, [busy, endpoint(1, scraped=False)])
    a.admit(req, [endpoint(1, scraped=False)])  # nothing known: no prediction applies, fail open


async def test_a_huge_predictor_answer_is_refused_not_buffered() -> None:
    """The answer was read whole whatever its size (only the 300 ms bound stopped it: on loopback, hundreds of MB
    per request in flight). A bulk answer is a few hundred bytes per row: anything far past that is refused."""
    pad = b" " * (64 * 1024 * 1024)
    body = b'{"predictions": [{"ttft_ms": 1, "tpot_ms": 1}, {"ttft_ms": 2, "tpot_ms": 2}]' + pad + b"}"

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/chunked/"):
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), 1 << 20):
                await resp.write(body[i : i + (1 << 20)])
            await resp.write_eof()
            return resp
        return web.Response(body=body, content_type="application/json")

    runner, url = await answering(handler)
    try:
        for prefix in ("/whole", "/chunked"):
            p = producer(url + prefix, predictionTimeout="350ms")
            r = request()
            await p.produce(r, [endpoint(0), endpoint(1)])
            assert KEY not in r.data
            counts = {k: c.value for k, c in p._metrics.unavailable._children.items()}
            assert counts == {("plp", "invalid"): 1}, (prefix, counts)
            await p.aclose()
    finally:
        await runner.cleanup()


async def test_concurrent_calls_failing_together_are_one_failure_for_the_back_off() -> None:
    """The back-off doubled per failed call: 20 requests in flight when the predictor stalled made one stall a 5 s
    back-off (0.5 · 2⁴ capped) instead of 0.5 s. Calls made before the server was marked failed do not escalate."""
    runner, url = await slow_predictor(5.0)
    try:
        p = producer(url, predictionTimeout="100ms")
        eps = [endpoint(0), endpoint(1)]
        await asyncio.gather(*(p.produce(request(), eps) for _ in range(20)))
        counts = {k: c.value for k, c in p._metrics.unavailable._children.items()}
        assert counts == {("plp", "timeout"): 20}
        assert p.client._backoff == [0.5]
        await p.aclose()
    finally:
        await runner.cleanup()


async def test_a_tpot_never_measured_is_no_tpot_slo_verdict() -> None:
    """A non-streamed answer (or one token) has no TPOT: before, the last tpot_slo_violation read 0, as if the
    request had met its TPOT SLO."""
    from llmepp.plugins.producers.predicted_latency import _Context

    p = make("predicted-latency-producer", {"streamingMode": True}, metrics=EppMetrics())
    labels = ("plp", "predicted-latency-producer", "m", "m")
    ctx = _Context(ttft_slo=100.0, tpot_slo=10.0, input_tokens=1, prefix_scores={}, labels=labels)
    ctx.target = endpoint(0)
    p._observe(ctx, 50.0, 0.0)
    kinds = {key[-1] for key in p._metrics.last._children}
    assert "ttft_slo_violation" in kinds and "tpot_slo_violation" not in kinds
    p._observe(ctx, 50.0, 12.0)
    assert p._metrics.last.labels(*labels, "tpot_slo_violation").value == 1.0
    await p.aclose()
