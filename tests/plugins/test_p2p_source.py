"""`p2p-source-producer`: which peer is named in `x-kv-cache-source-host-port`, when, and for which
computing pod; its config through the loader, and a pull named end to end through the Director with
the approximate prefix producer's real index."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from helpers import endpoint, request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.filters.header_testing import SELECTION_HEADER
from llmepp.plugins.producers.p2p_source import KV_CACHE_SOURCE_HEADER, P2PSourceProducer
from llmepp.request.types import InferenceRequest

HEADER = KV_CACHE_SOURCE_HEADER
BLOCK = 64
INFO_KEY = f"{PREFIX_CACHE_MATCH_INFO}/approx-prefix-cache-producer"


def producer(params: dict[str, Any] | None = None, seed: int = 7) -> P2PSourceProducer:
    prefix = registry.build("approx-prefix-cache-producer", "approx-prefix-cache-producer", None)
    plugin = registry.build("p2p-source-producer", "p2p", params)
    assert isinstance(plugin, P2PSourceProducer)
    others: list[Plugin] = [prefix, plugin]
    plugin.setup(PluginContext({p.name: p for p in others}, None, None, None))
    plugin._rng = random.Random(seed)
    return plugin


def with_hits(hits: dict[Endpoint, int], req: InferenceRequest | None = None) -> InferenceRequest:
    req = req or request(b"x" * 4096)
    req.data[INFO_KEY] = PrefixMatchInfo(block_size=BLOCK, total_blocks=16, hits=hits, hashes=[])
    return req


def primary(ep: Endpoint) -> SchedulingResult:
    return SchedulingResult("default", {"default": ProfileResult(targets=[ep])})


def pd(decode: Endpoint, prefill: Endpoint | None, prefill_name: str = "prefill") -> SchedulingResult:
    profiles: dict[str, ProfileResult | None] = {"decode": ProfileResult(targets=[decode])}
    profiles[prefill_name] = ProfileResult(targets=[prefill] if prefill is not None else [])
    return SchedulingResult("decode", profiles, prefill_profile=prefill_name)


def run(p: P2PSourceProducer, req: InferenceRequest, candidates: list[Endpoint], result: SchedulingResult) -> Any:
    """The header's value after produce and pre_request (None: not set)."""
    p.produce(req, candidates)
    p.pre_request(req, result)
    return req.upstream_headers.get(HEADER)


# -- the rule -------------------------------------------------------------------------------------
def test_a_peer_caching_more_than_the_computing_pod_is_named() -> None:
    a, b = endpoint(0), endpoint(1)
    assert run(producer(), with_hits({a: 10, b: 2}), [a, b], primary(b)) == a.hostport


def test_nothing_is_set_when_the_computing_pod_caches_as_much() -> None:
    a, b = endpoint(0), endpoint(1)
    assert run(producer(), with_hits({a: 10, b: 10}), [a, b], primary(b)) is None
    assert run(producer(), with_hits({a: 10}), [a, b], primary(a)) is None  # the best holder computes
    assert run(producer(), with_hits({}), [a, b], primary(b)) is None  # nobody caches a block
    assert run(producer(), request(b"x"), [a, b], primary(b)) is None  # no match info at all


def test_min_cached_token_delta_is_inclusive() -> None:
    a, b = endpoint(0), endpoint(1)
    # a holds 3 blocks more than b: 192 tokens.
    assert run(producer({"minCachedTokenDelta": 192}), with_hits({a: 5, b: 2}), [a, b], primary(b)) == a.hostport
    assert run(producer({"minCachedTokenDelta": 193}), with_hits({a: 5, b: 2}), [a, b], primary(b)) is None


def test_the_prefill_pick_computes_under_p_d() -> None:
    src, decode, prefill = endpoint(0), endpoint(1), endpoint(2)
    # The decode pod caches as much as the source, the prefill pod nothing: the prefill pod pulls.
    hits = {src: 8, decode: 8}
    assert run(producer(), with_hits(hits), [src, decode, prefill], pd(decode, prefill)) in {
        src.hostport,
        decode.hostport,
    }
    # Decode-only (the prefill profile ran and found nothing, or did not run): the decode pod computes.
    assert run(producer(), with_hits({src: 8, decode: 8}), [src, decode], pd(decode, None)) is None
    assert run(producer(), with_hits({src: 8, decode: 1}), [src, decode], primary(decode)) == src.hostport


