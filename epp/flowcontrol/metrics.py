"""Flow-control Prometheus metrics (reference names, `llm_d_epp_` prefix).

Nothing on the request path touches prometheus_client: its `inc` / `observe` take a lock
and cost microseconds, a fifth of the queue's budget. Instead, per-request outcomes go to
plain accumulators (`Tally`, `Buckets`: an int add, a bisect), and one collector turns them
— plus the live queue sizes, capacity use, saturation and stale endpoints — into metric
families when Prometheus scrapes.

Accumulators live here keyed by their label values, not on flows, so garbage-collecting an
idle flow never resets a counter. Fairness ids beyond MAX_FAIRNESS_LABELS fold into "other".
One `FlowControlMetrics` per CollectorRegistry (`for_registry`), shared by every controller
built on it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from llmepp.flowcontrol.types import ItemState, Outcome
from llmepp.observability.fast import Buckets, Tally
from llmepp.observability.metrics import (
    FAST_BUCKETS,
    MAX_FAIRNESS_LABELS,
    MAX_LABEL_VALUE_CHARS,
    MAX_MODEL_LABELS,
    OVERFLOW_LABEL,
    PREFIX,
    BoundedLabels,
    per_registry,
)

if TYPE_CHECKING:
    from llmepp.flowcontrol.queues import FlowQueue, PriorityBand

# The reference's buckets (up to 60 s), and 120 / 300 s for longer TTLs.
WAIT_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# The reference's (100 µs .. 100 ms) with finer ones below: a cycle or an enqueue takes microseconds here.
CYCLE_BUCKETS = tuple(sorted({0.000005, *FAST_BUCKETS}))
ENQUEUE_BUCKETS = CYCLE_BUCKETS
# Wait histograms with series of their own (fairness id x model x target x outcome x priority); later ones
# fold into "other", as the request series do (server.stream.MAX_LABEL_SETS).
MAX_WAIT_SERIES = 4096
# flow_control_request_enqueue_duration_seconds{outcome} of a request admitted to its queue (the reference's
# label for an item not finalised when its enqueue ends); a refused one has its outcome.
ENQUEUED = "NotYetFinalized"
# flow_control_revocations_total{outcome}: our revocation answers the stream at once (confirmed when issued).
REVOCATION_CONFIRMED = "confirmed"


class FlowChildren:
    """A flow's queue-duration histograms, one per (outcome, model, target model), and its enqueue-duration
    ones, one per outcome, bound on first use."""

    __slots__ = ("_enqueue", "_hist", "_key", "_metrics")

    def __init__(self, metrics: FlowControlMetrics, fairness_id: str, priority: str, pool: str) -> None:
        self._metrics = metrics
        self._key = (fairness_id, priority, pool)
        self._hist: dict[tuple[Outcome, str, str], Buckets] = {}
        self._enqueue: dict[str, Buckets] = {}

    def wait(self, outcome: Outcome, model: str = "", target: str = "") -> Buckets:
        # Reported as "other" anyway; a cache key would keep the client's whole name (up to the body limit).
        if len(model) > MAX_LABEL_VALUE_CHARS:
            model = OVERFLOW_LABEL
        if len(target) > MAX_LABEL_VALUE_CHARS:
            target = OVERFLOW_LABEL
        key = (outcome, model, target)
        found = self._hist.get(key)
        if found is None:
            fid, priority, pool = self._key
            m = self._metrics
            found = m.wait_histogram(fid, priority, outcome.value, pool, m.model_label(model), m.model_label(target))
            if len(self._hist) < MAX_MODEL_LABELS:  # models are client input
                self._hist[key] = found
        return found

    def enqueue(self, outcome: str) -> Buckets:
        found = self._enqueue.get(outcome)
        if found is None:
            fid, priority, _ = self._key
            found = self._enqueue[outcome] = self._metrics.enqueue_histogram(fid, priority, outcome)
        return found


class BandChildren:
    """A band's outcome counters."""

    __slots__ = ("_counters", "_key", "_metrics")

    def __init__(self, metrics: FlowControlMetrics, priority: str, pool: str) -> None:
        self._metrics = metrics
        self._key = (priority, pool)
        self._counters: dict[Outcome, Tally] = {}

    def outcome(self, outcome: Outcome) -> Tally:
        found = self._counters.get(outcome)
        if found is None:
            priority, pool = self._key
            found = self._counters[outcome] = self._metrics.outcome_counter(outcome.value, priority, pool)
        return found


