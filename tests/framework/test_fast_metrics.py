"""Lock-free metric families render as valid Prometheus text with the right values."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmepp.observability.fast import Counter, Gauge, Histogram


def families(registry: CollectorRegistry) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return out


def test_counter_gauge_histogram_exposition() -> None:
    r = CollectorRegistry()
    c = Counter("x_requests_total", "Requests.", ("model",), registry=r)
    g = Gauge("x_inflight", "In flight.", registry=r)
    h = Histogram("x_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=r)
    c.labels("a").inc()
    c.labels(model="a").inc(2)
    c.labels("b").inc()
    g.inc()
    g.inc()
    g.dec()
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    f = families(r)
    assert f["x_requests"][("x_requests_total", (("model", "a"),))] == 3.0
    assert f["x_requests"][("x_requests_total", (("model", "b"),))] == 1.0
    assert f["x_inflight"][("x_inflight", ())] == 1.0
    hist = f["x_latency_seconds"]
    assert hist[("x_latency_seconds_bucket", (("le", "0.1"),))] == 2.0  # le is inclusive
    assert hist[("x_latency_seconds_bucket", (("le", "1.0"),))] == 3.0
    assert hist[("x_latency_seconds_bucket", (("le", "+Inf"),))] == 4.0
    assert hist[("x_latency_seconds_count", ())] == 4.0
    assert abs(hist[("x_latency_seconds_sum", ())] - 3.65) < 1e-9


def test_wrong_label_count_is_an_error() -> None:
    c = Counter("y_total", "Y.", ("a", "b"), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        c.labels("only-one")
