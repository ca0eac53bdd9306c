"""InferenceModelRewrite: which model a request is sent upstream as (reference §10).

    rule lookup   for the request's `model`: a rule with an exact `matches[].model.value`
                  beats a catch-all rule (empty `matches`); between rules of the same kind
                  the oldest resource (creationTimestamp, then name) wins; inside a resource
                  the first rule in list order wins
    target        weighted random over the rule's `targets` (weight/Σweights); targets
                  without weights, or all weights 0, split uniformly; with mixed weights
                  the unweighted targets are never chosen (as in the reference)
    bad rules     a rule without targets, or whose `matches` name no model, is skipped
                  (logged, counted in `RewriteSync.rejected`, exported as
                  `llm_d_epp_kubernetes_informer_rejected_total`) — never a catch-all

`ModelRewriteStore` is fed by the informer handler `RewriteSync` (only rewrites whose
`poolRef` names our pool) and rebuilds a model → rule index on every change, so the
request path does one dict lookup. `ModelRewriter.rewrite(request)` is what the director
calls: it sets `request.target_model` (and decodes the body so the director can re-encode
it with the new `model`); the ext_proc layer rewrites the model name in the response back.
A rule matching the client's model overrides the `x-llm-d-model-name-rewrite` header's target, as in the
reference (director.go modelRewriteIfNeeded: the header sets the target, a rule may override it).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

from llmepp.decoding import DECODE_ERRORS
from llmepp.errors import BadRequest
from llmepp.k8s.models import InferenceModelRewrite
from llmepp.k8s.objectives import refers_to_pool
from llmepp.observability.metrics import MAX_LABEL_VALUE_CHARS, OVERFLOW_LABEL, PREFIX
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    model: str
    weight: int


@dataclass(frozen=True, slots=True)
class Rule:
    source: str  # the InferenceModelRewrite's name (metric label)
    models: frozenset[str]  # exact matches; empty = catch-all
    targets: tuple[Target, ...]
    weighted: bool  # False: uniform choice
    # Running sums of the weights, once per rule rather than per request (the same draw as `weights=`).
    cum_weights: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cum_weights", tuple(accumulate(t.weight for t in self.targets)))

    def choose(self, rng: random.Random) -> str:
        if len(self.targets) == 1:
            return self.targets[0].model
        if not self.weighted:
            return rng.choice(self.targets).model
        return rng.choices(self.targets, cum_weights=self.cum_weights)[0].model


@dataclass(frozen=True, slots=True)
class _Rewrite:
    created: str
    rules: tuple[Rule, ...]


def rules_of(obj: InferenceModelRewrite, skipped: list[str] | None = None) -> tuple[Rule, ...]:
    """The usable rules of `obj`. A rule the API server let through but that cannot apply is left out, with
    the reason appended to `skipped`: one without targets (the reference picks it and answers 400 "model not
    found"; here the next rule in precedence applies), or one whose `matches` name no model (a rule is a
    catch-all only when `matches` is empty, as in the reference: it must never become one by accident)."""
    name = obj.metadata.name
    rules = []
    for i, r in enumerate(obj.spec.rules):
        targets = tuple(Target(t.model_rewrite, max(t.weight or 0, 0)) for t in r.targets if t.model_rewrite)
        if not targets:
            if skipped is not None:
                skipped.append(f"rules[{i}] has no target with a modelRewrite")
            continue
        models = frozenset(m.model.value for m in r.matches if m.model is not None and m.model.value)
        if r.matches and not models:
            if skipped is not None:
                skipped.append(f"rules[{i}] has matches but none names a model")
            continue
        if any(t.weight is not None and t.weight < 0 for t in r.targets):
            log.warning("model rewrite %s: rules[%d]: a negative weight counts as 0", name, i)
        weighted = sum(t.weight is not None for t in r.targets if t.model_rewrite)
        if 0 < weighted < len(targets):
            log.warning("model rewrite %s: rules[%d]: targets without a weight are never chosen", name, i)
        rules.append(Rule(name, models, targets, weighted=any(t.weight for t in targets)))
    return tuple(rules)


class ModelRewriteStore:
    """Rewrite objects by name → an index model → winning rule, plus the winning catch-all."""

    def __init__(self) -> None:
        self._rewrites: dict[str, _Rewrite] = {}
        self._exact: dict[str, Rule] = {}
        self._catch_all: Rule | None = None

    def set(self, name: str, created: str, rules: tuple[Rule, ...]) -> None:
        self._rewrites[name] = _Rewrite(created, rules)
        self._rebuild()

    def delete(self, name: str) -> None:
        if self._rewrites.pop(name, None) is not None:
            self._rebuild()

    def clear(self) -> None:
        self._rewrites.clear()
        self._rebuild()

    def rule_for(self, model: str) -> Rule | None:
        rule = self._exact.get(model)
        return rule if rule is not None else self._catch_all

    def __len__(self) -> int:
        return len(self._rewrites)

    def _rebuild(self) -> None:
        exact: dict[str, Rule] = {}
        catch_all: Rule | None = None
        # Oldest resource first, then rule order: the first rule seen for a model wins.
        for _name, rewrite in sorted(self._rewrites.items(), key=lambda kv: (kv[1].created, kv[0])):
            for rule in rewrite.rules:
                if not rule.models:
                    if catch_all is None:
                        catch_all = rule
                    continue
                for model in rule.models:
                    exact.setdefault(model, rule)
        # Readers see the old or the new index, never a half-built one.
        self._exact, self._catch_all = exact, catch_all


class RewriteSync:
    """Informer handler: the pool's InferenceModelRewrites → `store`."""

    def __init__(self, store: ModelRewriteStore, pool_name: str, pool_group: str) -> None:
        self.store = store
        self.pool_name = pool_name
        self.pool_group = pool_group
        self.rejected = 0  # rules left out because they cannot apply (each logged)

    def upsert(self, obj: InferenceModelRewrite) -> None:
        name = obj.metadata.name
        if not refers_to_pool(obj.spec.pool_ref, self.pool_name, self.pool_group) or obj.metadata.deletion_timestamp:
            self.store.delete(name)
            return
        skipped: list[str] = []
        rules = rules_of(obj, skipped)
        for reason in skipped:
            log.warning("model rewrite %s: %s: rule skipped", name, reason)
        self.rejected += len(skipped)
        log.info("model rewrite %s: %d rules", name, len(rules))
        self.store.set(name, obj.metadata.creation_timestamp, rules)

    def delete(self, obj: InferenceModelRewrite) -> None:
        self.store.delete(obj.metadata.name)


