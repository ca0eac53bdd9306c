"""`disaggregatedset-rollout-screener`: one DisaggregatedSet revision per request (prefill and decode)
during a rollout, revision shares from ready pods, strict / prefer header selectors, the stamped
response header and the metrics; configs in the older reference shape (`headerSelectors`) and in the
newer one (`revisionHeaderName`, `requiredRoles`, `disableCoordination`, decision-id coordination),
through the loader and the Director."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, cast

import pytest
import yaml
from helpers import request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.errors import ServiceUnavailable
from llmepp.framework.plugin import ConfigError, PluginContext, registry
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.screeners.disaggregatedset_rollout import (
    DisaggregatedSetRolloutScreener,
    RevisionDecisions,
    parse_label_selector,
    revision_shares,
)
from llmepp.request.parsers import headers_request
from llmepp.request.types import ResponseInfo

REV = "disaggregatedset.x-k8s.io/revision"
ROLE = "disaggregatedset.x-k8s.io/role"
SET = "disaggregatedset.x-k8s.io/name"
SLICE = "disaggregatedset.x-k8s.io/slice"
PD_ROLE = "llm-d.ai/role"  # what prefill-filter / decode-filter read
TYPE = "disaggregatedset-rollout-screener"

# The reference's e2e config (test/e2e disaggregatedset rollout), MODE filled in per test.
PD_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  name: rollout-screener
  parameters:
    scope:
      labelSelector: "disaggregatedset.x-k8s.io/name=revision-rollout"
    headerSelectors:
    - name: revision
      headerName: x-disagg-revision
      labelKey: disaggregatedset.x-k8s.io/revision
      mode: strict
    revisionGating:
      mode: __MODE__
      requireRoles:
        values: [prefill, decode]
- type: prefill-filter
- type: decode-filter
- type: weighted-random-picker
  name: picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: picker
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: picker
"""

# The reference README's configuration (a prefer slice selector and its affinity scorer), single profile.
README_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  name: rollout-screener
  parameters:
    scope:
      labelSelector: "disaggregatedset.x-k8s.io/name=my-set"
    headerSelectors:
    - name: revision
      headerName: x-disagg-revision
      labelKey: disaggregatedset.x-k8s.io/revision
      mode: strict
    - name: slice
      headerName: x-disagg-slice
      labelKey: disaggregatedset.x-k8s.io/slice
      mode: prefer
    revisionGating:
      mode: max-role
      requireRoles:
        values: [prefill, decode]
- type: header-label-affinity-scorer
  name: slice-affinity
  parameters:
    headerName: x-disagg-slice
    labelKey: disaggregatedset.x-k8s.io/slice
- type: weighted-random-picker
  name: picker

schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: slice-affinity
    weight: 3
  - pluginRef: picker
