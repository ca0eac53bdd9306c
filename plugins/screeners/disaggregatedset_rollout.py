"""`disaggregatedset-rollout-screener`: one DisaggregatedSet revision per request during a P/D rollout."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams
from llmepp.framework.requestcontrol import ResponseHeaderProcessor, Screener
from llmepp.observability.metrics import PREFIX
from llmepp.request.types import InferenceRequest, ResponseInfo

log = logging.getLogger(__name__)

TYPE = "disaggregatedset-rollout-screener"
# Labels the LWS DisaggregatedSet controller puts on every pod it creates.
DEFAULT_REVISION_LABEL = "disaggregatedset.x-k8s.io/revision"
DEFAULT_ROLE_LABEL = "disaggregatedset.x-k8s.io/role"

STRICT = "strict"
PREFER = "prefer"
SUM = "sum"
MAX_ROLE = "max-role"
DISABLED = "disabled"

NO_MATCH_METRIC = PREFIX + "disaggregatedset_strict_header_no_match"  # exposed with _total
SHARE_METRIC = PREFIX + "disaggregatedset_revision_gating_share"


# -- parameters ---------------------------------------------------------------------------------
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
    require_roles: RequireRoles | None = None
    revision_label_key: str = DEFAULT_REVISION_LABEL
    role_label_key: str = DEFAULT_ROLE_LABEL


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
# One collector pair per registry, shared by every instance (their plugin_name label tells them apart).
_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Gauge]] = weakref.WeakKeyDictionary()


def _collectors(registry: CollectorRegistry) -> tuple[Counter, Gauge]:
    found = _COLLECTORS.get(registry)
    if found is None:
        no_match = Counter(
            NO_MATCH_METRIC,
            "Strict header selections that matched no endpoint and failed closed.",
            ("plugin_type", "plugin_name", "selector"),
            registry=registry,
        )
        share = Gauge(
            SHARE_METRIC,
            "Current weighted revision gating share from 0 to 1; incomplete revisions have share 0.",
            ("plugin_type", "plugin_name", "mode", "revision"),
            registry=registry,
        )
        found = _COLLECTORS[registry] = (no_match, share)
    return found


@dataclass(frozen=True, slots=True)
class _Selector:
    name: str
    header: str  # lower case, as request headers are
    label: str
    strict: bool


class DisaggregatedSetRolloutScreener(Screener, ResponseHeaderProcessor):
    """Keeps a request's prefill and decode picks on one LWS DisaggregatedSet revision while a
    rollout has pods of two (or more) revisions in the pool, and shares traffic between revisions
    by their ready pods.

    Why: every prefill and decode pod of one DisaggregatedSet version carries the same
    `disaggregatedset.x-k8s.io/revision` label. Pods of different revisions may disagree on the
    KV-cache format or transfer protocol, so a prefill on revision A must never hand its KV cache
    to a decode on revision B. Screening runs once per request before every scheduling profile,
    so decode and prefill both choose from the same single revision and no filter, scorer or
    picker can undo it.

    Per request (screen), with revision gating on (`mode: sum | max-role`):
      1. coverage: keep candidates whose revision is covered (each of `requireRoles.values` has
         at least one pod of that revision, see below); a candidate without the revision label
         is dropped;
      2. strict header selectors: for each `mode: strict` selector whose header the request sends
         (non-empty), keep the candidates with `label[labelKey] == header`; when none match the
         request fails closed (503) and `..._strict_header_no_match_total{selector}` counts it;
      3. weighted choice: if the candidates left span more than one revision, draw one revision
         with P(rev) = share(rev) / Σ shares of the revisions left, and keep only its candidates.
    A request carrying a strict selector on the revision label (`x-disagg-revision: B`, e.g.
    forwarded by a coordinator from the prefill EPP's response) is therefore pinned to B; an
    uncovered or unknown B fails closed, never another revision. No covered revision: 503.
    With `mode: disabled`: no coverage check and no choice (step 2 only), so all candidates go on
    to scheduling; as in the reference that alone does NOT keep one EPP's profiles on one
    revision, it is for a two-EPP flow where the decode EPP receives the strict revision header.

    Shares: the pods counted are the pool's endpoints (the EPP's datastore) matching
    `scope.labelSelector` that carry both the revision and the role label, one per pod
    (data-parallel ranks of a pod count once), recounted whenever pool membership or labels
    change. `sum`: weight(rev) = Σ over required roles of its pods. `max-role`: the required role
    with the most pods over all covered revisions (the first listed on a tie) is dominant for the
    whole distribution, weight(rev) = its pods of that role. share = weight / Σ weights. E.g.
    A = {prefill 2, decode 9}, B = {prefill 1, decode 1}: sum → A 11/13, B 2/13; max-role
    (decode dominant, 10 > 3) → A 0.9, B 0.1.

    Response header (every selector, strict or prefer, whatever the gating mode): the request's
    routed endpoint (the primary pick: the decode pod in P/D) has its `labelKey` value copied
    into `headerName` on the client response, when the label is set. `prefer` selectors do
    nothing else: pair them with a `header-label-affinity-scorer` for the soft preference.

    Parameters (the reference's): `scope.labelSelector` (required; Kubernetes selector string),
    `headerSelectors` ([]: each `name` (metric label, unique), `headerName` (case-insensitive,
    unique), `labelKey`, `mode` strict|prefer; all required), `revisionGating` (required):
    `mode` sum|max-role|disabled (required), `requireRoles.values` (required, non-empty, unique,
    for sum and max-role), `revisionLabelKey` (`disaggregatedset.x-k8s.io/revision`),
    `roleLabelKey` (`disaggregatedset.x-k8s.io/role`). Role label values must equal the
    required role names (e.g. `prefill`, `decode`).

    Metrics: `llm_d_epp_disaggregatedset_strict_header_no_match_total{plugin_type, plugin_name,
    selector}` (a series per strict selector exists from start-up at 0) and
    `llm_d_epp_disaggregatedset_revision_gating_share{plugin_type, plugin_name, mode, revision}`
    for every revision with counted pods (0 for an uncovered one; a revision's series is removed
    when its last pod leaves; only with gating on).

    Where this differs from the reference, and why:
      * the reference learns pods from a Kubernetes Pod watch (Ready pods matching the scope,
        inside the InferencePool or not); here they are the pool's endpoints (in Kubernetes mode
        exactly its Ready pods). A pool whose pods are all one role (one EPP per role) can then
        never cover `[prefill, decode]`: use `mode: disabled` there with the forwarded strict
        header, as the reference documents for two EPPs. There is no start-up window without pod
        information: the shares are counted from the pool the request is routed in.
      * the reference skips the weighted choice whenever any strict header is present; here it is
        made among the revisions left after strict screening, so a strict selector on another
        label (a slice) cannot let decode and prefill land on different revisions.
    """

    type = TYPE

    class Params(PluginParams):
        scope: Scope
        revision_gating: RevisionGating
        header_selectors: list[HeaderSelector] = msgspec.field(default_factory=list)

        def __post_init__(self) -> None:
            if not self.scope.label_selector.strip():
                raise ValueError("scope.labelSelector is required")
            try:
                parse_label_selector(self.scope.label_selector)
            except ValueError as e:
                raise ValueError(f"scope.labelSelector is not a valid label selector: {e}") from None
            names: set[str] = set()
            headers: set[str] = set()
            for i, s in enumerate(self.header_selectors):
                s.header_name = s.header_name.strip().lower()
                for field, value in (("name", s.name), ("headerName", s.header_name), ("labelKey", s.label_key)):
                    if not value:
                        raise ValueError(f"headerSelectors[{i}].{field} is required")
                if s.mode not in (STRICT, PREFER):
                    raise ValueError(f"headerSelectors[{i}].mode {s.mode!r} must be one of strict|prefer")
                if s.name in names:
                    raise ValueError(f"headerSelectors: duplicate name {s.name!r}")
                if s.header_name in headers:
                    raise ValueError(f"headerSelectors: duplicate headerName {s.header_name!r}")
                names.add(s.name)
                headers.add(s.header_name)
            g = self.revision_gating
            g.revision_label_key = g.revision_label_key or DEFAULT_REVISION_LABEL
            g.role_label_key = g.role_label_key or DEFAULT_ROLE_LABEL
            if g.mode == DISABLED:
                return
            if g.mode not in (SUM, MAX_ROLE):
                raise ValueError(f"revisionGating.mode {g.mode!r} must be one of sum|max-role|disabled")
            if g.require_roles is None:
                raise ValueError(f"revisionGating.requireRoles is required when revisionGating.mode={g.mode}")
            roles = g.require_roles.values
            if not roles:
                raise ValueError("revisionGating.requireRoles.values must contain at least one role")
            for i, role in enumerate(roles):
                if not role:
                    raise ValueError(f"revisionGating.requireRoles.values[{i}] must not be empty")
            if len(set(roles)) != len(roles):
                duplicate = next(r for r in roles if roles.count(r) > 1)
                raise ValueError(f"revisionGating.requireRoles.values contains duplicate role {duplicate!r}")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        g = params.revision_gating
        self.mode = g.mode
        self.gating = g.mode in (SUM, MAX_ROLE)
        self.required: tuple[str, ...] = tuple(g.require_roles.values) if g.require_roles is not None else ()
        self.revision_label = g.revision_label_key
        self.role_label = g.role_label_key
        self.in_scope = parse_label_selector(params.scope.label_selector)
        self.selectors = tuple(
            _Selector(s.name, s.header_name, s.label_key, s.mode == STRICT) for s in params.header_selectors
        )
        self.strict = tuple(s for s in self.selectors if s.strict)
        self.rng = random.Random()
        self.distribution = EMPTY
        self._datastore: object = None
        self._counted: tuple[Endpoint, ...] | None = None  # the pool snapshot `distribution` was counted from
        self._no_match: dict[str, Counter] = {}
        self._share_gauge: Gauge | None = None

    def setup(self, ctx: PluginContext) -> None:
        registry = ctx.metrics.registry if ctx.metrics is not None else CollectorRegistry()
        no_match, share = _collectors(registry)
        # Children resolved once (.labels() costs a lock and a dict build); visible at 0 from start-up.
        self._no_match = {s.name: no_match.labels(TYPE, self.name, s.name) for s in self.strict}
        self._share_gauge = share
        if not self.gating:
            return
        if ctx.datastore is None:
            raise ConfigError("revision gating needs the endpoint datastore")
        self._datastore = ctx.datastore
        ctx.datastore.on_change(self._recount)  # keeps the share gauge current without requests
        self._recount()

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
        if self.gating:
            shares = self._current().shares
            kept = [ep for ep in kept if ep.spec.labels.get(key, "") in shares]
            if not kept:
                return kept
        headers = request.headers
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
        if self.gating:
            kept = self._one_revision(kept, shares)
        return kept

    def _one_revision(self, candidates: Sequence[Endpoint], shares: Mapping[str, float]) -> Sequence[Endpoint]:
        key = self.revision_label
        present = {ep.spec.labels[key] for ep in candidates}
        if len(present) <= 1:
            return candidates
        revisions = sorted(present)  # a fixed order: the same draw always picks the same revision
        x = self.rng.random() * sum(shares[r] for r in revisions)
        chosen = revisions[-1]
        for revision in revisions:
            x -= shares[revision]
            if x < 0:
                chosen = revision
                break
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
