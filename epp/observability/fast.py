"""Lock-free metric families for the request path.

prometheus_client's `inc` / `observe` take a lock and cost ~1–2 µs each; a request records a
dozen of them. These families keep plain accumulators instead (an int add; a bisect and an
add) — safe because the event loop is their only writer — and turn them into Prometheus
families only when /metrics is scraped. Same call shapes as prometheus_client:
`family.labels(*values).inc()`, `.observe(v)`, `.set(v)`, and label-less families directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class Tally:
    """A counter child."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Level:
    """A gauge child."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Buckets:
    """A histogram child: per-bucket counts (non-cumulative, last = +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is inclusive).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            acc += n
            out.append((floatToGoString(bound), float(acc)))
        return out


C = TypeVar("C", Tally, Level, Buckets)


class _Family(Generic[C]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        self._default: C | None = None if self.labelnames else self._new()
        _collector_for(registry).families.append(self)

    def _new(self) -> C:
        raise TypeError

    def labels(self, *values: Any, **kw: Any) -> C:
        if kw:
            values = tuple(kw[n] for n in self.labelnames)
        child = self._children.get(values)  # label values given as strings (the usual case): no conversion
        if child is not None:
            return child
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
            child = self._children[key] = self._new()
        return child

    def remove(self, *values: Any) -> None:
        self._children.pop(tuple(str(v) for v in values), None)

    def _items(self) -> Iterator[tuple[list[str], C]]:
        if self._default is not None:
            yield [], self._default
        for key, child in list(self._children.items()):
            yield list(key), child

    def collect(self) -> Metric:
        raise TypeError


class Counter(_Family[Tally]):
    def _new(self) -> Tally:
        return Tally()

    def inc(self, amount: float = 1.0) -> None:
        assert self._default is not None, f"{self.name} has labels"
        self._default.inc(amount)

    def collect(self) -> Metric:
        base = self.name[: -len("_total")] if self.name.endswith("_total") else self.name
        family = CounterMetricFamily(base, self.documentation, labels=self.labelnames)
        for values, child in self._items():
            family.add_metric(values, child.value)
        return family


class Gauge(_Family[Level]):
    def _new(self) -> Level:
        return Level()

    def set(self, value: float) -> None:
        assert self._default is not None, f"{self.name} has labels"
        self._default.set(value)

    def inc(self, amount: float = 1.0) -> None:
        assert self._default is not None, f"{self.name} has labels"
        self._default.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        assert self._default is not None, f"{self.name} has labels"
        self._default.dec(amount)

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._items():
            family.add_metric(values, child.value)
        return family


class Histogram(_Family[Buckets]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new(self) -> Buckets:
        return Buckets(self.bounds)

    def observe(self, value: float) -> None:
        assert self._default is not None, f"{self.name} has labels"
        self._default.observe(value)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._items():
            family.add_metric(values, child.cumulative(), child.sum)
        return family


class _FastCollector(Collector):
    def __init__(self) -> None:
        self.families: list[_Family[Any]] = []

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()


def _collector_for(registry: CollectorRegistry) -> _FastCollector:
    """One collector per registry, registered on first use (kept on the registry object)."""
    collector: _FastCollector | None = getattr(registry, "_llmepp_fast", None)
    if collector is None:
        collector = _FastCollector()
        registry.register(collector)
        registry._llmepp_fast = collector  # type: ignore[attr-defined]
    return collector