def test_a_renamed_prefill_profile_is_followed() -> None:
    src, decode, prefill = endpoint(0), endpoint(1), endpoint(2)
    p = producer({"prefillProfileName": "pf"})
    assert run(p, with_hits({src: 8, decode: 8}), [src, decode, prefill], pd(decode, prefill, "pf")) == src.hostport
    # Under the default name "prefill" a profile called "pf" is not the computing one: decode is.
    assert run(producer(), with_hits({src: 8, decode: 8}), [src, decode, prefill], pd(decode, prefill, "pf")) is None
    assert producer({"prefillProfileName": ""}).prefill_profile == "prefill"  # the reference's default for ""


def test_only_candidates_are_sources() -> None:
    a, b, outside = endpoint(0), endpoint(1), endpoint(2)
    # `outside` caches the most but the subset hint / a screener left it out.
    assert run(producer(), with_hits({outside: 16, a: 4}), [a, b], primary(b)) == a.hostport


def test_a_client_sent_header_is_blanked_unless_a_source_is_named() -> None:
    a, b = endpoint(0), endpoint(1)
    spoofed = with_hits({a: 1, b: 1})
    spoofed.headers[HEADER] = "203.0.113.9:1"
    assert run(producer(), spoofed, [a, b], primary(b)) == ""
    real = with_hits({a: 9, b: 1})
    real.headers[HEADER] = "203.0.113.9:1"
    assert run(producer(), real, [a, b], primary(b)) == a.hostport


# -- sampling -------------------------------------------------------------------------------------
def sources(p: P2PSourceProducer, hits: dict[Endpoint, int], candidates: list[Endpoint], n: int) -> Counter[str]:
    computing = endpoint(99)
    seen: Counter[str] = Counter()
    for _ in range(n):
        req = with_hits(hits)
        seen[run(p, req, [*candidates, computing], primary(computing)) or "none"] += 1
    return seen


def test_sampled_within_one_block_of_the_best_weighted_by_queue() -> None:
    best, one_short, two_short = endpoint(0, queue=3), endpoint(1), endpoint(2)
    hits = {best: 10, one_short: 9, two_short: 8}
    seen = sources(producer(), hits, [best, one_short, two_short], 4000)
    assert set(seen) == {best.hostport, one_short.hostport}  # two blocks short: never
    # Weights 1/(1+3) vs 1/(1+0): one_short is drawn 4 times as often (80%).
    assert 0.77 < seen[one_short.hostport] / 4000 < 0.83


def test_equal_holders_share_the_pulls_evenly() -> None:
    holders = [endpoint(i) for i in range(4)]
    seen = sources(producer(), dict.fromkeys(holders, 6), holders, 4000)
    assert sorted(seen) == sorted(ep.hostport for ep in holders)
    assert all(800 < count < 1200 for count in seen.values())


def test_sampling_is_deterministic_for_a_seed() -> None:
    holders = [endpoint(i, queue=i) for i in range(5)]
    hits = dict.fromkeys(holders, 6)
    assert sources(producer(seed=3), hits, holders, 50) == sources(producer(seed=3), hits, holders, 50)


def test_the_chosen_peer_s_own_count_is_compared() -> None:
    """A peer one block short of the best is compared with its own count, as the reference does."""
    best, one_short, computing = endpoint(0, queue=1000), endpoint(1), endpoint(2)
    p = producer({"minCachedTokenDelta": 2 * BLOCK})
    # computing holds 7, one_short 9 (2 blocks more), best 10: the near-certain draw is one_short.
    headers = [run(p, with_hits({best: 10, one_short: 9, computing: 7}), [best, one_short, computing],
                   primary(computing)) for _ in range(20)]  # fmt: skip
    assert one_short.hostport in headers
    p3 = producer({"minCachedTokenDelta": 3 * BLOCK})
    headers = [run(p3, with_hits({best: 10, one_short: 9, computing: 7}), [best, one_short, computing],
                   primary(computing)) for _ in range(20)]  # fmt: skip
    assert set(headers) <= {best.hostport, None} and None in headers  # one_short's 2 blocks fall short


