"""`program-aware-fairness`: least attained service (LAS) between the programs (tenants) of a band."""

from __future__ import annotations

import heapq
import math
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmepp.flowcontrol.interfaces import FairnessPolicy, FairnessState
from llmepp.flowcontrol.metrics import FlowControlMetrics
from llmepp.flowcontrol.queues import FlowQueue, PriorityBand
from llmepp.flowcontrol.types import FLOW_ID_KEY, Outcome
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.requestcontrol import ResponseCompleteProcessor
from llmepp.framework.scheduling import SchedulingResult
from llmepp.observability.metrics import PREFIX, per_registry
from llmepp.request.types import InferenceRequest, ResponseInfo

DISPATCHED = Outcome.DISPATCHED.value
# Rebase the epoch before the scale factor e^(decay·Δt) passes e^200 (floats overflow past e^709).
_MAX_EXPONENT = 200.0


class _Service:
    """A program's attained service, scaled to the policy's epoch: service(now) = scaled · decay(now)."""

    __slots__ = ("at", "scaled")

    def __init__(self, at: float) -> None:
        self.scaled = 0.0
        self.at = at  # last service added (for forgetting idle programs)


class ProgramAwareFairness(FairnessPolicy, ResponseCompleteProcessor):
    """Serves next the program (fairness id) that has received the least service lately, with a
    nudge for the one that has waited longest:

        service(p) = Σ over p's finished requests of (prompt + 2 · completion tokens),
                     decayed by 2^(−Δt / lasHalfLifeSeconds)
        score(f)   = lasWeightService · (1 − norm(service)) + lasWeightHeadWait · norm(head wait)
        pick       = the non-empty flow of the band with the highest score (ties: the older head, then
                     the lower fairness id)

    `norm` is min-max over the band's non-empty flows (0 when all are equal). Usage comes from the
    model server's response (prompt tokens estimated from the prompt when it has none); a request the
    flow controller queued in a band's overflow flow (flowControl.maxFlows) is charged to that flow's
    program. Programs idle for `evictionTtlSeconds` are forgotten (checked every
    `evictionSweepSeconds`), and beyond `maxPrograms` (the fairness id is client-chosen) the least
    served tenth are (an unknown program counts as service 0, so that changes the picks least). Exported
    under the reference's names: `llm_d_epp_program_aware_attained_service_tokens{program_id}` (ids beyond
    the first 1,000 summed under "other", as the queue metrics), the mean flow-control queue wait of each
    program's dispatched requests in this policy's bands, `llm_d_epp_program_aware_avg_wait_time_milliseconds
    {program_id}` (read from the queue-duration histograms at scrape time), and Jain's fairness index over
    those means, `llm_d_epp_program_aware_jains_fairness_index` (1 = equal waits). Several program-aware
    policies (one per band, say) share one set of series: waits over all their bands, a program's
    service the largest of their views (each sees every completion).

    Parameters: `strategy` ("las", the only one), `lasWeightService` (0.8), `lasWeightHeadWait`
    (0.2), `lasHalfLifeSeconds` (60), `evictionTtlSeconds` (3600), `evictionSweepSeconds` (300),
    `maxPrograms` (10,000; not in the reference).
    """

    type = "program-aware-fairness"

    class Params(PluginParams):
        strategy: str = "las"
        las_weight_service: float = 0.8
        las_weight_head_wait: float = 0.2
        las_half_life_seconds: float = 60.0
        eviction_ttl_seconds: float = 3600.0
        eviction_sweep_seconds: float = 300.0
        max_programs: int = 10_000

        def __post_init__(self) -> None:
            if self.strategy != "las":
                raise ValueError(f"strategy: {self.strategy!r} is not supported; the strategy is 'las'")
            if self.las_half_life_seconds <= 0 or self.eviction_ttl_seconds <= 0 or self.eviction_sweep_seconds <= 0:
                raise ValueError("lasHalfLifeSeconds, evictionTtlSeconds and evictionSweepSeconds must be > 0")
            if self.las_weight_service < 0 or self.las_weight_head_wait < 0:
                raise ValueError("lasWeightService and lasWeightHeadWait must be >= 0")
            if self.max_programs < 1:
                raise ValueError(f"maxPrograms must be >= 1, got {self.max_programs}")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.clock: Callable[[], float] = time.monotonic
        self._decay = math.log(2) / params.las_half_life_seconds
        # Every program decays by the same factor, so services are kept as of one epoch and only the
        # epoch's factor moves: a pick compares them with no exp() per program (rebased at each sweep).
        self._programs: dict[str, _Service] = {}
        self._epoch: float | None = None  # set by the first service recorded
        self._next_sweep = 0.0
        self.priorities: set[str] = set()  # of the bands this policy orders (their waits are its programs')

    def setup(self, ctx: PluginContext) -> None:
        registry = getattr(ctx.metrics, "registry", None)
        if registry is not None:
            # One collector per registry for every program-aware policy: a collector each would emit each
            # family once per policy, which Prometheus refuses (the whole scrape fails).
            flow_metrics = FlowControlMetrics.for_registry(registry)
            collector = per_registry(registry, "program-aware-fairness", lambda r: _register(r, flow_metrics))
            collector.policies.add(self)

    # -- service -----------------------------------------------------------------------------------
    def service(self, fairness_id: str, now: float) -> float:
        s = self._programs.get(fairness_id)
        if s is None or self._epoch is None:
            return 0.0
        return s.scaled * math.exp(-self._decay * (now - self._epoch))

    def attained(self, fairness_id: str, amount: float, now: float) -> None:
        if self._epoch is None:
            self._epoch, self._next_sweep = now, now + self.params.eviction_sweep_seconds
        elif now >= self._next_sweep or (now - self._epoch) * self._decay > _MAX_EXPONENT:
            self._sweep(now)  # also early when a short half-life would overflow the epoch scale
        s = self._programs.get(fairness_id)
        if s is None:
            if len(self._programs) >= self.params.max_programs:
                self._forget_least_served()
            s = self._programs[fairness_id] = _Service(now)
        s.scaled += amount * math.exp(self._decay * (now - self._epoch))
        s.at = now

    def _sweep(self, now: float) -> None:
        """Forget idle programs; move the epoch to now (keeps the scaled values in range)."""
        p = self.params
        assert self._epoch is not None
        self._next_sweep = now + p.eviction_sweep_seconds
        idle = now - p.eviction_ttl_seconds
        factor = math.exp(-self._decay * (now - self._epoch))
        for fid, s in list(self._programs.items()):
            if s.at < idle:
                del self._programs[fid]
            else:
                s.scaled *= factor
        self._epoch = now

    def _forget_least_served(self) -> None:
        """Make room for a program: drop the least-served tenth (amortised O(log programs) per new one)."""
        programs = self._programs
        limit = self.params.max_programs
        keep = limit - max(1, limit // 10)
        for fid, _ in heapq.nsmallest(len(programs) - keep, programs.items(), key=lambda kv: kv[1].scaled):
            del programs[fid]

    def programs(self, now: float) -> dict[str, float]:
        # A copy: /metrics calls this from a worker thread while the event loop may add or forget programs.
        return {fid: self.service(fid, now) for fid in list(self._programs)}

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, result: SchedulingResult) -> None:
        usage = response.usage
        amount: float
        if usage is not None:
            amount = usage.prompt_tokens + 2 * usage.completion_tokens
        else:
            amount = len(request.prompt or b"") / 4  # ~4 bytes per token: the estimate tokenizer's rate
        # Queued in an overflow flow: that flow is the program the picks see.
        self.attained(request.data.get(FLOW_ID_KEY) or request.fairness_id, amount, self.clock())

    # -- fairness ----------------------------------------------------------------------------------
    def new_state(self, band: PriorityBand) -> FairnessState:
        self.priorities.add(str(band.priority))
        return _LasState(self, band)


