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


def test_label_values_of_other_types_name_the_same_series_as_their_strings() -> None:
    """`labels` looks a child up by the values as given first (strings: no conversion), then by their str()."""
    c = Counter("z_total", "Z.", ("priority", "model"), registry=CollectorRegistry())
    assert c.labels(1, "m") is c.labels("1", "m") is c.labels(priority=1, model="m")
    assert c.labels(1, "m") is not c.labels("2", "m")
    with pytest.raises(ValueError, match="expected labels"):
        c.labels(1)


def test_histograms_reach_as_far_as_the_values_they_record() -> None:
    """The top finite bucket is at least the reference's (llm-d-router pkg/epp/metrics) and what the EPP allows:
    above it, every value lands in +Inf and histogram_quantile answers with the top bound."""
    from llmepp.flowcontrol.controller import DEFAULT_REQUEST_TTL
    from llmepp.observability.metrics import EppMetrics

    m = EppMetrics()
    # Includes the flow-control queue wait, up to the default request TTL (the reference's top: 10 s).
    assert m.request_processing.bounds[-1] >= DEFAULT_REQUEST_TTL
    assert m.request_duration.bounds[-1] >= 3600 and m.request_ttft.bounds[-1] >= 120
    for tokens in (m.input_tokens, m.cached_tokens):  # 1M-token context windows
        assert tokens.bounds[-1] >= 1 << 20
    assert m.request_size.bounds[-1] >= 1 << 30
    for h in (m.request_processing, m.request_duration, m.input_tokens, m.request_size):
        assert list(h.bounds) == sorted(set(h.bounds))


def test_a_producer_registered_during_a_scrape_does_not_fail_it() -> None:
    """/metrics renders in a worker thread; a config reload may register an inflight-load-producer meanwhile."""
    from collections.abc import Iterator, Mapping

    from llmepp.observability.metrics import EppMetrics

    m = EppMetrics()

    class ReloadMidScrape(Mapping[object, object]):
        def __getitem__(self, key: object) -> object:
            raise KeyError(key)

        def __len__(self) -> int:
            return 0

        def __iter__(self) -> Iterator[object]:
            m.inflight.add("reloaded", {})  # the event loop, between two of the scrape's steps
            return iter(())

    m.inflight.add("first", ReloadMidScrape())  # type: ignore[arg-type]
    assert "llm_d_epp_inflight_requests" in generate_latest(m.registry).decode()
