"""Scorers of the plugin catalogue: each formula, no candidates, missing / never-scraped metrics,
ties, and property tests where the formula has invariants."""

from __future__ import annotations

import time
from typing import Any

import pytest
from helpers import endpoint, request
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, InFlight
from llmepp.framework.datakeys import (
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    TokenizedPrompt,
    scoped,
)
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.plugins.filters.session import encode_token
from llmepp.plugins.scorers.context_length import parse_range, range_score
from llmepp.request.types import ResponseInfo
from llmepp.scheduling.profile import SchedulerProfile, WeightedScorer

PREFIX_KEY = scoped(PREFIX_CACHE_MATCH_INFO, "approx")


def make(type_: str, params: dict[str, Any] | None = None, *others: Plugin) -> Any:
    plugin = registry.build(type_, type_, params)
    ctx = PluginContext({p.name: p for p in (plugin, *others)}, None, None, None)
    plugin.setup(ctx)
    return plugin


def with_inflight(type_: str, params: dict[str, Any] | None = None) -> tuple[Any, Any]:
    producer = registry.build("inflight-load-producer", "ifl", None)
    return make(type_, params, producer), producer


def result_for(ep: Endpoint, profile: str = "default") -> SchedulingResult:
    return SchedulingResult(primary_profile=profile, profiles={profile: ProfileResult(targets=[ep])})


in_unit = st.floats(min_value=0.0, max_value=1.0)


# -- running-requests-size-scorer ---------------------------------------------------------------
def test_running_requests_min_max() -> None:
    s = make("running-requests-size-scorer")
    eps = [endpoint(0, running=2), endpoint(1, running=6), endpoint(2, running=10)]
    assert s.score(request(), eps) == [1.0, 0.5, 0.0]
    assert s.score(request(), [endpoint(0, running=3), endpoint(1, running=3)]) == [1.0, 1.0]
    assert s.score(request(), []) == []
    # A never-scraped endpoint is left unscored and out of the range (the reference's current scorer).
    assert s.score(request(), [endpoint(0, running=4), endpoint(1, scraped=False)]) == [1.0, 0.0]
    assert s.score(request(), [endpoint(0, running=4), endpoint(1, scraped=False), endpoint(2, running=8)]) == [
        1.0,
        0.0,
        0.0,
    ]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=40))
def test_running_requests_property(running: list[int]) -> None:
    s = make("running-requests-size-scorer")
    scores = s.score(request(), [endpoint(i, running=r) for i, r in enumerate(running)])
    assert all(0.0 <= x <= 1.0 for x in scores)
    for a, sa in zip(running, scores):  # more running → never a higher score
        for b, sb in zip(running, scores):
            if a < b:
                assert sa >= sb


# -- load-aware-scorer ---------------------------------------------------------------------------
def test_load_aware_formula() -> None:
    s = make("load-aware-scorer", {"threshold": 10})
    eps = [endpoint(0, queue=0), endpoint(1, queue=5), endpoint(2, queue=10), endpoint(3, queue=50)]
    assert s.score(request(), eps) == pytest.approx([0.5, 0.25, 0.0, 0.0])
    assert make("load-aware-scorer").score(request(), [endpoint(0, queue=64)]) == pytest.approx([0.25])
    # Unknown load is not an empty queue: a never-scraped endpoint scores 0, as the reference's
    # queue, running-requests and KV scorers leave such an endpoint unscored.
    assert s.score(request(), [endpoint(0, scraped=False), endpoint(1, queue=5)]) == pytest.approx([0.0, 0.25])
    assert s.score(request(), []) == []
    # threshold <= 0 means the default there, as in the reference (test_reference_configs.py).
    assert registry.build("load-aware-scorer", "la", {"threshold": 0}).threshold == 128  # type: ignore[attr-defined]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 1000), st.lists(st.integers(0, 2000), min_size=1, max_size=30))
def test_load_aware_property(threshold: int, queues: list[int]) -> None:
    s = make("load-aware-scorer", {"threshold": threshold})
    scores = s.score(request(), [endpoint(i, queue=q) for i, q in enumerate(queues)])
    assert all(0.0 <= x <= 0.5 for x in scores)
    ordered = [x for _, x in sorted(zip(queues, scores))]
    assert ordered == sorted(ordered, reverse=True)  # monotone non-increasing in load