class _LasState(FairnessState):
    """The band's non-empty flows; a pick scores each once, with arithmetic only.

    Normalised service and head wait do not depend on `now`: services share one decay factor and
    waits one clock, so they are compared as epoch-scaled services and head enqueue times.
    O(active flows) per pick.
    """

    __slots__ = ("active", "band", "policy")

    def __init__(self, policy: ProgramAwareFairness, band: PriorityBand) -> None:
        self.policy = policy
        self.band = band
        self.active: dict[str, FlowQueue] = {}

    def flow_activated(self, flow: FlowQueue) -> None:
        self.active[flow.fairness_id] = flow

    def flow_removed(self, flow: FlowQueue) -> None:
        self.active.pop(flow.fairness_id, None)

    def pick(self) -> FlowQueue | None:
        active = self.active
        programs = self.policy._programs
        flows: list[FlowQueue] = []
        services: list[float] = []
        heads: list[float] = []
        emptied: list[str] = []
        for fid, flow in active.items():
            head = flow.peek() if flow.count else None
            if head is None:
                emptied.append(fid)  # emptied by dispatch, cancellation or expiry since activated
                continue
            record = programs.get(fid)
            flows.append(flow)
            services.append(record.scaled if record is not None else 0.0)
            heads.append(head.enqueued_at)
        for fid in emptied:
            del active[fid]
        if len(flows) <= 1:
            return flows[0] if flows else None
        p = self.policy.params
        s_lo, s_hi = min(services), max(services)
        e_lo, e_hi = min(heads), max(heads)
        # score = w_s·(1 − (s − s_lo)/Δs) + w_w·(e_hi − e)/Δe; maximise −a·s − b·e (ties: older head).
        a = p.las_weight_service / (s_hi - s_lo) if s_hi > s_lo else 0.0
        b = p.las_weight_head_wait / (e_hi - e_lo) if e_hi > e_lo else 0.0
        best_i, best = 0, math.inf
        for i, (service, enqueued) in enumerate(zip(services, heads)):
            cost = a * service + b * enqueued
            if cost < best or (
                cost == best
                and (
                    enqueued < heads[best_i]
                    or (enqueued == heads[best_i] and flows[i].fairness_id < flows[best_i].fairness_id)
                )
            ):
                best_i, best = i, cost
        return flows[best_i]


