"""A scheduling profile: filters narrow the candidates, weighted scorers rate them, a picker chooses.

    total(e) = Σ_i weight_i · clamp(score_i(e), 0, 1)      (a NaN score counts as 0)

Filters that leave nothing raise Saturated (HTTP 429 rejected-saturated, as the reference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import Saturated
from llmepp.framework.scheduling import Filter, Picker, ProfileResult, Scorer
from llmepp.observability.logging import LogLimiter
from llmepp.observability.plugin_timing import PluginTimers
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)


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
    _combine: Callable[[list[Sequence[float]]], list[float]] = field(init=False, repr=False)
    # A broken scorer: one line per scorer per 30 s, not per request.
    _failures: LogLimiter = field(init=False, repr=False, default_factory=lambda: LogLimiter(log, interval=30.0))

    def __post_init__(self) -> None:
        self._combine = weighted_sum([ws.weight for ws in self.scorers])

    def run(
        self, request: InferenceRequest, candidates: Sequence[Endpoint], timers: PluginTimers | None = None
    ) -> ProfileResult:
        if timers is not None:
            return self._run_timed(request, candidates, timers)
        endpoints = candidates
        for f in self.filters:
            kept = f.filter(request, endpoints)
            if len(kept) > len(endpoints):  # a repeat, or one it was not given (the O(1) part of the check)
                kept = self._filter_overfilled(f, endpoints, kept)
            endpoints = kept
            if not endpoints:
                raise Saturated(f"profile {self.name!r}: filter {f.name!r} removed every endpoint", emptied_by=f.type)
        columns = self._score(request, endpoints)
        totals = self._totals(columns, len(endpoints))
        return self._result(endpoints, columns, totals, self.picker.pick(endpoints, totals))

    def _run_timed(
        self, request: InferenceRequest, candidates: Sequence[Endpoint], timers: PluginTimers
    ) -> ProfileResult:
        """`run`, every filter, scorer and picker timed (llmepp.observability.plugin_timing)."""
        clock = time.perf_counter
        endpoints = candidates
        for f in self.filters:
            start = clock()
            kept = f.filter(request, endpoints)
            timers.observe("Filter", f, clock() - start)
            if len(kept) > len(endpoints):
                kept = self._filter_overfilled(f, endpoints, kept)
            endpoints = kept
            if not endpoints:
                raise Saturated(f"profile {self.name!r}: filter {f.name!r} removed every endpoint", emptied_by=f.type)
        columns = self._score(request, endpoints, timers)
        totals = self._totals(columns, len(endpoints))
        start = clock()
        targets = self.picker.pick(endpoints, totals)
        timers.observe("Picker", self.picker, clock() - start)
        return self._result(endpoints, columns, totals, targets)

    def _result(
        self,
        endpoints: Sequence[Endpoint],
        columns: list[Sequence[float]],
        totals: list[float],
        targets: list[Endpoint],
    ) -> ProfileResult:
        if not targets:
            raise Saturated(f"profile {self.name!r}: picker {self.picker.name!r} chose no endpoint")
        breakdown = None
        if log.isEnabledFor(logging.DEBUG):
            breakdown = {ws.scorer.name: col for ws, col in zip(self.scorers, columns)}
        return ProfileResult(targets=targets, candidates=endpoints, totals=totals, breakdown=breakdown)

    def _score(
        self, request: InferenceRequest, endpoints: Sequence[Endpoint], timers: PluginTimers | None = None
    ) -> list[Sequence[float]]:
        """One column of clamped scores per scorer."""
        n = len(endpoints)
        columns: list[Sequence[float]] = []
        for ws in self.scorers:
            try:
                if timers is not None:
                    start = time.perf_counter()
                    scores = ws.scorer.score(request, endpoints)
                    timers.observe("Scorer", ws.scorer, time.perf_counter() - start)
                else:
                    scores = ws.scorer.score(request, endpoints)
                if len(scores) != n:
                    self._scorer_failed(ws.scorer, f"returned {len(scores)} scores for {n} endpoints", False)
                    scores = [0.0] * n
                # Clamping per element is costly; check the range once (two C-level passes) instead. Inside
                # the try: a column that is no list of numbers (None, a map) is the scorer's failure too.
                elif n and (min(scores) < 0.0 or max(scores) > 1.0):
                    scores = _clamped(scores)
            except Exception:
                self._scorer_failed(ws.scorer, "failed", True)
                scores = [0.0] * n
            columns.append(scores)
        return columns

    def _scorer_failed(self, scorer: Scorer, what: str, exc_info: bool) -> None:
        """A scorer bug: its column counts as all 0 for this request (as the reference, whose scorers answer
        a map: an endpoint missing from it scores 0); one error line per scorer per 30 s, not per request."""
        self._failures.error(scorer.name, "profile %r: scorer %r %s; it scores 0 for the request", self.name,
                             scorer.name, what, exc_info=exc_info)  # fmt: skip

    def _filter_overfilled(self, f: Filter, given: Sequence[Endpoint], kept: Sequence[Endpoint]) -> list[Endpoint]:
        """A filter bug: it answered more endpoints than it was given, so it repeated one (two fallbacks to
        one endpoint, a repeat in every scorer's column) or added one it was not given (a pod another filter
        removed, or one gone from the pool). Its answer is cut to the endpoints it was given, once each, in
        its order; one error line per filter per 30 s.

        Only a longer answer is checked (O(1) a filter): a full check of every answer (a set of the input
        and of the output) costs 10-20% of a profile run at 8-64 endpoints, so a shorter answer holding a
        repeat or a stranger is the filter's own contract (Filter: the kept endpoints, in order)."""
        allowed = set(given)
        out = [ep for ep in dict.fromkeys(kept) if ep in allowed]
        self._failures.error("filter " + f.name, "profile %r: filter %r returned %d endpoints for %d given "
                             "(a repeat or one it was not given); it keeps those %d, once each", self.name, f.name,
                             len(kept), len(given), len(out))  # fmt: skip
        return out

    def _totals(self, columns: list[Sequence[float]], n: int) -> list[float]:
        """Σ weight·score per endpoint. A NaN score escapes the range check (NaN compares false; first in
        a column it even hides the column's other out-of-range values from min / max) and would reach the
        picker (max-score-picker always took a NaN in first place, and raised on an all-NaN column): it
        makes its total NaN whatever the weight, so one C-level pass over the totals finds it, and then
        every column is clamped, NaN to 0."""
        if not columns:
            return [0.0] * n
        totals = self._combine(columns)
        if (t := sum(totals)) != t:
            columns[:] = [_clamped(c) for c in columns]
            totals = self._combine(columns)
        return totals


