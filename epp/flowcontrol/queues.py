"""Flow queues and priority bands: the data the dispatcher walks.

A `FlowQueue` is a heap of (sort_key, seq, item) for one (fairness id, priority). Items
that leave other than by `pop` (cancelled, expired) are marked DONE and left in the heap as
tombstones: counts and bytes drop at once, the entry is skipped when it reaches the top,
and the heap is rebuilt when tombstones outnumber live items (amortised O(1)).

A `PriorityBand` owns the flows of one priority, its capacity limits, its ordering policy,
and its fairness policy's state. Counts are kept eagerly at flow, band and controller
level so capacity checks and metrics read integers, never walk queues.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from llmepp.flowcontrol.types import ItemState, QueueItem

if TYPE_CHECKING:
    from llmepp.flowcontrol.interfaces import FairnessPolicy, FairnessState, OrderingPolicy

# Rebuild a heap when it holds more than this many entries beyond twice its live items.
_COMPACT_SLACK = 32


class FlowQueue:
    """The waiting requests of one flow, best first by the band's ordering policy."""

    __slots__ = (
        "active",
        "band",
        "bytes",
        "count",
        "fairness_id",
        "heap",
        "idle_entry",
        "last_used",
        "metrics",
        "overflow",
        "priority",
    )

    def __init__(self, band: PriorityBand, fairness_id: str, now: float) -> None:
        self.band = band
        self.fairness_id = fairness_id
        self.priority = band.priority
        self.heap: list[tuple[float, int, QueueItem]] = []
        self.count = 0
        self.bytes = 0
        # Listed in the fairness policy's active set (round-robin removes lazily).
        self.active = False
        # Last admission into it, or when it last emptied: idle time is measured from here.
        self.last_used = now
        # Cached metric children for this flow (set by FlowControlMetrics.flow_children).
        self.metrics: Any = None
        # The band's shared overflow flow (not one of the controller's maxFlows flows).
        self.overflow = False
        # Listed in the controller's heap of eviction candidates (flow limit).
        self.idle_entry = False

    def push(self, item: QueueItem) -> None:
        heapq.heappush(self.heap, (item.sort_key, item.seq, item))
        self.count += 1
        self.bytes += item.size

    def peek(self) -> QueueItem | None:
        heap = self.heap
        while heap:
            item = heap[0][2]
            if item.state is ItemState.QUEUED:
                return item
            heapq.heappop(heap)
        return None

    def pop(self) -> QueueItem | None:
        """Remove and return the head (the caller finalises it)."""
        item = self.peek()
        if item is not None:
            heapq.heappop(self.heap)
            self.count -= 1
            self.bytes -= item.size
        return item

    def discard(self, item: QueueItem) -> None:
        """Account for an item that left in place (cancel / expiry); it is already DONE."""
        self.count -= 1
        self.bytes -= item.size
        if len(self.heap) > 2 * self.count + _COMPACT_SLACK:
            self.heap = [e for e in self.heap if e[2].state is ItemState.QUEUED]
            heapq.heapify(self.heap)

    def __repr__(self) -> str:
        return f"FlowQueue({self.fairness_id!r}, priority={self.priority}, count={self.count})"


class PriorityBand:
    """All flows of one priority, with the band's limits and policies."""

    __slots__ = (
        "bytes",
        "count",
        "dynamic",
        "fairness",
        "flows",
        "idle_since",
        "max_bytes",
        "max_requests",
        "metrics",
        "ordering",
        "priority",
    )

    def __init__(
        self,
        priority: int,
        *,
        max_requests: int,
        max_bytes: int,
        ordering: OrderingPolicy,
        fairness: FairnessPolicy,
        dynamic: bool,
        now: float,
    ) -> None:
        self.priority = priority
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.ordering = ordering
        self.flows: dict[str, FlowQueue] = {}
        self.count = 0
        self.bytes = 0
        # Provisioned from a template (not listed in priorityBands): garbage-collected when idle.
        self.dynamic = dynamic
        self.idle_since = now
        self.metrics: Any = None
        self.fairness: FairnessState = fairness.new_state(self)

    def flow(self, fairness_id: str, now: float) -> FlowQueue:
        flow = self.flows.get(fairness_id)
        if flow is None:
            flow = self.flows[fairness_id] = FlowQueue(self, fairness_id, now)
        return flow

    def push(self, item: QueueItem) -> None:
        flow = item.flow
        item.sort_key = self.ordering.sort_key(item)
        flow.push(item)
        self.count += 1
        self.bytes += item.size
        if flow.count == 1:
            self.fairness.flow_activated(flow)
        self.fairness.item_added(item)

    def pop(self, flow: FlowQueue) -> QueueItem | None:
        item = flow.pop()
        if item is not None:
            self.count -= 1
            self.bytes -= item.size
        return item

    def discard(self, item: QueueItem) -> None:
        item.flow.discard(item)
        self.count -= 1
        self.bytes -= item.size

    def has_room(self, size: int) -> bool:
        return self.count < self.max_requests and self.bytes + size <= self.max_bytes

    def collect_idle_flows(self, older_than: float) -> list[FlowQueue]:
        """Drop empty flows unused since `older_than`; returns them."""
        idle = [f for f in self.flows.values() if f.count == 0 and f.last_used <= older_than]
        for flow in idle:
            self.remove(flow)
        return idle

    def remove(self, flow: FlowQueue) -> None:
        """Forget an empty flow (idle garbage collection, or room for a new one at the flow limit)."""
        del self.flows[flow.fairness_id]
        self.fairness.flow_removed(flow)

    def __repr__(self) -> str:
        return f"PriorityBand({self.priority}, flows={len(self.flows)}, count={self.count})"
