"""`burst-prefix-cache-producer`: grouping, balance, the per-replica cap, the window, cancellation,
and a burst through the Director with `prefix-cache-scorer` reading the producer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from helpers import endpoint, on_a_punctual_loop, request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.director import PRODUCER_TIMEOUT, Director, RoutingDecision
from llmepp.framework.datakeys import (
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    TokenizedPrompt,
    scoped,
)
from llmepp.framework.plugin import ConfigError, registry
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.burst_prefix import BurstMember, BurstPrefixCacheProducer, assign
from llmepp.plugins.producers.prefix_index import block_hashes
from llmepp.plugins.producers.token import estimate_tokens
from llmepp.request.types import InferenceRequest

KEY = scoped(PREFIX_CACHE_MATCH_INFO, "burst-prefix-cache-producer")


def member(prompt: bytes, candidates: list[Endpoint], block: int = 64) -> BurstMember:
    tokens = estimate_tokens(prompt)
    return BurstMember(block_hashes(tokens, block, 1), len(tokens) // 4, candidates)


def prompt(tag: str, size: int = 1000) -> bytes:
    return (tag.encode() * size)[:size]


# -- assignment --------------------------------------------------------------------------------
def test_identical_prompts_share_one_endpoint_and_groups_spread() -> None:
    eps = [endpoint(i) for i in range(4)]
    batch = [member(prompt("a"), eps) for _ in range(8)] + [member(prompt("b"), eps) for _ in range(8)]
    targets = assign(batch)
    a, b = {t.name for t in targets[:8] if t}, {t.name for t in targets[8:] if t}
    assert len(a) == 1 and len(b) == 1 and a != b


def test_a_lone_request_gets_no_affinity_unless_it_shares_min_colocate_blocks() -> None:
    eps = [endpoint(i) for i in range(2)]
    shared = prompt("system ", 64 * 4 * 3)  # 3 full 64-token blocks
    batch = [member(shared + b"question one", eps), member(shared + b"question two", eps), member(prompt("z"), eps)]
    assert assign(batch) == [None, None, None]  # minColocateBlocks 0: only identical prompts group
    targets = assign(batch, min_colocate_blocks=3)
    assert targets[0] is not None and targets[1] is not None and targets[2] is None
    # Fair share is ceil(2 requests / 2 endpoints) = 1: co-location stops at balance.
    assert targets[0] is not targets[1]
    four = [member(shared + f"q{i}".encode(), eps) for i in range(4)]
    assert Counter(t.name for t in assign(four, min_colocate_blocks=3) if t) == {"pod-0": 2, "pod-1": 2}
    # Sharing fewer blocks than asked for is no family.
    assert assign(batch, min_colocate_blocks=4) == [None, None, None]


def test_prefix_families_stay_together_within_the_fair_share() -> None:
    """8 groups of 4 on 4 endpoints (fair share 8 requests each), two families of 4 groups sharing a
    2-block system prompt: each endpoint holds groups of one family only; without families the
    groups of each family spread over every endpoint."""
    eps = [endpoint(i) for i in range(4)]
    batch = []
    for family in "FG":
        shared = prompt(f"{family} system ", 64 * 4 * 2)
        for g in range(4):
            batch += [member(shared + f"question {g}".encode() * 20, eps) for _ in range(4)]
    with_families = assign(batch, min_colocate_blocks=2)
    f_pods, g_pods = {t.name for t in with_families[:16] if t}, {t.name for t in with_families[16:] if t}
    assert len(f_pods) == 2 and len(g_pods) == 2 and not f_pods & g_pods
    assert sorted(Counter(t.name for t in with_families if t).values()) == [8, 8, 8, 8]
    without = assign(batch)
    assert len({t.name for t in without[:16] if t}) == 4


def test_max_per_replica_fills_one_endpoint_then_spills() -> None:
    eps = [endpoint(i) for i in range(4)]
    batch = [member(prompt("a"), eps) for _ in range(8)]
    counts = Counter(t.name for t in assign(batch, max_per_replica=3) if t)
    assert sorted(counts.values()) == [2, 3, 3]
    # More members than endpoints × k: the rest get no affinity rather than break the cap.
    batch = [member(prompt("a"), eps) for _ in range(10)]
    targets = assign(batch, max_per_replica=2)
    assert targets.count(None) == 2
    assert set(Counter(t.name for t in targets if t).values()) == {2}


def test_balance_by_requests_spreads_counts() -> None:
    eps = [endpoint(i) for i in range(2)]
    batch = [member(prompt("a"), eps) for _ in range(6)]
    for c in "bcd":
        batch += [member(prompt(c), eps) for _ in range(2)]
    counts = Counter(t.name for t in assign(batch) if t)
    assert sorted(counts.values()) == [6, 6]


def test_balance_by_tokens_spreads_prompt_tokens() -> None:
    eps = [endpoint(i) for i in range(2)]
    batch = [member(prompt("L", 16000), eps) for _ in range(2)]  # one long prompt (4000 tokens)
    for c in "bcd":
        batch += [member(prompt(c, 2000), eps) for _ in range(2)]  # three short ones (500 tokens)
    by_tokens = assign(batch, balance_by="tokens")
    long_home = by_tokens[0]
    assert by_tokens[1] is long_home and all(t is not long_home for t in by_tokens[2:])
    by_requests = assign(batch, balance_by="requests")
    assert any(t is by_requests[0] for t in by_requests[2:])  # counts, not tokens: a short group joins it


def test_ties_go_to_the_less_loaded_endpoint_then_rotate() -> None:
    eps = [endpoint(0), endpoint(1, queue=5), endpoint(2)]
    batch = [member(prompt("a"), eps) for _ in range(2)]
    assert assign(batch)[0] is eps[0]
    assert assign(batch, offset=1)[0] is eps[2]  # a new batch starts elsewhere; the busy pod last
    assert assign(batch, offset=3)[0] is eps[0]


def test_only_endpoints_every_member_may_use_are_chosen() -> None:
    eps = [endpoint(i) for i in range(3)]
    batch = [member(prompt("a"), eps), member(prompt("a"), eps[1:]), member(prompt("a"), [eps[2], eps[1]])]
    targets = assign(batch)
    assert targets[0] is targets[1] is targets[2] is eps[1]
    assert assign([member(prompt("a"), eps[:1]), member(prompt("a"), eps[1:])]) == [None, None]


# -- the producer --------------------------------------------------------------------------------
def producer(params: dict[str, Any] | None = None) -> BurstPrefixCacheProducer:
    plugin = registry.build("burst-prefix-cache-producer", "burst-prefix-cache-producer", params)
    assert isinstance(plugin, BurstPrefixCacheProducer)
    return plugin


def tokenized(text: bytes) -> InferenceRequest:
    req = request(text)
    req.data[TOKENIZED_PROMPT] = TokenizedPrompt(estimate_tokens(text))
    return req


async def test_the_window_releases_a_burst_together_with_a_full_match_on_the_group_endpoint() -> None:
    p = producer({"windowDurationMs": 150})
    eps = [endpoint(i) for i in range(4)]
    reqs = [tokenized(prompt("a")) for _ in range(5)] + [tokenized(prompt("b")) for _ in range(5)]
    start = time.monotonic()
    await asyncio.gather(*(p.produce(r, eps) for r in reqs))
    waited = time.monotonic() - start
    assert 0.14 <= waited < 0.3
    infos: list[PrefixMatchInfo] = [r.data[KEY] for r in reqs]
    homes = [next(iter(i.hits)) for i in infos]
    assert len(set(homes[:5])) == 1 and len(set(homes[5:])) == 1 and homes[0] is not homes[5]
    assert all(i.hits[h] == i.total_blocks == 4 and i.block_size == 64 for i, h in zip(infos, homes, strict=True))
    assert p._batch is None  # sealed and detached: the next request opens a new window


async def test_a_late_arrival_waits_only_for_the_rest_of_the_window() -> None:
    async def measure() -> None:
        # The late request must arrive while the window is still open: a loaded machine may oversleep by tens of
        # ms, so the window stays open 250 ms past the sleep (a 200 ms window and a 150 ms sleep left 50 ms).
        p = producer({"windowDurationMs": 500})
        eps = [endpoint(i) for i in range(2)]
        first = asyncio.create_task(p.produce(tokenized(prompt("a")), eps))
        await asyncio.sleep(0.25)
        start = time.monotonic()
        late = tokenized(prompt("a"))
        await p.produce(late, eps)
        assert time.monotonic() - start < 0.4  # the rest of the window (<= 0.25 s), not a window of its own (0.5 s)
        await first
        assert late.data[KEY].hits  # it joined the open batch, so it is grouped with the first

    await on_a_punctual_loop(measure)


async def test_max_batch_size_seals_early_and_the_next_request_opens_a_new_batch() -> None:
    async def measure() -> None:
        p = producer({"windowDurationMs": 5000, "maxBatchSize": 3})
        eps = [endpoint(i) for i in range(2)]
        start = time.monotonic()
        reqs = [tokenized(prompt("a")) for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(*(p.produce(r, eps) for r in reqs)), 1.0)
        assert time.monotonic() - start < 0.5
        assert len({next(iter(r.data[KEY].hits)) for r in reqs}) == 1
        fourth = asyncio.create_task(p.produce(tokenized(prompt("a")), eps))
        await asyncio.sleep(0.01)
        assert not fourth.done() and p._batch is not None and len(p._batch.entries) == 1
        fourth.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fourth

    await on_a_punctual_loop(measure)


async def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on() -> None:
    p = producer({"windowDurationMs": 100})
    eps = [endpoint(i) for i in range(2)]
    reqs = [tokenized(prompt("a")) for _ in range(3)]
    tasks = [asyncio.create_task(p.produce(r, eps)) for r in reqs]
    await asyncio.sleep(0.01)
    tasks[0].cancel()
    await asyncio.sleep(0)
    assert p._batch is not None and len(p._batch.entries) == 2
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    await asyncio.gather(*tasks[1:])
    assert KEY not in reqs[0].data
    assert reqs[1].data[KEY].hits.keys() == reqs[2].data[KEY].hits.keys() != set()


async def test_cancelling_the_only_waiting_request_drops_its_batch_and_timer() -> None:
    p = producer({"windowDurationMs": 10000})
    task = asyncio.create_task(p.produce(tokenized(prompt("a")), [endpoint(0)]))
    await asyncio.sleep(0.01)
    batch = p._batch
    assert batch is not None and batch.timer is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p._batch is None and batch.sealed and batch.timer.cancelled()


async def test_a_request_whose_coroutine_is_closed_leaves_its_batch() -> None:
    # A transport may drop a waiting routing step without cancelling it (the coroutine closed: GeneratorExit).
    p = producer({"windowDurationMs": 10000})
    coro = p.produce(tokenized(prompt("a")), [endpoint(0)])
    coro.send(None)  # runs up to the wait on its batch
    batch = p._batch
    assert batch is not None and len(batch.entries) == 1
    coro.close()
    assert p._batch is None and batch.sealed and batch.timer is not None and batch.timer.cancelled()


async def test_a_timeout_releases_the_request() -> None:
    p = producer({"windowDurationMs": 10000})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.produce(tokenized(prompt("a")), [endpoint(0)]), 0.05)
    assert p._batch is None


async def test_requests_without_a_prompt_never_wait() -> None:
    p = producer({"windowDurationMs": 10000})
    req = request(None)
    await asyncio.wait_for(p.produce(req, [endpoint(0)]), 0.1)
    assert KEY not in req.data and p._batch is None


def test_the_director_waits_for_the_window() -> None:
    p = producer({"windowDurationMs": 2000})
    assert p.produce_timeout == pytest.approx(2.3) and p.produce_timeout > PRODUCER_TIMEOUT


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"windowDurationMs": 0}, r"windowDurationMs must be in 1\.\.10000"),
        ({"windowDurationMs": 10001}, r"windowDurationMs must be in 1\.\.10000"),
        ({"maxPerReplica": 0}, r"maxPerReplica must be -1 \(unlimited\) or >= 1"),
        ({"blockSizeTokens": 0}, r"blockSizeTokens must be > 0"),
        ({"minColocateBlocks": -1}, r"minColocateBlocks must be >= 0"),
        ({"maxBatchSize": 0}, r"maxBatchSize must be -1 \(unlimited\) or >= 1"),
        ({"balanceBy": "bytes"}, r"balanceBy must be one of requests, tokens"),
        ({"maxPrefixTokensToMatch": 10}, r"maxPrefixTokensToMatch must be 0 or >= blockSizeTokens"),
        ({"window": 5}, r"Object contains unknown field `window`"),
    ],
)
def test_bad_parameters_are_start_up_errors_naming_the_field(params: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=r"plugin 'b' \(type burst-prefix-cache-producer\): parameters: " + expected):
        registry.build("burst-prefix-cache-producer", "b", params)


# -- through the Director -------------------------------------------------------------------------
CONFIG = """
plugins:
- type: burst-prefix-cache-producer
  parameters: {windowDurationMs: 600}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: burst-prefix-cache-producer}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 1}