# -- active-request-scorer ----------------------------------------------------------------------
def test_active_request_formula_and_idle_gap() -> None:
    s, producer = with_inflight("active-request-scorer")
    eps = [endpoint(i) for i in range(4)]
    for ep, n in zip(eps, [0, 2, 4, 1]):
        if n:
            producer.loads[ep] = InFlight(requests=n)
    req = request()
    producer.produce(req, eps)
    assert s.score(req, eps) == pytest.approx([1.0, 0.5, 0.0, 0.75])
    gap, producer2 = with_inflight("active-request-scorer", {"idleThreshold": 1, "maxBusyScore": 0.5})
    producer2.loads.update(producer.loads)
    req2 = request()
    producer2.produce(req2, eps)
    assert gap.score(req2, eps) == pytest.approx([1.0, 0.25, 0.0, 1.0])


def test_active_request_all_idle_empty_and_fallback() -> None:
    s, _ = with_inflight("active-request-scorer")
    eps = [endpoint(0), endpoint(1)]
    assert s.score(request(), eps) == [1.0, 1.0]
    assert s.score(request(), []) == []
    eps[0].inflight.requests = 3  # producer data absent → the director's counters
    assert s.score(request(), eps) == [0.0, 1.0]


def test_active_request_params() -> None:
    s = registry.build("active-request-scorer", "a", {"requestTimeout": "2m"})  # deprecated, accepted
    assert s.consumes == {"InFlightLoad"}
    # Out-of-range values mean the defaults there, as in the reference (test_reference_configs.py).
    assert registry.build("active-request-scorer", "a", {"idleThreshold": -1}).idle == 0  # type: ignore[attr-defined]
    assert registry.build("active-request-scorer", "a", {"maxBusyScore": 1.5}).max_busy == 1.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="maxBusyScore") as err:
        registry.build("active-request-scorer", "a", {"maxBusyScore": "high"})
    assert "plugin 'a' (type active-request-scorer)" in str(err.value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=30), st.integers(0, 5), in_unit)
def test_active_request_property(counts: list[int], idle: int, busy: float) -> None:
    s, producer = with_inflight("active-request-scorer", {"idleThreshold": idle, "maxBusyScore": busy})
    eps = [endpoint(i) for i in range(len(counts))]
    for ep, n in zip(eps, counts):
        producer.loads[ep] = InFlight(requests=n)
    req = request()
    producer.produce(req, eps)
    scores = s.score(req, eps)
    assert all(0.0 <= x <= 1.0 for x in scores)
    ordered = [x for _, x in sorted(zip(counts, scores))]
    assert ordered == sorted(ordered, reverse=True)


# -- token-load-scorer ---------------------------------------------------------------------------
def test_token_load_formula() -> None:
    s, producer = with_inflight("token-load-scorer", {"queueThresholdTokens": 1000})
    eps = [endpoint(i) for i in range(3)]
    producer.loads[eps[1]] = InFlight(requests=1, tokens=250)
    producer.loads[eps[2]] = InFlight(requests=1, tokens=5000)
    req = request()
    producer.produce(req, eps)
    assert s.score(req, eps) == pytest.approx([1.0, 0.75, 0.0])
    assert s.score(request(), []) == []
    assert registry.build("token-load-scorer", "t", None).threshold == 4194304  # type: ignore[attr-defined]
    # <= 0 means the default there, as in the reference.
    assert registry.build("token-load-scorer", "t", {"queueThresholdTokens": 0}).threshold == 4194304  # type: ignore[attr-defined]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=30))
def test_token_load_property(tokens: list[int]) -> None:
    s, producer = with_inflight("token-load-scorer")
    eps = [endpoint(i) for i in range(len(tokens))]
    for ep, t in zip(eps, tokens):
        producer.loads[ep] = InFlight(tokens=t)
    req = request()
    producer.produce(req, eps)
    scores = s.score(req, eps)
    assert all(0.0 <= x <= 1.0 for x in scores)
    ordered = [x for _, x in sorted(zip(tokens, scores))]
    assert ordered == sorted(ordered, reverse=True)


