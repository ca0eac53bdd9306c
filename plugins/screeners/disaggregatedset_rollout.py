"""`disaggregatedset-rollout-screener`: one DisaggregatedSet revision per request during a P/D rollout.

Two parameter shapes load (the older `headerSelectors` one and the newer `revisionHeaderName` one);
see the class docstring."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec
from msgspec import UNSET, UnsetType
from prometheus_client import CollectorRegistry, Counter, Gauge

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams
from llmepp.framework.requestcontrol import ResponseHeaderProcessor, Screener
from llmepp.observability.metrics import PREFIX, per_registry
from llmepp.request.clientids import bounded_id
from llmepp.request.types import InferenceRequest, ResponseInfo

log = logging.getLogger(__name__)

TYPE = "disaggregatedset-rollout-screener"
# Labels the LWS DisaggregatedSet controller puts on every pod it creates.
DEFAULT_REVISION_LABEL = "disaggregatedset.x-k8s.io/revision"
DEFAULT_ROLE_LABEL = "disaggregatedset.x-k8s.io/role"
# Newer shape: the request / response header carrying the revision, and the coordination ids.
DEFAULT_REVISION_HEADER = "x-llm-d-disagg-revision"
DECISION_ID_HEADER = "x-llm-d-revision-decision-id"
REQUEST_ID_HEADER = "x-request-id"
# The reference's local fallback (its PluginState): an entry unused this long is forgotten ...
DECISION_TTL = 300.0
# ... by a sweep at most this often.
DECISION_SWEEP_INTERVAL = 60.0
# Decision ids kept at most (least recently used forgotten first): ~100k ids x ~150 B = 15 MB.
DECISION_MAX_ENTRIES = 100_000

OLDER = "older"
NEWER = "newer"
STRICT = "strict"
PREFER = "prefer"
SUM = "sum"
MAX_ROLE = "max-role"
DISABLED = "disabled"

NO_MATCH_METRIC = PREFIX + "disaggregatedset_strict_header_no_match"  # older shape; exposed with _total
REVISION_NO_MATCH_METRIC = PREFIX + "disaggregatedset_strict_revision_no_match"  # newer shape; with _total
SHARE_METRIC = PREFIX + "disaggregatedset_revision_gating_share"


# -- parameters ---------------------------------------------------------------------------------
# A field that only one shape has is UNSET when the config does not write it: which of them are
# written tells the shapes apart (`null` counts as written).
class Scope(PluginParams):
    label_selector: str = ""


class HeaderSelector(PluginParams):
    name: str = ""
    header_name: str = ""
    label_key: str = ""
    mode: str = ""


class RequireRoles(PluginParams):
    values: list[str] = msgspec.field(default_factory=list)


class RevisionGating(PluginParams):
    mode: str = ""
    revision_label_key: str = DEFAULT_REVISION_LABEL
    role_label_key: str = DEFAULT_ROLE_LABEL
    # older shape only
    require_roles: RequireRoles | UnsetType | None = UNSET
    # newer shape only (`null` reads as the default, as Go's JSON decoding leaves the zero value)
    revision_header_name: str | UnsetType | None = UNSET
    required_roles: list[str] | UnsetType | None = UNSET
    disable_coordination: bool | UnsetType | None = UNSET


@dataclass(frozen=True, slots=True)
class _Selector:
    name: str
    header: str  # lower case, as request headers are
    label: str
    strict: bool


@dataclass(frozen=True, slots=True)
class Settings:
    """The parameters of either shape, validated and with defaults filled in."""

    shape: str  # OLDER | NEWER
    mode: str
    required: tuple[str, ...]
    revision_label: str
    role_label: str
    selectors: tuple[_Selector, ...]  # newer shape: the one strict revision-header selector
    revision_header: str  # newer shape ("" in the older one)
    coordinate: bool  # newer shape with gating on and disableCoordination unset / false


def _shape(p: DisaggregatedSetRolloutScreener.Params) -> str:
    g = p.revision_gating
    older = [
        field
        for field, value in (
            ("headerSelectors", p.header_selectors),
            ("revisionGating.requireRoles", g.require_roles),
        )
        if value is not UNSET
    ]
    newer = [
        field
        for field, value in (
            ("revisionGating.revisionHeaderName", g.revision_header_name),
            ("revisionGating.requiredRoles", g.required_roles),
            ("revisionGating.disableCoordination", g.disable_coordination),
        )
        if value is not UNSET
    ]
    if older and newer:
        raise ValueError(
            f"parameters mix the older shape ({', '.join(older)}) with the newer shape ({', '.join(newer)}); "
            "write one: headerSelectors + revisionGating.requireRoles.values, or "
            "revisionGating.revisionHeaderName / requiredRoles / disableCoordination"
        )
    return OLDER if older else NEWER


def _check_roles(roles: Sequence[str], field: str) -> None:
    for i, role in enumerate(roles):
        if not role:
            raise ValueError(f"{field}[{i}] must not be empty")
    if len(set(roles)) != len(roles):
        duplicate = next(r for r in roles if roles.count(r) > 1)
        raise ValueError(f"{field} contains duplicate role {duplicate!r}")


def _older(p: DisaggregatedSetRolloutScreener.Params, revision_label: str, role_label: str) -> Settings:
    selectors: list[_Selector] = []
    names: set[str] = set()
    headers: set[str] = set()
    found = p.header_selectors if not isinstance(p.header_selectors, UnsetType) else []
    for i, s in enumerate(found):
        header = s.header_name.strip().lower()
        for field, value in (("name", s.name), ("headerName", header), ("labelKey", s.label_key)):
            if not value:
                raise ValueError(f"headerSelectors[{i}].{field} is required")
        if s.mode not in (STRICT, PREFER):
            raise ValueError(f"headerSelectors[{i}].mode {s.mode!r} must be one of strict|prefer")
        if s.name in names:
            raise ValueError(f"headerSelectors: duplicate name {s.name!r}")
        if header in headers:
            raise ValueError(f"headerSelectors: duplicate headerName {header!r}")
        names.add(s.name)
        headers.add(header)
        selectors.append(_Selector(s.name, header, s.label_key, s.mode == STRICT))
    g = p.revision_gating
    required: tuple[str, ...] = ()
    if g.mode != DISABLED:
        if g.mode not in (SUM, MAX_ROLE):
            raise ValueError(f"revisionGating.mode {g.mode!r} must be one of sum|max-role|disabled")
        if not isinstance(g.require_roles, RequireRoles):
            raise ValueError(f"revisionGating.requireRoles is required when revisionGating.mode={g.mode}")
        roles = g.require_roles.values
        if not roles:
            raise ValueError("revisionGating.requireRoles.values must contain at least one role")
        _check_roles(roles, "revisionGating.requireRoles.values")
        required = tuple(roles)
    return Settings(OLDER, g.mode, required, revision_label, role_label, tuple(selectors), "", False)


def _newer(p: DisaggregatedSetRolloutScreener.Params, revision_label: str, role_label: str) -> Settings:
    g = p.revision_gating
    header = g.revision_header_name if isinstance(g.revision_header_name, str) else ""
    header = header.strip().lower() or DEFAULT_REVISION_HEADER
    required: tuple[str, ...] = ()
    if g.mode != DISABLED:
        if g.mode not in (SUM, MAX_ROLE):
            raise ValueError(f"revisionGating.mode {g.mode!r} must be one of sum|max-role|disabled")
        roles = g.required_roles if isinstance(g.required_roles, list) else []
        if not roles:
            raise ValueError(
                f"revisionGating.requiredRoles must contain at least one role when revisionGating.mode={g.mode}"
            )
        _check_roles(roles, "revisionGating.requiredRoles")
        required = tuple(roles)
    coordinate = g.mode != DISABLED and g.disable_coordination is not True
    selector = _Selector("revision", header, revision_label, strict=True)
    return Settings(NEWER, g.mode, required, revision_label, role_label, (selector,), header, coordinate)


def settings(p: DisaggregatedSetRolloutScreener.Params) -> Settings:
    """Validate either shape (ValueError naming the field) and fill in its defaults."""
    if not p.scope.label_selector.strip():
        raise ValueError("scope.labelSelector is required")
    try:
        parse_label_selector(p.scope.label_selector)
    except ValueError as e:
        raise ValueError(f"scope.labelSelector is not a valid label selector: {e}") from None
    shape = _shape(p)
    g = p.revision_gating
    revision_label = g.revision_label_key or DEFAULT_REVISION_LABEL
    role_label = g.role_label_key or DEFAULT_ROLE_LABEL
    if shape == OLDER:
        return _older(p, revision_label, role_label)
    return _newer(p, revision_label, role_label)


# -- Kubernetes label selectors (the string form, as `kubectl -l` and labels.Parse take it) -----
_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}"
_VALUE = rf"(?:{_NAME})?"
_EXISTS = re.compile(rf"\s*(!?)\s*({_KEY})\s*")
_EQUALITY = re.compile(rf"\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*")
_ORDER = re.compile(rf"\s*({_KEY})\s*([<>])\s*(-?[0-9]+)\s*")
_SET = re.compile(rf"\s*({_KEY})\s+(in|notin)\s*\(([^()]*)\)\s*")
_SET_VALUE = re.compile(_VALUE)

LabelTest = Callable[[Mapping[str, str]], bool]


def _split_terms(selector: str) -> list[str]:
    """The selector's requirements: split on commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return terms