# -- config -----------------------------------------------------------------------------------------
# The reference README's wiring (a named prefix producer), with the approximate producer.
CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: approx-prefix-cache-producer
  name: approx-cache
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: approx-cache
- type: p2p-source-producer
  name: p2p-cache-source
  parameters:
    prefixMatchInfoProducerName: approx-cache
    prefillProfileName: prefill
    minCachedTokenDelta: 1
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: prefix-cache-scorer
"""


def director(config: str = CONFIG) -> tuple[Director, Datastore]:
    ds = Datastore()
    for i in range(3):
        ds.upsert(EndpointSpec(name=f"pod-{i}", address=f"10.3.0.{i + 1}", port=8000))
    metrics = EppMetrics()
    return Director(ds, build(load_config(config), datastore=ds, metrics=metrics).pipeline, metrics), ds


def test_reference_config_loads_and_runs_after_its_prefix_producer() -> None:
    d, _ = director()
    names = [p.name for p in d.pipeline.producers]
    assert names.index("p2p-cache-source") > names.index("approx-cache")
    assert any(p.name == "p2p-cache-source" for p in d.pipeline.pre_request)


def test_without_a_prefix_producer_the_approximate_one_is_auto_created() -> None:
    config = "plugins:\n- type: p2p-source-producer\n- type: queue-scorer\n"
    d, _ = director(config)
    assert [p.type for p in d.pipeline.producers] == ["token-producer", "approx-prefix-cache-producer",
                                                      "p2p-source-producer"]  # fmt: skip


async def test_a_pull_is_named_through_the_director() -> None:
    d, ds = director()
    prompt = b"shared system prompt " * 60  # ~1260 bytes: 4 full 64-token blocks
    home = await d.handle_request(request(prompt), None)
    assert isinstance(home, RoutingDecision)
    assert HEADER not in home.headers  # nobody cached it yet
    await asyncio.sleep(0)  # the prefix index records in a call_soon after the routing answer
    again = await d.handle_request(request(prompt), None)
    assert isinstance(again, RoutingDecision)
    assert again.targets == home.targets and HEADER not in again.headers  # affinity: computed at home
    # Forced elsewhere (as load-aware scoring would), the new pod is told to pull from the home pod.
    other = next(ep for ep in ds.endpoints if ep is not home.targets[0])
    req = request(prompt)
    req.headers[SELECTION_HEADER] = other.hostport
    away = await d.handle_request(req, None)
    assert isinstance(away, RoutingDecision)
    assert away.targets == [other] and away.headers[HEADER] == home.targets[0].hostport


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"minCachedTokenDelta": 0}, r"parameters: minCachedTokenDelta must be >= 1, got 0"),
        ({"minCachedTokenDelta": -5}, r"parameters: minCachedTokenDelta must be >= 1, got -5"),
        ({"minCachedTokenDelta": "1"}, r"parameters: Expected `int`, got `str` - at `parameters.minCachedTokenDelta`"),
        ({"minCachedTokens": 1}, r"parameters: Object contains unknown field `minCachedTokens`"),
    ],
)
def test_bad_parameters_are_start_up_errors_naming_the_field(params: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=r"plugin 'p' \(type p2p-source-producer\): " + expected):
        registry.build("p2p-source-producer", "p", params)


def test_an_unknown_prefix_producer_is_a_start_up_error() -> None:
    config = CONFIG.replace("    prefixMatchInfoProducerName: approx-cache\n    prefillProfileName",
                            "    prefixMatchInfoProducerName: nope\n    prefillProfileName")  # fmt: skip
    with pytest.raises(ConfigError, match=r"'p2p-cache-source'.*prefixMatchInfoProducerName: no plugin named 'nope'"):
        build(load_config(config))