# -- no-hit-lru-scorer ---------------------------------------------------------------------------
def lru_scorer(**params: Any) -> Any:
    return lru_with_inflight(**params)[0]


def lru_with_inflight(**params: Any) -> tuple[Any, Any]:
    producer = registry.build("approx-prefix-cache-producer", "approx", None)
    inflight = registry.build("inflight-load-producer", "ifl", None)
    return make("no-hit-lru-scorer", params or None, producer, inflight), inflight


def cold(eps: list[Endpoint], hits: dict[Endpoint, int] | None = None) -> Any:
    req = request()
    req.data[PREFIX_KEY] = PrefixMatchInfo(block_size=64, total_blocks=4, hits=hits or {}, hashes=[1, 2, 3, 4])
    return req


def test_no_hit_lru_never_used_first_then_oldest() -> None:
    s = lru_scorer()
    eps = [endpoint(i) for i in range(4)]
    assert s.score(cold(eps), eps) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])  # all never used: in order
    # Cold requests land on pod-2 then pod-0 (LRU oldest → newest: pod-2, pod-0).
    for target in (eps[2], eps[0]):
        req = cold(eps)
        s.score(req, eps)
        s.pre_request(req, result_for(target))
    # never used pod-1, pod-3 get ranks 0, 1; pod-2 rank 2 + 0; pod-0 rank 2 + 1.
    assert s.score(cold(eps), eps) == pytest.approx([0.0, 1.0, 1 / 3, 2 / 3])


def test_no_hit_lru_warm_requests_are_neutral_and_do_not_move_lru() -> None:
    s = lru_scorer()
    eps = [endpoint(i) for i in range(3)]
    warm = cold(eps, {eps[1]: 2})
    assert s.score(warm, eps) == [0.5, 0.5, 0.5]
    s.pre_request(warm, result_for(eps[0]))
    assert not s.lru
    # A hit on an endpoint that is not a candidate does not make the request warm.
    other = endpoint(9)
    req = cold(eps, {other: 4})
    assert s.score(req, eps) == pytest.approx([1.0, 0.5, 0.0])
    # No match data at all (no prompt) is cold too.
    assert s.score(request(prompt=None), eps) == pytest.approx([1.0, 0.5, 0.0])


def test_no_hit_lru_zero_block_hits_are_cold() -> None:
    # Warm means some candidate matched at least one block (the reference: MatchBlocks() > 0). A producer
    # may list an endpoint with 0 blocks (the precise producer rounds a tier-weighted match below half a
    # block to 0): still cold, so the LRU spreads it and PreRequest records the placement.
    s = lru_scorer()
    eps = [endpoint(i) for i in range(3)]
    req = cold(eps, {eps[1]: 0})
    assert s.score(req, eps) == pytest.approx([1.0, 0.5, 0.0])
    s.pre_request(req, result_for(eps[0]))
    assert list(s.lru) == [eps[0]]


def test_no_hit_lru_sends_an_evicted_prefix_back_to_its_last_holder() -> None:
    s = lru_scorer()
    eps = [endpoint(i) for i in range(4)]
    req = cold(eps)
    req.data[PREFIX_KEY].last_holder = eps[2]
    # The last holder first; the others keep their LRU order at half weight.
    assert s.score(req, eps) == pytest.approx([0.5, 1 / 3, 1.0, 0.0])
    s.pre_request(req, result_for(eps[2]))
    assert list(s.lru) == [eps[2]]  # still a cold placement: it moves the LRU
    # A last holder that is not a candidate (filtered out, gone) changes nothing.
    req = cold(eps[:2])
    req.data[PREFIX_KEY].last_holder = eps[2]
    assert s.score(req, eps[:2]) == pytest.approx([1.0, 0.0])
    # A warm request ignores it; preferLastHolder: false restores the reference's spreading.
    warm = cold(eps, {eps[1]: 2})
    warm.data[PREFIX_KEY].last_holder = eps[2]
    assert s.score(warm, eps) == [0.5] * 4
    off = lru_scorer(preferLastHolder=False)
    req = cold(eps)
    req.data[PREFIX_KEY].last_holder = eps[2]
    assert off.score(req, eps) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])