def _order_test(key: str, op: str, bound: int) -> LabelTest:
    def test(labels: Mapping[str, str]) -> bool:
        value = labels.get(key)
        if value is None:
            return False
        try:
            number = int(value)
        except ValueError:
            return False
        return number > bound if op == ">" else number < bound

    return test


def _term(term: str) -> LabelTest:
    if m := _SET.fullmatch(term):
        key, op = m.group(1), m.group(2)
        values = frozenset(v.strip() for v in m.group(3).split(","))
        if not all(_SET_VALUE.fullmatch(v) for v in values):
            raise ValueError(f"invalid value in {term.strip()!r}")
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values  # an absent label satisfies notin
    if m := _EQUALITY.fullmatch(term):
        key, op, value = m.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _ORDER.fullmatch(term):
        return _order_test(m.group(1), m.group(2), int(m.group(3)))
    if m := _EXISTS.fullmatch(term):
        negated, key = m.groups()
        if negated:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise ValueError(f"cannot parse requirement {term.strip()!r}")


def parse_label_selector(selector: str) -> Callable[[Mapping[str, str]], bool]:
    """A Kubernetes label selector string (`a=b,c!=d,e in (f,g),h notin (i),j,!k,l>3`) as a test
    over a label map: every requirement must hold. Raises ValueError on a malformed selector."""
    if not selector.strip():
        raise ValueError("empty selector")
    tests = [_term(t) for t in _split_terms(selector)]
    return lambda labels: all(test(labels) for test in tests)