"""


def pd_config(mode: str) -> str:
    return PD_CONFIG.replace("__MODE__", mode)


def pods(shape: dict[str, dict[str, int]], set_name: str = "revision-rollout") -> list[EndpointSpec]:
    """Endpoints for {revision: {role: count}}, labelled as the DisaggregatedSet controller labels pods."""
    specs: list[EndpointSpec] = []
    for revision, roles in shape.items():
        for role, count in roles.items():
            for i in range(count):
                n = len(specs) + 1
                labels = {REV: revision, ROLE: role, PD_ROLE: role, SET: set_name}
                specs.append(
                    EndpointSpec(name=f"{revision}-{role}-{i}", address=f"10.2.0.{n}", port=8000, labels=labels)
                )
    return specs


REQUEST_IDS = itertools.count()


class Rig:
    def __init__(self, config: str, specs: list[EndpointSpec]) -> None:
        self.ds = Datastore()
        for s in specs:
            self.ds.upsert(s)
        self.metrics = EppMetrics()
        components = build(load_config(config), datastore=self.ds, metrics=self.metrics)
        self.director = Director(self.ds, components.pipeline, self.metrics)
        self.screener: DisaggregatedSetRolloutScreener = components.plugins["rollout-screener"]  # type: ignore[assignment]
        self.screener.rng.seed(7)

    async def route(self, headers: dict[str, str] | None = None) -> tuple[str, str | None, dict[str, str]]:
        """(decode revision, prefill revision or None, stamped response headers) of one request."""
        req = request(b"hello world " * 40)
        req.request_id = f"r-{next(REQUEST_IDS)}"  # as the server's: one per request (the newer shape keys on it)
        req.headers.update(headers or {})
        decision = await self.director.handle_request(req, None)
        assert isinstance(decision, RoutingDecision)
        assert decision.result is not None
        prefill = decision.result.profiles.get("prefill")
        stamped = self.director.response_headers(req, ResponseInfo(status=200), {}) or {}
        self.director.response_complete(req, ResponseInfo(status=200), decision)
        prefill_rev = prefill.targets[0].labels[REV] if prefill is not None and prefill.targets else None
        return decision.targets[0].labels[REV], prefill_rev, stamped

    def share(self, revision: str, mode: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "llm_d_epp_disaggregatedset_revision_gating_share",
            {"plugin_type": TYPE, "plugin_name": "rollout-screener", "mode": mode, "revision": revision},
        )

    def no_match(self, selector: str = "revision") -> float | None:
        return self.metrics.registry.get_sample_value(
            "llm_d_epp_disaggregatedset_strict_header_no_match_total",
            {"plugin_type": TYPE, "plugin_name": "rollout-screener", "selector": selector},
        )


# The README's 2P:10D mid-rollout example: A = {prefill 2, decode 9}, B = {prefill 1, decode 1}.
ROLLOUT = {"A": {"prefill": 2, "decode": 9}, "B": {"prefill": 1, "decode": 1}}


@pytest.mark.parametrize(("mode", "share_b"), [("sum", 2 / 13), ("max-role", 1 / 10)])
async def test_prefill_and_decode_share_one_revision_and_traffic_follows_the_weights(mode: str, share_b: float) -> None:
    rig = Rig(pd_config(mode), pods(ROLLOUT))
    assert rig.share("B", mode) == pytest.approx(share_b)
    assert rig.share("A", mode) == pytest.approx(1 - share_b)
    seen: Counter[str] = Counter()
    n = 3000
    for _ in range(n):
        decode, prefill, stamped = await rig.route()
        assert prefill == decode  # never a cross-revision KV hand-off
        assert stamped == {"x-disagg-revision": decode}  # the served (decode) endpoint's revision
        seen[decode] += 1
    assert seen["B"] / n == pytest.approx(share_b, abs=0.025)


async def test_without_gating_the_same_pool_mixes_revisions_and_ignores_the_weights() -> None:
    """The control for the test above: `disabled` leaves both profiles free (the reference's documented
    behaviour for one EPP), so the checks above would fail without gating."""
    rig = Rig(pd_config("disabled"), pods(ROLLOUT))
    # Without gating the (unseeded) picker decides the revisions: the two share bounds below failed about 1 run
    # in 3,600 by chance (binomial tails of 600 uniform picks). Seeded, the same draws every run.
    rig.director.pipeline.scheduler.profiles["decode"].picker._rng.seed(7)  # type: ignore[attr-defined]
    results = [await rig.route() for _ in range(600)]
    assert sum(decode != prefill for decode, prefill, _ in results) > 100
    # Each profile picks its pods uniformly: B gets 1 of 10 decodes but 1 of 3 prefills.
    assert sum(decode == "B" for decode, _, _ in results) / len(results) == pytest.approx(1 / 10, abs=0.05)
    assert sum(prefill == "B" for _, prefill, _ in results) / len(results) == pytest.approx(1 / 3, abs=0.07)
    assert rig.share("A", "disabled") is None  # no gauge without gating


async def test_incomplete_revision_gets_no_traffic_and_share_zero() -> None:
    # C has prefill pods only (a rollout step where its decode pods are not ready yet).
    rig = Rig(pd_config("sum"), pods({"A": {"prefill": 1, "decode": 1}, "C": {"prefill": 3}}))
    assert rig.share("A", "sum") == 1.0 and rig.share("C", "sum") == 0.0
    for _ in range(50):
        decode, prefill, _ = await rig.route()
        assert decode == prefill == "A"


async def test_no_covered_revision_fails_closed() -> None:
    rig = Rig(pd_config("max-role"), pods({"A": {"decode": 2}, "B": {"prefill": 2}}))
    with pytest.raises(ServiceUnavailable, match="rollout-screener"):
        await rig.route()


async def test_strict_revision_header_pins_the_request_and_unknown_or_uncovered_fail_closed() -> None:
    rig = Rig(pd_config("sum"), pods({**ROLLOUT, "C": {"prefill": 1}}))
    assert rig.no_match() == 0.0  # the strict selector's series exists from start-up
    for _ in range(30):
        assert (await rig.route({"x-disagg-revision": "B"}))[:2] == ("B", "B")
    with pytest.raises(ServiceUnavailable):
        await rig.route({"x-disagg-revision": "Z"})  # no such revision: never another one
    assert rig.no_match() == 1.0
    with pytest.raises(ServiceUnavailable):
        await rig.route({"x-disagg-revision": "C"})  # C has no decode pod: pinning it cannot be served
    assert rig.no_match() == 2.0
    # An empty header value is no selection.
    decode, prefill, _ = await rig.route({"x-disagg-revision": ""})
    assert decode == prefill


async def test_bodyless_requests_are_screened_too() -> None:
    """GET /v1/models and the like (headers only) keep to a covered revision and honour a strict pin."""
    rig = Rig(pd_config("sum"), pods({**ROLLOUT, "C": {"prefill": 1}}))

    def bodyless(headers: dict[str, str]) -> str:
        get = headers_request({":method": "GET", ":path": "/v1/models", **headers}, request_id="b-1")
        return cast(RoutingDecision, rig.director.handle_bodyless(get, None)).targets[0].labels[REV]

    assert {bodyless({}) for _ in range(200)} == {"A", "B"}  # never C (incomplete)
    assert {bodyless({"x-disagg-revision": "B"}) for _ in range(30)} == {"B"}
    with pytest.raises(ServiceUnavailable, match="rollout-screener"):
        bodyless({"x-disagg-revision": "Z"})


async def test_disabled_gating_keeps_strict_selection_and_stamping() -> None:
    rig = Rig(pd_config("disabled"), pods(ROLLOUT))
    for _ in range(20):
        decode, prefill, stamped = await rig.route({"x-disagg-revision": "A"})
        assert decode == prefill == "A" and stamped == {"x-disagg-revision": "A"}
    with pytest.raises(ServiceUnavailable):
        await rig.route({"x-disagg-revision": "nope"})
    assert rig.no_match() == 1.0


async def test_readme_config_prefer_selector_stamps_only_and_shares_follow_pool_changes() -> None:
    specs = pods({"A": {"prefill": 1, "decode": 3}, "B": {"prefill": 1, "decode": 1}}, set_name="my-set")
    specs = [
        EndpointSpec(s.name, s.address, s.port, labels={**s.labels, SLICE: "s1" if s.name.endswith("0") else "s2"})
        for s in specs
    ]
    rig = Rig(README_CONFIG, specs)
    # max-role: decode is dominant (4 > 2): A 3/4, B 1/4.
    assert rig.share("A", "max-role") == 0.75 and rig.share("B", "max-role") == 0.25
    ds = rig.ds
    # A prefer selector does not screen: an unknown slice still routes, and the served pod's slice is stamped.
    req = request(b"x")
    req.headers["x-disagg-slice"] = "nowhere"
    decision = await rig.director.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    stamped = rig.director.response_headers(req, ResponseInfo(status=200), {})
    assert stamped == {
        "x-disagg-revision": decision.targets[0].labels[REV],
        "x-disagg-slice": decision.targets[0].labels[SLICE],
    }
    # Pods leave and arrive: the shares and the gauge follow without a request.
    for name in ("A-decode-1", "A-decode-2"):
        ds.delete(name)
    assert rig.share("A", "max-role") == pytest.approx(1 / 2)
    for name in ("B-prefill-0", "B-decode-0"):
        ds.delete(name)
    assert rig.share("B", "max-role") is None  # its series is removed with its last pod
    assert rig.share("A", "max-role") == 1.0
    ds.upsert(EndpointSpec("B2-d", "10.2.1.1", 8000, labels={REV: "B2", ROLE: "decode", SET: "my-set"}))
    assert rig.share("B2", "max-role") == 0.0  # decode only: not covered


async def test_strict_selector_on_another_label_still_keeps_one_revision() -> None:
    config = pd_config("sum").replace(
        "      mode: strict\n",
        "      mode: strict\n    - name: slice\n      headerName: X-Disagg-Slice\n"
        "      labelKey: disaggregatedset.x-k8s.io/slice\n      mode: strict\n",
    )
    specs = [
        EndpointSpec(s.name, s.address, s.port, labels={**s.labels, SLICE: "s1"})
        for s in pods({"A": {"prefill": 2, "decode": 2}, "B": {"prefill": 2, "decode": 2}})
    ]
    rig = Rig(config, specs)
    revisions = set()
    for _ in range(200):
        decode, prefill, stamped = await rig.route({"x-disagg-slice": "s1"})
        assert decode == prefill and stamped["x-disagg-slice"] == "s1"
        revisions.add(decode)
    assert revisions == {"A", "B"}
    with pytest.raises(ServiceUnavailable):
        await rig.route({"x-disagg-slice": "s9"})
    assert rig.no_match("slice") == 1.0 and rig.no_match("revision") == 0.0


async def test_out_of_scope_pods_do_not_count() -> None:
    # B's decode pod belongs to another DisaggregatedSet: B is not covered by this set's pods.
    specs = pods({"A": {"prefill": 1, "decode": 1}, "B": {"prefill": 1}})
    specs += pods({"B": {"decode": 1}}, set_name="other-set")
    specs[-1] = EndpointSpec("other-decode", "10.2.9.9", 8000, labels=specs[-1].labels)
    rig = Rig(pd_config("sum"), specs)
    assert rig.share("B", "sum") == 0.0
    for _ in range(30):
        assert (await rig.route())[:2] == ("A", "A")


def test_data_parallel_ranks_count_once() -> None:
    labels = {REV: "A", ROLE: "decode", SET: "revision-rollout"}
    screener = registry.build(TYPE, "s", yaml.safe_load(pd_config("sum"))["plugins"][0]["parameters"])
    assert isinstance(screener, DisaggregatedSetRolloutScreener)
    ds = Datastore()
    for rank in range(4):  # one pod, four rank endpoints
        ds.upsert(EndpointSpec(f"d-rank-{rank}", "10.3.0.1", 8000 + rank, labels=labels, rank=rank, pod_name="d"))
    ds.upsert(EndpointSpec("p", "10.3.0.2", 8000, labels={**labels, ROLE: "prefill"}))
    screener.setup(PluginContext({}, ds, None, None))
    assert screener.distribution.role_counts == {"A": {"decode": 1, "prefill": 1}}


def test_revision_shares() -> None:
    counts = {"A": {"prefill": 2, "decode": 9}, "B": {"prefill": 1, "decode": 1}, "C": {"prefill": 100}}
    assert revision_shares(counts, ["prefill", "decode"], "sum") == pytest.approx({"A": 11 / 13, "B": 2 / 13})
    assert revision_shares(counts, ["prefill", "decode"], "max-role") == pytest.approx({"A": 0.9, "B": 0.1})
    # max-role: one dominant role for the whole distribution; the first listed role wins a tie.
    tied = {"A": {"prefill": 8, "decode": 2}, "B": {"prefill": 2, "decode": 8}}
    assert revision_shares(tied, ["prefill", "decode"], "max-role") == {"A": 0.8, "B": 0.2}
    assert revision_shares(tied, ["decode", "prefill"], "max-role") == {"A": 0.2, "B": 0.8}
    assert revision_shares({"A": {"decode": 3}}, ["prefill", "decode"], "sum") == {}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=b", {"a": "b"}, True),
        ("a==b,c!=d", {"a": "b", "c": "x"}, True),
        ("a!=b", {}, True),
        ("a in (x, y),b notin (z)", {"a": "y"}, True),
        ("a in (x,y)", {"a": "z"}, False),
        ("example.com/k", {"example.com/k": ""}, True),
        ("!k", {"k": "v"}, False),
        ("n>3,n<10", {"n": "5"}, True),
        ("n>3", {"n": "abc"}, False),
        ("disaggregatedset.x-k8s.io/name=my-set", {SET: "my-set"}, True),
    ],
)
def test_label_selector(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_label_selector(selector)(labels) is expected


def params(**overrides: Any) -> dict[str, Any]:
    p: dict[str, Any] = yaml.safe_load(pd_config("sum"))["plugins"][0]["parameters"]
    for path, value in overrides.items():
        node = p
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        if value is None:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return p


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scope": None}, "missing required field `scope`"),
        ({"scope__labelSelector": ""}, "scope.labelSelector is required"),
        ({"scope__labelSelector": "a in b"}, "scope.labelSelector is not a valid label selector"),
        ({"revisionGating": None}, "missing required field `revisionGating`"),
        ({"revisionGating__mode": "weighted"}, "must be one of sum|max-role|disabled"),
        ({"revisionGating__requireRoles": None}, "revisionGating.requireRoles is required"),
        ({"revisionGating__requireRoles": {"values": []}}, "must contain at least one role"),
        ({"revisionGating__requireRoles": {"values": ["decode", "decode"]}}, "duplicate role 'decode'"),
        (
            {"revisionGating__requiredRoles": ["decode"]},
            "parameters mix the older shape (headerSelectors, revisionGating.requireRoles) "
            "with the newer shape (revisionGating.requiredRoles)",
        ),
        ({"revisionGating__requireRoles__values": ["decode"], "revisionGating__foo": 1}, "unknown field `foo`"),
        ({"headerSelectors": [{"name": "r", "headerName": "h", "labelKey": "k", "mode": "soft"}]}, "strict|prefer"),
        ({"headerSelectors": [{"name": "r", "headerName": "h", "mode": "strict"}]}, "headerSelectors[0].labelKey"),
        (
            {
                "headerSelectors": [
                    {"name": "r", "headerName": "H", "labelKey": "k", "mode": "strict"},
                    {"name": "s", "headerName": "h", "labelKey": "l", "mode": "prefer"},
                ]
            },
            "duplicate headerName 'h'",
        ),
    ],
)
def test_config_errors_name_the_plugin_and_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        registry.build(TYPE, "rollout-screener", params(**overrides))
    assert "plugin 'rollout-screener' (type disaggregatedset-rollout-screener)" in str(e.value)
    assert message in str(e.value)


def test_defaults_and_disabled_needs_no_roles() -> None:
    p = params(revisionGating={"mode": "disabled"}, headerSelectors=[])
    screener = registry.build(TYPE, "s", p)
    assert isinstance(screener, DisaggregatedSetRolloutScreener)
    assert screener.shape == "older"
    assert screener.revision_label == REV and screener.role_label == ROLE
    assert not screener.gating and screener.selectors == ()
    # Neither shape's own keys: read as the newer shape, whose revision header is strict and stamped.
    screener = registry.build(TYPE, "s", params(revisionGating={"mode": "disabled"}, headerSelectors=None))
    assert isinstance(screener, DisaggregatedSetRolloutScreener)
    assert screener.shape == "newer" and screener.revision_header == "x-llm-d-disagg-revision"
    assert [(s.header, s.label, s.strict) for s in screener.selectors] == [("x-llm-d-disagg-revision", REV, True)]


# -- the newer reference shape ------------------------------------------------------------------
# The newer reference's e2e rollout config (its ConfigMap's disaggregation.yaml), MODE filled in per test.
NEWER_PD_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  name: rollout-screener
  parameters:
    scope:
      labelSelector: "disaggregatedset.x-k8s.io/name=revision-rollout"
    revisionGating:
      revisionHeaderName: x-llm-d-disagg-revision
      revisionLabelKey: disaggregatedset.x-k8s.io/revision
      roleLabelKey: disaggregatedset.x-k8s.io/role
      mode: __MODE__
      requiredRoles: [prefill, decode]
- type: prefill-filter
- type: decode-filter
- type: weighted-random-picker
  name: picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: picker
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: picker
"""