def test_no_hit_lru_spreads_an_evicted_prefix_when_its_last_holder_has_a_prefill_backlog() -> None:
    s, inflight = lru_with_inflight()  # lastHolderBacklogLimit 8 prompts; the prompt is 4 blocks x 64 = 256 tokens
    eps = [endpoint(i) for i in range(4)]

    def score(home_backlog: int, least: int) -> list[float]:
        inflight.loads.clear()
        inflight.loads[eps[2]] = InFlight(requests=3, tokens=home_backlog)
        for ep in (eps[0], eps[1], eps[3]):
            inflight.loads[ep] = InFlight(requests=1, tokens=least)
        req = cold(eps)
        req.data[PREFIX_KEY].last_holder = eps[2]
        inflight.produce(req, eps)
        return s.score(req, eps)

    home = pytest.approx([0.5, 1 / 3, 1.0, 0.0])
    spread = pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert score(2048, 0) == home  # exactly eight prompts more than the least-loaded candidate: still home
    assert score(2049, 0) == spread  # one token over: the plain cold LRU order
    assert score(2600, 600) == home  # the difference counts, not the level
    unlimited, inflight = lru_with_inflight(lastHolderBacklogLimit=-1)
    inflight.loads[eps[2]] = InFlight(requests=9, tokens=10**6)
    req = cold(eps)
    req.data[PREFIX_KEY].last_holder = eps[2]
    inflight.produce(req, eps)
    assert unlimited.score(req, eps) == home


def test_no_hit_lru_spread_by_backlog_discounts_endpoints_over_a_prompt_behind() -> None:
    s, inflight = lru_with_inflight(spreadByBacklog=True)
    eps = [endpoint(i) for i in range(4)]

    def score(*backlog: int, holder: Endpoint | None = None) -> list[float]:
        inflight.loads.clear()
        for ep, tokens in zip(eps, backlog, strict=True):
            inflight.loads[ep] = InFlight(requests=1, tokens=tokens)
        req = cold(eps)
        req.data[TOKENIZED_PROMPT] = TokenizedPrompt(b"\0" * (4 * 100))  # P = 100 tokens
        req.data[PREFIX_KEY].last_holder = holder
        inflight.produce(req, eps)
        return s.score(req, eps)

    lru = [1.0, 2 / 3, 1 / 3, 0.0]  # never used: candidate order
    assert score(0, 0, 0, 0) == pytest.approx(lru)
    assert score(100, 0, 50, 0) == pytest.approx(lru)  # within one prompt of the least: rotation alone
    assert score(150, 50, 120, 50) == pytest.approx(lru)  # the gap counts, not the level
    # 300 tokens = 3 prompts behind the least, 2 past the free one: × 100 / (100 + 200).
    assert score(300, 0, 0, 0) == pytest.approx([1 / 3, 2 / 3, 1 / 3, 0.0])
    assert score(201, 0, 0, 0) == pytest.approx([100 / 201, 2 / 3, 1 / 3, 0.0])
    # The last holder that keeps up keeps its 1.0; the others' half scores are discounted as well.
    assert score(0, 0, 300, 0, holder=eps[2]) == pytest.approx([0.5, 1 / 3, 1.0, 0.0])
    assert score(300, 0, 0, 0, holder=eps[2]) == pytest.approx([0.5 / 3, 1 / 3, 1.0, 0.0])
    # A last holder past lastHolderBacklogLimit (8 × 256 tokens) is spread like the others, discounted too.
    assert score(3000, 0, 0, 0, holder=eps[0]) == pytest.approx([100 / 3000, 2 / 3, 1 / 3, 0.0])
    # Warm requests are untouched; off (the reference's behaviour) ignores the backlog.
    inflight.loads[eps[0]] = InFlight(requests=1, tokens=10**6)
    warm = cold(eps, {eps[1]: 2})
    inflight.produce(warm, eps)
    assert s.score(warm, eps) == [0.5] * 4
    off, inflight = lru_with_inflight()
    inflight.loads[eps[0]] = InFlight(requests=1, tokens=10**6)
    req = cold(eps)
    inflight.produce(req, eps)
    assert off.score(req, eps) == pytest.approx(lru)