# -- revision shares ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RevisionDistribution:
    """Ready pods per revision and role (the pods in scope), and each covered revision's share.

    A revision is covered when every required role has at least one pod; only covered revisions
    have a share, and their shares sum to 1 (none while no revision is covered)."""

    role_counts: Mapping[str, Mapping[str, int]]
    shares: Mapping[str, float]


EMPTY = RevisionDistribution({}, {})


def revision_shares(counts: Mapping[str, Mapping[str, int]], required: Sequence[str], mode: str) -> dict[str, float]:
    """`sum`: weight = the revision's pods over all required roles. `max-role`: the required role
    with the most pods over all covered revisions (the first listed on a tie) is the dominant one,
    weight = the revision's pods of that role. share = weight / Σ weights."""
    covered = {rev: roles for rev, roles in counts.items() if all(roles.get(role, 0) > 0 for role in required)}
    if not covered:
        return {}
    if mode == MAX_ROLE:
        best_role, best_total = required[0], -1
        for role in required:
            role_total = sum(roles.get(role, 0) for roles in covered.values())
            if role_total > best_total:  # strictly greater: the first listed role wins a tie
                best_role, best_total = role, role_total
        weights = {rev: roles.get(best_role, 0) for rev, roles in covered.items()}
    else:
        weights = {rev: sum(roles.get(role, 0) for role in required) for rev, roles in covered.items()}
    total = sum(weights.values())
    return {rev: weight / total for rev, weight in weights.items()}


