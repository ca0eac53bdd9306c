"""Polls every endpoint's /metrics page and keeps `endpoint.metrics` current.

Scheduling: one ticker task for the whole pool. The base interval is split into
`SUB_TICKS` slots and each endpoint is pinned to the least-loaded slot, so scrapes (and
the parsing work their responses cause) are spread evenly over the interval instead of
arriving as one burst that would delay ext_proc traffic on the same loop. Per scrape there
is no Task, Future or timer: the ticker starts the request and the `ScrapeClient`
callback parses the page. The ticker also enforces the per-scrape timeout; an endpoint
whose scrape is still outstanding is skipped (never doubled up).

Outcomes:
- success: `endpoint.metrics` is replaced by a new `EndpointMetrics` (update_time =
  time.monotonic()); nothing is logged.
- fetch failure (connect, timeout, non-200, broken HTTP): `poll_errors{source_type}` += 1.
- page failure (garbage, metric missing, unknown engine): `extract_errors` += 1; fields
  that could be read are still applied.
Either failure leaves update_time alone, so the metrics age; readers judge staleness with
`endpoint.metrics_age(now)`. A source with `forget_on_failure` (multicluster-metrics-data-source:
a cluster's load must not outlive its scrape) has a failed fetch reset `endpoint.metrics` to
NO_METRICS instead (what its extractor could not read is already absent). Logging per endpoint:
WARNING with the reason on the first failure, DEBUG while it keeps failing (again WARNING every
`failure_log_interval` seconds when the source sets one), INFO when it recovers. A source with
`clusters_as_endpoints` (a hub's) also has every replacement of a cluster's metrics checked for an
availability change (llmepp.datalayer.multicluster.AvailabilityLog).

Pool gauges (averages, ready count, per-endpoint queue) are refreshed on their own slower
period (`gauge_interval`, --refresh-prometheus-metrics-interval), not per scrape: over the pods'
metrics, or on a hub over its clusters' published gauges (multicluster.pool_averages).

Ready (`llm_d_epp_ready_endpoints`, what a hub reads to screen out an empty cluster): the pool's
endpoints less those whose server has stopped answering its /metrics page: every fetch (connect,
timeout, non-200, broken HTTP) failing, at least twice in a row, since a scrape that began at least
`down_after` seconds ago (max(1 s, 3 × the source's poll interval)). So one lost scrape, however long
its timeout, never drops the count, and neither does a restart shorter than `down_after`. A page that
arrives but cannot be used (garbage, a metric missing, an unknown engine) is an answer: the endpoint
stays ready. An endpoint not scraped yet is ready. Discovery decides what is in the pool (Kubernetes:
Ready pods; file discovery: the listed pods); this only takes out the ones that are listed but dead
(a stopped pod still in the file, a Ready pod whose model server died). The pool averages are over the
ready endpoints: a dead pod's last load is not the pool's.

Routing leaves out an endpoint whose every fetch for `down_after` (as above) found nothing listening
(connection refused or no route: `Endpoint.unreachable`, Datastore.reachable), while another candidate
answers: a crashed server fails each request at once, so its load reads as none and it would draw the
traffic (Kubernetes takes such a pod out when its readiness probe has failed, seconds later). A server
that answers slowly or with an error is still there: it stays routable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointMetrics, EndpointSpec
from llmepp.datalayer.engines import EngineMapping, PageMemo
from llmepp.datalayer.httpscrape import (
    BadStatus,
    ConnectFailed,
    ConnectionClosed,
    HandshakeFailed,
    ProtocolViolation,
    ScrapeClient,
    ScrapeError,
    ScrapeTarget,
)
from llmepp.datalayer.multicluster import (
    POOL_KV_CACHE_UTILIZATION,
    POOL_QUEUE_SIZE,
    POOL_READY_ENDPOINTS,
    POOL_RUNNING_REQUESTS,
    AvailabilityLog,
    is_unavailable,
    pool_averages,
)
from llmepp.datalayer.promtext import PromTextError
from llmepp.observability.metrics import EppMetrics, sample_std_dev
from llmepp.observability.streak import FailureStreak
from llmepp.tasks import cancel_and_wait

# A hub's spreads: over its available clusters' published averages.
_HUB_KEYS = (POOL_KV_CACHE_UTILIZATION, POOL_QUEUE_SIZE, POOL_RUNNING_REQUESTS)
log = logging.getLogger(__name__)
# What an empty cluster keeps through a brief fetch failure: its count of 0, no load.
_STILL_EMPTY = EndpointMetrics(attributes={POOL_READY_ENDPOINTS: 0.0})

MIN_INTERVAL = 0.050  # the reference clamps --refresh-metrics-interval to >= 50 ms
SUB_TICKS = 5
# An endpoint whose fetches keep failing leaves the ready count after this long (at least), and after
# this many polls (the source's interval) if that is longer; and only after two failed fetches in a row.
MIN_DOWN_AFTER = 1.0
DOWN_AFTER_POLLS = 3
# Fetch failures that prove a server listens on the port: it accepted the connection and answered (an
# error status, a broken response, a failed TLS handshake) or closed it. A timeout proves nothing (an
# unrouted address times out too).
_ANSWERED = (BadStatus, ProtocolViolation, ConnectionClosed, HandshakeFailed)


class ScrapeSource(Protocol):
    """What the collector needs from a data source plugin (MetricsDataSource)."""

    @property
    def type(self) -> str: ...

    def target_for(self, spec: EndpointSpec) -> ScrapeTarget: ...

    def ticks_per_poll(self, base_interval: float) -> int: ...


class MappingProvider(Protocol):
    """What the collector needs from an extractor plugin (CoreMetricsExtractor)."""

    @property
    def type(self) -> str: ...

    def mapping_for(self, labels: Mapping[str, str]) -> EngineMapping: ...


class _EndpointScrape:
    """Per-endpoint state: its client, cached engine mapping, failure streak and, for the ready count,
    its consecutive failed fetches (`down_count`) and when the first of them began (`down_since`)."""

    __slots__ = (
        "client",
        "collector",
        "countdown",
        "down_count",
        "down_refused",
        "down_since",
        "endpoint",
        "last_ready",
        "mapping",
        "mapping_error",
        "memo",
        "slot",
        "spec",
        "streak",
    )

    def __init__(self, collector: MetricsCollector, endpoint: Endpoint, slot: int) -> None:
        self.collector = collector
        self.endpoint = endpoint
        self.slot = slot
        self.countdown = 0
        self.down_count = 0  # consecutive fetches that got no page (0: the last one got one)
        self.down_since = 0.0  # time.monotonic() when the first of them began
        self.down_refused = False  # every one of them found nothing listening (routing leaves it out)
        self.last_ready: float | None = None  # a hub: the ready count its cluster published on its last page
        self.streak = FailureStreak(log, {"endpoint": endpoint.name}, collector.failure_log_interval)
        self.spec = endpoint.spec
        self.mapping: EngineMapping | None = None
        self.mapping_error: PromTextError | None = None
        self.memo: PageMemo | None = None  # where each metric sat on this server's last page
        self.client = ScrapeClient(collector.source.target_for(self.spec), self.on_result, collector.timeout)
        self.resolve_mapping()

    def is_down(self, now: float, down_after: float) -> bool:
        """Every fetch has failed, at least twice in a row, since a scrape that began `down_after` seconds
        before `now` or earlier (the ready count's rule, module docstring)."""
        return self.down_count >= 2 and now - self.down_since >= down_after

    def resolve_mapping(self) -> None:
        try:
            self.mapping, self.mapping_error = self.collector.extractor.mapping_for(self.spec.labels), None
            self.memo = self.mapping.new_memo()
        except PromTextError as e:
            self.mapping, self.mapping_error = None, e

    def on_result(self, body: bytes | None, err: ScrapeError | None) -> None:
        """ScrapeClient callback: the hot path, once per scrape."""
        ep = self.endpoint
        if ep.removed:
            return
        c = self.collector
        if err is not None:
            c._poll_errors.inc()
            # Nothing listening: the connection failed, not the TLS handshake after it (a server answered).
            refused = isinstance(err, ConnectFailed) and not isinstance(err, HandshakeFailed)
            if not self.down_count:  # failing since this scrape began
                client = self.client
                self.down_since = client.deadline - client.timeout
                self.down_refused = refused
            self.down_count += 1
            self.down_refused = self.down_refused and refused
            now = time.monotonic()
            down = self.is_down(now, c.down_after)
            if self.down_refused and down and not ep.unreachable:
                c.datastore.set_unreachable(ep, True)
                log.warning("endpoint %s: nothing has listened on its metrics port for %.1f s; routing leaves "
                            "it out while other endpoints answer", ep.name, now - self.down_since)  # fmt: skip
            elif ep.unreachable and isinstance(err, _ANSWERED):
                # Something listens again (it answered, if with an error): a server that answers with an
                # error is still there, so it is routed to again, as after a page.
                c.datastore.set_unreachable(ep, False)
                log.info("endpoint %s answers on its metrics port again (%s): routed to again", ep.name, err)
            if c.forget_on_failure:
                previous = ep.metrics
                # A cluster whose EPP said it has no ready endpoints stays empty through a brief failure (not
                # down yet: the ready count's rule), as its last count stays in the hub's gauge: one lost scrape
                # must not put it back among the candidates, nor count it unavailable again at the next page.
                keep_empty = not down and previous.attributes.get(POOL_READY_ENDPOINTS) == 0
                ep.metrics = _STILL_EMPTY if keep_empty else NO_METRICS
                if c.availability is not None:
                    c.availability.metrics_replaced(ep, previous)
            self.failed("metrics scrape failed", err if c.explain is None else c.explain(err))
            return
        self.down_count = 0  # a page came back: the server is up, whatever the page holds
        if ep.unreachable:
            c.datastore.set_unreachable(ep, False)
            log.info("endpoint %s answers its metrics page again: routed to again", ep.name)
        mapping = self.mapping
        if mapping is None:
            c._extract_errors.inc()
            self.failed("metrics page unusable", self.mapping_error)
            return
        assert body is not None
        previous = ep.metrics
        metrics, perr = mapping.extract(body, previous, time.monotonic(), self.memo)
        if metrics is not None:
            ep.metrics = metrics
            if c.availability is not None:
                c.availability.metrics_replaced(ep, previous)
                self.last_ready = metrics.attributes.get(POOL_READY_ENDPOINTS)
        if perr is not None:
            c._extract_errors.inc()
            self.failed("metrics page unusable", perr)
        else:
            self.streak.succeeded("metrics scrape", self.client.target)

    def failed(self, what: str, reason: Exception | None) -> None:
        self.streak.failed(what, reason, self.client.target)


class MetricsCollector:
    """A Datastore listener that scrapes every endpoint every `interval` seconds."""

    def __init__(
        self,
        datastore: Datastore,
        metrics: EppMetrics,
        interval: float,
        source: ScrapeSource,
        extractor: MappingProvider,
        timeout: float = 1.0,
        *,
        gauge_interval: float = 5.0,
    ) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.interval = max(interval, MIN_INTERVAL)
        self.source = source
        self.extractor = extractor
        self.timeout = timeout
        self.gauge_interval = gauge_interval
        self.ticks_per_poll = source.ticks_per_poll(self.interval)
        # How long an endpoint's fetches must have been failing before it leaves the ready count.
        self.down_after = max(MIN_DOWN_AFTER, DOWN_AFTER_POLLS * self.interval * self.ticks_per_poll)
        self.forget_on_failure = bool(getattr(source, "forget_on_failure", False))
        self.failure_log_interval = float(getattr(source, "failure_log_interval", 0.0))
        # A hub: the endpoints are clusters, whose EPPs publish pool gauges.
        self.clusters = bool(getattr(source, "clusters_as_endpoints", False))
        self.availability = AvailabilityLog(metrics.cluster_unavailable) if self.clusters else None
        # A source may put a failed fetch in its own words for the log (a hub: what a 401 means there).
        self.explain: Callable[[ScrapeError], Exception] | None = getattr(source, "explain_failure", None)
        self._poll_errors = metrics.poll_errors.labels(source_type=source.type)
        self._extract_errors = metrics.extract_errors.labels(source_type=source.type, extractor_type=extractor.type)
        self._slots: list[dict[Endpoint, _EndpointScrape]] = [{} for _ in range(SUB_TICKS)]
        self._by_endpoint: dict[Endpoint, _EndpointScrape] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._gauge_labels: set[str] = set()
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Begin scraping (current endpoints at once, later ones as discovery adds them)."""
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._tick_loop(), name="metrics-collector"),
            loop.create_task(self._gauge_loop(), name="metrics-pool-gauges"),
        ]
        self.datastore.add_listener(self)

    async def aclose(self) -> None:
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(ValueError):
            self.datastore.remove_listener(self)
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        for state in self._by_endpoint.values():
            state.client.close()
            self.datastore.set_unreachable(state.endpoint, False)  # nobody looks any more
        self._by_endpoint.clear()
        for slot in self._slots:
            slot.clear()

    # -- DatastoreListener ---------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        if endpoint in self._by_endpoint:
            return
        slot = min(range(SUB_TICKS), key=lambda i: len(self._slots[i]))
        state = _EndpointScrape(self, endpoint, slot)
        self._slots[slot][endpoint] = state
        self._by_endpoint[endpoint] = state
        # First scrape right away: a new endpoint gets real metrics within one round trip.
        state.countdown = self.ticks_per_poll
        state.client.start()

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        state = self._by_endpoint.pop(endpoint, None)
        if state is None:
            return
        del self._slots[state.slot][endpoint]
        state.client.close()
        if self.availability is not None:
            self.availability.forget(endpoint.name)

    # -- ticking -------------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        period = self.interval / SUB_TICKS
        next_at = time.monotonic()
        slot = 0
        while True:
            next_at += period
            delay = next_at - time.monotonic()
            if delay < -self.interval:
                next_at = time.monotonic()  # fell far behind (loop stalled): don't burst to catch up
                delay = 0.0
            await asyncio.sleep(max(delay, 0.0))
            try:
                self._run_slot(self._slots[slot], time.monotonic())
            except Exception:  # a bug must not stop all scraping
                log.exception("metrics collector tick failed")
            slot = slot + 1 if slot + 1 < SUB_TICKS else 0

    def _run_slot(self, states: dict[Endpoint, _EndpointScrape], now: float) -> None:
        for state in states.values():  # callbacks run later, never resize `states` here
            client = state.client
            if client.busy:
                if now >= client.deadline:
                    client.expire()  # reports ScrapeTimeout through on_result
                continue
            state.countdown -= 1
            if state.countdown > 0:
                continue
            state.countdown = self.ticks_per_poll
            if state.endpoint.spec is not state.spec:
                self._respec(state)  # may replace state.client
            state.client.start(now)

    def _respec(self, state: _EndpointScrape) -> None:
        """The endpoint's spec was replaced in place (labels or metrics port changed)."""
        state.spec = state.endpoint.spec
        state.resolve_mapping()
        target = self.source.target_for(state.spec)
        if target != state.client.target:
            state.client.close()
            state.client = ScrapeClient(target, state.on_result, self.timeout)
            state.down_count = 0  # the old target's failures say nothing about the new one
            self.datastore.set_unreachable(state.endpoint, False)

    # -- pool gauges ---------------------------------------------------------------------
    async def _gauge_loop(self) -> None:
        while True:
            try:
                self.update_pool_gauges()
            except Exception:
                log.exception("pool gauge update failed")
            await asyncio.sleep(self.gauge_interval)

    def update_pool_gauges(self) -> None:
        """Recompute the pool gauges from the current endpoint metrics."""
        m, pool = self.metrics, self.datastore.pool_name
        endpoints = self.datastore.endpoints
        if self.clusters:  # a hub: its clusters' gauges, weighted by their ready endpoints
            ready, kv, queue, running = pool_averages(endpoints)
            # A cluster whose fetches have failed only briefly (not yet down: ready_endpoints' rule) still has
            # its pods, as a pod EPP keeps a pod through one lost scrape: its last known count stays in the sum.
            # A cluster whose count is unknown (not read yet, or its page lacks the gauge) is a candidate, as a pod
            # EPP counts a pod it has not read or cannot read as ready: it counts as one, never as none (a hub
            # above would take this one for empty).
            for ep in self.ready_endpoints(endpoints, time.monotonic()):
                if POOL_READY_ENDPOINTS in ep.metrics.attributes:
                    continue  # counted by pool_averages
                state = self._by_endpoint.get(ep)
                if state is not None and state.down_count and state.last_ready is not None:
                    ready += state.last_ready
                else:
                    ready += 1.0
            # As the averages: an empty cluster's published 0s are no load (pool_averages skips them too).
            known = [ep.metrics.attributes for ep in endpoints if not is_unavailable(ep)]
            spreads = [[v for a in known if (v := a.get(key)) is not None] for key in _HUB_KEYS]
        else:
            live = self.ready_endpoints(endpoints, time.monotonic())
            scraped = [ep.metrics for ep in live if ep.metrics.update_time]
            n = len(scraped)
            ready = len(live)
            kv = sum(x.kv_cache_usage_percent for x in scraped) / n if n else 0.0
            queue = sum(x.waiting_queue_size for x in scraped) / n if n else 0.0
            running = sum(x.running_requests_size for x in scraped) / n if n else 0.0
            spreads = [
                [x.kv_cache_usage_percent for x in scraped],
                [float(x.waiting_queue_size) for x in scraped],
                [float(x.running_requests_size) for x in scraped],
            ]
        m.pool_ready.labels(name=pool).set(ready)
        m.pool_avg_kv.labels(name=pool).set(kv)
        m.pool_avg_queue.labels(name=pool).set(queue)
        m.pool_avg_running.labels(name=pool).set(running)
        for gauge, values in zip((m.pool_std_kv, m.pool_std_queue, m.pool_std_running), spreads, strict=True):
            gauge.labels(name=pool).set(sample_std_dev(values))
        current: set[str] = set()
        for ep in endpoints:
            current.add(ep.name)
            m.pool_endpoint_queue.labels(name=pool, model_server_endpoint=ep.name).set(ep.metrics.waiting_queue_size)
        for gone in self._gauge_labels - current:
            with contextlib.suppress(KeyError):
                m.pool_endpoint_queue.remove(pool, gone)
        self._gauge_labels = current

    def ready_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> Sequence[Endpoint]:
        """The ready ones of `endpoints` at `now`: all but those whose fetches have all failed, at least
        twice in a row, since a scrape that began `down_after` seconds ago or earlier (see the module
        docstring). The pool averages are taken over these too: a dead pod's last load is not the pool's."""
        states = self._by_endpoint
        down = [ep for ep in endpoints if (state := states.get(ep)) is not None and state.is_down(now, self.down_after)]
        if not down:
            return endpoints
        return [ep for ep in endpoints if ep not in down]