def test_no_hit_lru_edges_and_bounded_size() -> None:
    s = lru_scorer(lruSize=2)
    eps = [endpoint(i) for i in range(3)]
    assert s.score(cold(eps), []) == []
    assert s.score(cold(eps), eps[:1]) == [1.0]
    for ep in eps:
        req = cold(eps)
        s.score(req, eps)
        s.pre_request(req, result_for(ep))
    assert list(s.lru) == [eps[1], eps[2]]  # pod-0 evicted
    req = cold(eps)
    s.score(req, eps)
    s.pre_request(
        req,
        SchedulingResult(
            "decode", {"decode": ProfileResult([eps[1]]), "p-stage": ProfileResult([eps[0]])}, prefill_profile="p-stage"
        ),
    )
    assert list(s.lru) == [eps[1], eps[0]]  # decode target then the prefill target moved to the front
    assert registry.build("no-hit-lru-scorer", "n", {"lruSize": 0}).lru_size == 1024  # type: ignore[attr-defined]


def test_no_hit_lru_prefix_plugin_name_selects_the_producer() -> None:
    a = registry.build("approx-prefix-cache-producer", "a", None)
    b = registry.build("approx-prefix-cache-producer", "b", None)
    scorer = registry.build("prefix-cache-scorer", "pfx", {"prefixMatchInfoProducerName": "b"})
    inflight = registry.build("inflight-load-producer", "ifl", None)
    s = make("no-hit-lru-scorer", {"prefixPluginName": "pfx"}, a, b, scorer, inflight)
    assert s.key == scoped(PREFIX_CACHE_MATCH_INFO, "b")
    s = make("no-hit-lru-scorer", {"prefixPluginName": "a"}, a, b, scorer, inflight)
    assert s.key == scoped(PREFIX_CACHE_MATCH_INFO, "a")


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(0, 11), max_size=30))
def test_no_hit_lru_property(n: int, history: list[int]) -> None:
    s = lru_scorer(lruSize=8)
    eps = [endpoint(i) for i in range(n)]
    for h in history:
        req = cold(eps)
        s.score(req, eps)
        s.pre_request(req, result_for(eps[h % n]))
    scores = s.score(cold(eps), eps)
    assert all(0.0 <= x <= 1.0 for x in scores)
    assert max(scores) == 1.0
    if history and n > 1:  # the most recent cold target is never strictly preferred
        last = eps[history[-1] % n]
        assert scores[eps.index(last)] == min(scores)


# -- lora-affinity-scorer ------------------------------------------------------------------------
def lora_ep(i: int, active: set[str], waiting: set[str], max_loras: int) -> Endpoint:
    ep = endpoint(i)
    ep.metrics = EndpointMetrics(
        active_models=frozenset(active), waiting_models=frozenset(waiting), max_active_models=max_loras, update_time=1.0
    )
    return ep


def test_lora_affinity_tiers() -> None:
    s = make("lora-affinity-scorer")
    eps = [
        lora_ep(0, {"sql"}, set(), 2),  # active
        lora_ep(1, {"x"}, set(), 2),  # room to load
        lora_ep(2, {"x", "y"}, {"sql"}, 2),  # full, but queued
        lora_ep(3, {"x", "y"}, set(), 2),  # full
    ]
    assert s.score(request(model="sql"), eps) == [1.0, 0.8, 0.6, 0.0]
    assert s.score(request(), []) == []


def test_lora_affinity_without_lora_state_scores_zero() -> None:
    s = make("lora-affinity-scorer")
    eps = [endpoint(0), endpoint(1, scraped=False)]
    assert s.score(request(model="base"), eps) == [0.0, 0.0]  # as the reference: 0 < 0 is false
    # One LoRA-capable endpoint in the pool: the reference tiers apply to every candidate.
    mixed = [endpoint(0), lora_ep(1, set(), set(), 4)]
    assert s.score(request(model="sql"), mixed) == [0.0, 0.8]


