"""MetricsCollector against real aiohttp servers on 127.0.0.x."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from helpers import until

from llmepp.datalayer.collector import MetricsCollector
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor
from llmepp.plugins.datasources.metrics_source import MetricsDataSource

from .fakes import MetricsServer, RawServer
from .vllm_page import vllm_page


@dataclass
class Harness:
    datastore: Datastore
    metrics: EppMetrics
    collector: MetricsCollector

    def poll_errors(self) -> float:
        v = self.metrics.registry.get_sample_value(
            "llm_d_epp_datalayer_poll_errors_total", {"source_type": "metrics-data-source"}
        )
        return v or 0.0

    def extract_errors(self) -> float:
        v = self.metrics.registry.get_sample_value(
            "llm_d_epp_datalayer_extract_errors_total",
            {"source_type": "metrics-data-source", "extractor_type": "core-metrics-extractor"},
        )
        return v or 0.0

    def add(self, name: str, server: MetricsServer, **labels: str) -> Endpoint:
        self.datastore.upsert(EndpointSpec(name=name, address=server.host, port=server.port, labels=labels))
        ep = self.datastore.get(name)
        assert ep is not None
        return ep


HarnessFactory = Callable[..., Awaitable[Harness]]
ServerFactory = Callable[..., Awaitable[MetricsServer]]


@pytest.fixture
async def harness_factory() -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    async def make(scrape_timeout: float = 0.3, **source_params: object) -> Harness:
        metrics = EppMetrics()
        datastore = Datastore(pool_name="pool")
        params = MetricsDataSource.Params(**source_params)  # type: ignore[arg-type]
        source = MetricsDataSource("metrics-data-source", params)
        collector = MetricsCollector(datastore, metrics, 0.05, source, CoreMetricsExtractor(), scrape_timeout)
        await collector.start()
        h = Harness(datastore, metrics, collector)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.collector.aclose()


@pytest.fixture
async def servers() -> AsyncIterator[ServerFactory]:
    started: list[MetricsServer] = []

    async def start(host: str, page: bytes | None = None) -> MetricsServer:
        s = await MetricsServer(host, page).start()
        started.append(s)
        return s

    yield start
    for s in started:
        await s.stop()


async def test_metrics_update_and_follow_the_server(harness_factory: HarnessFactory, servers: ServerFactory) -> None:
    h = await harness_factory()
    server = await servers("127.0.0.51", vllm_page(waiting=2, running=5, kv_usage=0.5))
    t0 = time.monotonic()
    ep = h.add("a", server)
    await until(lambda: ep.metrics.update_time > 0)
    assert time.monotonic() - t0 < 0.5  # the first scrape starts at once (bound is loose for loaded CI)
    first = ep.metrics
    assert (first.waiting_queue_size, first.running_requests_size, first.kv_cache_usage_percent) == (2, 5, 0.5)
    assert (first.cache_block_size, first.cache_num_blocks) == (16, 74272)
    server.page = vllm_page(waiting=9, running=1, kv_usage=0.75)
    await until(lambda: ep.metrics.waiting_queue_size == 9)
    assert ep.metrics is not first and ep.metrics.update_time > first.update_time
    assert ep.metrics_age(time.monotonic()) < 0.2
    # Steady state: about one scrape per 50 ms tick (10 in 0.5 s), never more.
    n0 = server.requests
    await asyncio.sleep(0.5)
    assert 3 <= server.requests - n0 <= 12
    assert h.poll_errors() == 0 and h.extract_errors() == 0


async def test_hung_server_goes_stale_without_holding_up_others(
    harness_factory: HarnessFactory, servers: ServerFactory
) -> None:
    h = await harness_factory(scrape_timeout=0.2)
    hung_srv = await servers("127.0.0.52")
    ok_srv = await servers("127.0.0.53")
    hung, ok = h.add("hung", hung_srv), h.add("ok", ok_srv)
    await until(lambda: hung.metrics.update_time > 0 and ok.metrics.update_time > 0)
    hung_srv.mode = "hang"
    await asyncio.sleep(0.06)
    frozen = hung.metrics.update_time
    n0, t0 = hung_srv.requests, time.monotonic()
    lags: list[float] = []
    while time.monotonic() - t0 < 0.9:
        s = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - s - 0.01)
    now = time.monotonic()
    assert hung.metrics.update_time == frozen  # stale: not refreshed by failures
    assert hung.metrics_age(now) > 0.8
    # The healthy endpoint kept being scraped (blocked behind the hung one it would be > 0.8 s
    # old) and the loop never stalled (a blocking scrape would show >= 0.2 s of lag).
    assert ok.metrics_age(now) < 0.45
    assert max(lags) < 0.15
    # One outstanding request at a time: a hung scrape is abandoned after 0.2 s, not doubled.
    assert hung_srv.requests - n0 <= 0.9 / 0.2 + 2
    assert h.poll_errors() >= 3


async def test_unreachable_then_recovered_logs_once_each_way(
    harness_factory: HarnessFactory, servers: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmepp.datalayer.collector")
    h = await harness_factory()
    server = await servers("127.0.0.54")
    ep = h.add("flaky", server)
    await until(lambda: ep.metrics.update_time > 0)
    await server.stop()
    errors0 = h.poll_errors()
    await until(lambda: h.poll_errors() >= errors0 + 5)
    stale_since = ep.metrics.update_time
    await server.start()  # same address and port
    await until(lambda: ep.metrics.update_time > stale_since)
    records = [r for r in caplog.records if getattr(r, "endpoint", None) == "flaky"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "connect to 127.0.0.54" in warnings[0].getMessage()
    assert len([r for r in records if r.levelno == logging.DEBUG]) >= 4
    recovered = [r for r in records if r.levelno == logging.INFO]
    assert len(recovered) == 1 and "recovered after" in recovered[0].getMessage()


async def test_garbage_page_and_bad_status_are_counted_apart(
    harness_factory: HarnessFactory, servers: ServerFactory
) -> None:
    h = await harness_factory()
    server = await servers("127.0.0.55")
    ep = h.add("g", server)
    await until(lambda: ep.metrics.update_time > 0)
    server.mode = "garbage"
    await until(lambda: h.extract_errors() >= 3)
    frozen = ep.metrics.update_time
    assert h.poll_errors() == 0
    server.mode = "status"
    await until(lambda: h.poll_errors() >= 3)
    assert ep.metrics.update_time == frozen
    server.mode = "chunked"
    await until(lambda: ep.metrics.update_time > frozen, within=0.6)  # next page, not after 1 s


async def test_a_page_with_a_malformed_lora_line_is_applied_and_counted(
    harness_factory: HarnessFactory, servers: ServerFactory
) -> None:
    """The good values of a page with one malformed optional line are applied and the page counts as an
    extraction error (the error escaped into the connection: every scrape lost, the pod stale for good)."""
    h = await harness_factory()
    bad_lora = b'vllm:lora_requests_info{max_lora="1",running_lora_adapters="a"} x\n'
    ep = h.add("l", await servers("127.0.0.56", vllm_page(waiting=3) + bad_lora))
    await until(lambda: ep.metrics.update_time > 0 and h.extract_errors() >= 1)
    assert ep.metrics.waiting_queue_size == 3


async def test_removed_endpoint_is_no_longer_scraped(harness_factory: HarnessFactory, servers: ServerFactory) -> None:
    h = await harness_factory()
    server = await servers("127.0.0.56")
    ep = h.add("gone", server)
    await until(lambda: server.requests >= 3)
    h.datastore.delete("gone")
    await asyncio.sleep(0.02)
    n = server.requests
    await asyncio.sleep(0.3)
    assert server.requests == n
    assert ep.removed


async def test_source_interval_and_port_override(harness_factory: HarnessFactory, servers: ServerFactory) -> None:
    server = await servers("127.0.0.57")
    h = await harness_factory(interval="250ms", port=server.port)
    assert h.collector.ticks_per_poll == 5
    # The serving port is wrong on purpose: the source's port override is what gets scraped.
    h.datastore.upsert(EndpointSpec(name="p", address=server.host, port=1))
    await until(lambda: server.requests >= 1)
    n0 = server.requests
    await asyncio.sleep(1.0)
    assert 2 <= server.requests - n0 <= 6  # ~4 at 250 ms, not ~20 at the 50 ms base tick


async def test_metrics_port_change_in_place_moves_the_scrape(
    harness_factory: HarnessFactory, servers: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="llmepp.datalayer.collector")
    h = await harness_factory()
    serving = await servers("127.0.0.58", vllm_page(waiting=1))
    sidecar = await servers("127.0.0.58", vllm_page(waiting=7))
    ep = h.add("m", serving)
    await until(lambda: ep.metrics.waiting_queue_size == 1)
    # Same address:port, so the datastore updates the spec in place (no remove/add).
    h.datastore.upsert(EndpointSpec(name="m", address=serving.host, port=serving.port, metrics_port=sidecar.port))
    assert h.datastore.get("m") is ep
    await until(lambda: ep.metrics.waiting_queue_size == 7)
    n = serving.requests
    await asyncio.sleep(0.2)
    assert serving.requests == n
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_unknown_engine_is_an_extract_error(harness_factory: HarnessFactory, servers: ServerFactory) -> None:
    h = await harness_factory()
    server = await servers("127.0.0.59")
    ep = h.add("x", server, **{"llm-d.ai/engine-type": "mystery"})
    await until(lambda: h.extract_errors() >= 2)
    assert ep.metrics.update_time == 0.0
    assert h.poll_errors() == 0


async def test_pool_gauges(harness_factory: HarnessFactory, servers: ServerFactory) -> None:
    h = await harness_factory()
    s1 = await servers("127.0.0.60", vllm_page(waiting=2, running=4, kv_usage=0.25))
    s2 = await servers("127.0.0.61", vllm_page(waiting=6, running=8, kv_usage=0.75))
    e1, e2 = h.add("one", s1), h.add("two", s2)
    await until(lambda: e1.metrics.update_time > 0 and e2.metrics.update_time > 0)
    h.collector.update_pool_gauges()
    get = h.metrics.registry.get_sample_value
    assert get("llm_d_epp_average_queue_size", {"name": "pool"}) == 4.0
    assert get("llm_d_epp_average_running_requests", {"name": "pool"}) == 6.0
    assert get("llm_d_epp_average_kv_cache_utilization", {"name": "pool"}) == 0.5
    assert get("llm_d_epp_ready_endpoints", {"name": "pool"}) == 2.0
    labels = {"name": "pool", "model_server_endpoint": "two"}
    assert get("llm_d_epp_per_endpoint_queue_size", labels) == 6.0
    h.datastore.delete("two")
    h.collector.update_pool_gauges()
    assert get("llm_d_epp_per_endpoint_queue_size", labels) is None
    assert get("llm_d_epp_ready_endpoints", {"name": "pool"}) == 1.0
    assert get("llm_d_epp_average_queue_size", {"name": "pool"}) == 2.0


async def test_aclose_stops_scraping(harness_factory: HarnessFactory, servers: ServerFactory) -> None:
    h = await harness_factory()
    server = await servers("127.0.0.62")
    h.add("c", server)
    await until(lambda: server.requests >= 2)
    await h.collector.aclose()
    n = server.requests
    await asyncio.sleep(0.2)
    assert server.requests == n
    h.add("late", await servers("127.0.0.63"))  # no longer a listener: ignored
    await asyncio.sleep(0.1)


def ready_gauge(h: Harness) -> float | None:
    h.collector.update_pool_gauges()
    return h.metrics.registry.get_sample_value("llm_d_epp_ready_endpoints", {"name": "pool"})


async def test_ready_count_drops_an_endpoint_that_stops_answering_and_takes_it_back(
    harness_factory: HarnessFactory, servers: ServerFactory
) -> None:
    h = await harness_factory()  # 50 ms polls, 0.3 s timeout
    assert h.collector.down_after == 1.0  # max(1 s, 3 polls)
    up_srv, down_srv = (
        await servers("127.0.0.64", vllm_page(waiting=2)),
        await servers("127.0.0.65", vllm_page(waiting=8)),
    )
    up, down = h.add("up", up_srv), h.add("down", down_srv)
    await until(lambda: up.metrics.update_time > 0 and down.metrics.update_time > 0)
    assert ready_gauge(h) == 2.0
    queue = {"name": "pool"}
    assert h.metrics.registry.get_sample_value("llm_d_epp_average_queue_size", queue) == 5.0
    await down_srv.stop()  # a stopped pod still listed: its scrapes are refused from now on
    stopped = time.monotonic()
    errors0 = h.poll_errors()
    # Within the grace period it still counts, however many scrapes fail meanwhile.
    while time.monotonic() - stopped < 0.8:
        assert ready_gauge(h) == 2.0
        await asyncio.sleep(0.02)
    assert h.poll_errors() >= errors0 + 5
    await until(lambda: ready_gauge(h) == 1.0, within=1.5)
    assert time.monotonic() - stopped >= 0.9
    assert h.datastore.get("down") is down  # still in the pool: the ready count and routing leave it out
    await until(lambda: down.unreachable, within=0.5, what="routing told (at the next refused scrape)")
    assert not up.unreachable and h.datastore.unreachable == 1
    assert h.datastore.reachable(h.datastore.endpoints) == (up,)
    # Its last (frozen) load is not the pool's any more either.
    assert h.metrics.registry.get_sample_value("llm_d_epp_average_queue_size", queue) == 2.0
    await down_srv.start()  # same address and port: answers again
    await until(lambda: ready_gauge(h) == 2.0, within=1.0)
    assert not down.unreachable and h.datastore.unreachable == 0


async def test_a_server_answering_errors_leaves_the_ready_count_but_stays_routable(
    harness_factory: HarnessFactory, servers: ServerFactory
) -> None:
    """Routing leaves out only a server nothing listens for: one that answers 503 is there (and so may
    serve), whatever its metrics page says."""
    h = await harness_factory()
    srv = await servers("127.0.0.68")
    ep = h.add("erring", srv)
    await until(lambda: ep.metrics.update_time > 0)
    srv.mode = "status"
    await until(lambda: ready_gauge(h) == 0.0, within=2.0)
    assert not ep.unreachable and h.datastore.unreachable == 0


async def test_an_unreachable_server_that_answers_again_with_an_error_is_routed_to_again(
    harness_factory: HarnessFactory, servers: ServerFactory
) -> None:
    """A server left out because nothing listened is routed to again as soon as something answers on its
    port (here 503), not only once its page is good again."""
    h = await harness_factory()
    srv = await servers("127.0.0.69")
    ep = h.add("restarted", srv)
    await until(lambda: ep.metrics.update_time > 0)
    await srv.stop()
    await until(lambda: ep.unreachable, within=3.0, what="marked unreachable")
    srv.mode = "status"
    await srv.start()
    answered = srv.requests
    await until(lambda: not ep.unreachable, within=2.0, what="routed to again")
    assert h.datastore.unreachable == 0 and srv.requests > answered


async def test_one_lost_scrape_or_a_short_outage_does_not_drop_the_ready_count(
    harness_factory: HarnessFactory, servers: ServerFactory
) -> None:
    # A timeout longer than the grace period: one hung scrape alone is "failing" for longer than it.
    h = await harness_factory(scrape_timeout=1.3)
    assert h.collector.down_after == 1.0
    s1, s2 = await servers("127.0.0.66"), await servers("127.0.0.67")
    e1, e2 = h.add("one", s1), h.add("two", s2)
    await until(lambda: e1.metrics.update_time > 0 and e2.metrics.update_time > 0)
    assert ready_gauge(h) == 2.0

    # One scrape hangs until its timeout (the server is switched back at once: only that one hangs).
    s2.mode = "hang"
    n0, errors0, hung_at = s2.requests, h.poll_errors(), time.monotonic()
    await until(lambda: s2.requests > n0)
    s2.mode = "ok"
    samples: list[float | None] = []
    while h.poll_errors() == errors0:
        samples.append(ready_gauge(h))
        await asyncio.sleep(0.02)
        assert time.monotonic() - hung_at < 3.0, "the hung scrape never timed out"
    failed_at = time.monotonic()
    assert failed_at - hung_at >= 1.2  # the lost scrape lasted longer than the grace period
    while e2.metrics.update_time < failed_at:  # until the next scrape answers
        samples.append(ready_gauge(h))
        await asyncio.sleep(0.01)
        assert time.monotonic() - failed_at < 1.0, "no scrape after the lost one"
    assert h.poll_errors() == errors0 + 1
    assert samples and set(samples) == {2.0}

    # A restart shorter than the grace period: several refused scrapes, never out of the count.
    await s2.stop()
    stopped = time.monotonic()
    errors1 = h.poll_errors()
    while time.monotonic() - stopped < 0.4:
        samples.append(ready_gauge(h))
        await asyncio.sleep(0.02)
    assert h.poll_errors() >= errors1 + 3
    await s2.start()
    restarted = time.monotonic()
    while e2.metrics.update_time < restarted:  # until it answers again
        samples.append(ready_gauge(h))
        await asyncio.sleep(0.02)
        assert time.monotonic() - restarted < 1.0, "no scrape after the restart"
    assert set(samples) == {2.0}


async def test_a_flapping_endpoint_is_not_logged_on_every_scrape(
    harness_factory: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Every other scrape fails the same way (an overloaded server answering 503 now and then):
    # each one-scrape streak logged a WARNING and each next page an INFO "recovered", ~20 lines a
    # second for one pod. A streak failing as one warned about shortly before is logged at DEBUG.
    caplog.set_level(logging.DEBUG, logger="llmepp.datalayer.collector")
    page = vllm_page()

    def respond(conn: int, req: int) -> tuple[list[bytes], bool]:
        if req % 2:
            return [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"], False
        return [f"HTTP/1.1 200 OK\r\nContent-Length: {len(page)}\r\n\r\n".encode() + page], False

    server = await RawServer("127.0.0.68", respond).start()
    try:
        h = await harness_factory()
        h.datastore.upsert(EndpointSpec(name="flap", address=server.host, port=server.port))
        await until(lambda: h.poll_errors() >= 8)
    finally:
        await server.stop()
    records = [r for r in caplog.records if getattr(r, "endpoint", None) == "flap"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "HTTP status 503" in warnings[0], warnings
    assert len(infos) <= 1, infos
    assert len([r for r in records if r.levelno == logging.DEBUG]) >= 6  # still there at DEBUG
