"""Multicluster data layer: the cluster list (multicluster-file-discovery) and each cluster's load as its
EPP publishes it, scraped by the real collector from real servers serving a real EPP metrics page:
read, then unknown (never idle) when the peer lacks a gauge, serves garbage, fails or is unreachable;
counted and logged once per streak and interval. A cluster reporting no ready endpoints is unavailable
(counted and logged once per change); a hub publishes its clusters' averages, weighted by their ready
endpoints, as its own pool gauges (so hubs chain), and its saturation detector sees its clusters' load."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import until
from prometheus_client import generate_latest

from llmepp.config.loader import build, load_config
from llmepp.datalayer.collector import MetricsCollector
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointMetrics, EndpointSpec
from llmepp.datalayer.endpointsfile import EndpointsFileError, parse_endpoints
from llmepp.datalayer.multicluster import (
    POOL_KV_CACHE_UTILIZATION,
    POOL_QUEUE_SIZE,
    POOL_READY_ENDPOINTS,
    POOL_RUNNING_REQUESTS,
    AvailabilityLog,
    cluster_metrics,
    is_unavailable,
    pool_averages,
)
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources import multicluster as mc_source
from llmepp.plugins.datasources.multicluster import MulticlusterMetricsDataSource, MulticlusterMetricsExtractor
from llmepp.plugins.discovery.multicluster import MulticlusterFileDiscovery, cluster_labels, gateway_address
from llmepp.plugins.flowcontrol.utilization_detector import UtilizationDetector, UtilizationDetectorParams
from llmepp.plugins.scorers.multicluster import MulticlusterQueueScorer

from .fakes import TEST_CERT, TEST_KEY, MetricsServer

CLUSTERS = """
endpoints:
- name: cluster-a
  address: 10.20.0.5
  port: 80
  labels: {metricsAddress: 10.20.0.9, metricsPort: 9090, region: eu}
- name: cluster-b
  address: gw.cluster-b.example.com
  port: "443"
  labels: {metricsAddress: epp.cluster-b.example.com}
- name: cluster-c
  address: 10.30.0.5
  port: 8081
  metricsPort: 9091
"""


def parse_clusters(text: str) -> list[EndpointSpec]:
    return parse_endpoints(text.encode(), address_check=gateway_address, entry_check=cluster_labels)


def epp_page(
    *, kv: float | None, queue: float | None, ready: float | None = 2, running: float | None = None, pool: str = "pool"
) -> bytes:
    """A cluster EPP's /metrics page, rendered by its own registry (every family, HELP/TYPE lines)."""
    m = EppMetrics()
    if kv is not None:
        m.pool_avg_kv.labels(name=pool).set(kv)
    if queue is not None:
        m.pool_avg_queue.labels(name=pool).set(queue)
    if ready is not None:
        m.pool_ready.labels(name=pool).set(ready)
    if running is not None:
        m.pool_avg_running.labels(name=pool).set(running)
    return generate_latest(m.registry)


# -- the cluster list ------------------------------------------------------------------------------


def test_cluster_entries_take_hostnames_and_metrics_labels() -> None:
    a, b, c = parse_clusters(CLUSTERS)
    assert (a.hostport, a.labels["metricsAddress"], a.labels["metricsPort"]) == ("10.20.0.5:80", "10.20.0.9", "9090")
    assert b.hostport == "gw.cluster-b.example.com:443"
    assert c.metrics_port == 9091
    source = MulticlusterMetricsDataSource("s")
    # The peer EPP's metrics: the labels, else the entry's metricsPort, else the gateway itself.
    assert source.target_for(a).url == "https://10.20.0.9:9090/metrics"
    assert source.target_for(b).url == "https://epp.cluster-b.example.com:443/metrics"
    assert source.target_for(c).url == "https://10.30.0.5:9091/metrics"
    override = MulticlusterMetricsDataSource("s", MulticlusterMetricsDataSource.Params(scheme="http", port=9100))
    assert override.target_for(a).url == "http://10.20.0.9:9100/metrics"
    # An IPv6 gateway (and EPP) goes out bracketed, as a pod's pick does.
    (v6,) = parse_clusters(
        "endpoints:\n- {name: v6, address: 'FD00::5', port: 80, labels: {metricsAddress: 'fd00::9'}}\n"
    )
    assert v6.hostport == "[fd00::5]:80"
    assert source.target_for(v6).url == "https://[fd00::9]:80/metrics"
    # The pod discovery still wants IP literals as pod addresses.
    with pytest.raises(EndpointsFileError, match=r"endpoints\[1\].address: must be an IPv4 or IPv6 address"):
        parse_endpoints(CLUSTERS.encode())


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{name: x, address: 'fe80::1%eth0', port: 80}", "endpoints[0].address: must be an IP address without a zone"),
        (
            "{name: x, address: 'gw_1.example', port: 80}",
            "must be an IP address or a DNS hostname, got 'gw_1.example'",
        ),
        ("{name: x, address: 10.0.0.300, port: 80}", "must be an IP address or a DNS hostname, got '10.0.0.300'"),
        ("{name: x, address: -gw.example, port: 80}", "must be an IP address or a DNS hostname"),
        (
            "{name: x, address: gw.example, port: 80, labels: {metricsAddress: 'not a host'}}",
            "endpoints[0].labels.metricsAddress: must be an IP address or a DNS hostname, got 'not a host'",
        ),
        (
            "{name: x, address: gw.example, port: 80, labels: {metricsPort: 70000}}",
            "endpoints[0].labels.metricsPort: must be a port 1-65535, got '70000'",
        ),
        (
            "{name: x, address: gw.example, port: 80, metricsPort: 9090, labels: {metricsPort: 9091}}",
            "endpoints[0].labels.metricsPort: 9091 disagrees with the entry's metricsPort 9090",
        ),
    ],
)
def test_bad_cluster_entries_name_entry_and_field(entry: str, problem: str) -> None:
    with pytest.raises(EndpointsFileError) as err:
        parse_clusters(f"endpoints:\n- {entry}\n")
    assert problem in str(err.value)