def test_lora_affinity_without_lora_leaves_weighted_random_unchanged() -> None:
    # A constant 1.0 column would give the longest queue a third of the picks (totals 2 and 1); 0 keeps the
    # queue scorer's 1 and 0, so weighted-random-picker never picks the pod scoring 0.
    profile = SchedulerProfile(
        name="default",
        picker=make("weighted-random-picker"),
        scorers=[WeightedScorer(make("queue-scorer"), 1.0), WeightedScorer(make("lora-affinity-scorer"), 1.0)],
    )
    eps = [endpoint(0, queue=0), endpoint(1, queue=10)]
    assert {profile.run(request(model="base"), eps).targets[0].name for _ in range(300)} == {"pod-0"}


# -- header-label-affinity-scorer ----------------------------------------------------------------
def test_header_label_affinity() -> None:
    s = make("header-label-affinity-scorer", {"headerName": "X-Tenant", "labelKey": "tenant"})
    eps = [endpoint(0, labels={"tenant": "a"}), endpoint(1, labels={"tenant": "b"}), endpoint(2)]
    req = request()
    req.headers["x-tenant"] = "b"
    assert s.score(req, eps) == [0.0, 1.0, 0.0]
    assert s.score(request(), eps) == [0.0, 0.0, 0.0]
    assert s.score(req, []) == []
    for params, message in [
        ({"labelKey": "t"}, "headerName is required"),
        ({"headerName": "h"}, "labelKey is required"),
    ]:
        with pytest.raises(ConfigError, match=message):
            registry.build("header-label-affinity-scorer", "h", params)


# -- context-length-aware -----------------------------------------------------------------------
def prompt_of(tokens: int) -> Any:
    req = request()
    req.data[TOKENIZED_PROMPT] = TokenizedPrompt(b"\0" * (4 * tokens))
    return req


def test_context_length_formula() -> None:
    # in range: 0.3 + 0.7·(0.7/(1 + 2048/10000) + 0.3·(2048−1000)/2048)
    assert range_score(1000, 0, 2048) == pytest.approx(0.3 + 0.7 * (0.7 / 1.2048 + 0.3 * 1048 / 2048))
    assert range_score(5, 5, 5) == 1.0
    assert range_score(3000, 0, 2048) == pytest.approx(0.3 / (1 + 952 / 1000))
    assert range_score(100, 2048, 8192) == pytest.approx(0.3 / (1 + 1948 / 1000))
    assert parse_range("0-2048") == (0, 2048) and parse_range(" 10 - 20 ") == (10, 20)
    assert parse_range("20-10") is None and parse_range("abc") is None and parse_range("1-2-3") is None
    # Python's int() reads these; the reference's strconv.Atoi does not (a malformed label scores 0).
    assert parse_range("0-8_192") is None and parse_range("0-\u0968\u0966") is None and parse_range("+0-+5") == (0, 5)


def test_context_length_scores_and_filter() -> None:
    label = "llm-d.ai/context-length-range"
    eps = [
        endpoint(0, labels={label: "0-2048"}),
        endpoint(1, labels={label: "2048-32768"}),
        endpoint(2),
        endpoint(3, labels={label: "bogus"}),
    ]
    s = make("context-length-aware")
    scores = s.score(prompt_of(1000), eps)
    assert scores[0] > 0.3 > scores[1] and scores[2] == 0.5 and scores[3] == 0.0
    assert s.filter(prompt_of(1000), eps) == eps  # filtering off: pass-through
    f = make("context-length-aware", {"enableFiltering": True})
    assert [ep.name for ep in f.filter(prompt_of(4096), eps)] == ["pod-1", "pod-2"]
    assert f.filter(prompt_of(1), []) == []
    # Without TokenizedPrompt: prompt bytes / 4.
    assert [ep.name for ep in f.filter(request(b"x" * 40_000), eps)] == ["pod-1", "pod-2"]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200_000), st.integers(0, 100_000), st.integers(0, 100_000))
def test_context_length_property(length: int, lo: int, width: int) -> None:
    hi = lo + width
    score = range_score(length, lo, hi)
    assert 0.0 < score <= 1.0
    assert (score > 0.3) == (lo <= length <= hi)


INT64_MAX = 2**63 - 1


