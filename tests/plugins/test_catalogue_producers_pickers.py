"""weighted-random-picker, inflight-load-producer and session-id-producer."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

import pytest
from helpers import endpoint, request
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import (
    IN_FLIGHT_LOAD,
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    PrefixMatchInfo,
    TokenizedPrompt,
    scoped,
)
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.agent_identity import AgentIdentity
from llmepp.plugins.producers.inflight_load import InFlightLoadProducer
from llmepp.plugins.producers.session_id import SessionIdProducer
from llmepp.request.types import InferenceRequest, ResponseInfo


def make(type_: str, params: dict[str, Any] | None = None, *others: Plugin, datastore: Any = None) -> Any:
    plugin = registry.build(type_, type_, params)
    plugin.setup(PluginContext({p.name: p for p in (plugin, *others)}, datastore, None, None))
    return plugin


# -- weighted-random-picker ----------------------------------------------------------------------
def test_weighted_random_follows_the_scores() -> None:
    picker = make("weighted-random-picker")
    eps = [endpoint(i) for i in range(3)]
    seen = Counter(picker.pick(eps, [0.1, 0.3, 0.6])[0].name for _ in range(6000))
    assert seen["pod-0"] == pytest.approx(600, rel=0.2)
    assert seen["pod-1"] == pytest.approx(1800, rel=0.1)
    assert seen["pod-2"] == pytest.approx(3600, rel=0.1)


def test_weighted_random_zero_scores_and_all_zero_fallback() -> None:
    picker = make("weighted-random-picker")
    eps = [endpoint(i) for i in range(3)]
    assert {picker.pick(eps, [0.0, 1.0, 0.0])[0].name for _ in range(200)} == {"pod-1"}
    # Every score ≤ 0: uniform.
    seen = Counter(picker.pick(eps, [0.0, 0.0, 0.0])[0].name for _ in range(600))
    assert set(seen) == {"pod-0", "pod-1", "pod-2"}
    assert picker.pick([], []) == []


def test_weighted_random_several_targets_distinct_positive_first() -> None:
    picker = make("weighted-random-picker", {"maxNumOfEndpoints": 3})
    eps = [endpoint(i) for i in range(4)]
    for _ in range(100):
        picked = picker.pick(eps, [0.5, 0.0, 0.5, 0.2])
        assert len({ep.name for ep in picked}) == 3
        assert "pod-1" not in [ep.name for ep in picked]  # the zero score only if needed
    assert len(picker.pick(eps[:2], [0.0, 0.0])) == 2
    assert len(picker.pick(eps[:2], [0.3, 0.4])) == 2


def test_weighted_random_fallbacks_among_zero_scores_are_random_not_candidate_order() -> None:
    # One positive score, two targets: the fallback is one of the zero-scored endpoints, drawn at random
    # (as every score ≤ 0 is); in candidate order every request (and every replica) would fall back to
    # the same pod.
    picker = make("weighted-random-picker", {"maxNumOfEndpoints": 2})
    eps = [endpoint(i) for i in range(4)]
    picks = [picker.pick(eps, [0.0, 0.0, 0.7, 0.0]) for _ in range(300)]
    assert {p[0].name for p in picks} == {"pod-2"}
    fallbacks = Counter(p[1].name for p in picks)
    assert set(fallbacks) == {"pod-0", "pod-1", "pod-3"}
    assert min(fallbacks.values()) > 50


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20), st.integers(1, 5))
def test_weighted_random_property(scores: list[float], k: int) -> None:
    picker = make("weighted-random-picker", {"maxNumOfEndpoints": k})
    eps = [endpoint(i) for i in range(len(scores))]
    picked = picker.pick(eps, scores)
    assert len(picked) == min(k, len(eps))
    assert len(set(map(id, picked))) == len(picked)
    if any(s > 0 for s in scores):
        assert scores[eps.index(picked[0])] > 0


# -- inflight-load-producer ---------------------------------------------------------------------
def scheduled(ep: Endpoint, prefill: Endpoint | None = None) -> SchedulingResult:
    """A P/D result as the disagg handler returns it; its prefill profile has a configured name."""
    profiles: dict[str, ProfileResult | None] = {"decode": ProfileResult([ep])}
    if prefill is not None:
        profiles["p-stage"] = ProfileResult([prefill])
    return SchedulingResult("decode", profiles, prefill_profile="p-stage")


def tokenized(tokens: int, **kw: Any) -> Any:
    req = request(**kw)
    req.data[TOKENIZED_PROMPT] = TokenizedPrompt(b"\0" * (4 * tokens))
    return req


def test_inflight_counts_and_releases_once() -> None:
    p = make("inflight-load-producer")
    ep = endpoint(0)
    req = tokenized(1000)
    p.produce(req, [ep])
    assert req.data[scoped(IN_FLIGHT_LOAD, p.name)] is p.loads
    p.pre_request(req, scheduled(ep))
    assert (p.loads[ep].requests, p.loads[ep].tokens) == (1, 1000)
    p.first_response_chunk(req, ResponseInfo(status=200))  # prefill done: prompt tokens released
    assert (p.loads[ep].requests, p.loads[ep].tokens) == (1, 0)
    p.response_complete(req, ResponseInfo(status=200), scheduled(ep))
    assert (p.loads[ep].requests, p.loads[ep].tokens) == (0, 0)
    # Repeated hooks change nothing (exactly-once release).
    p.first_response_chunk(req, ResponseInfo(status=200))
    p.response_complete(req, ResponseInfo(status=200), scheduled(ep))
    assert (p.loads[ep].requests, p.loads[ep].tokens) == (0, 0)


def test_inflight_release_without_a_response_chunk() -> None:
    p = make("inflight-load-producer")
    ep = endpoint(0)
    reqs = [tokenized(100) for _ in range(3)]
    for r in reqs:
        p.pre_request(r, scheduled(ep))
    assert (p.loads[ep].requests, p.loads[ep].tokens) == (3, 300)
    p.response_complete(reqs[1], ResponseInfo(status=0), scheduled(ep))  # e.g. client disconnect
    assert (p.loads[ep].requests, p.loads[ep].tokens) == (2, 200)


def test_inflight_discounts_cached_prefix_and_tracks_prefill() -> None:
    approx = registry.build("approx-prefix-cache-producer", "approx", None)
    p = make("inflight-load-producer", None, approx)
    decode, prefill = endpoint(0), endpoint(1)
    req = tokenized(1000)
    # 16 blocks of 64 = 1024 ≥ 1000 indexed; decode caches 10 blocks → (16−10)·64 = 384 uncached.
    req.data[scoped(PREFIX_CACHE_MATCH_INFO, "approx")] = PrefixMatchInfo(64, 16, {decode: 10}, list(range(16)))
    p.pre_request(req, scheduled(decode, prefill))
    assert p.loads[decode].tokens == 384
    assert p.loads[prefill].tokens == 1000  # cold: capped at the prompt size, not 16·64
    p.first_response_chunk(req, ResponseInfo(status=200))
    assert (p.loads[prefill].requests, p.loads[prefill].tokens) == (0, 0)  # prefill worker done
    assert (p.loads[decode].requests, p.loads[decode].tokens) == (1, 0)


def test_inflight_prefix_cap_tail_is_charged() -> None:
    approx = registry.build("approx-prefix-cache-producer", "approx", None)
    p = make("inflight-load-producer", None, approx)
    ep = endpoint(0)
    req = tokenized(5000)  # only 4 blocks (256 tokens) indexed, all cached: the tail 4744 is not
    req.data[scoped(PREFIX_CACHE_MATCH_INFO, "approx")] = PrefixMatchInfo(64, 4, {ep: 4}, [1, 2, 3, 4])
    p.pre_request(req, scheduled(ep))
    assert p.loads[ep].tokens == 4744


def test_inflight_estimated_output_tokens() -> None:
    p = make("inflight-load-producer", {"addEstimatedOutputTokens": True, "outputRatio": 0.5})
    ep = endpoint(0)
    req = tokenized(1000)
    p.pre_request(req, scheduled(ep))
    assert p.loads[ep].tokens == 1500
    p.first_response_chunk(req, ResponseInfo(status=200))
    assert p.loads[ep].tokens == 500  # the output estimate stays until completion
    p.response_complete(req, ResponseInfo(status=200), scheduled(ep))
    assert p.loads[ep].tokens == 0
    capped = make("inflight-load-producer", {"addEstimatedOutputTokens": True, "maxEstimatedOutputTokens": 100})
    r = tokenized(1000)
    capped.pre_request(r, scheduled(ep))
    assert capped.loads[ep].tokens == 1100
    client = tokenized(1000, max_tokens=20)
    capped.pre_request(client, scheduled(endpoint(1)))
    assert list(capped.loads.values())[-1].tokens == 1020  # client's max tokens is a cap too


def test_inflight_estimated_output_rounds_half_away_from_zero() -> None:
    # The reference: round(input · outputRatio) with Go's math.Round, 3 · 1.5 = 4.5 → 5 (not 4, to even).
    p = make("inflight-load-producer", {"addEstimatedOutputTokens": True, "outputRatio": 1.5})
    ep = endpoint(0)
    p.pre_request(tokenized(3), scheduled(ep))
    assert p.loads[ep].tokens == 3 + 5


def test_inflight_counters_are_per_instance_and_dropped_on_removal() -> None:
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    ep = ds.endpoints[0]
    a = make("inflight-load-producer", datastore=ds)
    b = registry.build("inflight-load-producer", "other", None)
    b.setup(PluginContext({"other": b}, None, None, None))
    req = tokenized(10)
    a.pre_request(req, scheduled(ep))
    assert ep in a.loads and ep not in b.loads  # type: ignore[attr-defined]
    ds.delete(ep.name)
    assert ep not in a.loads
    a.response_complete(req, ResponseInfo(status=200), scheduled(ep))  # release after removal: harmless


def test_inflight_a_target_removed_while_its_request_was_scheduled_is_not_tracked_again() -> None:
    """Candidates are chosen before the async producers are awaited, so discovery can remove the
    picked endpoint before PreRequest runs. Charging it must not re-create its entry: nothing would
    ever drop it again (the removal was already notified), and once the pod comes back under the
    same name both entries were exported with the same labels."""
    metrics = EppMetrics()
    ds = Datastore()
    ds.upsert(endpoint(0).spec)
    old = ds.endpoints[0]
    p = registry.build("inflight-load-producer", "ifl", None)
    assert isinstance(p, InFlightLoadProducer)
    p.setup(PluginContext({"ifl": p}, ds, None, metrics))
    req = tokenized(10)
    p.produce(req, [old])
    ds.delete(old.name)  # during the await of an async producer
    p.pre_request(req, scheduled(old))
    assert old not in p.loads
    p.first_response_chunk(req, ResponseInfo(status=200))
    p.response_complete(req, ResponseInfo(status=200), scheduled(old))  # released without error
    assert old not in p.loads
    ds.upsert(endpoint(0).spec)  # back under the same name
    new = ds.endpoints[0]
    p.pre_request(tokenized(5), scheduled(new))
    fams = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    names = [s.labels["endpoint_name"] for f in fams if f.name == "llm_d_epp_inflight_requests" for s in f.samples]
    assert names == [new.name]


def test_inflight_falls_back_to_prompt_bytes_and_validates() -> None:
    p = make("inflight-load-producer")
    ep = endpoint(0)
    p.pre_request(request(b"x" * 401), scheduled(ep))
    assert p.loads[ep].tokens == 101
    for params, message in [({"outputRatio": -1}, "outputRatio"), ({"maxEstimatedOutputTokens": -5}, "maxEstimated")]:
        with pytest.raises(ConfigError, match=message) as err:
            registry.build("inflight-load-producer", "i", params)
        assert "plugin 'i' (type inflight-load-producer)" in str(err.value)


# -- session-id-producer ------------------------------------------------------------------------
def test_session_id_producer_header_cookie_default() -> None:
    key = scoped("SessionID", "session-id-producer")
    p = make("session-id-producer", {"headerName": "X-Conversation"})
    req = request()
    req.headers["x-conversation"] = "  c-1 "
    p.produce(req, [])
    assert req.data[key] == "c-1"
    empty = request()
    empty.headers["x-conversation"] = "  "
    p.produce(empty, [])
    assert key not in empty.data
    c = make("session-id-producer", {"cookieName": "sid"})
    req = request()
    req.headers["cookie"] = 'theme=dark; sid="abc"; x=y'
    c.produce(req, [])
    assert req.data[key] == "abc"
    d = make("session-id-producer")  # the auto-created default reads x-session-id
    req = request()
    req.headers["x-session-id"] = "s-9"
    d.produce(req, [])
    assert req.data[key] == "s-9"
    with pytest.raises(ConfigError, match="exactly one of headerName or cookieName") as err:
        registry.build("session-id-producer", "sp", {"headerName": "a", "cookieName": "b"})
    assert "plugin 'sp' (type session-id-producer)" in str(err.value)


def test_session_id_producer_bounds_huge_ids_and_keeps_them_distinct() -> None:
    """The id becomes a binding key the session filter keeps for its TTL: a client sending 64 KiB
    ids must not pin 64 KiB per session. Long ids are replaced by a digest (same id, same digest);
    ordinary and non-ASCII ids pass unchanged."""
    key = scoped("SessionID", "session-id-producer")
    p = make("session-id-producer")
    c = make("session-id-producer", {"cookieName": "sid"})

    def sid(plugin: SessionIdProducer, headers: dict[str, str]) -> str | None:
        req = request()
        req.headers.update(headers)
        plugin.produce(req, [])
        value: str | None = req.data.get(key)
        return value

    huge, other = "s" * 65536, "s" * 65535 + "t"
    got = sid(p, {"x-session-id": huge})
    assert got is not None and len(got) <= 256
    assert got == sid(p, {"x-session-id": huge}) == sid(c, {"cookie": f"a=b; sid={huge}"})
    assert got != sid(p, {"x-session-id": other})
    assert sid(p, {"x-session-id": "x" * 256}) == "x" * 256  # at the bound: unchanged
    assert sid(p, {"x-session-id": " 会话-é-\ufffd "}) == "会话-é-\ufffd"
    assert sid(p, {"x-session-id": "会" * 256}) == "会" * 256  # the bound is in characters
    assert sid(c, {"cookie": "sid=; x=y"}) is None and sid(c, {"cookie": 'sid="'}) is None
    assert sid(c, {"cookie": "garbage;;=;sid"}) is None


def test_weighted_random_equal_scores_are_uniform() -> None:
    picker = make("weighted-random-picker")
    eps = [endpoint(i) for i in range(4)]
    seen = Counter(picker.pick(eps, [0.5] * 4)[0].name for _ in range(4000))
    assert all(seen[f"pod-{i}"] == pytest.approx(1000, rel=0.15) for i in range(4))


def test_weighted_random_tiny_scores_never_pick_a_zero() -> None:
    # random()·total can round up to total for subnormal totals; the draw must stay in range.
    picker = make("weighted-random-picker")
    eps = [endpoint(i) for i in range(3)]
    assert {picker.pick(eps, [0.0, 5e-324, 0.0])[0].name for _ in range(500)} == {"pod-1"}


def test_inflight_counters_are_exported_per_endpoint_and_producer() -> None:
    metrics = EppMetrics()
    p = registry.build("inflight-load-producer", "ifl", None)
    assert isinstance(p, InFlightLoadProducer)
    p.setup(PluginContext({"ifl": p}, None, None, metrics))
    a, b = endpoint(0), endpoint(1)
    req = tokenized(700)
    p.pre_request(req, scheduled(a))
    p.pre_request(tokenized(300), scheduled(a))
    p.pre_request(tokenized(50), scheduled(b))
    p.first_response_chunk(req, ResponseInfo(status=200))

    def samples() -> dict[tuple[str, str], float]:
        fams = text_string_to_metric_families(generate_latest(metrics.registry).decode())
        return {
            (s.name, s.labels["endpoint_name"]): s.value
            for f in fams
            if f.name in ("llm_d_epp_inflight_requests", "llm_d_epp_inflight_tokens")
            for s in f.samples
            if s.labels["producer_name"] == "ifl" and s.labels["namespace"] == a.namespace
        }

    assert samples() == {
        ("llm_d_epp_inflight_requests", a.name): 2, ("llm_d_epp_inflight_tokens", a.name): 300,
        ("llm_d_epp_inflight_requests", b.name): 1, ("llm_d_epp_inflight_tokens", b.name): 50,
    }  # fmt: skip
    p.endpoint_removed(b)
    assert ("llm_d_epp_inflight_requests", b.name) not in samples()


# -- agent-identity -------------------------------------------------------------------------------------
def agent_request(headers: dict[str, str]) -> InferenceRequest:
    req = request()
    req.headers.update(headers)
    return req


def test_an_agent_session_becomes_the_fairness_id() -> None:
    plugin = registry.build("agent-identity", "agent-identity", None)
    assert isinstance(plugin, AgentIdentity)
    req = agent_request({"session-id": "later", "x-claude-code-session-id": " claude-1 "})
    plugin.process_headers(req)
    assert req.fairness_id == "claude-1" and req.data["agent-identity"] == "claude-1"  # listed order wins
    plain = agent_request({})
    plugin.process_headers(plain)
    assert plain.fairness_id == "default-flow" and "agent-identity" not in plain.data


def test_an_explicit_fairness_header_wins_and_extra_headers_come_first() -> None:
    plugin = registry.build("agent-identity", "agent-identity", {"additionalSessionHeaders": ["X-Conversation"]})
    assert isinstance(plugin, AgentIdentity)
    req = agent_request({"x-conversation": "conv-9", "session_id": "s"})
    plugin.process_headers(req)
    assert req.fairness_id == "conv-9"
    tenant = agent_request({"x-llm-d-inference-fairness-id": "tenant-a", "session_id": "s"})
    tenant.fairness_id = "tenant-a"  # as the parser sets it from the header
    plugin.process_headers(tenant)
    assert tenant.fairness_id == "tenant-a" and tenant.data["agent-identity"] == "s"


def test_a_huge_session_value_is_cut() -> None:
    req = agent_request({"session_id": "x" * 10_000})
    cast(AgentIdentity, registry.build("agent-identity", "agent-identity", None)).process_headers(req)
    assert len(req.fairness_id) == 256
