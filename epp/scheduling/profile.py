"""A scheduling profile: filters narrow the candidates, weighted scorers rate them, a picker chooses.

    total(e) = Σ_i weight_i · clamp(score_i(e), 0, 1)

Filters that leave nothing raise Saturated (HTTP 429 rejected-saturated, as the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import Saturated
from llmepp.framework.scheduling import Filter, Picker, ProfileResult, Scorer
from llmepp.request.types import InferenceRequest


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0


@dataclass(slots=True)
class SchedulerProfile:
    name: str
    picker: Picker
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)

    def run(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> ProfileResult:
        endpoints = candidates
        for f in self.filters:
            endpoints = f.filter(request, endpoints)
            if not endpoints:
                raise Saturated(f"profile {self.name!r}: filter {f.name!r} removed every endpoint")
        totals = self._score(request, endpoints)
        targets = self.picker.pick(endpoints, totals)
        if not targets:
            raise Saturated(f"profile {self.name!r}: picker {self.picker.name!r} chose no endpoint")
        if len(targets) == 1:
            scores = [totals[_index(endpoints, targets[0])]] if totals else []
        else:
            index = {id(ep): i for i, ep in enumerate(endpoints)}
            scores = [totals[index[id(ep)]] for ep in targets] if totals else []
        return ProfileResult(targets=targets, scores=scores)

    def _score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        n = len(endpoints)
        totals = [0.0] * n
        for ws in self.scorers:
            scores = ws.scorer.score(request, endpoints)
            if len(scores) != n:
                raise RuntimeError(
                    f"scorer {ws.scorer.name!r} returned {len(scores)} scores for {n} endpoints"
                )
            # Clamping per element is costly; check the range once (two C-level passes) instead.
            if n and (min(scores) < 0.0 or max(scores) > 1.0):
                scores = [0.0 if s < 0.0 else 1.0 if s > 1.0 else s for s in scores]
            w = ws.weight
            if w == 1.0:
                totals = [t + s for t, s in zip(totals, scores)]
            else:
                totals = [t + w * s for t, s in zip(totals, scores)]
        return totals


def _index(endpoints: Sequence[Endpoint], target: Endpoint) -> int:
    for i, ep in enumerate(endpoints):
        if ep is target:
            return i
    raise ValueError("picker returned an endpoint that was not a candidate")
