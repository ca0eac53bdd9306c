"""The flow controller: priority bands → fair flows → ordered requests, gated by saturation.

    admit(request)
      identity      priority from the InferenceObjective, flow = (fairness id, priority)
      capacity      band maxRequests / maxBytes, global maxRequests / maxBytes → 429
      fast path     nothing queued and the band not gated → dispatched, no task switch
      otherwise     enqueue, wake the dispatcher, await the item's future

    dispatcher (one task, the only writer of dispatch decisions)
      a cycle: saturation once → per-band ceilings → up to `credits` dispatches, each from
      the highest non-empty band: its fairness policy picks a flow, the flow's head goes.
      If that band is gated the cycle stops (head-of-line blocking: lower bands must not
      overtake a blocked higher band).

Dispatch is self-clocked, like the reference's: each enqueue, each completed request and
each poll tick (1 ms while work waits) earns one dispatch credit; credits are dropped while
gated. So a backlog drains as capacity frees up instead of flooding the pool the moment
saturation dips below the ceiling (the detector only sees dispatched work one scrape or
one in-flight count later). With an in-flight-based detector a cycle dispatches one
request and yields, so the next cycle sees it counted; scraped detectors may batch up to
`max_dispatch_per_cycle`. The dispatcher sleeps on a future when nothing waits.

Pending: an in-flight count sees a request only once the director charges it to its endpoint,
after data producers (which may await a tokenizer or a latency predictor) and the scheduler.
So an in-flight-based detector with a PendingLoad (`self.pending`) also counts requests
dispatched (fast path or cycle) and not yet charged: the count goes up at the dispatch
decision and down at `release_pending` (the director: charged, failed or cancelled), or here
when the waiting coroutine is cancelled or closed after its dispatch, before admit returned.
Without it a burst held in a producer would all pass the fast path, and each 1 ms cycle would
dispatch another request into the same free slot. Scraped detectors keep no such count.

TTL: all queued requests share the TTL of the current regime (noEndpointRequestTTL while
the pool is empty, else defaultRequestTTL). As in the reference (controller/config.go), a
change of regime starts a fresh budget for every request waiting: a request expires once
TTL has passed since the later of its enqueue and the last regime change. So with
noEndpointRequestTTL > defaultRequestTTL (a scale-from-zero waiting room), a request that
waited longer than defaultRequestTTL for the first pod is not shed (429) the moment that pod
appears: it has defaultRequestTTL from then on; the same holds the other way. A pool that keeps
flapping between empty and not keeps renewing the budget; the client's own timeout still
applies. Expiry order is still enqueue order: one FIFO and one timer for the oldest request,
re-armed when the regime changes.

Flow limit: a flow is made per (fairness id, priority), and the fairness id is a client-chosen
header. At most `maxFlows` flows are held (flowControl.maxFlows, default DEFAULT_MAX_FLOWS);
flows idle for flowGCTimeout are dropped anyway. A request with a new fairness id at the limit
  - takes the place of the idlest empty flow (unused longest; a flow is "used" when a request
    is admitted into it and when it empties): nothing is lost, an empty flow holds no request
    and fairness state lives in the policies (flow_control_flows_evicted_total);
  - if every flow has requests waiting, is queued in its band's shared overflow flow (fairness
    id OVERFLOW_FAIRNESS_ID, outside the limit): served like any flow, never refused for it
    (flow_control_overflow_requests_total, a rate-limited warning).
Bookkeeping: a heap of empty flows by last use, with lazy entries (re-filed when found used
since, dropped when found busy, re-listed when the flow empties): amortised O(log flows) per
new flow, nothing on the fast path.

Cancellation: a client that goes away cancels the awaiting task (or its transport drops the
waiting coroutine, which closes it); the handler frees the slot (counts and bytes) at once and
leaves a tombstone the queues skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmepp.datalayer.endpoint import Endpoint
from llmepp.flowcontrol.eviction import Evictor
from llmepp.flowcontrol.interfaces import (
    AdmissionController,
    EvictionFilterPolicy,
    EvictionOrderingPolicy,
    FairnessPolicy,
    OrderingPolicy,
    PendingLoad,
    SaturationDetector,
    UsageLimitPolicy,
)
from llmepp.flowcontrol.metrics import ENQUEUED, REVOCATION_CONFIRMED, FlowControlMetrics
from llmepp.flowcontrol.objectives import ObjectivesFileWatcher, ObjectiveStore
from llmepp.flowcontrol.queues import FlowQueue, PriorityBand
from llmepp.flowcontrol.saturation import StagedSaturation
from llmepp.flowcontrol.types import (
    DEFAULT_FAIRNESS_ID,
    FLOW_ID_KEY,
    OVERFLOW_FAIRNESS_ID,
    ItemState,
    Outcome,
    QueueItem,
    outcome_error,
)
from llmepp.observability.logging import LogLimiter
from llmepp.request.types import InferenceRequest
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_REQUEST_TTL = 60.0
# flowControl.maxFlows default: far above real tenant counts (the reference caps fairness_id metric
# labels at 1,000), small enough that flows cost little memory (~0.7 KB each), a scrape stays quick
# and program-aware fairness (O(waiting flows) per pick) keeps its pace.
DEFAULT_MAX_FLOWS = 1024
_INF = math.inf
_QUEUED = ItemState.QUEUED
_DONE = ItemState.DONE
_DISPATCHED = Outcome.DISPATCHED


@dataclass(frozen=True, slots=True)
class BandConfig:
    """Limits and policies of one band (explicit, or the template for unlisted priorities)."""

    ordering: OrderingPolicy
    fairness: FairnessPolicy
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS
    max_bytes: int = DEFAULT_BAND_MAX_BYTES


@dataclass(slots=True)
class FlowControlConfig:
    """The resolved `flowControl` block (plugins already built)."""

    detector: SaturationDetector
    usage_limit: UsageLimitPolicy
    default_band: BandConfig
    bands: dict[int, BandConfig] = field(default_factory=dict)
    default_negative_band: BandConfig | None = None
    max_requests: int = 0  # global; 0 = unlimited
    max_bytes: int = 0
    max_flows: int = DEFAULT_MAX_FLOWS  # flows held at once (the bands' overflow flows aside)
    default_ttl: float = DEFAULT_REQUEST_TTL  # 0 = no TTL
    no_endpoint_ttl: float = DEFAULT_REQUEST_TTL
    # In-flight eviction (flowcontrol.eviction): seconds between revocation decisions; None = off.
    eviction_grace: float | None = None
    eviction_filter: EvictionFilterPolicy | None = None
    eviction_ordering: EvictionOrderingPolicy | None = None
    # Runtime knobs (not in the YAML): dispatcher tick while work waits, per-cycle work
    # bound, idle garbage collection of flows and template-provisioned bands.
    poll_interval: float = 0.001
    max_dispatch_per_cycle: int = 64
    flow_gc_timeout: float = 300.0
    band_gc_timeout: float = 600.0
    # Saturation re-read this often while nothing is queued (dispatch cycles read it otherwise), so the
    # pool-saturation and stale-endpoint gauges follow the pods between requests.
    saturation_refresh: float = 1.0


class FlowController(AdmissionController):
    mode = "flow-control"

    def __init__(
        self,
        config: FlowControlConfig,
        *,
        pool: Callable[[], Sequence[Endpoint]],
        objectives: ObjectiveStore | None = None,
        metrics: FlowControlMetrics | None = None,
        pool_name: str = "epp",
        clock: Callable[[], float] = time.monotonic,
        watcher: ObjectivesFileWatcher | None = None,
    ) -> None:
        self.config = config
        self.objectives = objectives if objectives is not None else ObjectiveStore()
        self._pool = pool
        self._clock = clock
        self._watcher = watcher
        self.pool_name = pool_name
        if metrics is None:
            from prometheus_client import CollectorRegistry

            metrics = FlowControlMetrics.for_registry(CollectorRegistry())
        self.metrics = metrics
        self.detector = config.detector
        self.detector_name = config.detector.name
        self._usage_limit = config.usage_limit
        self._saturation = StagedSaturation(config.detector)
        self._cycle_log = LogLimiter(log, 10.0)  # a failing cycle repeats every tick (1 ms)
        self.max_requests = config.max_requests
        self.max_bytes = config.max_bytes
        self._default_ttl = config.default_ttl
        self._no_endpoint_ttl = config.no_endpoint_ttl
        self._ttl_enabled = config.default_ttl > 0 or config.no_endpoint_ttl > 0
        self._poll = config.poll_interval
        # TTL regime: whether the pool was empty at the last look, and since when (a change of
        # regime starts a fresh budget for every waiting request; -inf: no change seen yet).
        self._empty_pool: bool | None = None
        self._regime_since = -_INF
        # Flow limit (see the module docstring).
        self.max_flows = max(1, config.max_flows)
        self.flow_count = 0  # flows held, the bands' overflow flows aside
        self._busy_flows = 0  # of those, flows with requests waiting
        self._idle: list[tuple[float, int, FlowQueue]] = []  # (last use, tie-break, flow) heap
        self._idle_seq = 0
        self._evict_log = LogLimiter(log, 300.0)
        self._overflow_log = LogLimiter(log, 30.0)
        # In-flight-based saturation must be re-read after each dispatch is scheduled.
        self._per_cycle = 1 if config.detector.counts_inflight else config.max_dispatch_per_cycle
        # Dispatched, not yet charged to an endpoint (module docstring); None: the detector does not count it.
        self.pending: PendingLoad | None = config.detector.pending if config.detector.counts_inflight else None

        self.bands: dict[int, PriorityBand] = {}
        self._order: list[PriorityBand] = []  # highest priority first
        self._priorities: list[int] = []
        self._rank: dict[int, int] = {}
        now = clock()
        for priority, band in config.bands.items():
            self._add_band(priority, band, dynamic=False, now=now)
        if 0 not in self.bands:
            # As the reference (registry/config.go::NewConfig): priority 0 is always provisioned, from the default
            # template, and never garbage-collected; usage-limit policies see it among the priorities.
            self._add_band(0, config.default_band, dynamic=False, now=now)

        self.queued = 0
        self.queued_bytes = 0
        self._seq = 0
        self._credits = 0
        self._closed = False
        self._expiry: deque[QueueItem] = deque()
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._gc_timer: asyncio.TimerHandle | None = None
        self._tick_timer: asyncio.TimerHandle | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed_event: asyncio.Event | None = None  # set by shutdown() (ends a drain early)
        self.evictor: Evictor | None = None
        if config.eviction_grace is not None:
            assert config.eviction_filter is not None and config.eviction_ordering is not None
            self.evictor = Evictor(
                config.eviction_grace,
                lambda p: metrics.revocation_counter(str(p), pool_name),
                config.eviction_filter,
                config.eviction_ordering,
                confirmed=metrics.revocation_outcome_counter(REVOCATION_CONFIRMED, pool_name),
            )
        metrics.add_source(self)

    # -- gauges read at scrape time ------------------------------------------------------------
    @property
    def last_saturation(self) -> dict[str, float]:
        return self._saturation.stages()

    @property
    def stale_endpoints(self) -> int:
        return self.detector.stale_endpoints

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None or self._closed:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="flow-control-dispatcher")
        self._gc_timer = loop.call_later(self.config.flow_gc_timeout, self.collect_garbage)
        self._refresh_timer = loop.call_later(self.config.saturation_refresh, self._refresh_saturation)
        if self._watcher is not None:
            self._watcher.start()

    def _refresh_saturation(self) -> None:
        """Re-read saturation while nothing is queued (the reference reads it every dispatch tick, queue or
        not): flow_control_pool_saturation / _stale_endpoints would otherwise keep the last request's values."""
        if not self.queued:
            try:
                self._saturation(self._pool(), self._clock())
            except Exception:
                self._cycle_log.error("saturation", "flow control saturation refresh failed", exc_info=True)
        assert self._loop is not None
        self._refresh_timer = self._loop.call_later(self.config.saturation_refresh, self._refresh_saturation)

    def pool_changed(self) -> None:
        """Datastore membership changed: the TTL regime and saturation may have changed."""
        if self._ttl_enabled:
            self._note_regime(self._pool(), self._clock())
        if self.queued:
            self._credits += 1
            self._wake()
            if self._ttl_enabled:
                self._arm_expiry()

    def request_completed(self, request: InferenceRequest) -> None:
        if self.evictor is not None:
            self.evictor.completed(request)
        # Completion frees in-flight capacity: worth one dispatch attempt.
        if self.queued:
            self._credits += 1
            self._wake()

    def release_pending(self, request: InferenceRequest) -> None:
        if self.pending is not None:
            self.pending.remove(request)

    def shutdown(self) -> None:
        """Reject everything waiting (503 rejected-shutting-down) and refuse new requests."""
        if self._closed:
            return
        self._closed = True
        now = self._clock()
        for band in self._order:
            for flow in list(band.flows.values()):
                if flow.count:
                    while (item := band.pop(flow)) is not None:
                        self._settle(item, Outcome.EVICTED_OTHER, now)
                    self._emptied(flow, now)
        self._expiry.clear()
        for timer in (self._expiry_timer, self._gc_timer, self._refresh_timer):
            if timer is not None:
                timer.cancel()
        if self._closed_event is not None:
            self._closed_event.set()
        self._wake()

    async def drain(self, grace: float) -> None:
        """Serve normally for `grace` seconds (the app's drain window), then reject what still
        waits with 503 rejected-shutting-down. Returns early if the controller is closed meanwhile.

        Run it alongside the gRPC server's graceful stop, with a grace a little shorter than the
        stop's, so queued requests get a 503 before their streams are cancelled."""
        if not self._closed:
            closed = self._closed_event = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await closed.wait()
        await self.aclose()

    async def aclose(self) -> None:
        self.shutdown()
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._watcher is not None:
            await self._watcher.aclose()

    # -- admission -------------------------------------------------------------------------------
    async def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> None:
        t0 = time.perf_counter()
        if request.objective:
            request.priority = self.objectives.priority(request.objective)
        if self._task is None:
            self.start()
        now = self._clock()
        priority = request.priority
        band = self.bands.get(priority)
        if band is None:
            band = self._provision(priority, now)
        fid = request.fairness_id or DEFAULT_FAIRNESS_ID
        flow = band.flows.get(fid)
        if flow is None:
            flow = self._new_flow(band, fid, now, request)
        flow.last_used = now
        if self._closed:
            self._record(flow, Outcome.REJECTED_OTHER, 0.0, request)
            flow.metrics.enqueue(Outcome.REJECTED_OTHER.value).observe(time.perf_counter() - t0)
            raise outcome_error(Outcome.REJECTED_OTHER)

        size = request.body_size
        pool = self._pool()
        if (
            band.count >= band.max_requests
            or band.bytes + size > band.max_bytes
            or (self.max_requests and self.queued >= self.max_requests)
            or (self.max_bytes and self.queued_bytes + size > self.max_bytes)
        ):
            outcome = Outcome.REJECTED_CAPACITY if pool else Outcome.REJECTED_NO_ENDPOINTS
            self._record(flow, outcome, 0.0, request)
            flow.metrics.enqueue(outcome.value).observe(time.perf_counter() - t0)
            raise outcome_error(outcome)

        if flow.overflow and fid != OVERFLOW_FAIRNESS_ID:  # a new fairness id at the flow limit, queued below
            self.metrics.overflow_counter(str(band.priority), self.pool_name).inc()
            self._overflow_log.warning(
                "overflow",
                "flow control: all %d flows (flowControl.maxFlows) have requests waiting; requests with a new "
                "fairness id are queued in their band's shared overflow flow %r",
                self.max_flows, OVERFLOW_FAIRNESS_ID,
            )  # fmt: skip

        # Fast path: nobody is waiting, so dispatching now is what a cycle would do.
        if not self.queued:
            saturation = self._saturation(pool, now)
            if saturation < self._usage_limit.ceilings(saturation, self._priorities)[self._rank[priority]]:
                self._record(flow, _DISPATCHED, 0.0, request)
                flow.metrics.enqueue(ENQUEUED).observe(time.perf_counter() - t0)
                if self.evictor is not None:
                    self.evictor.dispatched(request)
                if self.pending is not None:
                    self.pending.add(request)
                return

        item = self._enqueue(request, band, flow, now)
        flow.metrics.enqueue(ENQUEUED).observe(time.perf_counter() - t0)
        future = item.future
        try:
            outcome = await future
            if outcome is not _DISPATCHED:
                raise outcome_error(outcome)
            if self.evictor is not None:
                self.evictor.dispatched(request)
        except BaseException:  # cancelled, or closed (GeneratorExit): dropped without being resumed
            if item.state is _QUEUED:
                self._settle_in_place(item, Outcome.EVICTED_CONTEXT_CANCELLED, self._clock())
            elif future.done() and not future.cancelled() and future.result() is _DISPATCHED:
                self.release_pending(request)  # dispatched, but the director will never have it
            raise

    def _enqueue(self, request: InferenceRequest, band: PriorityBand, flow: FlowQueue, now: float) -> QueueItem:
        loop = self._loop or asyncio.get_running_loop()
        self._seq += 1
        item = QueueItem(request, flow, self._seq, now, loop.create_future())
        band.push(item)
        if flow.count == 1 and not flow.overflow:
            self._busy_flows += 1
        self.queued += 1
        self.queued_bytes += item.size
        if self._ttl_enabled:
            expiry = self._expiry
            expiry.append(item)
            if len(expiry) > 2 * self.queued + 64:  # tombstones of dispatched / cancelled items
                self._expiry = deque(i for i in expiry if i.state is _QUEUED)
            if self._expiry_timer is None:
                self._arm_expiry()
        self._credits += 1
        self._wake()
        return item

    # -- dispatcher ------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _tick(self) -> None:
        self._tick_timer = None
        if self.queued:
            if self._credits < 1:
                self._credits = 1
            self._wake()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                if self.queued and self._credits > 0:
                    try:
                        self.dispatch_cycle()
                    except Exception:
                        self._cycle_log.error("dispatch", "flow control dispatch cycle failed", exc_info=True)
                        self._credits = 0
                    if self.queued and self._credits > 0:
                        # Bounded work per cycle: let the dispatched requests' tasks run (and be
                        # counted in flight) before the next cycle reads saturation.
                        await asyncio.sleep(0)
                        continue
                # The ticker runs only while work waits; it is not re-armed per wake-up.
                if self.queued and self._tick_timer is None:
                    self._tick_timer = loop.call_later(self._poll, self._tick)
                waiter = self._waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
        finally:
            if self._tick_timer is not None:
                self._tick_timer.cancel()
                self._tick_timer = None

    def dispatch_cycle(self) -> int:
        """One cycle (the dispatcher task runs these; tests may call it directly). Returns dispatches."""
        t0 = time.perf_counter()
        now = self._clock()
        pool = self._pool()
        saturation = self._saturation(pool, now)
        ceilings = self._usage_limit.ceilings(saturation, self._priorities)
        budget = min(self._credits, self._per_cycle)
        order = self._order
        sent = 0
        gated = False
        blocked: PriorityBand | None = None
        blocked_ceiling = 0.0
        while sent < budget and self.queued:
            for i, band in enumerate(order):
                if not band.count:
                    continue
                if saturation >= ceilings[i]:
                    gated = True  # head-of-line: nothing below a blocked band may go
                    blocked = band
                    blocked_ceiling = ceilings[i]
                    break
                flow = band.fairness.pick()
                if flow is None:  # count says otherwise; never expected
                    log.error("fairness policy found no flow in non-empty band %d", band.priority)
                    gated = True
                    break
                item = band.pop(flow)
                if item is None:
                    continue
                if not flow.count:  # self._emptied(flow, now), inlined
                    flow.last_used = now
                    if not flow.overflow:
                        self._busy_flows -= 1
                        if not flow.idle_entry:
                            self._list_idle(flow, now)
                self.queued -= 1
                self.queued_bytes -= item.size
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "dispatch %s from flow %s/%d: saturation %.3f, credits %d, queued %d",
                        item.request.request_id if item.request else "?", flow.fairness_id, band.priority,
                        saturation, self._credits - sent, self.queued,
                    )  # fmt: skip
                if self._dispatch(item, now):
                    sent += 1
                break
            else:
                break  # no band had anything to give (counts out of step: never expected)
            if gated:
                break
        self._credits = 0 if gated or not self.queued else self._credits - sent
        # A ceiling of 0 (soft-reflective thinning a band, an explicit 0) holds the band back whatever the load:
        # revoking in-flight work cannot open it (the reference's maybeReclaim skips such bands too). Nor can
        # it open an empty pool (saturation 1.0 with nothing to dispatch to): the requests still in flight run
        # on pods that have left it, and revoking them would only fail their clients (the evictor skips such
        # requests in a pool that still has endpoints, too).
        if blocked is not None and self.evictor is not None and blocked_ceiling > 0 and pool:
            self.evictor.reclaim(blocked.priority, blocked.count, now, pool)
        self.metrics.dispatch_cycle.observe(time.perf_counter() - t0)
        return sent

    def _dispatch(self, item: QueueItem, now: float) -> bool:
        item.state = _DONE
        request, item.request = item.request, None
        future = item.future
        if future.done():
            # Its task was cancelled a moment ago and has not run its handler yet.
            self._record(item.flow, Outcome.EVICTED_CONTEXT_CANCELLED, now - item.enqueued_at, request)
            return False
        future.set_result(_DISPATCHED)
        if self.pending is not None and request is not None:
            # Counted now, not when its task resumes: a request admitted on the fast path before then must see it.
            self.pending.add(request)
        self._record(item.flow, _DISPATCHED, now - item.enqueued_at, request)
        return True

    # -- expiry ----------------------------------------------------------------------------------
    def _arm_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        expiry = self._expiry
        while expiry and expiry[0].state is not _QUEUED:
            expiry.popleft()
        if not expiry or self._closed:
            return
        now = self._clock()
        ttl = self._no_endpoint_ttl if self._note_regime(self._pool(), now) else self._default_ttl
        if ttl <= 0:
            return  # this regime has no TTL; re-armed when the pool changes
        loop = self._loop or asyncio.get_running_loop()
        delay = max(expiry[0].enqueued_at, self._regime_since) + ttl - now
        self._expiry_timer = loop.call_later(max(0.0, delay), self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry_timer = None
        self.expire_due()

    def expire_due(self, now: float | None = None) -> int:
        """Evict every request that has waited the current regime's TTL since the later of its enqueue
        and the last regime change; returns how many."""
        if now is None:
            now = self._clock()
        empty = self._note_regime(self._pool(), now)
        ttl = self._no_endpoint_ttl if empty else self._default_ttl
        outcome = Outcome.EVICTED_NO_ENDPOINTS if empty else Outcome.EVICTED_TTL
        expiry = self._expiry
        evicted = 0
        limit = now - ttl
        if ttl > 0 and self._regime_since <= limit:  # else the regime's fresh budget has not run out
            while expiry:
                item = expiry[0]
                if item.state is not _QUEUED:
                    expiry.popleft()
                    continue
                if item.enqueued_at > limit:
                    break
                expiry.popleft()
                self._settle_in_place(item, outcome, now)
                evicted += 1
        self._arm_expiry()
        return evicted

    def _note_regime(self, pool: Sequence[Endpoint], now: float) -> bool:
        """Whether the pool is empty (the TTL regime); a change of regime since the last look starts a
        fresh budget (`_regime_since`) for every waiting request."""
        empty = not pool
        if empty is not self._empty_pool:
            if self._empty_pool is not None:
                self._regime_since = now
            self._empty_pool = empty
        return empty

    # -- settling --------------------------------------------------------------------------------
    def _settle_in_place(self, item: QueueItem, outcome: Outcome, now: float) -> None:
        """Finalise an item that leaves from the middle of its queue (cancel, expiry)."""
        item.state = _DONE
        flow = item.flow
        flow.band.discard(item)
        if not flow.count:
            self._emptied(flow, now)
        self.queued -= 1
        self.queued_bytes -= item.size
        self._settle(item, outcome, now)

    def _settle(self, item: QueueItem, outcome: Outcome, now: float) -> None:
        """Outcome metrics and the waiter's answer, for an item already out of the counts."""
        if item.state is _QUEUED:  # popped by shutdown: counts still include it
            item.state = _DONE
            self.queued -= 1
            self.queued_bytes -= item.size
        request, item.request = item.request, None
        self._record(item.flow, outcome, now - item.enqueued_at, request)
        if not item.future.done():
            item.future.set_result(outcome)

    def _record(self, flow: FlowQueue, outcome: Outcome, waited: float, request: InferenceRequest | None) -> None:
        if request is not None:
            flow.metrics.wait(outcome, request.model, request.target_model).observe(waited)
        else:
            flow.metrics.wait(outcome).observe(waited)
        flow.band.metrics.outcome(outcome).inc()

    # -- bands and flows -------------------------------------------------------------------------
    def _add_band(self, priority: int, cfg: BandConfig, *, dynamic: bool, now: float) -> PriorityBand:
        band = PriorityBand(
            priority,
            max_requests=cfg.max_requests,
            max_bytes=cfg.max_bytes,
            ordering=cfg.ordering,
            fairness=cfg.fairness,
            dynamic=dynamic,
            now=now,
        )
        band.metrics = self.metrics.band_children(band, self.pool_name)
        self.bands[priority] = band
        self._reorder()
        return band

    def _reorder(self) -> None:
        self._order = sorted(self.bands.values(), key=lambda b: -b.priority)
        self._priorities = [b.priority for b in self._order]
        self._rank = {p: i for i, p in enumerate(self._priorities)}

    def _provision(self, priority: int, now: float) -> PriorityBand:
        """A band for a priority not listed in priorityBands, from the matching template."""
        template = self.config.default_band
        if priority < 0 and self.config.default_negative_band is not None:
            template = self.config.default_negative_band
        log.info("provisioning priority band %d from the default template", priority)
        return self._add_band(priority, template, dynamic=True, now=now)

    def _new_flow(
        self, band: PriorityBand, fairness_id: str, now: float, request: InferenceRequest | None = None
    ) -> FlowQueue:
        """The flow for a fairness id the band has none for: a new one, within the flow limit."""
        if fairness_id == OVERFLOW_FAIRNESS_ID:
            return self._overflow_flow(band, now)
        if self.flow_count >= self.max_flows and not self._evict_idlest():
            # Every flow has requests waiting: share the band's overflow flow rather than refuse (counted by
            # admit once the request is actually queued there, not when it is refused).
            if request is not None:
                request.data[FLOW_ID_KEY] = OVERFLOW_FAIRNESS_ID
            return self._overflow_flow(band, now)
        flow = band.flow(fairness_id, now)
        flow.metrics = self.metrics.flow_children(flow, self.pool_name)
        self.flow_count += 1
        self._list_idle(flow, now)
        return flow

    def _overflow_flow(self, band: PriorityBand, now: float) -> FlowQueue:
        flow = band.flows.get(OVERFLOW_FAIRNESS_ID)
        if flow is None:
            flow = band.flow(OVERFLOW_FAIRNESS_ID, now)
            flow.overflow = True
            flow.metrics = self.metrics.flow_children(flow, self.pool_name)
        return flow

    def _list_idle(self, flow: FlowQueue, since: float) -> None:
        self._idle_seq += 1
        heapq.heappush(self._idle, (since, self._idle_seq, flow))
        flow.idle_entry = True

    def _emptied(self, flow: FlowQueue, now: float) -> None:
        """`flow`'s last waiting request left: it is idle from now, an eviction candidate again."""
        flow.last_used = now
        if flow.overflow:
            return
        self._busy_flows -= 1
        if not flow.idle_entry:
            self._list_idle(flow, now)

    def _evict_idlest(self) -> bool:
        """Drop the empty flow unused longest, to make room for a new one; False if every flow is busy."""
        if self.flow_count <= self._busy_flows:
            return False
        idle = self._idle
        while idle:
            since, _, flow = idle[0]
            band = flow.band
            if band.flows.get(flow.fairness_id) is not flow:  # garbage-collected meanwhile
                heapq.heappop(idle)
            elif flow.count:  # busy: listed again when it empties
                heapq.heappop(idle)
                flow.idle_entry = False
            elif flow.last_used > since:  # used since it was listed: re-file at its last use
                self._idle_seq += 1
                heapq.heapreplace(idle, (flow.last_used, self._idle_seq, flow))
            else:
                heapq.heappop(idle)
                flow.idle_entry = False
                band.remove(flow)
                self.flow_count -= 1
                self.metrics.flow_eviction_counter(str(band.priority), self.pool_name).inc()
                self._evict_log.warning(
                    "evict",
                    "flow control: %d flows (flowControl.maxFlows) reached; new fairness ids take the place of "
                    "the idlest empty flows",
                    self.max_flows,
                )
                return True
        log.error("flow control: %d flows, %d busy, but no empty flow listed", self.flow_count, self._busy_flows)
        return False

    def collect_garbage(self) -> None:
        """Drop flows idle for flowGCTimeout and template bands idle for bandGCTimeout."""
        now = self._clock()
        cfg = self.config
        removed = False
        for band in list(self._order):
            for flow in band.collect_idle_flows(now - cfg.flow_gc_timeout):
                if not flow.overflow:
                    self.flow_count -= 1
            if band.flows or band.count:
                band.idle_since = now
            elif band.dynamic and band.idle_since <= now - cfg.band_gc_timeout:
                del self.bands[band.priority]
                removed = True
        if removed:
            self._reorder()
        if len(self._idle) > 2 * self.flow_count + 64:  # entries of flows collected above
            self._idle = [e for e in self._idle if e[2].band.flows.get(e[2].fairness_id) is e[2]]
            heapq.heapify(self._idle)
        if not self._closed and self._loop is not None:
            self._gc_timer = self._loop.call_later(cfg.flow_gc_timeout, self.collect_garbage)

    # -- introspection (tests, /debug) -----------------------------------------------------------
    def queue_lengths(self) -> dict[tuple[str, int], int]:
        """(fairness id, priority) → waiting requests, for non-empty flows."""
        return {(f.fairness_id, b.priority): f.count for b in self._order for f in b.flows.values() if f.count}
