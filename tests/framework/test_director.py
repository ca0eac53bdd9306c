"""Director: candidates, subset hints, in-flight accounting, model rewrite, errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import msgspec
import pytest
from helpers import endpoint, request

from llmepp.config.loader import build, load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.errors import BadRequest, NoEndpoints, RequestError, ResourceExhausted, Saturated
from llmepp.framework.requestcontrol import (
    Admitter,
    DirectResponse,
    PreRequest,
    RequestHeaderProcessor,
    Responder,
    ResponseCompleteProcessor,
    ResponseHeaderProcessor,
    Screener,
)
from llmepp.framework.scheduling import Filter, ProfileHandler, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.observability.plugin_timing import TIMED_EVERY
from llmepp.request.parsers import headers_request
from llmepp.request.types import InferenceRequest, ResponseInfo, TerminationCause
from llmepp.scheduling.profile import SchedulerProfile


def director_for(n: int, config: str = DEFAULT_CONFIG) -> tuple[Director, Datastore]:
    ds = Datastore()
    for i in range(n):
        ds.upsert(endpoint(i).spec)
    metrics = EppMetrics()
    c = build(load_config(config), datastore=ds, metrics=metrics)
    return Director(ds, c.pipeline, metrics), ds


async def test_routes_to_a_pool_endpoint_and_accounts_inflight() -> None:
    d, _ds = director_for(3)
    req = request(b"x" * 400)
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    target = decision.targets[0]
    assert decision.destination == target.hostport
    assert target.inflight.requests == 1 and target.inflight.tokens == 100
    d.response_complete(req, ResponseInfo(status=200, cause=TerminationCause.CLIENT_DISCONNECT), decision)
    assert target.inflight.requests == 0 and target.inflight.tokens == 0


async def test_subset_hint_matches_on_ip_only() -> None:
    d, ds = director_for(4)
    wanted = ds.endpoints[2]
    for _ in range(20):
        decision = await d.handle_request(request(), [f"{wanted.address}:9999"])
        assert isinstance(decision, RoutingDecision)
        assert decision.targets == [wanted]


async def test_subset_hint_with_bracketed_ipv6_entries() -> None:
    """A gateway writes an IPv6 hint entry as `[ip]:port` (net.JoinHostPort); it matches the endpoint whose
    address is that IP, and the pick goes out bracketed too."""
    ds = Datastore()
    for i, address in enumerate(("fd00::1", "fd00::2", "10.0.0.3")):
        ds.upsert(EndpointSpec(name=f"pod-{i}", address=address, port=8000))
    metrics = EppMetrics()
    d = Director(ds, build(load_config(DEFAULT_CONFIG), datastore=ds, metrics=metrics).pipeline, metrics)
    wanted = next(ep for ep in ds.endpoints if ep.address == "fd00::2")
    for _ in range(20):
        decision = await d.handle_request(request(), ["[fd00::2]:9999", "[fd00::9]:8000"])
        assert isinstance(decision, RoutingDecision)
        assert decision.targets == [wanted]
        assert decision.destination == "[fd00::2]:8000"
    assert {ep.address for ep in d.candidates(["[fd00::1]:8000", "10.0.0.3:8000"])} == {"fd00::1", "10.0.0.3"}
    with pytest.raises(NoEndpoints):
        d.candidates(["[fd00::9]:8000"])


async def test_an_unreachable_endpoint_is_routed_around_while_another_answers() -> None:
    """A dead server fails each request at once, so its load reads as none: left in, it draws the traffic."""
    d, ds = director_for(3)
    dead, *alive = ds.endpoints
    ds.set_unreachable(dead, True)
    for _ in range(30):
        decision = await d.handle_request(request(), None)
        assert isinstance(decision, RoutingDecision) and decision.targets[0] in alive
    assert d.candidates([f"{dead.address}:8000"]) == (dead,)  # all the hint names is down: try it anyway
    for ep in alive:
        ds.set_unreachable(ep, True)
    assert set(d.candidates(None)) == set(ds.endpoints)  # all down: every one is tried
    ds.delete(dead.name)  # removed while unreachable: the count follows
    assert ds.unreachable == 2
    for ep in alive:
        ds.set_unreachable(ep, False)
    assert ds.unreachable == 0 and set(d.candidates(None)) == set(alive)


async def test_empty_pool_and_empty_subset_are_503() -> None:
    d, _ = director_for(0)
    with pytest.raises(NoEndpoints) as err:
        await d.handle_request(request(), None)
    assert err.value.status == 503 and err.value.reason == "rejected-no-endpoints"
    d2, _ = director_for(2)
    with pytest.raises(NoEndpoints):
        await d2.handle_request(request(), [])
    with pytest.raises(NoEndpoints):
        d2.handle_bodyless(request(None), ["10.9.9.9:8000"])


async def test_filters_removing_everything_is_429_saturated() -> None:
    d, _ = director_for(2)

    class DropAll(Filter):
        type = "drop-all"

        def filter(self, request, endpoints):  # type: ignore[no-untyped-def]
            return []

    profile: SchedulerProfile = d.pipeline.scheduler.profiles["default"]
    profile.filters.append(DropAll("drop-all"))
    with pytest.raises(Saturated) as err:
        await d.handle_request(request(), None)
    assert err.value.status == 429 and err.value.reason == "rejected-saturated"


async def test_bodyless_goes_to_a_random_ready_endpoint() -> None:
    d, ds = director_for(3)
    seen = {cast(RoutingDecision, d.handle_bodyless(request(None), None)).destination for _ in range(60)}
    assert seen == {ep.hostport for ep in ds.endpoints}


class DropNamed(Screener):
    """Drops the endpoints named in `names` (all of them: none kept)."""

    type = "drop-named"

    def __init__(self, names: set[str]) -> None:
        super().__init__("drop-named")
        self.names = names
        self.seen: list[object] = []

    def screen(self, request, candidates):  # type: ignore[no-untyped-def]
        self.seen.append(request)
        return [ep for ep in candidates if ep.name not in self.names]


async def test_bodyless_runs_the_screeners() -> None:
    d, ds = director_for(3)
    dropped = ds.endpoints[1]
    screener = DropNamed({dropped.name})
    d.pipeline.screeners.append(screener)
    get = headers_request({":method": "GET", ":path": "/v1/models"}, request_id="b-1")
    # 60 picks of the 2 kept: P(never the dropped one | screeners ignored) = (2/3)^60 ≈ 3e-11.
    seen = {cast(RoutingDecision, d.handle_bodyless(get, None)).destination for _ in range(60)}
    assert seen == {ep.hostport for ep in ds.endpoints if ep is not dropped}
    assert screener.seen and all(r is get for r in screener.seen)
    # The subset hint narrows first, then the screeners; none left is the same 503 as a routed request.
    assert cast(RoutingDecision, d.handle_bodyless(get, [ds.endpoints[0].hostport])).targets == [ds.endpoints[0]]
    with pytest.raises(NoEndpoints, match="no endpoint passed screener 'drop-named'") as err:
        d.handle_bodyless(get, [dropped.hostport])
    assert err.value.status == 503
    screener.names = {ep.name for ep in ds.endpoints}
    with pytest.raises(NoEndpoints, match="no endpoint passed screener 'drop-named'"):
        d.handle_bodyless(get, None)
    with pytest.raises(NoEndpoints, match="no endpoint passed screener 'drop-named'"):
        await d.handle_request(request(), None)


async def test_model_rewrite_reencodes_body_only_when_needed() -> None:
    d, _ = director_for(1)
    same = request(model="llama")
    same.payload = {"model": "llama", "prompt": "hi"}
    assert (await d.handle_request(same, None)).body is None
    req = request(model="llama")
    req.target_model = "llama-v2"
    req.payload = {"model": "llama", "prompt": "hi", "max_tokens": 3}
    body = (await d.handle_request(req, None)).body
    assert body is not None
    assert msgspec.json.decode(body) == {"model": "llama-v2", "prompt": "hi", "max_tokens": 3}


async def test_fallback_list_is_comma_separated() -> None:
    text = (
        "plugins:\n- type: queue-scorer\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 3}\n"
        "schedulingProfiles:\n- name: d\n  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]\n"
    )
    d, _ = director_for(4, text)
    decision = await d.handle_request(request(), None)
    assert isinstance(decision, RoutingDecision)
    parts = decision.destination.split(",")
    assert len(parts) == 3 and len(set(parts)) == 3
    assert parts[0] == decision.targets[0].hostport


async def test_a_picker_repeating_an_endpoint_lists_it_once_in_the_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party picker answering [a, a, b]: Envoy's fallback list was "a,a,b", retrying the endpoint
    that had just failed."""
    d, _ = director_for(4)
    profile = next(iter(d.pipeline.scheduler.profiles.values()))

    def repeating(endpoints: Sequence[Endpoint], totals: Sequence[float]) -> list[Endpoint]:
        return [endpoints[1], endpoints[1], endpoints[0]]

    monkeypatch.setattr(profile.picker, "pick", repeating)
    decision = await d.handle_request(request(), None)
    assert isinstance(decision, RoutingDecision)
    first, second = decision.targets[0].hostport, decision.targets[2].hostport
    assert decision.destination == f"{first},{second}"