# The newer reference README's configuration (the slice preference is the affinity scorer's alone).
NEWER_README_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  name: rollout-screener
  parameters:
    scope:
      labelSelector: "disaggregatedset.x-k8s.io/name=my-set"
    revisionGating:
      revisionHeaderName: x-llm-d-disagg-revision
      revisionLabelKey: disaggregatedset.x-k8s.io/revision
      roleLabelKey: disaggregatedset.x-k8s.io/role
      mode: max-role
      requiredRoles: [prefill, decode]
- type: header-label-affinity-scorer
  name: slice-affinity
  parameters:
    headerName: x-disagg-slice
    labelKey: disaggregatedset.x-k8s.io/slice
- type: weighted-random-picker
  name: picker

schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: slice-affinity
    weight: 3
  - pluginRef: picker
"""

HEADER = "x-llm-d-disagg-revision"
DECISION = "x-llm-d-revision-decision-id"


def newer_config(mode: str, **gating: str) -> str:
    config = NEWER_PD_CONFIG.replace("__MODE__", mode)
    for key, value in gating.items():
        config = config.replace("      mode: ", f"      {key}: {value}\n      mode: ", 1)
    return config


def revision_no_match(rig: Rig) -> float | None:
    return rig.metrics.registry.get_sample_value(
        "llm_d_epp_disaggregatedset_strict_revision_no_match_total",
        {"plugin_type": TYPE, "plugin_name": "rollout-screener"},
    )


@pytest.mark.parametrize(("mode", "share_b"), [("sum", 2 / 13), ("max-role", 1 / 10)])
async def test_newer_shape_keeps_one_revision_stamps_its_header_and_follows_the_weights(
    mode: str, share_b: float
) -> None:
    rig = Rig(newer_config(mode), pods(ROLLOUT))
    assert rig.screener.shape == "newer" and rig.screener.coordinate
    assert rig.share("B", mode) == pytest.approx(share_b)
    seen: Counter[str] = Counter()
    n = 2000
    for _ in range(n):
        decode, prefill, stamped = await rig.route()
        assert prefill == decode
        assert stamped == {HEADER: decode}
        seen[decode] += 1
    assert seen["B"] / n == pytest.approx(share_b, abs=0.03)
    # Every request had its own x-request-id: each stored its own decision (both revisions in the pool).
    assert len(rig.screener.decisions) == n


async def test_newer_shape_strict_revision_header_and_its_metric() -> None:
    rig = Rig(newer_config("sum"), pods({**ROLLOUT, "C": {"prefill": 1}}))
    assert revision_no_match(rig) == 0.0  # from start-up
    assert rig.no_match() is None  # the older shape's counter is not exported
    for _ in range(30):
        decode, prefill, stamped = await rig.route({HEADER: "B", DECISION: "d-1"})
        assert (decode, prefill, stamped) == ("B", "B", {HEADER: "B"})
    assert len(rig.screener.decisions) == 0  # a pinned request makes no decision
    for header, count in (("Z", 1.0), ("C", 2.0)):  # unknown; uncovered (no decode pod)
        with pytest.raises(ServiceUnavailable, match="rollout-screener"):
            await rig.route({HEADER: header})
        assert revision_no_match(rig) == count
    # The older shape's header means nothing here.
    assert (await rig.route({"x-disagg-revision": "Z"}))[0] in ("A", "B")


async def test_newer_shape_counts_a_failed_pin_even_when_nothing_is_covered() -> None:
    rig = Rig(newer_config("max-role"), pods({"A": {"decode": 2}, "B": {"prefill": 2}}))
    with pytest.raises(ServiceUnavailable):
        await rig.route()
    assert revision_no_match(rig) == 0.0
    with pytest.raises(ServiceUnavailable):
        await rig.route({HEADER: "A"})
    assert revision_no_match(rig) == 1.0


async def test_newer_shape_disabled_keeps_strict_header_and_stamping_only() -> None:
    rig = Rig(newer_config("disabled"), pods(ROLLOUT))
    assert not rig.screener.gating and not rig.screener.coordinate
    results = [await rig.route({DECISION: "same"}) for _ in range(300)]
    assert sum(decode != prefill for decode, prefill, _ in results) > 40  # no revision decision at all
    assert all(stamped == {HEADER: decode} for decode, _, stamped in results)
    for _ in range(20):
        assert (await rig.route({HEADER: "A"}))[:2] == ("A", "A")
    with pytest.raises(ServiceUnavailable):
        await rig.route({HEADER: "nope"})
    assert revision_no_match(rig) == 1.0
    assert rig.share("A", "disabled") is None


async def test_newer_shape_coordinates_one_revision_per_decision_id() -> None:
    rig = Rig(newer_config("sum"), pods({"A": {"prefill": 1, "decode": 1}, "B": {"prefill": 1, "decode": 1}}))
    # Parallel sub-requests of one logical request share the decision id: one revision for all.
    for decision in ("d-1", "d-2", "d-3", "d-4"):
        first = (await rig.route({DECISION: decision}))[0]
        for _ in range(20):
            assert (await rig.route({DECISION: decision}))[:2] == (first, first)
    # Without a decision id, x-request-id is the key; a decision id beats it.
    first = (await rig.route({"x-request-id": "req-1"}))[0]
    for _ in range(20):
        assert (await rig.route({"x-request-id": "req-1"}))[0] == first
    drawn = {(await rig.route({"x-request-id": "req-1", DECISION: f"e-{i}"}))[0] for i in range(40)}
    assert drawn == {"A", "B"}
    # A forwarded revision header is authoritative: the stored decision does not override it.
    other = "B" if first == "A" else "A"
    assert (await rig.route({"x-request-id": "req-1", HEADER: other}))[0] == other


async def test_newer_shape_disable_coordination_and_single_revision_store_nothing() -> None:
    both = pods({"A": {"prefill": 1, "decode": 1}, "B": {"prefill": 1, "decode": 1}})
    rig = Rig(newer_config("sum", disableCoordination="true"), both)
    assert not rig.screener.coordinate
    assert {(await rig.route({DECISION: "same"}))[0] for _ in range(40)} == {"A", "B"}
    assert len(rig.screener.decisions) == 0
    # Outside a rollout (the pool's counted pods of one revision) every request gets it; nothing is stored.
    rig = Rig(newer_config("sum"), pods({"A": {"prefill": 1, "decode": 1}}))
    for _ in range(10):
        assert (await rig.route({DECISION: "same"}))[0] == "A"
    assert len(rig.screener.decisions) == 0
    # An uncovered second revision's pods already turn coordination on (it may be covered soon).
    rig = Rig(newer_config("sum"), pods({"A": {"prefill": 1, "decode": 1}, "B": {"decode": 1}}))
    assert (await rig.route({DECISION: "early"}))[0] == "A"
    assert len(rig.screener.decisions) == 1


async def test_newer_shape_a_decision_outlives_candidate_changes_and_fails_closed_when_it_cannot_be_served() -> None:
    specs = pods({"A": {"prefill": 1, "decode": 1}, "B": {"prefill": 1, "decode": 1}})
    rig = Rig(newer_config("sum"), specs)
    screener = rig.screener
    only_a = [ep for ep in rig.ds.endpoints if ep.spec.labels[REV] == "A"]
    req = request(b"x")
    req.headers[DECISION] = "d-1"
    assert {ep.spec.labels[REV] for ep in screener.screen(req, only_a)} == {"A"}  # stored: A
    for _ in range(20):  # later requests of d-1 see both revisions but keep A
        assert {ep.spec.labels[REV] for ep in screener.screen(req, rig.ds.endpoints)} == {"A"}
    # A loses its decode pod: d-1's decision cannot be served and is not replaced by B.
    rig.ds.delete("A-decode-0")
    with pytest.raises(ServiceUnavailable):
        await rig.route({DECISION: "d-1"})
    assert revision_no_match(rig) == 0.0  # not a pinned header
    assert (await rig.route({DECISION: "d-2"}))[:2] == ("B", "B")


def test_revision_decisions_forget_after_five_minutes_without_use() -> None:
    now = [0.0]
    decisions = RevisionDecisions(clock=lambda: now[0])
    assert decisions.get_or_set("d", "A") == "A"
    now[0] = 299.0
    assert decisions.get_or_set("d", "B") == "A"  # a use keeps it ...
    now[0] = 598.0
    assert decisions.get_or_set("d", "B") == "A"
    assert decisions.get_or_set("e", "B") == "B"
    now[0] = 899.0  # ... 301 s after the last use it is gone, and a sweep dropped it
    assert decisions.get_or_set("d", "B") == "B"
    assert len(decisions) == 1  # "e" swept (unused for 301 s); "d" newly stored


def test_revision_decisions_are_bounded_least_recently_used_first() -> None:
    decisions = RevisionDecisions(max_entries=3)
    for i in range(3):
        decisions.get_or_set(f"d{i}", "A")
    assert decisions.get_or_set("d0", "B") == "A"  # used again: now the most recent
    assert decisions.get_or_set("d3", "B") == "B"  # over the bound: d1, the least recently used, goes
    assert len(decisions) == 3
    assert decisions.get_or_set("d1", "B") == "B"  # forgotten
    assert decisions.get_or_set("d0", "B") == "A"  # kept


async def test_newer_readme_config_stamps_the_revision_and_shares_follow_the_pool() -> None:
    specs = pods({"A": {"prefill": 1, "decode": 3}, "B": {"prefill": 1, "decode": 1}}, set_name="my-set")
    rig = Rig(NEWER_README_CONFIG, specs)
    assert rig.share("A", "max-role") == 0.75 and rig.share("B", "max-role") == 0.25
    decode, _, stamped = await rig.route({"x-disagg-slice": "nowhere"})
    assert stamped[HEADER] == decode
    for name in ("B-prefill-0", "B-decode-0"):
        rig.ds.delete(name)
    assert rig.share("B", "max-role") is None and rig.share("A", "max-role") == 1.0


DROP = object()  # newer_params: leave the key out (None writes it as null)


def newer_params(**gating: Any) -> dict[str, Any]:
    p: dict[str, Any] = yaml.safe_load(newer_config("sum"))["plugins"][0]["parameters"]
    for key, value in gating.items():
        if value is DROP:
            p["revisionGating"].pop(key)
        else:
            p["revisionGating"][key] = value
    return p


@pytest.mark.parametrize(
    ("gating", "message"),
    [
        (
            {"requiredRoles": DROP},
            "revisionGating.requiredRoles must contain at least one role when revisionGating.mode=sum",
        ),
        ({"requiredRoles": None}, "revisionGating.requiredRoles must contain at least one role"),
        ({"requiredRoles": []}, "revisionGating.requiredRoles must contain at least one role"),
        ({"requiredRoles": ["prefill", ""]}, "revisionGating.requiredRoles[1] must not be empty"),
        ({"requiredRoles": ["decode", "decode"]}, "revisionGating.requiredRoles contains duplicate role 'decode'"),
        ({"mode": "weighted"}, "revisionGating.mode 'weighted' must be one of sum|max-role|disabled"),
        ({"disableCoordination": "yes"}, "Expected `bool | null`"),
        (
            {"requireRoles": {"values": ["prefill"]}},
            "parameters mix the older shape (revisionGating.requireRoles) with the newer shape "
            "(revisionGating.revisionHeaderName, revisionGating.requiredRoles)",
        ),
        (  # `requireRoles: null` is written: the older shape, which then needs its values
            {"revisionHeaderName": DROP, "requiredRoles": DROP, "requireRoles": None},
            "revisionGating.requireRoles is required when revisionGating.mode=sum",
        ),
    ],
)
def test_newer_shape_config_errors_name_the_plugin_and_field(gating: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        registry.build(TYPE, "rollout-screener", newer_params(**gating))
    assert "plugin 'rollout-screener' (type disaggregatedset-rollout-screener)" in str(e.value)
    assert message in str(e.value)


def test_mixing_header_selectors_with_newer_keys_is_a_startup_error() -> None:
    config = newer_config("sum").replace(
        "    revisionGating:\n",
        "    headerSelectors: []\n    revisionGating:\n",
    )
    with pytest.raises(ConfigError, match=r"older shape \(headerSelectors\) with the newer shape"):
        build(load_config(config), datastore=Datastore(), metrics=EppMetrics())


@pytest.mark.parametrize(
    ("gating", "header", "coordinate"),
    [
        ({"revisionHeaderName": DROP}, "x-llm-d-disagg-revision", True),
        ({"revisionHeaderName": None}, "x-llm-d-disagg-revision", True),
        ({"revisionHeaderName": ""}, "x-llm-d-disagg-revision", True),
        ({"revisionHeaderName": " X-Disagg-Revision "}, "x-disagg-revision", True),
        ({"disableCoordination": None}, "x-llm-d-disagg-revision", True),
        ({"disableCoordination": False}, "x-llm-d-disagg-revision", True),
        ({"disableCoordination": True}, "x-llm-d-disagg-revision", False),
        ({"mode": "disabled", "requiredRoles": DROP}, "x-llm-d-disagg-revision", False),
        ({"mode": "disabled", "requiredRoles": None, "revisionHeaderName": DROP}, "x-llm-d-disagg-revision", False),
    ],
)
def test_newer_shape_defaults(gating: dict[str, Any], header: str, coordinate: bool) -> None:
    screener = registry.build(TYPE, "s", newer_params(**gating))
    assert isinstance(screener, DisaggregatedSetRolloutScreener)
    assert screener.shape == "newer" and screener.revision_header == header and screener.coordinate is coordinate
    assert screener.revision_label == REV and screener.role_label == ROLE