def test_context_length_bounds_beyond_int64_are_malformed_not_a_crash() -> None:
    # A bound too large for a float made range_score raise OverflowError on every request (the
    # label parse is cached); the reference's strconv.Atoi rejects anything beyond int64.
    label = "llm-d.ai/context-length-range"
    huge = "0-" + "9" * 400
    assert parse_range(huge) is None and parse_range(f"0-{INT64_MAX + 1}") is None
    assert parse_range(f"0-{INT64_MAX}") == (0, INT64_MAX)
    eps = [endpoint(0, labels={label: huge}), endpoint(1, labels={label: "0-4096"})]
    assert make("context-length-aware").score(prompt_of(10), eps)[0] == 0.0
    f = make("context-length-aware", {"enableFiltering": True})
    assert [ep.name for ep in f.filter(prompt_of(10), eps)] == ["pod-1"]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, INT64_MAX), st.integers(0, INT64_MAX), st.integers(0, INT64_MAX))
def test_context_length_property_over_the_label_range(length: int, a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    assert parse_range(f"{lo}-{hi}") == (lo, hi)
    score = range_score(length, lo, hi)
    assert 0.0 < score <= 1.0
    assert (score > 0.3) == (lo <= length <= hi)  # what the filter relies on


# -- endpoint-attribute-scorer -------------------------------------------------------------------
def test_endpoint_attribute_scorer_adaptive_and_fixed() -> None:
    lower = make(
        "endpoint-attribute-scorer", {"attributeKey": "waiting-queue", "algorithm": {"type": "linear_lower_is_better"}}
    )
    eps = [endpoint(0, queue=2), endpoint(1, queue=6), endpoint(2, queue=10), endpoint(3, scraped=False)]
    assert lower.score(request(), eps) == pytest.approx([1.0, 0.5, 0.0, 0.0])  # missing → 0
    higher = make(
        "endpoint-attribute-scorer", {"attributeKey": "waiting-queue", "algorithm": {"type": "linear_higher_is_better"}}
    )
    assert higher.score(request(), eps) == pytest.approx([0.0, 0.5, 1.0, 0.0])
    assert lower.score(request(), [endpoint(0, queue=3), endpoint(1, queue=3)]) == [1.0, 1.0]
    assert lower.score(request(), [endpoint(0, scraped=False)]) == [0.0]
    assert lower.score(request(), []) == []
    fixed = make(
        "endpoint-attribute-scorer",
        {"attributeKey": "kv-cache-utilization",
         "algorithm": {"type": "linear_lower_is_better", "normalization": {"fixedRange": {"min": 0.2, "max": 0.6}}}},
    )  # fmt: skip
    kv = [endpoint(0, kv=0.1), endpoint(1, kv=0.4), endpoint(2, kv=0.9)]
    assert fixed.score(request(), kv) == pytest.approx([1.0, 0.5, 0.0])  # clamped outside the range


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"algorithm": {"type": "linear_lower_is_better"}}, "attributeKey: attribute is required"),
        ({"attributeKey": "waiting-queue"}, "algorithm is required"),
        ({"attributeKey": "waiting-queue", "algorithm": {"type": "log"}}, "algorithm.type must be"),
        (
            {"attributeKey": "waiting-queue",
             "algorithm": {"type": "linear_lower_is_better", "normalization": {"fixedRange": {"min": 1, "max": 1}}}},
            "min < max",
        ),
        (
            {"attributeKey": "waiting-queue",
             "algorithm": {"type": "linear_lower_is_better",
                           "normalization": {"fixedRange": {"min": 0, "max": 1}, "adaptiveRange": {}}}},
            "at most one",
        ),
    ],
)  # fmt: skip
def test_endpoint_attribute_scorer_validation(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        registry.build("endpoint-attribute-scorer", "eas", params)
    assert "plugin 'eas' (type endpoint-attribute-scorer)" in str(err.value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 1e6)), min_size=1, max_size=30), st.booleans())