# -- metrics ------------------------------------------------------------------------------------
# One collector of each per registry (per_registry), shared by every instance (their plugin_name label
# tells them apart), made when the first instance that exports it is set up.
def _counter(registry: CollectorRegistry, name: str, documentation: str, labels: tuple[str, ...]) -> Counter:
    return per_registry(registry, name, lambda r: Counter(name, documentation, labels, registry=r))


def _share_gauge(registry: CollectorRegistry) -> Gauge:
    return per_registry(
        registry,
        SHARE_METRIC,
        lambda r: Gauge(
            SHARE_METRIC,
            "Current weighted revision gating share from 0 to 1; incomplete revisions have share 0.",
            ("plugin_type", "plugin_name", "mode", "revision"),
            registry=r,
        ),
    )


# -- revision decisions (newer shape) -----------------------------------------------------------
class RevisionDecisions:
    """Get-or-set of one revision per decision id, in this process: the first revision stored for an
    id is the answer for every later request carrying it. An entry is forgotten `ttl` seconds after
    its last use (a lookup past that reads as absent; a sweep at most every `sweep_interval`
    seconds drops such entries), as the reference's local PluginState fallback forgets them.
    Unlike the reference's, the store is bounded: past `max_entries` the least recently used id is
    forgotten first (a rollout at 1,000 requests/s would otherwise hold ~300k ids for the TTL).
    Entries are kept in last-use order, so a sweep stops at the first fresh one."""

    def __init__(
        self,
        ttl: float = DECISION_TTL,
        sweep_interval: float = DECISION_SWEEP_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DECISION_MAX_ENTRIES,
    ) -> None:
        self.ttl = ttl
        self.sweep_interval = sweep_interval
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[str, tuple[str, float]] = {}  # id → (revision, last use), oldest use first
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_set(self, decision_id: str, candidate: str) -> str:
        decision_id = bounded_id(decision_id)  # client input: it must not choose the store's size
        now = self.clock()
        if now - self._swept >= self.sweep_interval:
            self._sweep(now)
        entries = self._entries
        entry = entries.pop(decision_id, None)
        revision = entry[0] if entry is not None and now - entry[1] <= self.ttl else candidate
        entries[decision_id] = (revision, now)  # re-inserted: the most recently used
        if len(entries) > self.max_entries:
            del entries[next(iter(entries))]
        return revision

    def _sweep(self, now: float) -> None:
        self._swept = now
        entries = self._entries
        while entries:
            oldest = next(iter(entries))
            if now - entries[oldest][1] <= self.ttl:
                return
            del entries[oldest]


