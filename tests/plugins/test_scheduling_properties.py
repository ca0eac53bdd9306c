"""Scheduling with the shipped configs (deploy/config/*.yaml) never raises on any endpoint metrics.

For any scraped values (NaN, ±inf, negative, 1e308; straight in `EndpointMetrics`, or as spelt on a
model server's /metrics page and read by the core metrics extractor), every shipped config routes the
request to a candidate endpoint, or refuses it as documented (429 when a profile's filters leave none,
503 when a P/D handler finds no pod for a profile it requires), and every scorer column a profile sums
is finite and within [0, 1] (the reference clamps each score).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from helpers import endpoint, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmepp.config.loader import Components, build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointMetrics
from llmepp.datalayer.engines import BUILTIN_ENGINES, EngineMapping
from llmepp.errors import RequestError
from llmepp.framework.datakeys import LATENCY_PREDICTION_INFO, LatencyPredictionInfo, scoped
from llmepp.framework.requestcontrol import DataProducer
from llmepp.framework.scheduling import SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.filters.roles import ROLE_LABEL
from llmepp.request.types import InferenceRequest
from llmepp.scheduling.profile import SchedulerProfile

CONFIGS = sorted(
    p
    for p in (Path(__file__).parents[2] / "deploy" / "config").glob("*.yaml")
    if "EndpointPickerConfig" in p.read_text()
)
POOL = 6
ROLES = (None, "decode", "prefill", "both", "prefill-decode")


@dataclass
class Setup:
    components: Components
    endpoints: list[Endpoint]
    async_producers: list[str]

    def __repr__(self) -> str:
        return f"Setup({list(self.components.pipeline.scheduler.profiles)})"


def _build(path: Path) -> Setup:
    ds = Datastore()
    for i in range(POOL):
        ds.upsert(endpoint(i).spec)
    components = build(load_config(path.read_text()), datastore=ds, metrics=EppMetrics())
    for plugin in components.plugins.values():  # pickers and filters that draw: the same draws on a replay
        if isinstance(rng := getattr(plugin, "_rng", None), random.Random):
            rng.seed(0)
    asyncs = [p.name for p in components.pipeline.producers if _is_async(p)]
    return Setup(components, list(ds.endpoints), asyncs)


def _is_async(producer: DataProducer) -> bool:
    return inspect.iscoroutinefunction(producer.produce)


@pytest.fixture(params=CONFIGS, ids=[p.name for p in CONFIGS])
def config(request: pytest.FixtureRequest) -> Iterator[Path]:
    profile_log = logging.getLogger("llmepp.scheduling.profile")
    level = profile_log.level
    profile_log.setLevel(logging.DEBUG)  # ProfileResult.breakdown: every scorer's (clamped) column
    try:
        yield request.param
    finally:
        profile_log.setLevel(level)


ODD = [math.nan, math.inf, -math.inf, -1.0, -1e308, 1e308, 0.0, -0.0, 1.0, 0.5, 2.0, 5e-324, 1.7976931348623157e308]
floats = st.one_of(st.sampled_from(ODD), st.floats(), st.integers(-(10**6), 10**6).map(float))
counts = st.one_of(st.sampled_from([0, 1, 16, 2**31, 2**63 - 1]), st.integers(0, 10**6))  # the extractor's range


@st.composite
def raw_metrics(draw: st.DrawFn) -> EndpointMetrics:
    """Any values in the float fields (what a buggy extractor or a hub's peer could hand over); the
    integer fields within their type's domain as the extractor fills them (whole numbers >= 0)."""
    return EndpointMetrics(
        waiting_queue_size=draw(st.one_of(floats, counts)),
        running_requests_size=draw(st.one_of(floats, counts)),
        kv_cache_usage_percent=draw(floats),
        max_active_models=draw(counts),
        cache_block_size=draw(counts),
        cache_num_blocks=draw(counts),
        update_time=draw(st.sampled_from([0.0, 1.0])),
    )


VALUE_SPELLINGS = [
    b"NaN", b"Nan", b"nan", b"+Inf", b"-Inf", b"+inf", b"inf", b"-1", b"-0", b"0", b"3", b"1e308", b"-1e308",
    b"1e309", b"1.5E2", b"0.25", b"1.7976931348623157e308", b"4.9e-324", b"-5e-324", b"2",
]  # fmt: skip
values = st.one_of(st.sampled_from(VALUE_SPELLINGS), st.floats().map(lambda v: repr(v).encode()))
label_ints = st.one_of(
    st.sampled_from([b"16", b"-16", b"0", b"-1", b"99999999999999999999999"]), st.integers().map(str).map(str.encode)
)
VLLM = EngineMapping(BUILTIN_ENGINES[0])


@st.composite
def scraped_metrics(draw: st.DrawFn) -> EndpointMetrics:
    """What the core metrics extractor makes of a vLLM page with any value spellings."""
    page = (
        b"# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n"
        b'vllm:num_requests_waiting{model_name="m"} ' + draw(values) + b"\n"
        b"# TYPE vllm:num_requests_running gauge\n"
        b'vllm:num_requests_running{model_name="m"} ' + draw(values) + b"\n"
        b"# TYPE vllm:kv_cache_usage_perc gauge\n"
        b'vllm:kv_cache_usage_perc{model_name="m"} ' + draw(values) + b"\n"
        b"# TYPE vllm:cache_config_info gauge\n"
        b'vllm:cache_config_info{block_size="' + draw(label_ints) + b'",num_gpu_blocks="' + draw(label_ints) + b'"} 1\n'
        b"# TYPE vllm:lora_requests_info gauge\n"
        b'vllm:lora_requests_info{max_lora="'
        + draw(label_ints)
        + b'",running_lora_adapters="a",waiting_lora_adapters=""} '
        + draw(values)
        + b"\n"
    )
    previous = draw(st.sampled_from([NO_METRICS, EndpointMetrics(3, 1, 0.5, update_time=1.0)]))
    metrics, _err = VLLM.extract(page, previous, 1.0)
    return previous if metrics is None else metrics


@st.composite
def predictions(draw: st.DrawFn) -> LatencyPredictionInfo:
    ttft_headroom, tpot_headroom = draw(st.floats(-1e8, 1e300)), draw(st.floats(-1e8, 1e300))
    return LatencyPredictionInfo(
        ttft_ms=draw(st.floats(0, 1e8)),
        tpot_ms=draw(st.floats(0, 1e8)),
        ttft_headroom=ttft_headroom,
        tpot_headroom=tpot_headroom,
        ttft_valid=ttft_headroom > 0,
        tpot_valid=tpot_headroom > 0,
        dispatched_requests=draw(st.integers(0, 3)),
    )


@st.composite
def requests(draw: st.DrawFn, setup: Setup, candidates: list[Endpoint]) -> InferenceRequest:
    prompt = draw(st.one_of(st.none(), st.binary(max_size=600), st.just(b"shared prefix " * 40)))
    req = request(prompt)
    if draw(st.booleans()):
        req.headers["x-llm-d-slo-ttft-ms"] = str(draw(st.sampled_from([0, 1, 500, 1e300])))
    for name in setup.async_producers:  # the latency predictor's answers (finite, as its client checks)
        if draw(st.booleans()):
            answered = [ep for ep in candidates if draw(st.booleans())]
            req.data[scoped(LATENCY_PREDICTION_INFO, name)] = {ep: draw(predictions()) for ep in answered}
    return req


def schedule(setup: Setup, req: InferenceRequest, candidates: list[Endpoint]) -> SchedulingResult | None:
    """Producers (the synchronous ones; the predictor's answers are drawn), scheduler, PreRequest, as the
    director runs them. None: a documented refusal (429: a profile's filters left no endpoint; 503: a P/D
    handler found no pod for a profile it requires)."""
    pipeline = setup.components.pipeline
    for producer in pipeline.producers:
        if producer.name not in setup.async_producers:
            producer.produce(req, candidates)
    try:
        result = pipeline.scheduler.schedule(req, candidates)
    except RequestError as e:
        assert e.status in (429, 503), e
        return None
    for plugin in pipeline.pre_request:
        plugin.pre_request(req, result)
    return result


def check(setup: Setup, result: SchedulingResult | None, candidates: list[Endpoint]) -> None:
    profiles: dict[str, SchedulerProfile] = setup.components.pipeline.scheduler.profiles
    if result is None:
        # Only the P/D configs have filters that can leave nothing (no pod of a role).
        assert any(p.filters for p in profiles.values())
        return
    assert result.targets
    assert all(any(t is c for c in candidates) for t in result.targets)
    for name, res in result.profiles.items():
        if res is None:
            continue
        assert res.breakdown is not None
        weights = {ws.scorer.name: ws.weight for ws in profiles[name].scorers}
        for scorer, column in res.breakdown.items():
            assert len(column) == len(res.candidates), scorer
            assert all(0.0 <= s <= 1.0 for s in column), (name, scorer, column)
        assert all(math.isfinite(t) and 0.0 <= t <= sum(weights.values()) + 1e-9 for t in res.totals), res.totals


def _pool(setup: Setup, data: st.DataObject, metrics: st.SearchStrategy[EndpointMetrics]) -> list[Endpoint]:
    n = data.draw(st.integers(1, POOL))
    candidates = setup.endpoints[:n]
    for ep in candidates:
        role = data.draw(st.sampled_from(ROLES))
        ep.spec = replace(ep.spec, labels={ROLE_LABEL: role} if role else {})
        ep.metrics = data.draw(metrics)
    return candidates


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_endpoint_metrics_schedule(config: Path, data: st.DataObject) -> None:
    setup = _build(config)  # afresh: no prefix index or LRU state carried over from another example
    candidates = _pool(setup, data, raw_metrics())
    for _ in range(2):  # twice: the second request sees the prefix index and LRU the first one left
        req = data.draw(requests(setup, candidates))
        check(setup, schedule(setup, req, candidates), candidates)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_scraped_page_values_schedule(config: Path, data: st.DataObject) -> None:
    setup = _build(config)  # afresh: no prefix index or LRU state carried over from another example
    candidates = _pool(setup, data, scraped_metrics())
    for _ in range(2):
        req = data.draw(requests(setup, candidates))
        check(setup, schedule(setup, req, candidates), candidates)