async def test_emit_scores_covers_every_candidate() -> None:
    ds = Datastore()
    for i, q in enumerate([0, 4, 8]):
        ep = endpoint(i, queue=q)
        ds.upsert(ep.spec)
        ds.get(ep.name).metrics = ep.metrics  # type: ignore[union-attr]
    metrics = EppMetrics()
    c = build(load_config(DEFAULT_CONFIG), datastore=ds, metrics=metrics)
    d = Director(ds, c.pipeline, metrics, emit_scores=True, decision_header=True)
    req = request(b"p" * 100)
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.scores is not None
    assert set(decision.scores) == {ep.hostport for ep in ds.endpoints}
    # queue 2·(1, .5, 0) + kv 2·1 + prefix 6·0 (cold) + no-hit-lru 2·(1, .5, 0) (never used: list order)
    assert sorted(decision.scores.values(), reverse=True) == pytest.approx([6.0, 4.0, 2.0])
    header = d.response_headers(req, ResponseInfo(status=200), {})
    assert header is not None
    first = ds.endpoints[0].hostport
    assert header["x-epp-decision"].startswith(f"default: {first}; scores {first}=6.000")


async def test_debug_log_has_per_scorer_breakdown(caplog: pytest.LogCaptureFixture) -> None:
    d, _ = director_for(2)
    with caplog.at_level(logging.DEBUG, logger="llmepp"):
        await d.handle_request(request(b"q" * 100), None)
    record = next(r for r in caplog.records if r.getMessage() == "scheduling decision")
    top = record.top  # type: ignore[attr-defined]
    assert set(top[0]) == {
        "endpoint", "total", "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "no-hit-lru-scorer"
    }  # fmt: skip