class FlowControlMetrics:
    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> FlowControlMetrics:
        return per_registry(registry, "flow_control", cls)

    def __init__(self, registry: CollectorRegistry) -> None:
        # (outcome, priority, inference_pool) → Tally
        self.outcomes: dict[tuple[str, str, str], Tally] = {}
        # (fairness_id, priority, outcome, inference_pool, model_name, target_model_name) → Buckets
        self.waits: dict[tuple[str, str, str, str, str, str], Buckets] = {}
        # (fairness_id, priority, outcome) → Buckets
        self.enqueues: dict[tuple[str, str, str], Buckets] = {}
        self.dispatch_cycle = Buckets(CYCLE_BUCKETS)
        # (priority of the blocked band they were issued for, inference_pool) → in-flight revocations
        # (flowcontrol.eviction); and (outcome, inference_pool) → their outcomes
        self.revocations: dict[tuple[str, str], Tally] = {}
        self.revocation_outcomes: dict[tuple[str, str], Tally] = {}
        # (priority, inference_pool) → flow limit (flowControl.maxFlows): empty flows dropped early to
        # make room, and requests queued in the band's overflow flow
        self.flow_evictions: dict[tuple[str, str], Tally] = {}
        self.overflows: dict[tuple[str, str], Tally] = {}
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        # Fairness ids and model names as label values (client input): MAX_FAIRNESS_LABELS /
        # MAX_MODEL_LABELS of them, later ones "other" (as the reference).
        self.fairness_label = BoundedLabels(MAX_FAIRNESS_LABELS)
        self.model_label = BoundedLabels(MAX_MODEL_LABELS)
        registry.register(_Collector(self))

    def add_source(self, source: Any) -> None:
        self._sources.add(source)

    def sources(self) -> list[Any]:
        return list(self._sources)

    def outcome_counter(self, outcome: str, priority: str, pool: str) -> Tally:
        key = (outcome, priority, pool)
        found = self.outcomes.get(key)
        if found is None:
            found = self.outcomes[key] = Tally()
        return found

    def revocation_counter(self, priority: str, pool: str) -> Tally:
        found = self.revocations.get((priority, pool))
        if found is None:
            found = self.revocations[(priority, pool)] = Tally()
        return found

    def revocation_outcome_counter(self, outcome: str, pool: str) -> Tally:
        found = self.revocation_outcomes.get((outcome, pool))
        if found is None:
            found = self.revocation_outcomes[(outcome, pool)] = Tally()
        return found

    def flow_eviction_counter(self, priority: str, pool: str) -> Tally:
        found = self.flow_evictions.get((priority, pool))
        if found is None:
            found = self.flow_evictions[(priority, pool)] = Tally()
        return found

    def overflow_counter(self, priority: str, pool: str) -> Tally:
        found = self.overflows.get((priority, pool))
        if found is None:
            found = self.overflows[(priority, pool)] = Tally()
        return found

    def wait_histogram(
        self, fairness_id: str, priority: str, outcome: str, pool: str, model: str = "", target: str = ""
    ) -> Buckets:
        key = (fairness_id, priority, outcome, pool, model, target)
        found = self.waits.get(key)
        if found is None:
            if len(self.waits) >= MAX_WAIT_SERIES:  # each label is capped; their product is capped here
                key = (OVERFLOW_LABEL, priority, outcome, pool, OVERFLOW_LABEL, OVERFLOW_LABEL)
                found = self.waits.get(key)
            if found is None:
                found = self.waits[key] = Buckets(WAIT_BUCKETS)
        return found

    def enqueue_histogram(self, fairness_id: str, priority: str, outcome: str) -> Buckets:
        key = (fairness_id, priority, outcome)
        found = self.enqueues.get(key)
        if found is None:
            found = self.enqueues[key] = Buckets(ENQUEUE_BUCKETS)
        return found

    def flow_children(self, flow: FlowQueue, pool: str) -> FlowChildren:
        return FlowChildren(self, self.fairness_label(flow.fairness_id), str(flow.priority), pool)

    def band_children(self, band: PriorityBand, pool: str) -> BandChildren:
        return BandChildren(self, str(band.priority), pool)


_COUNTERS = 8  # counter and histogram families first (_families), then the gauges