"""


def pool(n: int) -> Datastore:
    ds = Datastore()
    for i in range(n):
        ds.upsert(EndpointSpec(name=f"pod-{i}", address=f"10.4.0.{i + 1}", port=8000))
    return ds


async def test_a_burst_through_the_director_lands_one_group_per_endpoint() -> None:
    ds = pool(4)
    metrics = EppMetrics()
    components = build(load_config(CONFIG), datastore=ds, metrics=metrics)
    assert [p.type for p in components.pipeline.producers] == ["token-producer", "burst-prefix-cache-producer"]
    d = Director(ds, components.pipeline, metrics)
    reqs = [request(prompt(c)) for c in "ab" for _ in range(6)]
    # A 600 ms window outlasts the director's default 400 ms producer budget: the producer's own holds.
    decisions = await asyncio.gather(*(d.handle_request(r, None) for r in reqs))
    pods = [dec.targets[0].name for dec in decisions]  # type: ignore[union-attr]
    assert len(set(pods[:6])) == 1 and len(set(pods[6:])) == 1 and pods[0] != pods[6]


# -- endpoints that leave while a batch waits ------------------------------------------------------------------
# The candidates a request joined the batch with can lose an endpoint before the window seals (rollout,
# scale-in, readiness lost). The director drops it from the candidates, so a group assigned to it would be left
# with no affinity and scattered over the live pods: the prompt prefilled on many pods, which the producer exists
# to prevent. Removed endpoints are never assigned.
async def test_a_group_is_never_assigned_to_an_endpoint_removed_during_the_window() -> None:
    ds = pool(3)
    p = registry.build("burst-prefix-cache-producer", "burst-prefix-cache-producer", {"windowDurationMs": 200})
    assert isinstance(p, BurstPrefixCacheProducer)
    reqs = []
    for _ in range(6):
        r = request(prompt("r"))
        r.data[TOKENIZED_PROMPT] = TokenizedPrompt(estimate_tokens(prompt("r")))
        reqs.append(r)
    candidates = ds.endpoints  # what the director hands every producer: the pool when the request came in
    waiting = asyncio.gather(*(p.produce(r, candidates) for r in reqs))
    await asyncio.sleep(0.05)
    ds.delete("pod-0")  # a pod leaves while the window is open (rollout, scale-in, readiness lost)
    await waiting
    infos: list[PrefixMatchInfo] = [r.data[KEY] for r in reqs]
    homes = {ep for info in infos for ep in info.hits}
    assert homes, "the group got no affinity at all"
    removed = [ep.name for ep in homes if ep.removed]
    assert not removed, f"the whole group was steered to {removed}, removed while the batch waited"


async def test_through_the_director_a_burst_still_lands_on_one_pod_when_a_pod_leaves_during_the_window() -> None:
    ds = pool(6)
    metrics = EppMetrics()
    components = build(load_config(CONFIG), datastore=ds, metrics=metrics)
    director = Director(ds, components.pipeline, metrics)
    reqs = [request(prompt("r")) for _ in range(12)]
    routing = asyncio.gather(*(director.handle_request(r, None) for r in reqs))
    await asyncio.sleep(0.1)
    ds.delete("pod-0")
    decisions = await routing
    assert all(isinstance(d, RoutingDecision) for d in decisions)
    pods = sorted({d.targets[0].name for d in decisions})  # type: ignore[union-attr]
    assert "pod-0" not in pods
    # One prompt, one window: one pod prefills it (the producer's whole point); 12 requests scattered at
    # random over 5 pods instead when the group was assigned to the departed one.
    assert len(pods) == 1, f"the burst was scattered over {pods}"