async def test_failing_pre_request_plugin_releases_what_the_request_held() -> None:
    from llmepp.framework.requestcontrol import PreRequest

    class Boom(PreRequest):
        type = "boom"

        def pre_request(self, request, result):  # type: ignore[no-untyped-def]
            raise RuntimeError("plugin bug")

    d, ds = director_for(2)
    d.pipeline.pre_request.append(Boom("boom"))
    # A plugin bug is a counted 500 (a RequestError: rate-limited log), not a traceback per request.
    with pytest.raises(RequestError) as err:
        await d.handle_request(request(b"x" * 40), None)
    assert err.value.status == 500
    assert all(ep.inflight.requests == 0 and ep.inflight.tokens == 0 for ep in ds.endpoints)


async def test_unrewritable_body_is_400_and_charges_nothing() -> None:
    from llmepp.errors import BadRequest

    d, ds = director_for(2)
    req = request(model="a")
    req.target_model = "b"
    req.payload = {"model": "a", "prompt": object()}  # not JSON-encodable
    with pytest.raises(BadRequest):
        await d.handle_request(req, None)
    assert all(ep.inflight.requests == 0 for ep in ds.endpoints)


async def test_a_failed_scheduling_attempt_is_timed_like_a_successful_one() -> None:
    """The reference observes the scheduler's latency and counts the attempt in one defer: the histogram's
    count is every attempt's, refused ones included (a 429 under saturation was counted, not timed)."""
    d, _ = director_for(1)

    def saturated(*args: object, **kwargs: object) -> SchedulingResult:
        raise Saturated()

    d.pipeline.scheduler.schedule = saturated  # type: ignore[method-assign]
    with pytest.raises(Saturated):
        await d.handle_request(request(), None)
    sample = d.metrics.registry.get_sample_value
    labels = {"status": "failure", "target_model_name": "m", "endpoint_name": "", "namespace": "", "port": ""}
    assert sample("llm_d_epp_scheduler_attempts_total", labels) == 1
    assert sample("llm_d_epp_scheduler_e2e_duration_seconds_count") == 1


