"""Counters of the KV-event pipeline, exported as Prometheus metrics at scrape time.

The hot path only increments plain ints on one object; a custom collector reads them when
/metrics is scraped (no per-event Prometheus call, no label lookups). Metric names follow the
EPP's `llm_d_epp_` prefix with a `producer` label (several precise producers may coexist).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from llmepp.kvevents.chain import ChainStats
from llmepp.observability.metrics import per_registry


@dataclass(slots=True)
class KVEventStats:
    messages: int = 0  # PUB messages received (frames read)
    batches: int = 0  # batches applied (live + replayed)
    block_stored: int = 0  # engine blocks named by BlockStored events
    block_removed: int = 0
    all_cleared: int = 0
    malformed_frames: int = 0  # wrong frame count / sequence size
    malformed_payloads: int = 0  # undecodable msgpack envelopes
    skipped_events: int = 0  # unknown event types / unreadable events inside a batch
    gaps: int = 0  # sequence gaps seen (live)
    lost_batches: int = 0  # batches never recovered (no replay, replay failed or incomplete)
    duplicates: int = 0  # batches seen twice (replay overlap)
    resets: int = 0  # publisher restarts detected (sequence went back)
    replays_ok: int = 0
    replays_failed: int = 0  # timeout or error; the source cools down
    replays_incomplete: int = 0  # the publisher no longer buffered the first batch asked for
    replayed_batches: int = 0
    redials: int = 0  # connections ZeroMQ dropped for good (a message over the size limit) and dialled again
    caught_up_batches: int = 0  # missed batches another replica had applied: state taken from the shared index
    restarts: int = 0  # subscribers restarted after an error (e.g. the shared index unreachable)
    unknown_sources: int = 0  # global-socket mode: messages whose topic names no endpoint of the pool
    queue_drops: int = 0  # global-socket mode: messages dropped because their source's queue was full
    # Redis index only: requests routed without prefix data, and speculative writes lost.
    lookup_errors: int = 0  # the lookup failed (Redis unreachable, connection lost, script error)
    lookup_timeouts: int = 0  # the lookup outlasted lookupTimeout
    lookup_skips: int = 0  # Redis not called: too many lookups were already waiting on it
    speculation_errors: int = 0  # a speculative write failed or timed out
    speculation_skips: int = 0  # a speculative write not started: too many were already waiting on Redis


_COUNTERS = [f.name for f in fields(KVEventStats)]
_CHAIN_COUNTERS = [f.name for f in fields(ChainStats)]


class KVEventsCollector(Collector):
    """Exports one producer's counters; `gauges()` supplies index sizes and subscriber counts."""

    def __init__(
        self,
        producer: str,
        stats: KVEventStats,
        chain_stats: Callable[[], ChainStats],
        gauges: Callable[[], dict[str, float]],
    ) -> None:
        self.producer = producer
        self.stats = stats
        self.chain_stats = chain_stats
        self.gauges = gauges

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["producer"]
        chain = self.chain_stats()
        counters = [(n, getattr(self.stats, n)) for n in _COUNTERS] + [(n, getattr(chain, n)) for n in _CHAIN_COUNTERS]
        for name, value in counters:
            text = name.replace("_", " ")
            c = CounterMetricFamily(f"llm_d_epp_kv_events_{name}", f"KV events: {text}.", labels=labels)
            c.add_metric([self.producer], value)
            yield c
        for name, value in self.gauges().items():
            text = name.replace("_", " ")
            g = GaugeMetricFamily(f"llm_d_epp_kv_{name}", f"Precise prefix index: {text}.", labels=labels)
            g.add_metric([self.producer], value)
            yield g


class _Exported(Collector):
    """Every precise producer's counters in one registry, each family once with a sample per producer:
    a collector per producer would repeat each family name (OpenMetrics refuses such a page)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.by_producer: dict[str, KVEventsCollector] = {}
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for collector in list(self.by_producer.values()):
            for family in collector.collect():
                found = families.setdefault(family.name, family)
                if found is not family:
                    found.samples.extend(family.samples)
        yield from families.values()


def register(registry: CollectorRegistry | None, collector: KVEventsCollector) -> None:
    if registry is not None:
        # A producer rebuilt under its name (a config reload) replaces the retired one's series.
        per_registry(registry, "kv-events", _Exported).by_producer[collector.producer] = collector