class DisaggregatedSetRolloutScreener(Screener, ResponseHeaderProcessor):
    """Keeps a request's prefill and decode picks on one LWS DisaggregatedSet revision while a
    rollout has pods of two (or more) revisions in the pool, and shares traffic between revisions
    by their ready pods. Configs of two versions of the reference load: the older `headerSelectors`
    shape and the newer `revisionHeaderName` shape (below).

    Why: every prefill and decode pod of one DisaggregatedSet version carries the same
    `disaggregatedset.x-k8s.io/revision` label. Pods of different revisions may disagree on the
    KV-cache format or transfer protocol, so a prefill on revision A must never hand its KV cache
    to a decode on revision B. Screening runs once per request before every scheduling profile,
    so decode and prefill both choose from the same single revision and no filter, scorer or
    picker can undo it.

    Shapes, told apart by the keys the config writes (a key written as null counts):
      older: `scope.labelSelector` (required; Kubernetes selector string), `headerSelectors`
        ([]: each `name` (metric label, unique), `headerName` (case-insensitive, unique),
        `labelKey`, `mode` strict|prefer; all required), `revisionGating` (required): `mode`
        sum|max-role|disabled (required), `requireRoles.values` (required, non-empty, unique, for
        sum and max-role), `revisionLabelKey`, `roleLabelKey`. Its own keys: `headerSelectors`,
        `revisionGating.requireRoles`. Source: the reference version this plugin was first written
        to (our reference notes), unchanged here.
      newer: `scope.labelSelector` (as above), `revisionGating` (required): `mode`
        sum|max-role|disabled (required), `requiredRoles` (a list; required, non-empty, unique,
        for sum and max-role), `revisionHeaderName` (default `x-llm-d-disagg-revision`; matched
        lower-cased), `revisionLabelKey`, `roleLabelKey`, `disableCoordination` (default false).
        Its own keys: `revisionGating.revisionHeaderName`, `.requiredRoles`,
        `.disableCoordination`. Source: llm-d/llm-d-router
        pkg/epp/framework/plugins/requestcontrol/screener/disaggregatedsetrollout @5fb3f2c
        (config.go, screener.go, plugin.go, README.md: every key but `disableCoordination`, the
        defaults, the errors, the decision-id coordination) and its red-hat-data-services fork,
        same path (config.go @bcd914a, screener.go / README.md / metrics.go @1f2d25d, plugin.go
        @3162a00: `disableCoordination`, coordination only while more than one revision is seen);
        header names from pkg/common/request/constants.go there.
      Both: `revisionLabelKey` (`disaggregatedset.x-k8s.io/revision`), `roleLabelKey`
        (`disaggregatedset.x-k8s.io/role`); role label values must equal the required role names
        (e.g. `prefill`, `decode`). A config with keys of both shapes is a start-up error naming
        them. A config with neither's keys (`mode: disabled` with only the common keys; the
        gating modes need roles) is read as the newer shape: its revision header is then strict
        and stamped; in the older shape it would do nothing at all.

    Per request, older shape, with revision gating on (`mode: sum | max-role`):
      1. coverage: keep candidates whose revision is covered (each required role has at least one
         pod of that revision, see below); a candidate without the revision label is dropped;
      2. strict header selectors: for each `mode: strict` selector whose header the request sends
         (non-empty), keep the candidates with `label[labelKey] == header`; when none match the
         request fails closed (503) and `..._strict_header_no_match_total{selector}` counts it;
      3. weighted choice: if the candidates left span more than one revision, draw one revision
         with P(rev) = share(rev) / Σ shares of the revisions left, and keep only its candidates.
      A strict selector on the revision label (`x-disagg-revision: B`, forwarded by a coordinator
      from the prefill EPP's response) pins the request to B; an uncovered or unknown B fails
      closed, never another revision. No covered revision: 503.
    Per request, newer shape, with gating on: the same with one strict selector, the revision
    header (`revisionHeaderName` on the revision label), and coordination:
      1. coverage, as above;
      2. a request sending the revision header (non-empty) keeps that revision's covered
         candidates and makes no choice; none: 503, counted in
         `..._strict_revision_no_match_total` (also when no revision at all is covered);
      3. otherwise one revision is drawn as in step 3 above (also when only one is left), and
         then coordinated (below) when coordination is on; the request keeps the candidates of
         the coordinated revision; if that one is not among its covered candidates: 503.
    `mode: disabled` (both shapes): no coverage check and no choice, only the strict header(s),
    so all candidates go on to scheduling; as in the references that alone does NOT keep one
    EPP's profiles on one revision: it is for a two-EPP flow where the decode EPP receives the
    strict revision header.

    Coordination (newer shape; what it means and what is done here): a coordinator (llm-d's)
    splits one user request into phase requests, each routed by an EPP. In P/D with separate EPPs
    the prefill EPP's stamped revision header is forwarded to the decode request, which is
    therefore strict and needs nothing else. Parallel requests of one logical request (E/P/D:
    one encode sub-request per image) cannot wait for that header; the coordinator gives them one
    `x-llm-d-revision-decision-id` (and the same `x-request-id`), and a get-or-set keyed by it
    (else by `x-request-id`, else by the request id this EPP generated) makes the first drawn
    revision the answer for all of them. The reference does the get-or-set in a
    CrossReplicaSyncer shared by its replicas (e.g. Redis), or without one in process-local state
    (entries forgotten 5 minutes after last use); this build has no CrossReplicaSyncer
    (`dataLayer.crossReplicaSyncerPluginRef` is accepted and unused), so it is always the local
    one (`RevisionDecisions`, per plugin instance): requests of one decision id that reach THIS
    EPP process get one revision; spread over several EPP replicas they may not (as in the
    reference without a syncer). One request never needs it: screening runs once for all its
    profiles. As in the fork, the get-or-set happens only while the counted pods span more than
    one revision (outside a rollout every request can only get the one revision) and never with
    `disableCoordination: true` (fine for sequential P/D, wrong for parallel E/P/D); llm-d
    @5fb3f2c, which has no `disableCoordination`, did it for every unpinned request with gating on.

    Shares (both shapes): the pods counted are the pool's endpoints (the EPP's datastore)
    matching `scope.labelSelector` that carry both the revision and the role label, one per pod
    (data-parallel ranks of a pod count once), recounted whenever pool membership or labels
    change. `sum`: weight(rev) = Σ over required roles of its pods. `max-role`: the required role
    with the most pods over all covered revisions (the first listed on a tie) is dominant for the
    whole distribution, weight(rev) = its pods of that role. share = weight / Σ weights. E.g.
    A = {prefill 2, decode 9}, B = {prefill 1, decode 1}: sum → A 11/13, B 2/13; max-role
    (decode dominant, 10 > 3) → A 0.9, B 0.1.

    Response header (whatever the gating mode): the request's routed endpoint (the primary pick:
    the decode pod in P/D) has its label value copied into the response header when the label is
    set. Older shape: every selector, strict or prefer, its `labelKey` into its `headerName`
    (`prefer` selectors do nothing else: pair them with a `header-label-affinity-scorer`). Newer
    shape: its revision into `revisionHeaderName`.

    Metrics: older shape `llm_d_epp_disaggregatedset_strict_header_no_match_total{plugin_type,
    plugin_name, selector}` (a series per strict selector); newer shape
    `llm_d_epp_disaggregatedset_strict_revision_no_match_total{plugin_type, plugin_name}`; both
    exist from start-up at 0. Both shapes: `llm_d_epp_disaggregatedset_revision_gating_share
    {plugin_type, plugin_name, mode, revision}` for every revision with counted pods (0 for an
    uncovered one; a revision's series is removed when its last pod leaves; only with gating on).

    Where this differs from the references, and why:
      * the references learn pods from a Kubernetes Pod watch (pods matching the scope, inside the
        InferencePool or not); here they are the pool's endpoints (in Kubernetes mode exactly its
        Ready pods). A pool whose pods are all one role (one EPP per role) can then never cover
        `[prefill, decode]`: use `mode: disabled` there with the forwarded strict header, as the
        references document for two EPPs. There is no start-up window without pod information:
        the shares are counted from the pool the request is routed in.
      * the fork also counts NotReady pods as "seen", so a starting revision turns coordination on
        before it can take traffic. Here only pool (Ready) pods are seen: coordination turns on
        with the second revision's first pod in the pool, still before that revision is covered
        unless its first pods of every required role join in one pool update (or one role is
        required); requests of one decision id straddling that moment may then differ.
      * older shape: the reference skips the weighted choice whenever any strict header is
        present; here it is made among the revisions left after strict screening, so a strict
        selector on another label (a slice) cannot let decode and prefill land on different
        revisions.
    """

    type = TYPE

    class Params(PluginParams):
        scope: Scope
        revision_gating: RevisionGating
        header_selectors: list[HeaderSelector] | UnsetType = UNSET  # older shape only

        def __post_init__(self) -> None:
            settings(self)

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        s = settings(params)
        self.settings = s
        self.shape = s.shape
        self.mode = s.mode
        self.gating = s.mode in (SUM, MAX_ROLE)
        self.required = s.required
        self.revision_label = s.revision_label
        self.role_label = s.role_label
        self.revision_header = s.revision_header
        self.coordinate = s.coordinate
        self.in_scope = parse_label_selector(params.scope.label_selector)
        self.selectors = s.selectors
        self.strict = tuple(sel for sel in self.selectors if sel.strict)
        self.rng = random.Random()
        self.decisions = RevisionDecisions()
        self.distribution = EMPTY
        self._datastore: object = None
        self._counted: tuple[Endpoint, ...] | None = None  # the pool snapshot `distribution` was counted from
        self._no_match: dict[str, Counter] = {}
        self._share_gauge: Gauge | None = None

    def setup(self, ctx: PluginContext) -> None:
        registry = ctx.metrics.registry if ctx.metrics is not None else CollectorRegistry()
        # Children resolved once (.labels() costs a lock and a dict build); visible at 0 from start-up.
        if self.shape == OLDER:
            older = _counter(
                registry,
                NO_MATCH_METRIC,
                "Strict header selections that matched no endpoint and failed closed.",
                ("plugin_type", "plugin_name", "selector"),
            )
            self._no_match = {s.name: older.labels(TYPE, self.name, s.name) for s in self.strict}
        else:
            newer = _counter(
                registry,
                REVISION_NO_MATCH_METRIC,
                "Strict revision selections that matched no endpoint and failed closed.",
                ("plugin_type", "plugin_name"),
            )
            self._no_match = {s.name: newer.labels(TYPE, self.name) for s in self.strict}
        share = _share_gauge(registry)
        self._share_gauge = share
        if not self.gating:
            return
        if ctx.datastore is None:
            raise ConfigError("revision gating needs the endpoint datastore")
        self._datastore = ctx.datastore
        ctx.datastore.on_change(self._recount)  # keeps the share gauge current without requests
        self._recount()
        if self.coordinate:
            log.info(
                "%s: revision decisions are coordinated within this EPP process only (no CrossReplicaSyncer)",
                self.name,
            )

    # -- shares -----------------------------------------------------------------------------------
    def _current(self) -> RevisionDistribution:
        pool = getattr(self._datastore, "endpoints", None)
        if pool is not self._counted:
            self._recount()
        return self.distribution

    def _recount(self) -> None:
        pool: tuple[Endpoint, ...] = getattr(self._datastore, "endpoints", ())
        self._counted = pool
        pods: dict[tuple[str, str], tuple[str, str]] = {}
        for ep in pool:
            labels = ep.spec.labels
            revision = labels.get(self.revision_label)
            role = labels.get(self.role_label)
            if revision and role and self.in_scope(labels):
                pods[(ep.spec.namespace, ep.spec.pod)] = (revision, role)
        counts: dict[str, dict[str, int]] = {}
        for revision, role in pods.values():
            roles = counts.setdefault(revision, {})
            roles[role] = roles.get(role, 0) + 1
        previous = self.distribution
        self.distribution = RevisionDistribution(counts, revision_shares(counts, self.required, self.mode))
        if previous.role_counts != counts or previous.shares != self.distribution.shares:
            log.info("%s: revision shares %s from ready pods %s", self.name, dict(self.distribution.shares), counts)
        self._export(previous)

    def _export(self, previous: RevisionDistribution) -> None:
        gauge = self._share_gauge
        if gauge is None:
            return
        current = self.distribution
        for revision in previous.role_counts:
            if revision not in current.role_counts:
                with contextlib.suppress(KeyError):  # never set (no setup before a recount)
                    gauge.remove(TYPE, self.name, self.mode, revision)
        for revision in current.role_counts:
            gauge.labels(TYPE, self.name, self.mode, revision).set(current.shares.get(revision, 0.0))

    # -- Screener ---------------------------------------------------------------------------------
    def screen(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        kept: Sequence[Endpoint] = candidates
        shares: Mapping[str, float] = {}
        key = self.revision_label
        headers = request.headers
        if self.gating:
            shares = self._current().shares
            kept = [ep for ep in kept if ep.spec.labels.get(key, "") in shares]
            if not kept:
                if self.shape == NEWER and headers.get(self.revision_header):
                    self._no_match[self.strict[0].name].inc()  # the newer reference counts every failed pin
                return kept
        for selector in self.strict:
            wanted = headers.get(selector.header)
            if not wanted:
                continue
            label = selector.label
            matched = [ep for ep in kept if ep.spec.labels.get(label) == wanted]
            if not matched:
                counter = self._no_match.get(selector.name)
                if counter is not None:
                    counter.inc()
                return matched
            kept = matched
        if not self.gating:
            return kept
        if self.coordinate and not headers.get(self.revision_header) and len(self.distribution.role_counts) > 1:
            return self._coordinated(request, kept, shares)
        return self._one_revision(kept, shares)

    def _draw(self, revisions: Sequence[str], shares: Mapping[str, float]) -> str:
        """One of `revisions` (sorted: the same draw always picks the same one), P ∝ share."""
        x = self.rng.random() * sum(shares[r] for r in revisions)
        for revision in revisions:
            x -= shares[revision]
            if x < 0:
                return revision
        return revisions[-1]

    def _one_revision(self, candidates: Sequence[Endpoint], shares: Mapping[str, float]) -> Sequence[Endpoint]:
        key = self.revision_label
        present = {ep.spec.labels[key] for ep in candidates}
        if len(present) <= 1:
            return candidates
        chosen = self._draw(sorted(present), shares)
        return [ep for ep in candidates if ep.spec.labels[key] == chosen]

    def _coordinated(
        self, request: InferenceRequest, candidates: Sequence[Endpoint], shares: Mapping[str, float]
    ) -> Sequence[Endpoint]:
        """Newer shape: this request's draw, unless an earlier request of its decision id decided."""
        key = self.revision_label
        chosen = self._draw(sorted({ep.spec.labels[key] for ep in candidates}), shares)
        headers = request.headers
        decision_id = headers.get(DECISION_ID_HEADER) or headers.get(REQUEST_ID_HEADER) or request.request_id
        if decision_id:
            drawn, chosen = chosen, self.decisions.get_or_set(decision_id, chosen)
            if chosen != drawn:
                log.debug("%s: decision %s already chose revision %s", self.name, decision_id, chosen)
        return [ep for ep in candidates if ep.spec.labels[key] == chosen]

    # -- ResponseHeaderProcessor ------------------------------------------------------------------
    def response_headers(
        self, request: InferenceRequest, response: ResponseInfo, headers: dict[str, str]
    ) -> dict[str, str] | None:
        result = request.scheduling
        if result is None or not self.selectors:
            return None
        targets = result.targets
        if not targets:
            return None
        labels = targets[0].spec.labels
        stamped = {s.header: value for s in self.selectors if (value := labels.get(s.label))}
        return stamped or None