async def test_plugin_durations_are_recorded_for_one_request_in_sixteen() -> None:
    ds = Datastore()
    for i in range(3):
        ds.upsert(endpoint(i).spec)
    metrics = EppMetrics()
    c = build(load_config(DEFAULT_CONFIG), datastore=ds, metrics=metrics)
    d = Director(ds, c.pipeline, metrics)

    def count(point: str, plugin_type: str) -> float:
        labels = {"extension_point": point, "plugin_type": plugin_type, "plugin_name": plugin_type}
        return metrics.registry.get_sample_value("llm_d_epp_plugin_duration_seconds_count", labels) or 0.0

    for i in range(2 * TIMED_EVERY):
        req = request(b"x" * 400)
        decision = await d.handle_request(req, None)
        assert isinstance(decision, RoutingDecision)
        info = ResponseInfo(status=200)
        d.response_first_chunk(req, info)  # each response hook is sampled on its own count
        d.response_complete(req, info, decision)
        if i == TIMED_EVERY - 2:
            assert count("Scorer", "queue-scorer") == 0  # not sampled yet
    expected = {
        ("DataProducer", "token-producer"),
        ("DataProducer", "approx-prefix-cache-producer"),
        ("DataProducer", "inflight-load-producer"),
        ("Scorer", "queue-scorer"),
        ("Scorer", "kv-cache-utilization-scorer"),
        ("Scorer", "prefix-cache-scorer"),
        ("Scorer", "no-hit-lru-scorer"),
        ("Picker", "max-score-picker"),
        ("PreRequest", "approx-prefix-cache-producer"),
        ("PreRequest", "no-hit-lru-scorer"),
        ("FirstResponseChunkProcessor", "inflight-load-producer"),
        ("ResponseCompleteProcessor", "inflight-load-producer"),
        ("ProcessProfilesResults", "single-profile-handler"),
    }
    for point, plugin_type in expected:
        assert count(point, plugin_type) == 2, (point, plugin_type)
    # The handler is timed at every pick, as the reference's loop does: the profile's, then the empty one.
    assert count("ProfilePicker", "single-profile-handler") == 4
    total = metrics.registry.get_sample_value(
        "llm_d_epp_plugin_duration_seconds_sum",
        {"extension_point": "Scorer", "plugin_type": "queue-scorer", "plugin_name": "queue-scorer"},
    )
    assert total is not None and 0 < total < 0.1


async def test_a_failing_data_producer_does_not_fail_the_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As the reference: a producer's failure is logged, the request is still routed (an async producer's
    already was; a synchronous one's escaped as a 500)."""
    d, _ds = director_for(3)
    sync = [p for p, is_async in d._producers if not is_async]
    assert sync
    for producer in sync:

        def broken(*_: object) -> None:
            raise ZeroDivisionError("1 / (1 + q)")

        monkeypatch.setattr(producer, "produce", broken)
    with caplog.at_level(logging.ERROR, logger="llmepp.director"):
        decision = await d.handle_request(request(b"x" * 400), None)
        assert isinstance(decision, RoutingDecision)
    assert decision.targets
    assert f"data producer {sync[0].name} failed" in caplog.text


class _BrokenHeaders(RequestHeaderProcessor):
    type = "test-broken-headers"

    def process_headers(self, request: InferenceRequest) -> None:
        raise KeyError("x-tenant")


class _BrokenResponder(Responder):
    type = "test-broken-responder"

    def respond(self, request: InferenceRequest) -> DirectResponse | None:
        raise AttributeError("'NoneType' object has no attribute 'model'")