@example([0.0, 5e-324], False).via("a subnormal span overflowed 1 / span to inf")
@example([0.0, 5e-324], True).via("a subnormal span overflowed 1 / span to inf")
def test_endpoint_attribute_scorer_property(values: list[float | None], lower: bool) -> None:
    class P(Plugin):
        type = "attr-test"
        produces = frozenset({"x"})

    algo = "linear_lower_is_better" if lower else "linear_higher_is_better"
    s = make("endpoint-attribute-scorer", {"attributeKey": "x", "producer": "p", "algorithm": {"type": algo}}, P("p"))
    eps = [endpoint(i) for i in range(len(values))]
    req = request()
    req.data[scoped("x", "p")] = {ep: v for ep, v in zip(eps, values) if v is not None}
    scores = s.score(req, eps)
    assert all(0.0 <= x <= 1.0 for x in scores)
    present = sorted((v, x) for v, x in zip(values, scores) if v is not None)
    ordered = [x for _, x in present]
    assert ordered == (sorted(ordered, reverse=True) if lower else sorted(ordered))


# -- session-affinity-scorer ---------------------------------------------------------------------
def test_session_scorer_scores_and_writes_token() -> None:
    s = make("session-affinity-scorer")
    eps = [endpoint(i) for i in range(3)]
    assert s.score(request(), eps) == [0.0, 0.0, 0.0]
    req = request()
    req.headers["x-session-token"] = encode_token(eps[2])
    assert s.score(req, eps) == [0.0, 0.0, 1.0]
    assert s.score(req, eps[:2]) == [0.0, 0.0]
    assert s.score(req, []) == []
    s.pre_request(req, result_for(eps[0]))  # other scorers outweighed the session
    assert s.response_headers(req, ResponseInfo(status=200), {}) == {"x-session-token": encode_token(eps[0])}


def in_session() -> Any:
    """A request of session "abc" (the session_id strategy's default header)."""
    r = request()
    r.headers["x-session-id"] = "abc"
    return r


def test_session_scorer_session_id_keeps_binding_when_outweighed() -> None:
    s = make("session-affinity-scorer", {"strategy": "session_id"})
    eps = [endpoint(i) for i in range(3)]

    r = in_session()
    assert s.score(r, eps) == [0.0, 0.0, 0.0]
    s.pre_request(r, result_for(eps[1]))
    r = in_session()
    assert s.score(r, eps) == [0.0, 1.0, 0.0]
    s.pre_request(r, result_for(eps[2]))  # outweighed while pod-1 was a candidate: binding kept
    assert s.score(in_session(), eps) == [0.0, 1.0, 0.0]


def test_a_session_outweighed_on_every_request_stays_bound_while_it_is_active() -> None:
    """Each request of the session refreshes its binding, wherever it went: a session active all along is not
    forgotten after `evictionTtlSeconds` because other scorers outweighed it each time (before, only a request
    that landed on the bound endpoint refreshed it)."""
    s = make("session-affinity-scorer", {"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": 10}})
    eps = [endpoint(i) for i in range(3)]

    r = in_session()
    s.score(r, eps)
    s.pre_request(r, result_for(eps[1]))
    for _ in range(3):  # every 6 s for 18 s (past the 10 s TTL), always outweighed
        s.bindings["abc"].last_seen -= 6
        r = in_session()
        s.score(r, eps)
        s.pre_request(r, result_for(eps[2]))
        s.sweep(time.monotonic())
    assert s.score(in_session(), eps) == [0.0, 1.0, 0.0]


def test_no_hit_lru_follows_the_prefix_scorer_by_type() -> None:
    a = registry.build("approx-prefix-cache-producer", "a", None)
    b = registry.build("approx-prefix-cache-producer", "b", None)
    scorer = registry.build("prefix-cache-scorer", "pfx", {"prefixMatchInfoProducerName": "b"})
    inflight = registry.build("inflight-load-producer", "ifl", None)
    s = make("no-hit-lru-scorer", None, a, b, scorer, inflight)  # default prefixPluginType: prefix-cache-scorer
    assert s.key == scoped(PREFIX_CACHE_MATCH_INFO, "b")
    s = make("no-hit-lru-scorer", {"prefixMatchInfoProducerName": "a"}, a, b, scorer, inflight)
    assert s.key == scoped(PREFIX_CACHE_MATCH_INFO, "a")
