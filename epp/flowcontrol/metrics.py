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

from llmepp.flowcontrol.types import Outcome
from llmepp.observability.fast import Buckets, Tally
from llmepp.observability.metrics import PREFIX

if TYPE_CHECKING:
    from llmepp.flowcontrol.queues import FlowQueue, PriorityBand

MAX_FAIRNESS_LABELS = 1000
OVERFLOW_LABEL = "other"

WAIT_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
CYCLE_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1)


class FlowChildren:
    """A flow's queue-duration histograms, one per outcome, bound on first use."""

    __slots__ = ("_hist", "_key", "_metrics")

    def __init__(self, metrics: FlowControlMetrics, fairness_id: str, priority: str, pool: str) -> None:
        self._metrics = metrics
        self._key = (fairness_id, priority, pool)
        self._hist: dict[Outcome, Buckets] = {}

    def wait(self, outcome: Outcome) -> Buckets:
        found = self._hist.get(outcome)
        if found is None:
            fid, priority, pool = self._key
            found = self._hist[outcome] = self._metrics.wait_histogram(fid, priority, outcome.value, pool)
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
    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, FlowControlMetrics] = weakref.WeakKeyDictionary()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> FlowControlMetrics:
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found

    def __init__(self, registry: CollectorRegistry) -> None:
        # (outcome, priority, inference_pool) → Tally
        self.outcomes: dict[tuple[str, str, str], Tally] = {}
        # (fairness_id, priority, outcome, inference_pool) → Buckets
        self.waits: dict[tuple[str, str, str, str], Buckets] = {}
        self.dispatch_cycle = Buckets(CYCLE_BUCKETS)
        # (victim priority, inference_pool) → in-flight revocations (flowcontrol.eviction)
        self.revocations: dict[tuple[str, str], Tally] = {}
        # (priority, inference_pool) → flow limit (flowControl.maxFlows): empty flows dropped early to
        # make room, and requests queued in the band's overflow flow
        self.flow_evictions: dict[tuple[str, str], Tally] = {}
        self.overflows: dict[tuple[str, str], Tally] = {}
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self._fairness_labels: set[str] = set()
        registry.register(_Collector(self))

    def add_source(self, source: Any) -> None:
        self._sources.add(source)

    def sources(self) -> list[Any]:
        return list(self._sources)

    def fairness_label(self, fairness_id: str) -> str:
        labels = self._fairness_labels
        if fairness_id in labels:
            return fairness_id
        if len(labels) >= MAX_FAIRNESS_LABELS:
            return OVERFLOW_LABEL
        labels.add(fairness_id)
        return fairness_id

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

    def wait_histogram(self, fairness_id: str, priority: str, outcome: str, pool: str) -> Buckets:
        key = (fairness_id, priority, outcome, pool)
        found = self.waits.get(key)
        if found is None:
            found = self.waits[key] = Buckets(WAIT_BUCKETS)
        return found

    def flow_children(self, flow: FlowQueue, pool: str) -> FlowChildren:
        return FlowChildren(self, self.fairness_label(flow.fairness_id), str(flow.priority), pool)

    def band_children(self, band: PriorityBand, pool: str) -> BandChildren:
        return BandChildren(self, str(band.priority), pool)


_COUNTERS = 6  # counter and histogram families first (_families), then the gauges


class _Collector(Collector):
    def __init__(self, metrics: FlowControlMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return self._families()

    def collect(self) -> Iterator[Any]:
        families = self._families()
        m = self.metrics
        total, wait, cycle, revoked, flows_evicted, overflowed = families[:_COUNTERS]
        for (outcome, priority, pool), tally in list(m.outcomes.items()):
            total.add_metric([outcome, priority, pool], tally.value)
        for family, tallies in ((revoked, m.revocations), (flows_evicted, m.flow_evictions), (overflowed, m.overflows)):
            for (priority, pool), tally in list(tallies.items()):
                family.add_metric([priority, pool], tally.value)
        for labels, hist in list(m.waits.items()):
            wait.add_metric(list(labels), hist.cumulative(), hist.sum)
        cycle.add_metric([], m.dispatch_cycle.cumulative(), m.dispatch_cycle.sum)
        for src in m.sources():
            self._fill_gauges(families[_COUNTERS:], src)
        return iter(families)

    @staticmethod
    def _families() -> list[Any]:
        p = PREFIX
        flow = ["fairness_id", "priority", "inference_pool"]
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
                labels=["fairness_id", "priority", "outcome", "inference_pool"],
            ),
            HistogramMetricFamily(p + "flow_control_dispatch_cycle_duration_seconds", "One dispatcher cycle."),
            CounterMetricFamily(
                p + "flow_control_revocations_total",
                "Dispatched requests evicted to free capacity for a blocked band, by their priority.",
                labels=["priority", "inference_pool"],
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
                "Queued requests / global maxRequests (0 when unlimited).",
                labels=["inference_pool"],
            ),
            GaugeMetricFamily(
                p + "flow_control_global_capacity_utilization_bytes",
                "Queued bytes / global maxBytes (0 when unlimited).",
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
        ]

    def _fill_gauges(self, families: list[Any], src: Any) -> None:
        size, qbytes, cap_r, cap_b, glob_r, glob_b, sat, stale, flows = families
        pool = src.pool_name
        label = self.metrics.fairness_label
        flows.add_metric([pool], sum(len(band.flows) for band in list(src.bands.values())))
        for band in list(src.bands.values()):
            priority = str(band.priority)
            per_label: dict[str, list[int]] = {}
            for flow in list(band.flows.values()):
                acc = per_label.setdefault(label(flow.fairness_id), [0, 0])
                acc[0] += flow.count
                acc[1] += flow.bytes
            for fid, (count, nbytes) in per_label.items():
                size.add_metric([fid, priority, pool], count)
                qbytes.add_metric([fid, priority, pool], nbytes)
            cap_r.add_metric([priority, pool], band.count / band.max_requests if band.max_requests else 0.0)
            cap_b.add_metric([priority, pool], band.bytes / band.max_bytes if band.max_bytes else 0.0)
        glob_r.add_metric([pool], src.queued / src.max_requests if src.max_requests else 0.0)
        glob_b.add_metric([pool], src.queued_bytes / src.max_bytes if src.max_bytes else 0.0)
        for stage, value in src.last_saturation.items():
            sat.add_metric([pool, stage], value)
        stale.add_metric([src.detector_name], src.stale_endpoints)