def _clamped(scores: Sequence[float]) -> list[float]:
    """Each score clamped to [0, 1]; NaN to 0."""
    return [s if 0.0 <= s <= 1.0 else 1.0 if s > 1.0 else 0.0 for s in scores]


def weighted_sum(weights: list[float]) -> Callable[[list[Sequence[float]]], list[float]]:
    """A function summing weight·score columns in one pass, specialised once per profile
    (one comprehension over zipped columns is much faster than one pass per scorer)."""
    if len(weights) == 1:
        (w1,) = weights
        return lambda c: [w1 * a for a in c[0]]
    if len(weights) == 2:
        w1, w2 = weights
        return lambda c: [w1 * a + w2 * b for a, b in zip(c[0], c[1])]
    if len(weights) == 3:
        w1, w2, w3 = weights
        return lambda c: [w1 * a + w2 * b + w3 * d for a, b, d in zip(c[0], c[1], c[2])]
    if len(weights) == 4:
        w1, w2, w3, w4 = weights
        return lambda c: [w1 * a + w2 * b + w3 * d + w4 * e for a, b, d, e in zip(c[0], c[1], c[2], c[3])]

    def combine(columns: list[Sequence[float]]) -> list[float]:
        totals = [weights[0] * s for s in columns[0]]
        for w, col in zip(weights[1:], columns[1:]):
            totals = [t + w * s for t, s in zip(totals, col)]
        return totals

    return combine