MAX_DECISION_SERIES = 1000


class ModelRewriter:
    """Applies the store's rules to requests (called by the director before admission)."""

    def __init__(
        self, store: ModelRewriteStore, registry: CollectorRegistry | None, rng: random.Random | None = None
    ) -> None:
        self.store = store
        self._rng = rng or random.Random()
        self.decisions = Counter(
            PREFIX + "model_rewrite_decisions_total",
            "Model rewrite decisions (InferenceModelRewrite).",
            ("model_rewrite_name", "model_name", "target_model"),
            registry=registry,
        )
        # (rule, model, target) -> its counter child: `labels()` takes the family's lock; once per series.
        self._series: dict[tuple[str, str, str], Any] = {}

    def rewrite(self, request: InferenceRequest) -> None:
        model = request.model
        if not model:
            return
        rule = self.store.rule_for(model)
        if rule is None:
            return  # the rewrite header's target, if any, stands
        target = rule.choose(self._rng)
        self._count(rule.source, model, target)
        if target == (request.target_model or model):
            return
        if target != model and request.payload is None:
            try:
                request.payload = msgspec.json.decode(request.body, type=dict[str, Any])
            except DECODE_ERRORS as e:
                raise BadRequest(f"cannot rewrite model name: {e}") from None
        request.target_model = target

    def _count(self, source: str, model: str, target: str) -> None:
        """One decision; past MAX_DECISION_SERIES label sets, or for a model name longer than
        MAX_LABEL_VALUE_CHARS, the model is "other": a catch-all rule sees every model name clients send (client
        input), and each would be a series for ever (a long one repeated on every scrape)."""
        series = self._series
        key = (source, model, target)
        child = series.get(key)
        if child is None:
            if len(series) >= MAX_DECISION_SERIES or len(model) > MAX_LABEL_VALUE_CHARS:
                key = (source, OVERFLOW_LABEL, target)
                child = series.get(key)
            if child is None:
                child = series[key] = self.decisions.labels(*key)
        child.inc()