class _BrokenScreener(Screener):
    type = "test-broken-screener"

    def screen(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        raise IndexError("list index out of range")


class _BrokenAdmitter(Admitter):
    type = "test-broken-admitter"

    def admit(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        raise ZeroDivisionError("division by zero")


_BROKEN = [
    ("header_processors", _BrokenHeaders, "RequestHeaderProcessor"),
    ("responders", _BrokenResponder, "Responder"),
    ("screeners", _BrokenScreener, "Screener"),
    ("admitters", _BrokenAdmitter, "Admitter"),
]


@pytest.mark.parametrize(("stage", "cls", "kind"), _BROKEN, ids=[kind for _, _, kind in _BROKEN])
async def test_a_broken_plugin_before_scheduling_is_skipped_not_a_500_for_every_request(
    caplog: pytest.LogCaptureFixture, stage: str, cls: type, kind: str
) -> None:
    """Before: a header processor, responder, screener or admitter raising a bug (not a RequestError, its
    way to answer) failed every request with a 500. Now it is skipped for the request (fails open, as a
    broken producer or scorer) and logged once per 30 s, with its traceback."""
    d, ds = director_for(3)
    getattr(d.pipeline, stage).append(cls("broken"))
    with caplog.at_level(logging.ERROR, logger="llmepp.director"):
        for _ in range(5):
            req = request(b"x" * 400)
            decision = await d.handle_request(req, None)
            assert not isinstance(decision, DirectResponse) and decision.targets[0] in ds.endpoints
            d.response_complete(req, ResponseInfo(status=200), decision)
    [line] = [r for r in caplog.records if "broken" in r.getMessage()]
    assert f"{kind} broken failed; skipped for the request" in line.getMessage() and line.exc_info is not None


@pytest.mark.parametrize(("stage", "cls", "kind"), _BROKEN, ids=[kind for _, _, kind in _BROKEN])
async def test_a_request_error_from_a_plugin_before_scheduling_is_still_its_answer(
    monkeypatch: pytest.MonkeyPatch, stage: str, cls: type, kind: str
) -> None:
    d, _ = director_for(3)
    plugin = cls("refusing")

    def refuse(*_: object) -> None:
        raise BadRequest("tenant header missing")

    method = {"header_processors": "process_headers", "responders": "respond", "screeners": "screen",
              "admitters": "admit"}[stage]  # fmt: skip
    monkeypatch.setattr(plugin, method, refuse)
    getattr(d.pipeline, stage).append(plugin)
    with pytest.raises(BadRequest, match="tenant header missing"):
        await d.handle_request(request(b"x" * 400), None)


async def test_a_slow_async_producer_is_skipped_and_logged_once_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio
    import types

    d, _ds = director_for(2)

    async def slow(*_: object) -> None:
        await asyncio.sleep(10)

    producer = types.SimpleNamespace(name="slow-tokenizer", produce_timeout=0.01, produce=slow)
    d._producers = [(producer, True)]  # type: ignore[list-item]
    with caplog.at_level(logging.WARNING, logger="llmepp.director"):
        for _ in range(5):  # every request still routes, on what the other producers gave
            assert cast(RoutingDecision, await d.handle_request(request(b"x" * 400), None)).targets
    lines = [r for r in caplog.records if "data producer slow-tokenizer timed out" in r.getMessage()]
    assert len(lines) == 1


async def test_an_endpoint_removed_while_an_async_producer_waits_is_not_picked() -> None:
    """Candidates are taken before the async producers run (a tokenizer sidecar: up to its timeout); a pod
    deleted meanwhile must not be routed to."""
    import asyncio

    d, ds = director_for(2)
    gone, kept = ds.endpoints

    class Producer:  # an async producer that changes the pool while it runs
        name = type = "tokenizer"
        produce_timeout = 1.0

        def __init__(self, produce: object) -> None:
            self.produce = produce

    def producing(step: object) -> None:
        d._producers = [(Producer(step), True)]  # type: ignore[list-item]

    async def delete_one(*_: object) -> None:
        ds.delete(gone.spec.name)
        await asyncio.sleep(0)

    producing(delete_one)
    for _ in range(20):
        ds.upsert(gone.spec)
        assert cast(RoutingDecision, await d.handle_request(request(b"x" * 400), None)).targets == [kept]

    async def delete_all(*_: object) -> None:
        for ep in ds.endpoints:
            ds.delete(ep.spec.name)

    producing(delete_all)
    with pytest.raises(NoEndpoints):
        await d.handle_request(request(b"x" * 400), None)


# -- misbehaving plugins: other hooks still run, the request is answered, nothing leaks, logs are bounded --
class _Recorder(PreRequest):
    type = "recorder"

    def __init__(self, name: str, error: Exception | None = None) -> None:
        super().__init__(name)
        self.error = error
        self.calls = 0

    def pre_request(self, request, result):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.error is not None:
            raise self.error


async def test_every_pre_request_plugin_runs_when_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    """Reference: all PreRequest plugins run and their errors are joined (500, a single typed error
    keeps its code); the request holds nothing afterwards; a plugin bug is logged once, not per request."""
    d, ds = director_for(2)
    broken, after = _Recorder("broken", RuntimeError("plugin bug")), _Recorder("after")
    d.pipeline.pre_request[:0] = [broken]
    d.pipeline.pre_request.append(after)
    with caplog.at_level(logging.ERROR, logger="llmepp.director"):
        for _ in range(5):
            with pytest.raises(RequestError) as err:
                await d.handle_request(request(b"x" * 40), None)
            assert err.value.status == 500 and "broken" in err.value.message
    assert broken.calls == after.calls == 5
    assert all(ep.inflight.requests == 0 and ep.inflight.tokens == 0 for ep in ds.endpoints)
    assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 1

    typed = _Recorder("typed", BadRequest("no such adapter"))
    d.pipeline.pre_request[:] = [typed, after]
    with pytest.raises(BadRequest):  # a single typed error keeps its own code
        await d.handle_request(request(b"x" * 40), None)
    assert after.calls == 6


async def test_a_failing_response_header_plugin_does_not_skip_the_others(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ResponseHeaderProcessor):
        type = "broken-headers"

        def response_headers(self, request, response, headers):  # type: ignore[no-untyped-def]
            raise KeyError("x-missing")

    class Stamp(ResponseHeaderProcessor):
        type = "stamp"

        def response_headers(self, request, response, headers):  # type: ignore[no-untyped-def]
            return {"x-stamp": "1"}

    d, _ = director_for(2)
    d.pipeline.response_header[:] = [Broken("broken-headers"), Stamp("stamp")]
    with caplog.at_level(logging.ERROR, logger="llmepp.director"):
        for _ in range(5):
            req = request(b"x" * 40)
            decision = await d.handle_request(req, None)
            assert isinstance(decision, RoutingDecision)
            assert d.response_headers(req, ResponseInfo(status=200), {}) == {"x-stamp": "1"}
            d.response_complete(req, ResponseInfo(status=200), decision)
    assert len([r for r in caplog.records if "broken-headers" in r.getMessage()]) == 1


async def test_a_failing_response_complete_plugin_is_logged_once_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(ResponseCompleteProcessor):
        type = "broken-complete"

        def response_complete(self, request, response, result):  # type: ignore[no-untyped-def]
            raise ValueError("plugin bug")

    d, ds = director_for(2)
    d.pipeline.response_complete.insert(0, Broken("broken-complete"))
    with caplog.at_level(logging.ERROR, logger="llmepp.director"):
        for _ in range(5):
            req = request(b"x" * 40)
            decision = await d.handle_request(req, None)
            assert isinstance(decision, RoutingDecision)
            d.response_complete(req, ResponseInfo(status=200), decision)
    assert all(ep.inflight.requests == 0 and ep.inflight.tokens == 0 for ep in ds.endpoints)
    assert len([r for r in caplog.records if "broken-complete" in r.getMessage()]) == 1


class _Handler(ProfileHandler):
    """A profile handler whose round picks are given: `rounds(results)` → profile names to run."""

    type = "test-handler"

    def __init__(self, rounds) -> None:  # type: ignore[no-untyped-def]
        super().__init__("test-handler")
        self.rounds = rounds

    def pick_profiles(self, request, profiles, results):  # type: ignore[no-untyped-def]
        return [profiles[n] for n in self.rounds(results)]

    def process_results(self, request, results):  # type: ignore[no-untyped-def]
        return SchedulingResult(primary_profile=next(iter(results)), profiles=results)


async def test_a_profile_handler_that_never_finishes_is_a_500_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A handler that keeps selecting profiles is stopped by the round bound: a counted 500 (RequestError),
    not a traceback per request; the request holds nothing."""
    d, ds = director_for(2)
    d.pipeline.scheduler.handler = _Handler(lambda results: ["default"])
    with caplog.at_level(logging.ERROR, logger="llmepp"):
        for _ in range(3):
            with pytest.raises(RequestError) as err:
                await d.handle_request(request(), None)
            assert err.value.status == 500 and "test-handler" in err.value.message
    assert all(ep.inflight.requests == 0 for ep in ds.endpoints)
    assert len([r for r in caplog.records if "test-handler" in r.getMessage()]) == 1


async def test_a_profile_handler_that_runs_no_profile_is_429() -> None:
    """Reference scheduler: no profile run → "failed to run any scheduler profile" (429 from the director),
    before the handler's ProcessResults sees an empty result set."""
    d, _ = director_for(2)
    d.pipeline.scheduler.handler = _Handler(lambda results: [])
    with pytest.raises(ResourceExhausted):
        await d.handle_request(request(), None)


PD_CONFIG = """\
plugins:
- type: queue-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: prefill
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
"""


async def test_primary_profile_filtered_empty_is_429_saturated_with_several_profiles() -> None:
    """Filters of the primary profile removing every endpoint is 429 `rejected-saturated` (reference
    §1.4), with one profile or several (P/D: the decode profile)."""
    d, _ = director_for(2, PD_CONFIG)

    class DropAll(Filter):
        type = "drop-all"

        def filter(self, request, endpoints):  # type: ignore[no-untyped-def]
            return []

    d.pipeline.scheduler.profiles["decode"].filters.append(DropAll("drop-all"))
    with pytest.raises(Saturated) as err:
        await d.handle_request(request(), None)
    assert err.value.status == 429 and err.value.reason == "rejected-saturated"


async def test_a_crashing_filter_is_a_500_logged_once_not_a_traceback_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d, ds = director_for(2)

    class Crash(Filter):
        type = "crash"

        def filter(self, request, endpoints):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("plugin bug")

    d.pipeline.scheduler.profiles["default"].filters.append(Crash("crash"))
    with caplog.at_level(logging.ERROR, logger="llmepp"):
        for _ in range(3):
            with pytest.raises(RequestError) as err:
                await d.handle_request(request(), None)
            assert err.value.status == 500
    assert all(ep.inflight.requests == 0 for ep in ds.endpoints)
    assert len([r for r in caplog.records if r.exc_info]) == 1


def _hf_tokenizing_director(n: int) -> tuple[Director, Datastore]:
    from llmepp_sim.tokenizer import TOKENIZER_PATH

    config = f"""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {{tokenizer: {{backend: hf, path: {str(TOKENIZER_PATH)!r}}}}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: max-score-picker
"""
    return director_for(n, config)


def test_a_producer_that_finished_at_once_costs_no_event_loop_turn() -> None:
    """The hf token producer encodes a short prompt inline and returns a done future: the routing step then
    finishes in its first stretch, with no task and no asyncio.wait (~25 µs and three loop turns a request)."""
    from llmepp.framework.datakeys import TOKENIZED_PROMPT

    async def main() -> None:
        d, _ = _hf_tokenizing_director(2)
        assert [type(p).__name__ for p, _ in d._producers] == ["HFTokenProducer"]
        req = request(b"the quick brown fox " * 20)
        routing = d.handle_request(req, None)
        with pytest.raises(StopIteration) as finished:
            routing.send(None)  # the first stretch, as Pending.step runs it: no yield
        assert cast(RoutingDecision, finished.value.value).targets
        assert req.data[TOKENIZED_PROMPT].count > 0

        long = request(b"the quick brown fox " * 400)  # 8,000 characters: encoded in a worker, awaited
        assert cast(RoutingDecision, await d.handle_request(long, None)).targets
        assert long.data[TOKENIZED_PROMPT].count > 0

    import asyncio

    asyncio.run(main())


async def test_a_done_future_from_a_producer_is_its_outcome(caplog: pytest.LogCaptureFixture) -> None:
    """A producer's done future that holds a failure: a RequestError is the request's answer, another one is
    logged and the request routes on."""
    import asyncio
    import types

    d, _ = director_for(2)

    def failing(error: Exception) -> object:
        def produce(*_: object) -> asyncio.Future[None]:
            done = asyncio.get_running_loop().create_future()
            done.set_exception(error)
            return done

        return types.SimpleNamespace(name="at-once", type="at-once", produce_timeout=0.0, produce=produce)

    d._producers = [(failing(BadRequest("no tenant")), False)]  # type: ignore[list-item]
    with pytest.raises(BadRequest, match="no tenant"):
        await d.handle_request(request(b"x" * 400), None)
    d._producers = [(failing(RuntimeError("plugin bug")), False)]  # type: ignore[list-item]
    with caplog.at_level(logging.ERROR, logger="llmepp.director"):
        assert cast(RoutingDecision, await d.handle_request(request(b"x" * 400), None)).targets
    assert any("data producer at-once failed" in r.getMessage() for r in caplog.records)
