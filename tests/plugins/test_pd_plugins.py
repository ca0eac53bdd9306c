"""P/D disaggregation plugins: role filters, deciders, disagg- and header-profile-handlers,
and the reference P/D config (example B) routed through the Director."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import msgspec
import pytest
from helpers import endpoint, request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.errors import BadRequest, PreconditionFailed, ResourceExhausted, ServiceUnavailable
from llmepp.flowcontrol.interfaces import SaturationDetector
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT, PrefixMatchInfo, TokenizedPrompt
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, registry
from llmepp.framework.scheduling import Decider
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.profile_handlers.disagg import PEER_ENDPOINT, DisaggProfileHandler
from llmepp.request.parsers import parse_request
from llmepp.request.types import InferenceRequest
from llmepp.testing.pdstack import LEGACY_PD_CONFIG, PD_CONFIG

ROLE = "llm-d.ai/role"

# Reference example B, unchanged.
EXAMPLE_B = PD_CONFIG


def make(type_: str, params: dict[str, Any] | None = None, *others: Plugin) -> Any:
    plugin = registry.build(type_, type_, params)
    plugin.setup(PluginContext({p.name: p for p in (plugin, *others)}, None, None, None))
    return plugin


def names(eps: Any) -> list[str]:
    return [ep.name for ep in eps]


def spec(name: str, i: int, role: str | None) -> EndpointSpec:
    return EndpointSpec(name=name, address=f"10.1.0.{i}", port=8000, labels={ROLE: role} if role else {})


def director(config: str, pods: list[tuple[str, str | None]]) -> tuple[Director, Datastore, EppMetrics]:
    ds = Datastore()
    for i, (name, role) in enumerate(pods):
        ds.upsert(spec(name, i + 1, role))
    metrics = EppMetrics()
    c = build(load_config(config), datastore=ds, metrics=metrics)
    return Director(ds, c.pipeline, metrics), ds, metrics


def decisions(metrics: EppMetrics, kind: str, model: str = "m") -> float:
    value = metrics.registry.get_sample_value(
        "llm_d_epp_disagg_decision_total",
        {"plugin_name": "disagg-profile-handler", "plugin_type": "disagg-profile-handler",
         "model_name": model, "decision_type": kind},
    )  # fmt: skip
    return value or 0.0


PD_PODS: list[tuple[str, str | None]] = [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")]


# -- role filters -------------------------------------------------------------------------------
ROLES = ["encode", "prefill", "decode", "encode-prefill", "encode-decode", "prefill-decode",
         "encode-prefill-decode", "both", None]  # fmt: skip


def role_pods() -> list[Endpoint]:
    return [endpoint(i, labels={ROLE: r} if r else {}) for i, r in enumerate(ROLES)]


@pytest.mark.parametrize(
    ("type_", "kept"),
    [
        ("decode-filter", ["decode", "prefill-decode", "encode-prefill-decode", "both", None]),
        ("prefill-filter", ["prefill", "encode-prefill", "prefill-decode", "encode-prefill-decode", "both"]),
        ("encode-filter", ["encode", "encode-prefill", "encode-prefill-decode"]),
    ],
)
def test_role_filters_follow_the_reference_sets(type_: str, kept: list[str | None]) -> None:
    eps = role_pods()
    out = make(type_).filter(request(), eps)
    assert [ep.spec.labels.get(ROLE) for ep in out] == [r for r in ROLES if r in kept]


def test_role_filters_take_no_parameters(caplog: pytest.LogCaptureFixture) -> None:
    # As the reference (DecodeRoleFactory ignores its decoder): a parameters block is ignored, with a warning.
    with caplog.at_level("WARNING"):
        assert registry.build("decode-filter", "d", {"role": "x"}).type == "decode-filter"
    assert "takes no parameters; ignoring ['role']" in caplog.text


# -- prefix-based-pd-decider ---------------------------------------------------------------------
def decider(**params: int) -> Any:
    producer = registry.build("approx-prefix-cache-producer", "approx-prefix-cache-producer", None)
    return make("prefix-based-pd-decider", dict(params), producer)


def pd_request(tokens: int, hits: dict[Endpoint, int] | None, block: int = 64) -> InferenceRequest:
    req = request(b"x" * (tokens * 4))
    req.data[TOKENIZED_PROMPT] = TokenizedPrompt(b"x" * (tokens * 4))
    if hits is not None:
        info = PrefixMatchInfo(block_size=block, total_blocks=tokens // block, hits=hits, hashes=[])
        req.data[f"{PREFIX_CACHE_MATCH_INFO}/approx-prefix-cache-producer"] = info
    return req


def test_prefix_decider_rule() -> None:
    ep, other = endpoint(0), endpoint(1)
    d = decider(nonCachedTokens=100)
    assert d.disaggregate(pd_request(1000, {}), ep)  # nothing cached: 1000 ≥ 100
    assert not d.disaggregate(pd_request(99, {}), ep)  # shorter than the threshold
    # 14 of 15 blocks cached on the decode pod: 1000 − 896 = 104 ≥ 100 → yes; 15 blocks: 40 → no.
    assert d.disaggregate(pd_request(1000, {ep: 14}), ep)
    assert not d.disaggregate(pd_request(1000, {ep: 15}), ep)
    # Only the chosen decode endpoint's hits count.
    assert d.disaggregate(pd_request(1000, {other: 15}), ep)
    # Boundary: exactly nonCachedTokens uncached → disaggregate (≥).
    assert d.disaggregate(pd_request(1060, {ep: 15}), ep)
    assert not d.disaggregate(pd_request(1059, {ep: 15}), ep)


def test_prefix_decider_gates_and_disabled() -> None:
    ep = endpoint(0)
    assert not decider(nonCachedTokens=0).disaggregate(pd_request(100000, {}), ep)
    gated = decider(nonCachedTokens=10, promptTokens=500)
    assert not gated.disaggregate(pd_request(499, {}), ep)
    assert gated.disaggregate(pd_request(500, {}), ep)
    assert not gated.disaggregate(pd_request(500, {}), None)


def test_prefix_decider_without_prefix_info_says_no_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    d = decider(nonCachedTokens=10)
    with caplog.at_level(logging.ERROR):
        for _ in range(50):  # every request while e.g. the tokenizer fails: one line, not fifty
            assert not d.disaggregate(pd_request(1000, None), endpoint(0))
    lines = [r for r in caplog.records if "no prefix cache match info" in r.getMessage()]
    assert len(lines) == 1


def test_prefix_decider_estimates_from_prompt_bytes_without_tokens() -> None:
    ep = endpoint(0)
    req = request(b"y" * 400)  # 100 estimated tokens, no TokenizedPrompt
    req.data[f"{PREFIX_CACHE_MATCH_INFO}/approx-prefix-cache-producer"] = PrefixMatchInfo(64, 1, {}, [])
    assert decider(nonCachedTokens=100).disaggregate(req, ep)
    assert not decider(nonCachedTokens=101).disaggregate(req, ep)


@pytest.mark.parametrize("params", [{"nonCachedTokens": -1}, {"promptTokens": -5}, {"nonCachedTokenz": 3}])
def test_prefix_decider_rejects_bad_parameters(params: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        registry.build("prefix-based-pd-decider", "d", params)


def test_always_disagg_decider() -> None:
    assert make("always-disagg-pd-decider").disaggregate(request(b""), None)


# -- example B through the director ----------------------------------------------------------------
async def test_example_b_loads_unchanged_and_disaggregates_a_long_prompt() -> None:
    d, _, metrics = director(EXAMPLE_B, PD_PODS)
    req = request(b"a" * 4000)  # 1000 estimated tokens, nothing cached
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name in {"d0", "d1"}  # decode is primary: Envoy routes there
    assert decision.result is not None
    prefill = decision.result.profiles["prefill"]
    assert prefill is not None and prefill.targets[0].name in {"p0", "p1"}
    assert decision.headers["x-prefiller-host-port"] == prefill.targets[0].hostport
    assert req.data[PEER_ENDPOINT] is decision.targets[0]
    assert decisions(metrics, "prefill-decode") == 1 and decisions(metrics, "decode-only") == 0


async def test_example_b_short_and_cached_prompts_stay_decode_only() -> None:
    d, _, metrics = director(EXAMPLE_B, PD_PODS)
    short = request(b"hi there")  # 2 tokens < nonCachedTokens 16
    decision = await d.handle_request(short, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name in {"d0", "d1"}
    assert "x-prefiller-host-port" not in decision.headers
    assert decision.result is not None and set(decision.result.profiles) == {"decode"}
    # 256 tokens = 4 full 64-token blocks: once routed, the decode pod caches all of it.
    prompt = b"b" * 1024
    first = await d.handle_request(request(prompt), None)
    assert isinstance(first, RoutingDecision)
    assert "x-prefiller-host-port" in first.headers
    await asyncio.sleep(0)  # the prefix index records in a call_soon after the routing answer
    again = await d.handle_request(request(prompt), None)
    assert isinstance(again, RoutingDecision)
    assert again.targets == first.targets  # prefix affinity keeps the decode pod
    assert "x-prefiller-host-port" not in again.headers
    assert decisions(metrics, "decode-only") == 2 and decisions(metrics, "prefill-decode") == 1


def _parsed(path: str, body: dict[str, Any]) -> InferenceRequest:
    return parse_request({":path": path, ":method": "POST"}, msgspec.json.encode(body), request_id="r")


# A long uncached prompt of each kind the sidecar does not split: the decider would approve its length.
UNSPLIT = [
    ("/v1/embeddings", {"model": "m", "input": "a" * 4000}),
    ("/v1/responses", {"model": "m", "input": "a" * 4000}),
    ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "a" * 4000}]}),
    # vLLM's render endpoints parse as the API they render, but only tokenize: the sidecar passes them through.
    ("/v1/chat/completions/render", {"model": "m", "messages": [{"role": "user", "content": "a" * 4000}]}),
    ("/v1/completions/render", {"model": "m", "prompt": "a" * 4000}),
]


@pytest.mark.parametrize(("path", "body"), UNSPLIT, ids=[p for p, _ in UNSPLIT])
@pytest.mark.parametrize("config", ["decode-first", "prefill-first"])
async def test_kinds_the_sidecar_does_not_split_are_decode_only(path: str, body: dict[str, Any], config: str) -> None:
    """Embeddings have no decode to hand over, and the sidecar sends the Responses and Anthropic APIs straight
    to its vLLM. Before, a long one got a prefill pick (a prefill pod charged for work it never did, the
    decision counted prefill-decode) and, with no prefill pod up, a 503 the decode pod need not have given."""
    pods: list[tuple[str, str | None]] = [("p0", "prefill"), ("d0", "decode")]
    d, _, metrics = director(EXAMPLE_B if config == "decode-first" else PREFILL_FIRST, pods)
    decision = await d.handle_request(_parsed(path, body), None)
    assert isinstance(decision, RoutingDecision) and decision.targets[0].name == "d0"
    assert not decision.headers.get("x-prefiller-host-port"), decision.headers
    assert decision.result is not None and set(decision.result.profiles) == {"decode"}
    assert decisions(metrics, "decode-only") == 1 and decisions(metrics, "prefill-decode") == 0
    d, _, _ = director(EXAMPLE_B if config == "decode-first" else PREFILL_FIRST, [("d0", "decode")])
    decision = await d.handle_request(_parsed(path, body), None)  # no prefill pod up: still served
    assert isinstance(decision, RoutingDecision) and decision.targets[0].name == "d0"


async def test_client_sent_prefill_header_is_blanked_when_no_prefill_runs() -> None:
    d, _, _ = director(EXAMPLE_B, PD_PODS)
    req = request(b"short")
    req.headers["x-prefiller-host-port"] = "203.0.113.9:1"
    req.headers["x-encoder-hosts-ports"] = "203.0.113.9:2"
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.headers["x-prefiller-host-port"] == ""
    assert decision.headers["x-encoder-hosts-ports"] == ""
    # A disaggregated request overwrites the client's value with the real pick.
    long = request(b"c" * 4000)
    long.headers["x-prefiller-host-port"] = "203.0.113.9:1"
    decision = await d.handle_request(long, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.headers["x-prefiller-host-port"].startswith("10.1.0.")


async def test_unlabeled_pool_routes_decode_only() -> None:
    # decode-filter keeps unlabeled pods; prefill-filter drops them: the required prefill fails.
    d, _, _ = director(EXAMPLE_B, [("u0", None), ("u1", None)])
    decision = await d.handle_request(request(b"short"), None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name in {"u0", "u1"}
    with pytest.raises(ServiceUnavailable, match="prefill profile 'prefill' was required"):
        await d.handle_request(request(b"z" * 4000), None)


async def test_no_decode_endpoint_fails_without_running_prefill() -> None:
    d, _, metrics = director(EXAMPLE_B, [("p0", "prefill")])
    handler = d.pipeline.scheduler.handler
    assert isinstance(handler, DisaggProfileHandler)
    calls = count_decider(handler)
    with pytest.raises(ResourceExhausted):
        await d.handle_request(request(b"q" * 4000), None)
    assert calls == [] and decisions(metrics, "decode-only") == 0


def count_decider(handler: DisaggProfileHandler) -> list[str]:
    """Wrap the handler's prefill decider; the returned list gets one entry per call."""
    calls: list[str] = []
    inner = handler.prefill_decider
    assert inner is not None
    decide = inner.disaggregate

    class Counting(Decider):
        type = "counting"

        def disaggregate(self, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
            calls.append(endpoint.name if endpoint else "")
            return decide(request, endpoint)

    handler.prefill_decider = Counting("counting")
    return calls


async def test_deciders_are_asked_once_per_request_with_the_decode_pick() -> None:
    d, _, _ = director(EXAMPLE_B, PD_PODS)
    handler = d.pipeline.scheduler.handler
    assert isinstance(handler, DisaggProfileHandler)
    calls = count_decider(handler)
    yes = await d.handle_request(request(b"e" * 4000), None)
    assert isinstance(yes, RoutingDecision)
    no = await d.handle_request(request(b"tiny"), None)
    assert isinstance(no, RoutingDecision)
    assert calls == [yes.targets[0].name, no.targets[0].name]


EPD = """
plugins:
- {type: decode-filter}
- {type: prefill-filter}
- {type: encode-filter}
- {type: always-disagg-pd-decider, name: always}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always, encode: always}, profiles: {encode: enc}}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
- name: enc
  plugins: [{pluginRef: encode-filter}, {pluginRef: picker}]
- {name: unused, plugins: [{pluginRef: decode-filter}]}
"""


async def test_encode_prefill_decode_stamps_both_headers(caplog: pytest.LogCaptureFixture) -> None:
    config = EPD.replace("- {type: always-disagg", "- {type: max-score-picker, name: picker, parameters: "
                         "{maxNumOfEndpoints: 2}}\n- {type: always-disagg")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        d, _, metrics = director(config, [("e0", "encode"), ("e1", "encode"), ("p0", "prefill"), ("d0", "decode")])
    assert "never run" in caplog.text and "unused" in caplog.text
    decision = await d.handle_request(request(b"x"), None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name == "d0"
    assert decision.headers["x-prefiller-host-port"] == "10.1.0.3:8000"
    assert sorted(decision.headers["x-encoder-hosts-ports"].split(",")) == ["10.1.0.1:8000", "10.1.0.2:8000"]
    assert decisions(metrics, "encode-prefill-decode") == 1


async def test_a_failed_encode_stage_is_dropped() -> None:
    d, _, metrics = director(EPD.replace("{pluginRef: picker}", "{pluginRef: max-score-picker}"),
                             [("p0", "prefill"), ("d0", "decode")])  # fmt: skip
    decision = await d.handle_request(request(b"x"), None)
    assert isinstance(decision, RoutingDecision)
    assert "x-encoder-hosts-ports" not in decision.headers
    assert decision.headers["x-prefiller-host-port"] == "10.1.0.1:8000"
    assert decisions(metrics, "prefill-decode") == 1


PREFILL_FIRST = """
plugins:
- {type: decode-filter}
- {type: prefill-filter}
- type: disagg-profile-handler
  parameters: {stageOrder: prefill-first}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
"""


async def test_prefill_first_always_prefills_then_decodes() -> None:
    d, _, metrics = director(PREFILL_FIRST, [("p0", "prefill"), ("d0", "decode")])
    req = request(b"x")
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name == "d0"
    assert decision.headers["x-prefiller-host-port"] == "10.1.0.1:8000"
    assert req.data[PEER_ENDPOINT].name == "p0"  # published for the decode profile's plugins
    assert decisions(metrics, "prefill-decode") == 1
    d2, _, _ = director(PREFILL_FIRST, [("d0", "decode")])
    with pytest.raises(ServiceUnavailable):
        await d2.handle_request(request(b"x"), None)


async def test_a_renamed_prefill_profile_is_named_in_the_result() -> None:
    """Plugins that index or charge the prefill pod (prefix producers, no-hit-lru, in-flight load)
    find it through the result, whatever the profile is called."""
    config = PREFILL_FIRST.replace(
        "{stageOrder: prefill-first}", "{stageOrder: prefill-first, profiles: {prefill: pf}}"
    )
    d, _, _ = director(config.replace("{name: prefill,", "{name: pf,"), [("p0", "prefill"), ("d0", "decode")])
    req = request(b"x")
    await d.handle_request(req, None)
    result = req.scheduling
    assert result is not None and result.prefill_profile == "pf"
    assert [ep.name for ep in result.kv_targets()] == ["d0", "p0"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("prefill-first}", "prefill-first, deciders: {prefill: x}}"), "not supported with stageOrder"),
        (("prefill-first}", "sideways}"), "stageOrder must be"),
        (("prefill-first}", "decode-first, profiles: {prefill: decode}}"), "must be distinct"),
        (("{name: prefill,", "{name: prefill2,"), "profiles.prefill: no scheduling profile named 'prefill'"),
        (("{name: decode,", "{name: dec,"), "profiles.decode: no scheduling profile named 'decode'"),
        (("prefill-first}", "decode-first, deciders: {prefill: decode-filter}}"), "is not a Decider"),
        (("prefill-first}", "decode-first, deciders: {encode: nope}}"), "deciders.encode: no plugin named 'nope'"),
    ],
)
def test_disagg_config_errors(edit: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        build(load_config(PREFILL_FIRST.replace(*edit)))


def test_stage_order_is_parsed_loosely_like_the_reference() -> None:
    for text in ("decode_first", "DecodeFirst", "decode", ""):
        assert registry.build("disagg-profile-handler", "h", {"stageOrder": text}).params.stage_order == "decode-first"
    handler = registry.build("disagg-profile-handler", "h", {"stageOrder": "Prefill"})
    assert isinstance(handler, DisaggProfileHandler) and handler.prefill_first


def test_empty_profile_names_mean_the_defaults_like_the_reference() -> None:
    # The reference's DisaggProfileHandlerConfigParser: "Apply profile name defaults for any fields
    # still unset" (a Helm value rendered empty, say).
    handler = registry.build("disagg-profile-handler", "h", {"profiles": {"decode": "", "prefill": "", "encode": ""}})
    assert isinstance(handler, DisaggProfileHandler)
    assert (handler.decode, handler.prefill, handler.encode) == ("decode", "prefill", "encode")


def test_decision_metric_caps_model_labels() -> None:
    handler = registry.build("disagg-profile-handler", "h", None)
    assert isinstance(handler, DisaggProfileHandler)
    metrics = EppMetrics()
    handler.setup(PluginContext({"h": handler}, None, None, metrics))
    import llmepp.plugins.profile_handlers.disagg as disagg

    for i in range(disagg.MAX_MODEL_LABELS + 5):
        handler._record(f"model-{i}", "decode-only")
    labels = {"plugin_name": "h", "plugin_type": "disagg-profile-handler", "decision_type": "decode-only"}
    assert metrics.registry.get_sample_value("llm_d_epp_disagg_decision_total", {**labels, "model_name": "other"}) == 5
    assert (
        metrics.registry.get_sample_value("llm_d_epp_disagg_decision_total", {**labels, "model_name": "model-0"}) == 1
    )


# -- header-profile-handler ------------------------------------------------------------------------
HEADER = """
plugins:
- {type: decode-filter}
- {type: prefill-filter}
- {type: header-profile-handler}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
"""


async def test_header_profile_handler_runs_the_named_profile() -> None:
    d, _, _ = director(HEADER, [("p0", "prefill"), ("d0", "decode")])
    req = request(b"x")
    req.headers["epp-profile"] = " prefill "
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name == "p0"
    assert decision.result is not None and list(decision.result.profiles) == ["prefill"]
    assert cast(RoutingDecision, await d.handle_request(request(b"x"), None)).targets[0].name == "d0"  # default: decode
    bad = request(b"x")
    bad.headers["epp-profile"] = "encode"
    with pytest.raises(BadRequest, match="unknown scheduling profile 'encode'; known: decode, prefill") as err:
        await d.handle_request(bad, None)
    assert err.value.status == 400


async def test_header_profile_handler_custom_header_and_a_blank_default_is_decode() -> None:
    # Reference NewHeaderProfileHandler: a blank defaultProfile is "decode" (a Helm value rendered empty).
    params = "{headerName: X-Stage, defaultProfile: '  '}"
    config = HEADER.replace("{type: header-profile-handler}", f"{{type: header-profile-handler, parameters: {params}}}")
    d, _, _ = director(config, [("p0", "prefill"), ("d0", "decode")])
    assert cast(RoutingDecision, await d.handle_request(request(b"x"), None)).targets[0].name == "d0"
    req = request(b"x")
    req.headers["x-stage"] = "prefill"
    assert cast(RoutingDecision, await d.handle_request(req, None)).targets[0].name == "p0"


async def test_header_profile_handler_with_one_profile_always_runs_it() -> None:
    # Reference headerprofile/README.md: "With exactly one profile configured, that profile always
    # runs, regardless of the header (or its absence)"; defaultProfile is ignored then.
    config = """
plugins:
- {type: decode-filter}
- {type: header-profile-handler}
schedulingProfiles:
- {name: stage, plugins: [{pluginRef: decode-filter}]}
"""
    d, _, _ = director(config, [("d0", "decode")])
    assert cast(RoutingDecision, await d.handle_request(request(b"x"), None)).targets[0].name == "d0"
    req = request(b"x")
    req.headers["epp-profile"] = "prefill"
    assert cast(RoutingDecision, await d.handle_request(req, None)).targets[0].name == "d0"


def test_header_profile_handler_empty_header_name_means_the_default() -> None:
    # Reference NewHeaderProfileHandler: a blank headerName is "EPP-Profile".
    handler = registry.build("header-profile-handler", "h", {"headerName": "  "})
    assert handler.header == "epp-profile"  # type: ignore[attr-defined]


def test_header_profile_handler_default_must_exist() -> None:
    config = HEADER.replace("{type: header-profile-handler}",
                            "{type: header-profile-handler, parameters: {defaultProfile: encode}}")  # fmt: skip
    with pytest.raises(ConfigError, match="defaultProfile: no scheduling profile named 'encode'"):
        build(load_config(config))


# -- deprecated pd-profile-handler and header handlers (configs from before llm-d v0.7) ------------------
def legacy_pd(params: str = "") -> str:
    """deploy/config/pd-legacy-epp-config.yaml with `params` as pd-profile-handler's parameters."""
    if not params:
        return LEGACY_PD_CONFIG
    return LEGACY_PD_CONFIG.replace(
        "- type: pd-profile-handler\n", f"- type: pd-profile-handler\n  parameters: {params}\n"
    )


def legacy_decisions(metrics: EppMetrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "llm_d_epp_disagg_decision_total",
        {"plugin_name": "pd-profile-handler", "plugin_type": "pd-profile-handler", "model_name": "m",
         "decision_type": kind},
    )  # fmt: skip
    return value or 0.0


async def test_a_legacy_pd_config_without_parameters_disaggregates_every_request() -> None:
    d, _, metrics = director(legacy_pd(), PD_PODS)
    decision = await d.handle_request(request(b"hi"), None)  # threshold 0: even a short prompt
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name in {"d0", "d1"}
    assert decision.result is not None
    prefill = decision.result.profiles["prefill"]
    assert prefill is not None and decision.headers["x-prefiller-host-port"] == prefill.targets[0].hostport
    assert legacy_decisions(metrics, "prefill-decode") == 1


async def test_a_legacy_threshold_disaggregates_only_long_uncached_prompts() -> None:
    params = "{threshold: 500, hashBlockSize: 64, prefixPluginName: prefix-cache-scorer}"
    d, _, metrics = director(legacy_pd(params), PD_PODS)
    short = await d.handle_request(request(b"s" * 400), None)  # 100 tokens < 500
    assert isinstance(short, RoutingDecision)
    assert "x-prefiller-host-port" not in short.headers
    long = await d.handle_request(request(b"l" * 4000), None)  # 1000 uncached tokens
    assert isinstance(long, RoutingDecision)
    assert long.headers["x-prefiller-host-port"].startswith("10.1.0.")
    assert legacy_decisions(metrics, "decode-only") == 1 and legacy_decisions(metrics, "prefill-decode") == 1


async def test_a_legacy_decider_plugin_name_and_renamed_profiles() -> None:
    config = (
        legacy_pd("{deciderPluginName: never, decodeProfile: d, prefillProfile: p}")
        .replace("- type: prefill-header-handler", "- type: prefix-based-pd-decider\n  name: never")
        .replace("- name: prefill\n", "- name: p\n")
        .replace("- name: decode\n", "- name: d\n")
    )
    d, _, _ = director(config, PD_PODS)
    decision = await d.handle_request(request(b"x" * 4000), None)  # nonCachedTokens 0: never disaggregate
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name in {"d0", "d1"} and "x-prefiller-host-port" not in decision.headers


async def test_a_legacy_config_uses_the_decider_named_prefix_based_pd_decider_by_default() -> None:
    # pd-profile-handler's deciderPluginName defaults to "prefix-based-pd-decider" in every reference
    # version that has the parameter: such a plugin in the config decides (the old threshold does not).
    config = legacy_pd().replace(
        "- type: prefill-header-handler\n",
        "- type: prefill-header-handler\n- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 500}\n",
    )
    d, _, metrics = director(config, PD_PODS)
    short = await d.handle_request(request(b"s" * 400), None)  # 100 tokens < 500
    assert isinstance(short, RoutingDecision)
    assert "x-prefiller-host-port" not in short.headers
    long = await d.handle_request(request(b"l" * 4000), None)  # 1000 uncached tokens
    assert isinstance(long, RoutingDecision)
    assert long.headers["x-prefiller-host-port"].startswith("10.1.0.")
    assert legacy_decisions(metrics, "decode-only") == 1 and legacy_decisions(metrics, "prefill-decode") == 1


async def test_a_legacy_config_with_only_a_decode_profile_is_decode_only() -> None:
    config = legacy_pd().split("- name: prefill")[0] + (
        "- name: decode\n  plugins:\n  - pluginRef: decode-filter\n  - pluginRef: max-score-picker\n"
    )
    d, _, _ = director(config, PD_PODS)
    decision = await d.handle_request(request(b"x" * 4000), None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name in {"d0", "d1"} and "x-prefiller-host-port" not in decision.headers


async def test_a_legacy_config_whose_prefill_pods_are_all_gone_serves_decode_only() -> None:
    # The reference's pd-profile-handler (every version) keeps only a prefill result that exists:
    # a prefill profile that found no endpoint leaves the request decode-only, it does not fail it.
    d, _, metrics = director(legacy_pd(), [("d0", "decode"), ("d1", "decode")])
    req = request(b"x" * 4000)
    req.headers["x-prefiller-host-port"] = "203.0.113.9:1"
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name in {"d0", "d1"}
    assert decision.result is not None and set(decision.result.profiles) == {"decode"}
    assert decision.headers["x-prefiller-host-port"] == ""
    assert legacy_decisions(metrics, "decode-only") == 1 and legacy_decisions(metrics, "prefill-decode") == 0
    # Without a decode endpoint it still fails.
    d, _, _ = director(legacy_pd(), [("p0", "prefill")])
    with pytest.raises(ResourceExhausted):
        await d.handle_request(request(b"x" * 4000), None)


async def test_a_legacy_prefix_match_info_producer_name_is_accepted_and_used() -> None:
    # The reference's pd-profile-handler parameter; the threshold decider reads that producer.
    config = legacy_pd("{threshold: 500, prefixMatchInfoProducerName: approx}").replace(
        "plugins:\n", "plugins:\n- type: approx-prefix-cache-producer\n  name: approx\n", 1
    )
    d, _, _ = director(config, PD_PODS)
    handler = d.pipeline.scheduler.handler
    assert isinstance(handler, DisaggProfileHandler) and handler.prefill_decider is not None
    assert handler.prefill_decider.data_key == f"{PREFIX_CACHE_MATCH_INFO}/approx"  # type: ignore[attr-defined]
    long = await d.handle_request(request(b"l" * 4000), None)
    assert isinstance(long, RoutingDecision)
    assert long.headers["x-prefiller-host-port"].startswith("10.1.0.")


def test_the_legacy_data_parallel_port_rewrite_is_refused_with_the_alternative() -> None:
    with pytest.raises(ConfigError, match=r"primaryPort .* is not supported: list every rank.s port"):
        build(load_config(legacy_pd("{primaryPort: 8000}")))


def test_disagg_headers_handler_stamps_both_headers() -> None:
    from llmepp.framework.scheduling import ProfileResult, SchedulingResult

    handler = make("disagg-headers-handler", {"prefillProfile": "p", "encodeProfile": "e"})
    req = request()
    result = SchedulingResult(
        "d", {"d": ProfileResult([endpoint(0)]), "p": ProfileResult([endpoint(1)]), "e": ProfileResult([endpoint(2)])}
    )
    handler.pre_request(req, result)
    assert req.upstream_headers == {"x-prefiller-host-port": "10.0.0.2:8000", "x-encoder-hosts-ports": "10.0.0.3:8000"}


COORDINATOR = """
plugins:
- {type: approx-prefix-cache-producer}
- {type: prefix-cache-scorer}
- {type: decode-filter}
- {type: prefill-filter}
- {type: header-profile-handler}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer}]}
"""


async def test_conditional_decode_is_412_unless_the_decode_pod_holds_the_prefix() -> None:
    """Reference §1.4 / §6: a coordinator's `Prefer: if-available` decode call is answered 412 when the
    chosen decode pod caches none of the prompt (it then runs the prefill phase first); it was routed."""
    d, _, _ = director(COORDINATOR, [("p0", "prefill"), ("d0", "decode")])
    cold = request(b"q" * 4000)
    cold.headers.update({"epp-profile": "decode", "prefer": "respond-async, if-available"})
    with pytest.raises(PreconditionFailed) as refused:
        await d.handle_request(cold, None)
    assert refused.value.status == 412 and "d0" in refused.value.message
    assert d.datastore.endpoints[1].inflight.requests == 0  # nothing charged
    warm = request(b"w" * 4000)
    warm.headers["epp-profile"] = "decode"
    assert isinstance(await d.handle_request(warm, None), RoutingDecision)
    await asyncio.sleep(0)  # the approximate index records the routed prompt in a call_soon
    again = request(b"w" * 4000)
    again.headers.update({"epp-profile": "decode", "prefer": "if-available"})
    decision = await d.handle_request(again, None)
    assert isinstance(decision, RoutingDecision) and decision.targets[0].name == "d0"


async def test_a_concurrency_detector_reading_the_inflight_producer_counts_remote_prefills() -> None:
    """The director charges a P/D request to its decode pod only: a detector reading those counts saw a
    prefill pod running a remote prefill as idle. Named, the inflight-load-producer's counts (which charge the
    prefill pick until its prefill is done) make that pod saturated and filter it out of the next prefill."""
    config = EXAMPLE_B.replace(
        "- type: queue-scorer",
        "- type: queue-scorer\n- type: inflight-load-producer\n- type: concurrency-detector\n"
        "  parameters: {maxConcurrency: 1, inFlightLoadProducerName: inflight-load-producer}",
    ).replace(
        "plugins: [{pluginRef: prefill-filter}, ",
        "plugins: [{pluginRef: prefill-filter}, {pluginRef: concurrency-detector}, ",
    )
    d, _, _ = director(config, [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")])
    detector = next(f for f in d.pipeline.scheduler.profiles["prefill"].filters if f.type == "concurrency-detector")
    assert isinstance(detector, SaturationDetector)

    async def prefill_pick(body: bytes) -> Endpoint:
        decision = await d.handle_request(request(body), None)
        assert isinstance(decision, RoutingDecision) and decision.result is not None
        picked = decision.result.profiles["prefill"]
        assert picked is not None
        return picked.targets[0]

    prefill = await prefill_pick(b"a" * 4000)
    assert detector.saturation([prefill], 0.0) >= 1.0 and prefill.inflight.requests == 0
    assert await prefill_pick(b"b" * 4000) is not prefill


async def test_a_saturated_prefill_pool_is_429_saturated_and_an_absent_one_503() -> None:
    """Prefill pods are up but a load filter in the prefill profile refuses them all (each already runs a
    remote prefill): that is saturation, 429 rejected-saturated as the decode stage answers it, not the 503
    rejected-no-endpoints (which Envoy's retry_on 5xx retries at once) of a pool without prefill pods."""
    cfg = EXAMPLE_B.replace(
        "- type: max-score-picker",
        "- type: max-score-picker\n- type: inflight-load-producer\n- type: utilization-filter\n"
        "  parameters: {conditions: [{metric: active-requests, maxValue: 0}]}",
    ).replace(
        "plugins: [{pluginRef: prefill-filter}, ",
        "plugins: [{pluginRef: prefill-filter}, {pluginRef: utilization-filter}, ",
        1,
    )
    assert "{pluginRef: utilization-filter}" in cfg
    d, _, _ = director(cfg, [("p0", "prefill"), ("d0", "decode"), ("d1", "decode")])
    first = await d.handle_request(request(b"a" * 4000), None)
    assert isinstance(first, RoutingDecision) and first.result is not None
    prefill = first.result.profiles["prefill"]
    assert prefill is not None and prefill.targets[0].name == "p0"
    with pytest.raises(ResourceExhausted) as saturated:  # p0 still runs the first one's prefill
        await d.handle_request(request(b"b" * 4000), None)
    assert (saturated.value.status, saturated.value.reason) == (429, "rejected-saturated")
    d, _, _ = director(cfg, [("d0", "decode")])
    with pytest.raises(ServiceUnavailable) as absent:
        await d.handle_request(request(b"a" * 4000), None)
    assert (absent.value.status, absent.value.reason) == (503, "rejected-no-endpoints")


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1/completions/"])
async def test_a_path_the_sidecar_passes_through_gets_no_prefill_pick(path: str) -> None:
    """The parser ignores a trailing slash, the sidecar does not: it splits only its exact paths and passes
    these to its vLLM as they are. A prefill pick for them was charged, indexed and counted for a prefill
    that never happens (and with no prefill pod up, answered 503)."""
    if path.endswith("chat/completions/"):
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "a" * 4000}]}
    else:
        body = {"model": "m", "prompt": "a" * 4000}
    pod_sets: list[list[tuple[str, str | None]]] = [[("p0", "prefill"), ("d0", "decode")], [("d0", "decode")]]
    for pods in pod_sets:
        d, _, _ = director(EXAMPLE_B, pods)
        req = parse_request({":path": path, ":method": "POST"}, msgspec.json.encode(body), request_id="r")
        decision = await d.handle_request(req, None)
        assert isinstance(decision, RoutingDecision) and decision.targets[0].name == "d0"
        assert "x-prefiller-host-port" not in decision.headers