def _register(registry: CollectorRegistry, flow_metrics: FlowControlMetrics) -> _Collector:
    collector = _Collector(flow_metrics)
    registry.register(collector)
    return collector


class _Collector(Collector):
    """The program-aware series of every program-aware policy of a registry (one family each)."""

    def __init__(self, flow_metrics: FlowControlMetrics) -> None:
        self.policies: weakref.WeakSet[ProgramAwareFairness] = weakref.WeakSet()
        self.flow_metrics = flow_metrics

    def collect(self) -> Iterator[Any]:
        policies = list(self.policies)
        # Every policy is told of every completion, so each knows every program (with its own half-life):
        # a program's service is the largest of their views, not their sum.
        programs: dict[str, float] = {}
        for policy in policies:
            for fid, value in policy.programs(policy.clock()).items():
                if value > programs.get(fid, -1.0):
                    programs[fid] = value
        service = GaugeMetricFamily(
            PREFIX + "program_aware_attained_service_tokens",
            "Decayed attained service (prompt + 2 x completion tokens) per program.",
            labels=["program_id"],
        )
        # The queue metrics' fairness-id labels (the waits below carry them): a program past the cap is "other"
        # in both series, not in one under its name and in the other folded.
        label = self.flow_metrics.fairness_label
        per_label: dict[str, float] = {}
        for fid, value in sorted(programs.items()):
            fid = label(fid)
            per_label[fid] = per_label.get(fid, 0.0) + value
        for fid, value in per_label.items():
            service.add_metric([fid], value)
        # Each program's mean queue wait: its dispatched requests' queue-duration histograms in the bands
        # these policies order (their fairness ids are capped the same way).
        waits: dict[str, list[float]] = {}
        priorities = {p for policy in policies for p in list(policy.priorities)}  # copies: the loop may add
        for (fid, priority, outcome, *_), hist in list(self.flow_metrics.waits.items()):
            if outcome == DISPATCHED and priority in priorities:
                acc = waits.setdefault(fid, [0.0, 0])
                acc[0] += hist.sum
                acc[1] += sum(hist.counts)
        wait = GaugeMetricFamily(
            PREFIX + "program_aware_avg_wait_time_milliseconds",
            "Mean flow-control queue wait of each program's dispatched requests, in milliseconds.",
            labels=["program_id"],
        )
        means = [1000.0 * total / count for total, count in waits.values() if count]
        for fid, (total, count) in sorted(waits.items()):
            if count:
                wait.add_metric([fid], 1000.0 * total / count)
        squares = sum(v * v for v in means)
        jain = (sum(means) ** 2 / (len(means) * squares)) if squares > 0 else 1.0
        index = GaugeMetricFamily(
            PREFIX + "program_aware_jains_fairness_index",
            "Jain's fairness index over the programs' mean queue waits (1 = equal waits).",
        )
        index.add_metric([], jain)
        yield service
        yield wait
        yield index