class _Collector(Collector):
    def __init__(self, metrics: FlowControlMetrics) -> None:
        self.metrics = metrics
        # pool → (fairness id, priority) → (model, target model) pairs seen waiting in a live flow
        self._seen_models: dict[str, dict[tuple[str, str], set[tuple[str, str]]]] = {}

    def describe(self) -> Iterable[Any]:
        return self._families()

    def collect(self) -> Iterator[Any]:
        families = self._families()
        m = self.metrics
        total, wait, cycle, enqueue, issued, revoked, flows_evicted, overflowed = families[:_COUNTERS]
        for (outcome, priority, pool), tally in list(m.outcomes.items()):
            total.add_metric([outcome, priority, pool], tally.value)
        for family, tallies in (
            (issued, m.revocations), (revoked, m.revocation_outcomes), (flows_evicted, m.flow_evictions),
            (overflowed, m.overflows),
        ):  # fmt: skip
            for key, tally in list(tallies.items()):
                family.add_metric(list(key), tally.value)
        for labels, hist in list(m.waits.items()):
            wait.add_metric(list(labels), hist.cumulative(), hist.sum)
        for enqueue_labels, hist in list(m.enqueues.items()):
            enqueue.add_metric(list(enqueue_labels), hist.cumulative(), hist.sum)
        cycle.add_metric([], m.dispatch_cycle.cumulative(), m.dispatch_cycle.sum)
        for src in m.sources():
            self._fill_gauges(families[_COUNTERS:], src)
        return iter(families)

    @staticmethod
    def _families() -> list[Any]:
        p = PREFIX
        flow = ["fairness_id", "priority", "inference_pool", "model_name", "target_model_name"]
        band = ["priority", "inference_pool"]
        return [
            CounterMetricFamily(
                p + "flow_control_requests_total",
                "Requests leaving flow control, by outcome.",
                labels=["outcome", "priority", "inference_pool"],
            ),
            HistogramMetricFamily(
                p + "flow_control_request_queue_duration_seconds",
                "Time a request spent in flow control, by outcome.",
                labels=["fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name"],
            ),
            HistogramMetricFamily(p + "flow_control_dispatch_cycle_duration_seconds", "One dispatcher cycle."),
            HistogramMetricFamily(
                p + "flow_control_request_enqueue_duration_seconds",
                "Time to admit a request to its queue (capacity checks, insertion; the immediate dispatch of an "
                "idle pool's request included), by the outcome it had then (NotYetFinalized: admitted).",
                labels=["fairness_id", "priority", "outcome"],
            ),
            CounterMetricFamily(
                p + "flow_control_revocations_issued_total",
                "Dispatched requests evicted to free capacity, by the priority of the blocked band they were "
                "evicted for.",
                labels=band,
            ),
            CounterMetricFamily(
                p + "flow_control_revocations_total",
                "In-flight evictions by outcome (confirmed: the stream was answered 429 and released).",
                labels=["outcome", "inference_pool"],
            ),
            CounterMetricFamily(
                p + "flow_control_flows_evicted_total",
                "Empty flows dropped before their idle timeout to make room for a new fairness id: "
                "flowControl.maxFlows was reached (idlest first).",
                labels=band,
            ),
            CounterMetricFamily(
                p + "flow_control_overflow_requests_total",
                "Requests with a new fairness id queued in their band's shared overflow flow: flowControl.maxFlows "
                "flows all had requests waiting.",
                labels=band,
            ),
            GaugeMetricFamily(p + "flow_control_queue_size", "Requests waiting, per flow.", labels=flow),
            GaugeMetricFamily(p + "flow_control_queue_bytes", "Body bytes waiting, per flow.", labels=flow),
            GaugeMetricFamily(
                p + "flow_control_capacity_utilization_requests", "Band queue use / band maxRequests.", labels=band
            ),
            GaugeMetricFamily(
                p + "flow_control_capacity_utilization_bytes", "Band queue bytes / band maxBytes.", labels=band
            ),
            GaugeMetricFamily(
                p + "flow_control_global_capacity_utilization_requests",
                "Queued requests / global maxRequests (no series when unlimited).",
                labels=["inference_pool"],
            ),
            GaugeMetricFamily(
                p + "flow_control_global_capacity_utilization_bytes",
                "Queued bytes / global maxBytes (no series when unlimited).",
                labels=["inference_pool"],
            ),
            GaugeMetricFamily(
                p + "flow_control_pool_saturation",
                "Pool saturation seen by the dispatcher (>= 1 = full).",
                labels=["inference_pool", "stage"],
            ),
            GaugeMetricFamily(
                p + "flow_control_stale_endpoints",
                "Endpoints whose metrics are too old (counted as saturated).",
                labels=["detector"],
            ),
            GaugeMetricFamily(
                p + "flow_control_flows",
                "Flows held (fairness id x priority), the bands' overflow flows included; at most "
                "flowControl.maxFlows plus one overflow flow per band.",
                labels=["inference_pool"],
            ),
            GaugeMetricFamily(
                p + "flow_control_pending_requests",
                "Requests flow control has released that are not yet charged to an endpoint (in data producers "
                "or the scheduler); an in-flight saturation detector counts them as load. No series otherwise.",
                labels=["inference_pool"],
            ),
            GaugeMetricFamily(
                p + "flow_control_pending_tokens",
                "Prompt-token estimates (bytes/4) of the pending requests.",
                labels=["inference_pool"],
            ),
        ]

    def _fill_gauges(self, families: list[Any], src: Any) -> None:
        size, qbytes, cap_r, cap_b, glob_r, glob_b, sat, stale, flows, pending_r, pending_t = families
        pool = src.pool_name
        label = self.metrics.fairness_label
        flows.add_metric([pool], sum(len(band.flows) for band in list(src.bands.values())))
        model = self.metrics.model_label
        # Per (fairness id, model, target model), from the waiting items (O(queued) per scrape). A flow's
        # models seen waiting keep a series (at 0) while the flow lives, as the reference's gauges do.
        seen = self._seen_models.get(pool, {})
        fresh: dict[tuple[str, str], set[tuple[str, str]]] = {}
        bands = list(src.bands.values())
        # Each label is capped, their product is capped here (as the wait histogram's): the combinations carried
        # over from the last scrape keep their series, new ones get series of their own while fewer than
        # MAX_WAIT_SERIES exist, later ones are reported as (other, priority, other, other) and not carried over.
        live = {(label(flow.fairness_id), str(band.priority)) for band in bands for flow in list(band.flows.values())}
        room = MAX_WAIT_SERIES - sum(len(seen.get(key, ())) for key in live)
        overflow = (OVERFLOW_LABEL, OVERFLOW_LABEL)
        for band in bands:
            priority = str(band.priority)
            per_label: dict[tuple[str, str, str], list[int]] = {}
            for flow in list(band.flows.values()):
                fid = label(flow.fairness_id)
                models = fresh.get((fid, priority))
                if models is None:
                    models = fresh[(fid, priority)] = set(seen.get((fid, priority), ()))
                for _, _, item in list(flow.heap) if flow.count else ():
                    request = item.request
                    if item.state is not ItemState.QUEUED or request is None:
                        continue
                    pair = (model(request.model), model(request.target_model))
                    series_fid = fid
                    if pair not in models:
                        if room > 0:
                            room -= 1
                            models.add(pair)
                        else:
                            series_fid, pair = OVERFLOW_LABEL, overflow
                    acc = per_label.setdefault((series_fid, *pair), [0, 0])
                    acc[0] += 1
                    acc[1] += item.size
                for pair in models:
                    per_label.setdefault((fid, *pair), [0, 0])
            for (fid, model_name, target), (count, nbytes) in per_label.items():
                size.add_metric([fid, priority, pool, model_name, target], count)
                qbytes.add_metric([fid, priority, pool, model_name, target], nbytes)
            cap_r.add_metric([priority, pool], band.count / band.max_requests if band.max_requests else 0.0)
            cap_b.add_metric([priority, pool], band.bytes / band.max_bytes if band.max_bytes else 0.0)
        self._seen_models[pool] = fresh
        if src.max_requests:  # as the reference: a global limit is optional, its series absent when unset
            glob_r.add_metric([pool], src.queued / src.max_requests)
        if src.max_bytes:
            glob_b.add_metric([pool], src.queued_bytes / src.max_bytes)
        for stage, value in src.last_saturation.items():
            sat.add_metric([pool, stage], value)
        stale.add_metric([src.detector_name], src.stale_endpoints)
        if src.pending is not None:
            pending_r.add_metric([pool], src.pending.requests)
            pending_t.add_metric([pool], src.pending.tokens)
