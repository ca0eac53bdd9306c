"""A hub EPP and its clusters' failures: a cluster whose EPP fails the TLS handshake has a server listening (it
stays routable, with unknown load, as one answering an error status); one lost scrape of a cluster's EPP does
not zero the hub's published ready count (a hub above would take the whole sub-hub out), as a pod EPP keeps a
pod through one lost scrape."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import until
from prometheus_client import generate_latest

from llmepp.config.loader import build, load_config
from llmepp.datalayer.collector import MetricsCollector
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointSpec
from llmepp.datalayer.multicluster import POOL_READY_ENDPOINTS, is_unavailable
from llmepp.observability.metrics import EppMetrics

from .fakes import TEST_CERT, TEST_KEY, MetricsServer

HUB = """
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


def epp_page(*, kv: float, queue: float, ready: float, pool: str = "pool") -> bytes:
    """A cluster EPP's /metrics page, rendered by its own registry."""
    m = EppMetrics()
    m.pool_avg_kv.labels(name=pool).set(kv)
    m.pool_avg_queue.labels(name=pool).set(queue)
    m.pool_ready.labels(name=pool).set(ready)
    return generate_latest(m.registry)


class Hub:
    def __init__(self, source_params: str, pool: str = "hub") -> None:
        self.datastore, self.metrics = Datastore(pool), EppMetrics()
        [wired] = build(
            load_config(HUB.format(source_params=source_params)), datastore=self.datastore, metrics=self.metrics
        ).data_sources
        # As the app builds it (50 ms ticks), with the harness' 0.3 s scrape timeout.
        source: Any = wired.source
        mapping: Any = wired.extractors[0]
        self.collector = MetricsCollector(self.datastore, self.metrics, 0.05, source, mapping, 0.3)

    def add(self, name: str, server: MetricsServer) -> Endpoint:
        labels = {"metricsAddress": server.host, "metricsPort": str(server.port)}
        self.datastore.upsert(EndpointSpec(name=name, address="127.0.0.90", port=9, labels=labels))
        ep = self.datastore.get(name)
        assert ep is not None
        return ep

    def ready_gauge(self) -> float | None:
        self.collector.update_pool_gauges()
        return self.metrics.registry.get_sample_value("llm_d_epp_ready_endpoints", {"name": self.datastore.pool_name})


@pytest.fixture
async def servers() -> AsyncIterator[list[MetricsServer]]:
    started: list[MetricsServer] = []
    yield started
    for s in started:
        await s.stop()


@pytest.fixture
async def hubs() -> AsyncIterator[list[Hub]]:
    made: list[Hub] = []
    yield made
    for h in made:
        await h.collector.aclose()


async def test_a_cluster_whose_epp_fails_the_tls_handshake_stays_routable(
    servers: list[MetricsServer], hubs: list[Hub], tmp_path: Path
) -> None:
    """A TLS failure (certificate not valid for the peer's address, expired, a rotated CA, an http-only
    peer) proves a server listens on the port: the collector's own rule (module docstring: routing leaves
    out only an endpoint where "nothing listening", "A server that answers slowly or with an error is still
    there: it stays routable") and the README's hub "Failures" bullet (its load is unknown, scored 0, still
    a candidate) say the cluster stays a candidate. It is taken out of routing instead: the handshake
    error is reported as ConnectFailed, which the collector reads as "connection refused"."""
    (tmp_path / "c.pem").write_text(TEST_CERT)
    (tmp_path / "k.pem").write_text(TEST_KEY)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    # The certificate names 127.0.0.1 / .43 / .44: the second cluster's EPP serves it on .47 (a cert
    # not valid for its address: the classic misissued / moved EPP).
    good = await MetricsServer("127.0.0.44", epp_page(kv=0.3, queue=1.0, ready=2), tls).start()
    bad = await MetricsServer("127.0.0.47", epp_page(kv=0.3, queue=1.0, ready=2), tls).start()
    servers += [good, bad]
    hub = Hub(f"{{caCertPath: {tmp_path / 'c.pem'}}}")
    hubs.append(hub)
    await hub.collector.start()
    a, b = hub.add("good", good), hub.add("bad-cert", bad)
    await until(lambda: POOL_READY_ENDPOINTS in a.metrics.attributes, what="good cluster scraped")
    assert b.metrics is NO_METRICS  # its load is unknown: the documented behaviour
    # Past down_after (1 s) with the handshake failing every scrape (the server answered each time).
    assert hub.collector.down_after == 1.0
    await asyncio.sleep(2.0)
    assert not b.unreachable, "a cluster whose EPP answered every scrape (TLS) was taken for 'nothing listening'"
    assert hub.datastore.reachable(hub.datastore.endpoints) == (a, b)


async def test_one_lost_scrape_of_a_clusters_epp_does_not_zero_the_hubs_ready_count(
    servers: list[MetricsServer], hubs: list[Hub]
) -> None:
    """A hub publishes llm_d_epp_ready_endpoints "as one EPP in front of all those pods would" (README), so a
    hub above can treat it as a cluster; such an EPP never drops its ready count on one lost scrape (the
    collector's rule: every fetch failing, twice in a row, for down_after). A hub drops a cluster's pods
    from its count at the first failed scrape (forget_on_failure resets the cluster to NO_METRICS, whose
    ready count is then missing from the sum): with one cluster, or all clusters briefly unreadable, it
    publishes ready = 0, which a hub above reads as "no ready endpoints": it screens the whole sub-hub
    out, counts it in multicluster_cluster_unavailable_total and logs a WARNING — a known 0, where the
    truth is "unknown" (which the docs say must never be taken for 0)."""
    peer = await MetricsServer("127.0.0.48", epp_page(kv=0.2, queue=1.0, ready=4)).start()
    servers.append(peer)
    lower = Hub("{scheme: http}", pool="lower")
    hubs.append(lower)
    await lower.collector.start()
    cluster = lower.add("only-cluster", peer)
    await until(lambda: lower.ready_gauge() == 4.0, what="lower hub publishes 4 pods")
    # One scrape of the cluster's EPP is lost (a 503 here; a timeout does the same), then it answers again.
    errors = (
        lower.metrics.registry.get_sample_value(
            "llm_d_epp_datalayer_poll_errors_total", {"source_type": "multicluster-metrics-data-source"}
        )
        or 0.0
    )
    peer.mode = "status"

    def one_failure_seen() -> bool:
        now = (
            lower.metrics.registry.get_sample_value(
                "llm_d_epp_datalayer_poll_errors_total", {"source_type": "multicluster-metrics-data-source"}
            )
            or 0.0
        )
        return now > errors

    await until(one_failure_seen, what="one failed scrape")
    peer.mode = "ok"
    # What the lower hub publishes at this moment (its gauge refresh may fall here), and what a hub above
    # makes of that page.
    assert cluster.metrics is NO_METRICS  # the lost scrape is what the lower hub has now (documented)
    published = lower.ready_gauge()
    page = generate_latest(lower.metrics.registry)
    upper_peer = await MetricsServer("127.0.0.49", page).start()
    servers.append(upper_peer)
    upper = Hub("{scheme: http}", pool="upper")
    hubs.append(upper)
    await upper.collector.start()
    sub_hub = upper.add("lower-hub", upper_peer)
    await until(lambda: POOL_READY_ENDPOINTS in sub_hub.metrics.attributes, what="upper hub scraped")
    assert published == 4.0, f"lower hub published ready={published} after one lost scrape of its cluster"
    assert not is_unavailable(sub_hub)
