"""`label-selector-filter` (+ deprecated `by-label-selector`, `by-label`): keep endpoints by labels."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class LabelSelectorRequirement(PluginParams):
    """One Kubernetes `matchExpressions` entry."""

    key: str
    operator: str
    values: list[str] = []

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("matchExpressions: key is required")
        if self.operator not in OPERATORS:
            raise ValueError(f"matchExpressions[{self.key}]: operator must be one of {', '.join(OPERATORS)}")
        # Kubernetes' LabelSelectorAsSelector rules.
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"matchExpressions[{self.key}]: values must be non-empty for {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"matchExpressions[{self.key}]: values must be empty for {self.operator}")


# One pass over the candidates per requirement: a specialised comprehension per operator is
# several times cheaper than one generic predicate call per endpoint.
Pass = Callable[[Sequence[Endpoint]], list[Endpoint]]


def _label_equals(key: str, value: str) -> Pass:
    return lambda eps: [ep for ep in eps if ep.spec.labels.get(key) == value]


def _requirement(req: LabelSelectorRequirement) -> Pass:
    key, values = req.key, frozenset(req.values)
    if req.operator == "In":
        return lambda eps: [ep for ep in eps if ep.spec.labels.get(key) in values]
    if req.operator == "NotIn":  # an absent label satisfies NotIn, as in Kubernetes
        return lambda eps: [ep for ep in eps if ep.spec.labels.get(key) not in values]
    if req.operator == "Exists":
        return lambda eps: [ep for ep in eps if key in ep.spec.labels]
    return lambda eps: [ep for ep in eps if key not in ep.spec.labels]


def compile_selector(match_labels: Mapping[str, str], expressions: Sequence[LabelSelectorRequirement]) -> list[Pass]:
    """The selector as successive passes (AND of everything); no pass matches everything."""
    return [_label_equals(k, v) for k, v in match_labels.items()] + [_requirement(r) for r in expressions]


class LabelSelectorFilter(Filter):
    """Keeps endpoints whose labels match a Kubernetes LabelSelector.

    Why: route a profile to a subset of the pool (hardware type, role, tenant) without a
    separate pool.

    Parameters: `matchLabels` {key: value} (all must match) and `matchExpressions`
    [{key, operator In|NotIn|Exists|DoesNotExist, values}] (all must hold). Kubernetes
    semantics: NotIn also matches endpoints without the label; an empty selector keeps
    everything. May return no endpoint (the profile then fails with 429, as the reference).
    """

    type = "label-selector-filter"
    aliases = ("by-label-selector",)  # deprecated in the reference (removed in v0.11)

    class Params(PluginParams):
        match_labels: dict[str, str] = {}
        match_expressions: list[LabelSelectorRequirement] = []

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.passes = compile_selector(params.match_labels, params.match_expressions)

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        kept = endpoints
        for keep in self.passes:
            if not kept:
                break
            kept = keep(kept)
        return kept


class ByLabelFilter(Filter):
    """Deprecated (`by-label`): keeps endpoints whose `label` value is one of `validValues`.

    Parameters: `label` (required), `validValues` ([]), `allowsNoLabel` (false: endpoints
    without the label are dropped; true: kept). Prefer `label-selector-filter`.
    keep(e) = (label ∉ labels(e) ∧ allowsNoLabel) ∨ labels(e)[label] ∈ validValues
    """

    type = "by-label"

    class Params(PluginParams):
        label: str = ""
        valid_values: list[str] = []
        allows_no_label: bool = False

        def __post_init__(self) -> None:
            if not self.label:
                raise ValueError("label is required")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.label = params.label
        self.valid = frozenset(params.valid_values)
        self.allow_missing = params.allows_no_label
        log.warning("plugin %s: type %s is deprecated; use label-selector-filter", self.name, self.type)

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        label, valid = self.label, self.valid
        if self.allow_missing:
            return [ep for ep in endpoints if label not in (lb := ep.spec.labels) or lb[label] in valid]
        # An absent label reads as "" (Go zero value), so validValues [""] keeps it, as the reference.
        return [ep for ep in endpoints if ep.spec.labels.get(label, "") in valid]