async def test_discovery_loads_clusters_and_warns_once_about_hostnames(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "clusters.yaml"
    path.write_text(CLUSTERS)
    caplog.set_level(logging.WARNING, logger="llmepp.plugins.discovery.multicluster")
    discovery = MulticlusterFileDiscovery("d", MulticlusterFileDiscovery.Params(path=str(path), watch_file=True))
    discovery.poll_interval = 0.02
    ds = Datastore()
    task = asyncio.create_task(discovery.run(ds))
    try:
        for _ in range(200):
            if ds.synced:
                break
            await asyncio.sleep(0.01)
        assert sorted(ep.name for ep in ds.endpoints) == ["cluster-a", "cluster-b", "cluster-c"]
        path.write_text(CLUSTERS.replace("region: eu", "region: us"))  # a reload re-reads the hostname
        for _ in range(300):
            if discovery.reloads:
                break
            await asyncio.sleep(0.01)
        assert discovery.reloads == 1
        ep = ds.get("cluster-a")
        assert ep is not None and ep.labels["region"] == "us"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gw.cluster-b.example.com is a hostname" in warnings[0]


async def test_a_bad_cluster_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "clusters.yaml"
    path.write_text("endpoints:\n- {name: x, address: 'gw_1.example', port: 80}\n")
    discovery = MulticlusterFileDiscovery("d", MulticlusterFileDiscovery.Params(path=str(path)))
    with pytest.raises(ConfigError, match=r"plugin 'd' \(type multicluster-file-discovery\): .*DNS hostname"):
        await discovery.run(Datastore())


def test_source_defaults_verify_the_peer(tmp_path: Path) -> None:
    strict = MulticlusterMetricsDataSource("s")
    assert strict.scheme == "https" and strict.path == "/metrics" and strict.ticks_per_poll(0.05) == 1
    assert strict.ssl_context is not None and strict.ssl_context.verify_mode == ssl.CERT_REQUIRED
    opted_out = MulticlusterMetricsDataSource("s", MulticlusterMetricsDataSource.Params(insecure_skip_verify=True))
    assert opted_out.ssl_context is not None and opted_out.ssl_context.verify_mode == ssl.CERT_NONE
    custom = MulticlusterMetricsExtractor(
        "x",
        MulticlusterMetricsExtractor.Params(
            kv_cache_utilization_metric="", queue_size_metric='q{name="p"}', ready_endpoints_metric="r"
        ),
    )
    assert [s.spec for s in custom.mapping.selectors if s is not None] == [
        "llm_d_epp_average_kv_cache_utilization",
        'q{name="p"}',
        "r",
        "llm_d_epp_average_running_requests",
    ]
    with pytest.raises(ConfigError, match=r"parameters.readyEndpointsMetric: "):
        MulticlusterMetricsExtractor("x", MulticlusterMetricsExtractor.Params(ready_endpoints_metric="a{"))


# -- scraping the peers ------------------------------------------------------------------------------


@dataclass
class Hub:
    datastore: Datastore
    metrics: EppMetrics
    collector: MetricsCollector

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def unavailable(self, cluster: str) -> float:
        return self.sample("llm_d_epp_multicluster_cluster_unavailable_total", cluster=cluster)

    def gauges(self) -> tuple[float, float, float, float]:
        """The hub's own pool gauges, refreshed now: (ready, average KV, average queue, average running)."""
        self.collector.update_pool_gauges()
        names = ("ready_endpoints", "average_kv_cache_utilization", "average_queue_size", "average_running_requests")
        pool = {"name": self.datastore.pool_name}
        r, kv, q, run = (self.metrics.registry.get_sample_value(f"llm_d_epp_{n}", pool) for n in names)
        return r or 0.0, kv or 0.0, q or 0.0, run or 0.0

    def poll_errors(self) -> float:
        return self.sample("llm_d_epp_datalayer_poll_errors_total", source_type="multicluster-metrics-data-source")

    def extract_errors(self) -> float:
        return self.sample(
            "llm_d_epp_datalayer_extract_errors_total",
            source_type="multicluster-metrics-data-source",
            extractor_type="multicluster-metrics-extractor",
        )

    def add(self, name: str, server: MetricsServer) -> Endpoint:
        """A cluster whose gateway is elsewhere (nothing listens there) and whose EPP is `server`."""
        labels = {"metricsAddress": server.host, "metricsPort": str(server.port)}
        self.datastore.upsert(EndpointSpec(name=name, address="127.0.0.90", port=9, labels=labels))
        ep = self.datastore.get(name)
        assert ep is not None
        return ep


@pytest.fixture
async def hubs() -> AsyncIterator[Callable[..., object]]:
    made: list[Hub] = []

    async def make(source_params: str = "{scheme: http}", pool: str = "hub") -> Hub:
        """The collector exactly as the app builds it from a hub config."""
        text = f"""
plugins:
- {{type: multicluster-file-discovery, parameters: {{path: /x}}}}
- {{type: multicluster-metrics-data-source, parameters: {source_params}}}
- {{type: multicluster-metrics-extractor}}
dataLayer:
  discovery: {{pluginRef: multicluster-file-discovery}}
  sources:
  - pluginRef: multicluster-metrics-data-source
    extractors: [{{pluginRef: multicluster-metrics-extractor}}]
"""
        ds, metrics = Datastore(pool), EppMetrics()
        [wired] = build(load_config(text), datastore=ds, metrics=metrics).data_sources
        collector = MetricsCollector(ds, metrics, 0.05, wired.source, wired.extractors[0], 0.3)  # type: ignore[arg-type]
        await collector.start()
        hub = Hub(ds, metrics, collector)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        await hub.collector.aclose()


@pytest.fixture
async def peers() -> AsyncIterator[Callable[..., object]]:
    started: list[MetricsServer] = []

    async def start(host: str, page: bytes, ssl_context: ssl.SSLContext | None = None) -> MetricsServer:
        server = await MetricsServer(host, page, ssl_context).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def load(ep: Endpoint) -> tuple[float | None, float | None]:
    a = ep.metrics.attributes
    return a.get(POOL_QUEUE_SIZE), a.get(POOL_KV_CACHE_UTILIZATION)


async def test_pool_averages_follow_the_peer_and_go_unknown_when_it_cannot_be_read(
    hubs: Callable[..., object], peers: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmepp.datalayer.collector")
    hub: Hub = await hubs()  # type: ignore[misc]
    peer: MetricsServer = await peers("127.0.0.81", epp_page(kv=0.25, queue=3.5))  # type: ignore[misc]
    ep = hub.add("cluster-a", peer)
    await until(lambda: load(ep) == (3.5, 0.25))
    peer.page = epp_page(kv=0.75, queue=0.5)
    await until(lambda: load(ep) == (0.5, 0.75))
    assert hub.poll_errors() == 0 and hub.extract_errors() == 0
    # The peer stops publishing the queue gauge: that one is unknown, the KV value still follows.
    peer.page = epp_page(kv=0.5, queue=None)
    await until(lambda: load(ep) == (None, 0.5))
    assert hub.extract_errors() >= 1
    # Neither gauge (e.g. a model server's page by mistake), then garbage: unknown, nothing kept.
    peer.page = (
        b"# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 4\n"
    )
    await until(lambda: ep.metrics is NO_METRICS)
    peer.page = epp_page(kv=0.1, queue=1.0)
    await until(lambda: load(ep) == (1.0, 0.1))
    peer.mode = "garbage"
    await until(lambda: ep.metrics is NO_METRICS)
    # An error status, then unreachable: unknown at once (not last known values aging), counted.
    peer.mode = "ok"
    await until(lambda: load(ep) == (1.0, 0.1))
    peer.mode = "status"
    await until(lambda: ep.metrics is NO_METRICS)
    peer.mode = "ok"
    await until(lambda: load(ep) == (1.0, 0.1))
    errors = hub.poll_errors()
    await peer.stop()
    await until(lambda: ep.metrics is NO_METRICS and hub.poll_errors() >= errors + 3)
    await peer.start()  # same address and port: back to known values
    await until(lambda: load(ep) == (1.0, 0.1))
    records = [r for r in caplog.records if getattr(r, "endpoint", None) == "cluster-a"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    recoveries = [r.getMessage() for r in records if r.levelno == logging.INFO]
    # One warning per failure streak (4 above: a gauge missing then both, garbage, 503, unreachable),
    # each with its reason, the rest at DEBUG; one recovery line each.
    assert len(warnings) == 4, warnings
    assert "custom metric llm-d.ai/multicluster-queue-size: llm_d_epp_average_queue_size: not found" in warnings[0]
    assert "llm_d_epp_average_kv_cache_utilization: not found" in warnings[1]
    assert "HTTP status 503" in warnings[2] and "connect to 127.0.0.81" in warnings[3]
    assert len(recoveries) == 4 and all("recovered after" in m for m in recoveries)


async def test_a_lasting_failure_is_logged_again_once_per_interval(
    hubs: Callable[..., object], peers: Callable[..., object], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(mc_source.MulticlusterMetricsDataSource, "failure_log_interval", 0.3)
    caplog.set_level(logging.WARNING, logger="llmepp.datalayer.collector")
    hub: Hub = await hubs()  # type: ignore[misc]
    peer: MetricsServer = await peers("127.0.0.82", epp_page(kv=0.2, queue=1.0))  # type: ignore[misc]
    ep = hub.add("cluster-b", peer)
    await until(lambda: load(ep) == (1.0, 0.2))
    peer.mode = "status"
    await asyncio.sleep(1.0)  # ~20 failed scrapes
    peer.mode = "ok"
    warnings = [r.getMessage() for r in caplog.records if getattr(r, "endpoint", None) == "cluster-b"]
    assert hub.poll_errors() >= 10
    assert 3 <= len(warnings) <= 5, warnings  # the first, then one per 0.3 s: not one per scrape
    assert " in a row over " in warnings[1] and warnings[1].endswith("): HTTP status 503")


async def test_peer_certificates_are_verified_by_default(
    hubs: Callable[..., object], peers: Callable[..., object], tmp_path: Path
) -> None:
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    (tmp_path / "c.pem").write_text(TEST_CERT)
    (tmp_path / "k.pem").write_text(TEST_KEY)
    server_tls.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    peer: MetricsServer = await peers("127.0.0.44", epp_page(kv=0.3, queue=2.0), server_tls)  # type: ignore[misc]
    strict: Hub = await hubs("{}")  # type: ignore[misc]
    trusted: Hub = await hubs(f"{{caCertPath: {tmp_path / 'c.pem'}}}")  # type: ignore[misc]
    a, b = strict.add("untrusted", peer), trusted.add("trusted", peer)
    await until(lambda: load(b) == (2.0, 0.3) and strict.poll_errors() >= 3)
    assert a.metrics is NO_METRICS  # a self-signed peer is refused: its load stays unknown


# -- availability and the hub's own gauges -----------------------------------------------------------


async def test_an_empty_cluster_is_unavailable_counted_and_logged_once_per_change(
    hubs: Callable[..., object], peers: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmepp.datalayer.multicluster")
    hub: Hub = await hubs()  # type: ignore[misc]
    peer: MetricsServer = await peers("127.0.0.83", epp_page(kv=0.4, queue=2.5, ready=3, running=1.5))  # type: ignore[misc]
    ep = hub.add("cluster-e", peer)
    await until(lambda: ep.metrics.attributes.get(POOL_READY_ENDPOINTS) == 3)
    # Available: the pool averages are the cluster's per-endpoint fields too (what generic plugins read).
    m = ep.metrics
    assert (m.waiting_queue_size, m.kv_cache_usage_percent, m.running_requests_size) == (2.5, 0.4, 1.5)
    assert m.update_time > 0 and not is_unavailable(ep)
    # Its pods are gone: its EPP still publishes averages of 0, which must not read as idle.
    peer.page = epp_page(kv=0.0, queue=0.0, ready=0)
    await until(lambda: is_unavailable(ep))
    scrapes = peer.requests
    await until(lambda: peer.requests >= scrapes + 5)  # still empty: nothing more counted or logged
    assert ep.metrics.update_time == 0.0 and ep.metrics.waiting_queue_size == 0  # no load to act on
    assert hub.unavailable("cluster-e") == 1
    peer.page = epp_page(kv=0.1, queue=0.0, ready=1)
    await until(lambda: not is_unavailable(ep) and ep.metrics.update_time > 0)
    peer.page = epp_page(kv=0.0, queue=0.0, ready=0)
    await until(lambda: is_unavailable(ep))
    assert hub.unavailable("cluster-e") == 2
    peer.mode = "status"  # unreadable: the count is unknown, which is not 0: a candidate again
    await until(lambda: ep.metrics is NO_METRICS)
    assert not is_unavailable(ep) and hub.unavailable("cluster-e") == 2
    # A page without the ready gauge: an extraction error, the loads still used, not unavailable.
    peer.mode = "ok"
    peer.page = epp_page(kv=0.3, queue=1.0, ready=None)
    errors = hub.extract_errors()
    await until(lambda: load(ep) == (1.0, 0.3) and hub.extract_errors() > errors)
    assert not is_unavailable(ep) and ep.metrics.waiting_queue_size == 1.0
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llmepp.datalayer.multicluster"]
    assert logged == [
        (logging.WARNING, logged[0][1]),
        (logging.INFO, "cluster cluster-e: 1 ready endpoints again; back in rotation"),
        (logging.WARNING, logged[0][1]),
        (logging.INFO, logged[3][1]),
    ], logged
    assert "reports no ready endpoints" in logged[0][1] and "unknown" in logged[3][1]


def scraped_cluster(name: str, **attributes: float) -> Endpoint:
    ep = Endpoint(EndpointSpec(name=name, address="10.9.9.9", port=80))
    keys = {"queue": POOL_QUEUE_SIZE, "kv": POOL_KV_CACHE_UTILIZATION, "ready": POOL_READY_ENDPOINTS}
    ep.metrics = cluster_metrics({keys.get(k, POOL_RUNNING_REQUESTS): v for k, v in attributes.items()}, 1.0)
    return ep


def test_pool_averages_weigh_clusters_by_ready_endpoints_and_skip_empty_and_unknown_ones() -> None:
    big = scraped_cluster("big", queue=4.0, kv=0.6, ready=3, running=2.0)
    small = scraped_cluster("small", queue=0.0, kv=0.2, ready=1, running=0.0)
    empty = scraped_cluster("empty", queue=0.0, kv=0.0, ready=0, running=0.0)
    unseen = Endpoint(EndpointSpec(name="unseen", address="10.9.9.8", port=80))  # never read
    assert pool_averages([big, small, empty, unseen]) == pytest.approx((4, 0.5, 3.0, 1.5))
    # A cluster without a ready count: no weights then (a plain mean over the clusters with a value);
    # it publishes no running average, so that one is still weighted over the other two.
    legacy = scraped_cluster("legacy", queue=1.0, kv=0.4)
    assert pool_averages([big, small, legacy]) == pytest.approx((4, 0.4, 5 / 3, 1.5))
    # Nothing known, or every cluster empty: 0, as an empty pod pool reads.
    assert pool_averages([empty, unseen]) == (0, 0.0, 0.0, 0.0)
    assert pool_averages([]) == (0, 0.0, 0.0, 0.0)


async def test_a_hub_publishes_its_clusters_averages_and_chains_and_its_detector_sees_their_load(
    hubs: Callable[..., object], peers: Callable[..., object]
) -> None:
    hub: Hub = await hubs()  # type: ignore[misc]
    big: MetricsServer = await peers("127.0.0.84", epp_page(kv=0.6, queue=4.0, ready=3, running=2.0))  # type: ignore[misc]
    small: MetricsServer = await peers("127.0.0.85", epp_page(kv=0.2, queue=0.0, ready=1, running=0.0))  # type: ignore[misc]
    empty: MetricsServer = await peers("127.0.0.86", epp_page(kv=0.0, queue=0.0, ready=0, running=0.0))  # type: ignore[misc]
    clusters = [hub.add("big", big), hub.add("small", small), hub.add("empty", empty)]
    await until(lambda: all(POOL_READY_ENDPOINTS in ep.metrics.attributes for ep in clusters))
    # Per pod behind the hub: (3·4 + 1·0) / 4 queued, (3·0.6 + 1·0.2) / 4 KV; the empty cluster adds nothing.
    assert hub.gauges() == pytest.approx((4, 0.5, 3.0, 1.5))
    # A hub above reads this hub's page as it reads a cluster's: 4 pods, the same averages.
    top: Hub = await hubs()  # type: ignore[misc]
    lower: MetricsServer = await peers("127.0.0.87", generate_latest(hub.metrics.registry))  # type: ignore[misc]
    other: MetricsServer = await peers("127.0.0.88", epp_page(kv=0.0, queue=0.0, ready=4, running=0.0))  # type: ignore[misc]
    a, b = top.add("hub-a", lower), top.add("cluster-b", other)
    await until(lambda: POOL_READY_ENDPOINTS in a.metrics.attributes and POOL_READY_ENDPOINTS in b.metrics.attributes)
    assert a.metrics.attributes == pytest.approx(
        {POOL_READY_ENDPOINTS: 4, POOL_KV_CACHE_UTILIZATION: 0.5, POOL_QUEUE_SIZE: 3.0, POOL_RUNNING_REQUESTS: 1.5}
    )
    assert top.gauges() == pytest.approx((8, 0.25, 1.5, 0.75))
    # The saturation detector (per endpoint: max(queue / 5, KV / 0.8)) sees each cluster's load; the
    # empty cluster, with no capacity to give, counts as saturated.
    detector = UtilizationDetector("d", UtilizationDetectorParams(metrics_staleness_threshold="10s"))
    assert detector.saturation(clusters, time.monotonic()) == pytest.approx((0.8 + 0.25 + 1.0) / 3)
    empty.page = epp_page(kv=0.0, queue=0.0, ready=2, running=0.0)  # its pods are back, idle
    await until(lambda: not is_unavailable(clusters[2]))
    assert detector.saturation(clusters, time.monotonic()) == pytest.approx((0.8 + 0.25 + 0.0) / 3)
    assert hub.gauges() == pytest.approx((6, (1.8 + 0.2) / 6, 2.0, 1.0))


def test_a_hubs_spreads_leave_out_empty_clusters_as_its_averages_do() -> None:
    # An empty cluster's EPP publishes 0 averages (its pool has no pod): like its ready count of 0 they say
    # nothing about load, so the hub's std-dev gauges must skip it as its average gauges do.
    text = """
plugins:
- {type: multicluster-file-discovery, parameters: {path: /x}}
- {type: multicluster-metrics-data-source, parameters: {scheme: http}}
- {type: multicluster-metrics-extractor}
dataLayer:
  discovery: {pluginRef: multicluster-file-discovery}
  sources:
  - pluginRef: multicluster-metrics-data-source
    extractors: [{pluginRef: multicluster-metrics-extractor}]
"""
    ds, metrics = Datastore("hub"), EppMetrics()
    [wired] = build(load_config(text), datastore=ds, metrics=metrics).data_sources
    collector = MetricsCollector(ds, metrics, 0.05, wired.source, wired.extractors[0])  # type: ignore[arg-type]
    loads = {
        "big": dict(queue=4.0, kv=0.6, ready=3, running=2.0),
        "small": dict(queue=0.0, kv=0.2, ready=1, running=0.0),
        "empty": dict(queue=0.0, kv=0.0, ready=0, running=0.0),
    }
    for name, attributes in loads.items():
        ds.upsert(EndpointSpec(name=name, address="10.9.9.9", port=80 + len(name)))
        ep = ds.get(name)
        assert ep is not None
        ep.metrics = scraped_cluster(name, **attributes).metrics
    collector.update_pool_gauges()

    def gauge(name: str) -> float | None:
        return metrics.registry.get_sample_value(f"llm_d_epp_{name}", {"name": "hub"})

    assert gauge("average_kv_cache_utilization") == pytest.approx(0.5)
    assert gauge("std_dev_kv_cache_utilization") == pytest.approx(0.28)  # of 0.6 and 0.2, not of 0.6, 0.2, 0
    assert gauge("std_dev_queue_size") == pytest.approx(2.83)
    assert gauge("std_dev_running_requests") == pytest.approx(1.41)


# -- broken peers: nonsense values, overflow, flapping ---------------------------------------------


@pytest.mark.parametrize(
    ("page", "unknown"),
    [
        (dict(kv=0.4, queue=-3.0), POOL_QUEUE_SIZE),  # would look idler than idle: all traffic to it
        (dict(kv=-0.5, queue=1.0), POOL_KV_CACHE_UTILIZATION),  # would score 1.5
        (dict(kv=0.4, queue=1.0, ready=-2), POOL_READY_ENDPOINTS),  # a negative weight in the hub's mean
        (dict(kv=0.4, queue=1.0, ready=1e30), POOL_READY_ENDPOINTS),  # no pool has that many pods
        (dict(kv=0.4, queue=1.0, ready=2, running=-1.0), POOL_RUNNING_REQUESTS),
    ],
)
def test_a_negative_or_impossible_pool_value_is_unknown_and_reported(page: dict[str, Any], unknown: str) -> None:
    extractor = MulticlusterMetricsExtractor("x")
    metrics, err = extractor.mapping.extract(epp_page(**page), NO_METRICS, 1.0)
    assert metrics is not None and unknown not in metrics.attributes, metrics.attributes
    assert err is not None and unknown in str(err)
    assert all(v >= 0 for v in metrics.attributes.values())
    assert metrics.waiting_queue_size >= 0 and metrics.kv_cache_usage_percent >= 0


async def test_a_peer_publishing_a_negative_queue_does_not_draw_the_traffic(
    hubs: Callable[..., object], peers: Callable[..., object]
) -> None:
    hub: Hub = await hubs()  # type: ignore[misc]
    broken: MetricsServer = await peers("127.0.0.91", epp_page(kv=0.4, queue=-50.0))  # type: ignore[misc]
    sane: MetricsServer = await peers("127.0.0.92", epp_page(kv=0.4, queue=2.0))  # type: ignore[misc]
    a, b = hub.add("broken", broken), hub.add("sane", sane)
    await until(lambda: load(b) == (2.0, 0.4) and load(a)[1] == 0.4 and hub.extract_errors() >= 1)
    assert load(a)[0] is None
    assert MulticlusterQueueScorer("q").score(None, [a, b]) == [0.0, 1.0]  # type: ignore[arg-type]
    assert all(math.isfinite(v) and v >= 0 for v in hub.gauges())


def test_pool_averages_stay_finite_with_huge_values_and_counts() -> None:
    huge = scraped_cluster("huge", queue=1e300, kv=0.5, ready=1e18, running=1e300)
    small = scraped_cluster("small", queue=1.0, kv=0.5, ready=1, running=1.0)
    legacy = scraped_cluster("legacy", queue=1e308, kv=0.5)  # no ready count: plain mean
    for clusters in ([huge, small], [huge, huge], [legacy, legacy, small]):
        ready, kv, queue, running = pool_averages(clusters)
        assert all(math.isfinite(v) for v in (ready, kv, queue, running)), (ready, kv, queue, running)
        assert kv == pytest.approx(0.5)
    assert pool_averages([huge, small])[2] == pytest.approx(1e300)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flapping_cluster_is_counted_every_time_but_not_logged_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmepp.datalayer.multicluster")
    metrics, clock = EppMetrics(), _Clock()
    availability = AvailabilityLog(metrics.cluster_unavailable, clock=clock)
    ep = scraped_cluster("flappy", queue=1.0, kv=0.5, ready=1)
    empty, one = scraped_cluster("x", queue=0.0, kv=0.0, ready=0).metrics, ep.metrics

    def replace(new: EndpointMetrics) -> None:
        previous, ep.metrics = ep.metrics, new
        availability.metrics_replaced(ep, previous)

    for _ in range(100):  # its EPP's ready count flips every 50 ms scrape for 10 s
        replace(empty)
        clock.now += 0.05
        replace(one)
        clock.now += 0.05
    counted = metrics.registry.get_sample_value(
        "llm_d_epp_multicluster_cluster_unavailable_total", {"cluster": "flappy"}
    )
    assert counted == 100

    def lines() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]

    assert 2 <= len(lines()) <= 6, lines()  # the first changes, then quiet: not 200 lines
    # It ends flapping unavailable: once the quiet period is over, its current state is logged with
    # how many changes went unlogged, at the next scrape (not only at its next change).
    replace(empty)
    before = len(lines())
    clock.now += 60.0
    replace(empty)
    last = lines()[before:]
    assert len(last) == 1 and last[0][0] == logging.WARNING, last
    assert "no ready endpoints" in last[0][1] and "changes" in last[0][1], last
    replace(empty)
    assert len(lines()) == before + 1  # said once
    # A cluster that is removed leaves nothing behind.
    availability.forget(ep.name)
    assert not availability.tracked()


async def test_a_removed_cluster_leaves_no_state_in_the_hub(
    hubs: Callable[..., object], peers: Callable[..., object]
) -> None:
    hub: Hub = await hubs()  # type: ignore[misc]
    peers_ = [await peers(f"127.0.0.{93 + i}", epp_page(kv=0.1, queue=1.0, ready=0)) for i in range(3)]  # type: ignore[misc]
    clusters = [hub.add(f"c{i}", p) for i, p in enumerate(peers_)]
    await until(lambda: all(is_unavailable(ep) for ep in clusters))
    for ep in clusters:
        hub.datastore.delete(ep.name)
    availability = hub.collector.availability
    assert availability is not None and not availability.tracked()
    assert (
        hub.metrics.registry.get_sample_value(  # no series left behind per removed cluster
            "llm_d_epp_multicluster_cluster_unavailable_total", {"cluster": "c0"}
        )
        is None
    )
    assert not hub.collector._by_endpoint and not any(hub.collector._slots)


@pytest.mark.parametrize("status", [401, 403])
async def test_a_peer_asking_for_a_bearer_token_is_unknown_and_logged_with_the_fix(
    hubs: Callable[..., object], peers: Callable[..., object], caplog: pytest.LogCaptureFixture, status: int
) -> None:
    caplog.set_level(logging.WARNING, logger="llmepp.datalayer.collector")
    hub: Hub = await hubs()  # type: ignore[misc]
    peer: MetricsServer = await peers("127.0.0.97", epp_page(kv=0.2, queue=1.0))  # type: ignore[misc]
    peer.mode, peer.status = "status", status  # a Kubernetes-mode cluster EPP with --metrics-endpoint-auth
    ep = hub.add("locked", peer)
    await until(lambda: hub.poll_errors() >= 2)
    assert ep.metrics is NO_METRICS and not is_unavailable(ep)
    [warning] = [r.getMessage() for r in caplog.records if getattr(r, "endpoint", None) == "locked"]
    assert f"HTTP status {status}" in warning and "--metrics-endpoint-auth=false" in warning, warning


async def test_a_slow_peer_is_unknown_after_the_timeout_and_does_not_hold_up_the_others(
    hubs: Callable[..., object], peers: Callable[..., object]
) -> None:
    hub: Hub = await hubs()  # type: ignore[misc]
    slow: MetricsServer = await peers("127.0.0.98", epp_page(kv=0.2, queue=1.0))  # type: ignore[misc]
    fast: MetricsServer = await peers("127.0.0.99", epp_page(kv=0.3, queue=2.0))  # type: ignore[misc]
    a, b = hub.add("slow", slow), hub.add("fast", fast)
    await until(lambda: load(a) == (1.0, 0.2) and load(b) == (2.0, 0.3))
    slow.mode = "hang"  # answers nothing (the fixture's timeout: 0.3 s)
    errors = hub.poll_errors()
    await until(lambda: a.metrics is NO_METRICS and hub.poll_errors() > errors)
    fast.page = epp_page(kv=0.5, queue=4.0)
    await until(lambda: load(b) == (4.0, 0.5))  # the other cluster is still followed
    slow.mode = "ok"
    await slow.stop()  # release the hung handlers
    await slow.start()
    await until(lambda: load(a) == (1.0, 0.2))


async def test_a_peer_publishing_huge_finite_values_does_not_stop_the_hubs_gauges(
    hubs: Callable[..., object], peers: Callable[..., object]
) -> None:
    hub: Hub = await hubs()  # type: ignore[misc]
    wild: MetricsServer = await peers("127.0.0.100", epp_page(kv=1e200, queue=1e300, ready=2, running=1e250))  # type: ignore[misc]
    sane: MetricsServer = await peers("127.0.0.101", epp_page(kv=0.5, queue=1.0, ready=2, running=1.0))  # type: ignore[misc]
    a, b = hub.add("wild", wild), hub.add("sane", sane)
    await until(lambda: load(a) == (1e300, 1e200) and load(b) == (1.0, 0.5))
    ready, kv, queue, _running = hub.gauges()  # raised OverflowError in the spreads: no gauge refreshed
    assert ready == 4 and queue == pytest.approx(5e299) and kv == pytest.approx(5e199)
    for spread in ("kv_cache_utilization", "queue_size", "running_requests"):
        value = hub.metrics.registry.get_sample_value(f"llm_d_epp_std_dev_{spread}", {"name": "hub"})
        assert value is not None and math.isfinite(value), (spread, value)
    per_cluster = hub.metrics.registry.get_sample_value(
        "llm_d_epp_per_endpoint_queue_size", {"name": "hub", "model_server_endpoint": "sane"}
    )
    assert per_cluster == 1.0


# -- pod-only plugins in a hub -------------------------------------------------------------------------
POD_HUB = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: multicluster-file-discovery, name: clusters, parameters: {path: /nonexistent/clusters.yaml}}
- {type: multicluster-metrics-data-source, name: src}
- {type: multicluster-metrics-extractor, name: ext}
- type: multicluster-queue-scorer
dataLayer:
  discovery: {pluginRef: clusters}
  sources: [{pluginRef: src, extractors: [{pluginRef: ext}]}]
"""
# Plugins reading per-pod model-server state (adapters, KV events, one server's load, its GPU) that a
# cluster endpoint (a gateway) never has: in a hub they would do nothing, or mislead, silently.
POD_ONLY = {
    "- type: lora-affinity-scorer\n": "plugin 'lora-affinity-scorer' (type lora-affinity-scorer): reads",
    "- type: precise-prefix-cache-producer\n": "plugin 'precise-prefix-cache-producer' (type precise-prefix-cache",
    "- type: precise-prefix-cache-scorer\n": "plugin 'precise-prefix-cache-scorer' (type precise-prefix-cache-sc",
    "- type: predicted-latency-producer\n": "plugin 'predicted-latency-producer' (type predicted-latency-produce",
    # Its predictions come from an auto-created predicted-latency-producer: the error says who needs it.
    "- type: latency-scorer\n": "(type predicted-latency-producer): needed by latency-scorer; ",
    "- {type: dcgm-data-source, name: gpu}\n": "plugin 'gpu' (type dcgm-data-source): ",
    "- type: dcgm-extractor\n": "(type dcgm-extractor): ",
}


@pytest.mark.parametrize("plugin", sorted(POD_ONLY))
def test_a_hub_refuses_plugins_that_read_per_pod_state_naming_plugin_and_why(plugin: str) -> None:
    text = POD_HUB.replace("- type: multicluster-queue-scorer\n", "- type: multicluster-queue-scorer\n" + plugin)
    with pytest.raises(ConfigError) as e:
        build(load_config(text), datastore=Datastore(), metrics=EppMetrics())
    message = str(e.value)
    assert POD_ONLY[plugin] in message
    assert "'clusters', type multicluster-file-discovery" in message and "hub" in message
    # The same plugin in pod mode loads (the check is the hub's only).
    pods = (
        text.replace("multicluster-file-discovery", "file-discovery")
        .replace(
            "- {type: multicluster-metrics-data-source, name: src}\n"
            "- {type: multicluster-metrics-extractor, name: ext}\n- type: multicluster-queue-scorer\n",
            "",
        )
        .replace("  sources: [{pluginRef: src, extractors: [{pluginRef: ext}]}]\n", "")
    )
    build(load_config(pods), datastore=Datastore(), metrics=EppMetrics())


def test_a_reload_cannot_bring_a_pod_only_scorer_into_a_hub() -> None:
    from llmepp.config.loader import rebuild_scheduling

    ds = Datastore()
    running = build(load_config(POD_HUB), datastore=ds, metrics=EppMetrics())
    text = POD_HUB.replace(
        "- type: multicluster-queue-scorer\n", "- type: multicluster-queue-scorer\n- type: lora-affinity-scorer\n"
    )
    with pytest.raises(ConfigError, match=r"plugin 'lora-affinity-scorer' \(type lora-affinity-scorer\): reads"):
        rebuild_scheduling(running, load_config(text), datastore=ds)


# -- a cluster's EPP failing briefly or over TLS -------------------------------------------------------------
async def test_a_cluster_whose_epp_fails_the_tls_handshake_stays_routable(
    hubs: Callable[..., object], peers: Callable[..., object], tmp_path: Path
) -> None:
    """A failed TLS handshake (a certificate not valid for the peer's address, expired, a rotated CA, an http-only
    peer) proves a server listens on the port: as one answering an error status, the cluster stays a candidate
    with unknown load (before, the handshake error read as "connection refused" and routing left it out)."""
    (tmp_path / "c.pem").write_text(TEST_CERT)
    (tmp_path / "k.pem").write_text(TEST_KEY)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    # The certificate names 127.0.0.1 / .43 / .44: the second cluster's EPP serves it on .47 (a certificate not
    # valid for its address: the classic misissued / moved EPP).
    good: MetricsServer = await peers("127.0.0.44", epp_page(kv=0.3, queue=1.0, ready=2), tls)  # type: ignore[misc]
    bad: MetricsServer = await peers("127.0.0.47", epp_page(kv=0.3, queue=1.0, ready=2), tls)  # type: ignore[misc]
    hub: Hub = await hubs(f"{{caCertPath: {tmp_path / 'c.pem'}}}")  # type: ignore[misc]
    a, b = hub.add("good", good), hub.add("bad-cert", bad)
    await until(lambda: POOL_READY_ENDPOINTS in a.metrics.attributes, what="good cluster scraped")
    assert b.metrics is NO_METRICS  # its load is unknown: the documented behaviour
    # Past down_after (1 s) with the handshake failing every scrape (the server answered each time).
    assert hub.collector.down_after == 1.0
    await asyncio.sleep(2.0)
    assert not b.unreachable, "a cluster whose EPP answered every scrape (TLS) was taken for 'nothing listening'"
    assert hub.datastore.reachable(hub.datastore.endpoints) == (a, b)


async def test_one_lost_scrape_of_a_clusters_epp_does_not_zero_the_hubs_ready_count(
    hubs: Callable[..., object], peers: Callable[..., object]
) -> None:
    """A hub publishes llm_d_epp_ready_endpoints as one EPP in front of all those pods would (README), so a hub
    above can treat it as a cluster; a pod EPP keeps a pod through one lost scrape (every fetch failing, twice
    in a row, for down_after). So does a hub's ready count: the cluster's last count stays in the sum while its
    fetches fail only briefly. (Before, one lost scrape published ready = 0, which a hub above reads as "no
    ready endpoints": it took the whole sub-hub out and counted it unavailable.)"""
    peer: MetricsServer = await peers("127.0.0.48", epp_page(kv=0.2, queue=1.0, ready=4))  # type: ignore[misc]
    lower: Hub = await hubs(pool="lower")  # type: ignore[misc]
    cluster = lower.add("only-cluster", peer)
    await until(lambda: lower.gauges()[0] == 4.0, what="lower hub publishes 4 pods")
    # One scrape of the cluster's EPP is lost (a 503 here; a timeout does the same), then it answers again.
    errors = lower.poll_errors()
    peer.mode = "status"
    await until(lambda: lower.poll_errors() > errors, what="one failed scrape")
    peer.mode = "ok"
    # What the lower hub publishes at this moment (its gauge refresh may fall here), and what a hub above makes
    # of that page.
    assert cluster.metrics is NO_METRICS  # the lost scrape is what the lower hub has now (documented)
    published = lower.gauges()[0]
    upper_peer: MetricsServer = await peers("127.0.0.49", generate_latest(lower.metrics.registry))  # type: ignore[misc]
    upper: Hub = await hubs(pool="upper")  # type: ignore[misc]
    sub_hub = upper.add("lower-hub", upper_peer)
    await until(lambda: POOL_READY_ENDPOINTS in sub_hub.metrics.attributes, what="upper hub scraped")
    assert published == 4.0, f"lower hub published ready={published} after one lost scrape of its cluster"
    assert not is_unavailable(sub_hub)


async def test_a_peer_page_with_a_malformed_gauge_line_does_not_freeze_the_clusters_last_load(
    hubs: Callable[..., Any], peers: Callable[..., Any]
) -> None:
    """A page whose queue line has a bad value (a peer mid-restart, a proxy's partial page) is counted and the
    cluster's queue is unknown from that scrape on, not frozen at its last good (idle) value."""
    hub: Hub = await hubs()
    peer: MetricsServer = await peers("127.0.0.83", epp_page(kv=0.1, queue=0.0))
    ep = hub.add("cluster-m", peer)
    await until(lambda: load(ep) == (0.0, 0.1))  # idle: the best cluster there is
    good = epp_page(kv=0.1, queue=0.0)
    # The queue family is on the page but its sample's value is garbage.
    peer.page = good.replace(
        b'llm_d_epp_average_queue_size{name="pool"} 0.0', b'llm_d_epp_average_queue_size{name="pool"} 0.0.0'
    )
    assert peer.page != good
    requests = peer.requests
    await until(lambda: peer.requests >= requests + 5, what="five more scrapes")
    await asyncio.sleep(0.1)
    # The queue is unknown now (and the error counted); the idle reading is not kept.
    assert load(ep)[0] is None, ep.metrics
    assert hub.extract_errors() >= 1


async def test_a_hub_whose_clusters_counts_are_unknown_does_not_publish_zero_ready_endpoints(
    hubs: Callable[..., Any], peers: Callable[..., Any]
) -> None:
    """A cluster whose EPP publishes no ready gauge (an older or reference EPP) is a candidate, so the hub's
    own ready count includes it (as one): a hub above must not take the whole lower hub for empty."""
    peer: MetricsServer = await peers("127.0.0.84", epp_page(kv=0.2, queue=1.0, ready=None))
    lower: Hub = await hubs(pool="lower")
    cluster = lower.add("no-count", peer)
    await until(lambda: load(cluster) == (1.0, 0.2), what="cluster load read")
    assert lower.datastore.reachable(lower.datastore.endpoints) == (cluster,)  # the lower hub routes there
    lower.collector.update_pool_gauges()
    upper_peer: MetricsServer = await peers("127.0.0.85", generate_latest(lower.metrics.registry))
    upper: Hub = await hubs(pool="upper")
    sub_hub = upper.add("lower-hub", upper_peer)
    await until(lambda: load(sub_hub) != (None, None), what="upper hub scraped the lower hub")
    published = lower.metrics.registry.get_sample_value("llm_d_epp_ready_endpoints", {"name": "lower"})
    assert not is_unavailable(sub_hub), f"lower hub routes to a live cluster but published ready={published}"


async def test_a_hub_does_not_publish_zero_ready_endpoints_before_its_first_scrape(
    hubs: Callable[..., Any], peers: Callable[..., Any]
) -> None:
    """As a pod EPP counts an endpoint not scraped yet as ready, a starting hub whose clusters' first pages
    have not arrived publishes a ready count above 0 (a hub above would read 0 as empty until the next refresh)."""
    slow: MetricsServer = await peers("127.0.0.86", epp_page(kv=0.2, queue=1.0, ready=3))
    slow.mode = "hang"  # its first page has not arrived yet
    hub: Hub = await hubs(pool="starting")
    cluster = hub.add("first", slow)
    assert cluster.metrics is NO_METRICS
    ready = hub.gauges()[0]
    slow.mode = "ok"
    await slow.stop()
    assert ready != 0.0, "a starting hub with a cluster it routes to published llm_d_epp_ready_endpoints 0"


async def test_one_lost_scrape_of_an_empty_clusters_epp_does_not_put_it_back_in_rotation(
    hubs: Callable[..., Any], peers: Callable[..., Any]
) -> None:
    """An empty cluster stays out of rotation through a brief fetch failure of its EPP, as its last ready count
    stays in the hub's gauge: no prefix or session is routed to a cluster with no pods, and the next page does
    not count it as newly unavailable."""
    hub: Hub = await hubs()
    peer: MetricsServer = await peers("127.0.0.87", epp_page(kv=0.0, queue=0.0, ready=0))
    ep = hub.add("empty", peer)
    await until(lambda: is_unavailable(ep), what="empty cluster screened out")
    assert hub.unavailable("empty") == 1
    errors = hub.poll_errors()
    peer.mode = "status"  # one lost scrape
    await until(lambda: hub.poll_errors() > errors, what="one failed scrape")
    in_rotation = not is_unavailable(ep)
    peer.mode = "ok"
    requests = peer.requests
    await until(lambda: peer.requests >= requests + 3 and is_unavailable(ep), what="empty again")
    assert not in_rotation, "one lost scrape put an empty cluster back among the candidates"
    assert hub.unavailable("empty") == 1, "one lost scrape counted as the cluster becoming unavailable again"
