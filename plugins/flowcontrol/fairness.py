"""Fairness policies: which flow (tenant) inside a priority band is served next."""

from __future__ import annotations

import bisect
import heapq

from llmepp.flowcontrol.interfaces import FairnessPolicy, FairnessState
from llmepp.flowcontrol.queues import FlowQueue, PriorityBand
from llmepp.flowcontrol.types import ItemState, QueueItem

# Rebuild the band-wide index when it holds this many entries beyond twice the live items.
_COMPACT_SLACK = 64


class _GlobalStrictState(FairnessState):
    """A band-wide heap of every queued item (tombstones skipped lazily): O(log n) per pick."""

    __slots__ = ("band", "heap")

    def __init__(self, band: PriorityBand) -> None:
        self.band = band
        self.heap: list[tuple[float, int, QueueItem]] = []

    def item_added(self, item: QueueItem) -> None:
        heap = self.heap
        heapq.heappush(heap, (item.sort_key, item.seq, item))
        if len(heap) > 2 * self.band.count + _COMPACT_SLACK:
            self.heap = [e for e in heap if e[2].state is ItemState.QUEUED]
            heapq.heapify(self.heap)

    def pick(self) -> FlowQueue | None:
        heap = self.heap
        while heap:
            item = heap[0][2]
            if item.state is ItemState.QUEUED:
                # The band's best item is also the best of its own flow, i.e. that flow's head.
                return item.flow
            heapq.heappop(heap)
        return None


class GlobalStrictFairnessPolicy(FairnessPolicy):
    """No fairness (the default): the best head item across all flows of the band wins.

    pick = flow of argmin over queued items in the band of (ordering key, arrival seq); with
    FCFS ordering that is the oldest request in the band, whoever sent it, so one tenant
    flooding the band delays everybody. Parameters: none.
    """

    type = "global-strict-fairness-policy"

    def new_state(self, band: PriorityBand) -> FairnessState:
        return _GlobalStrictState(band)


class _RoundRobinState(FairnessState):
    """Sorted fairness ids of non-empty flows and the id served last."""

    __slots__ = ("active", "band", "cursor")

    def __init__(self, band: PriorityBand) -> None:
        self.band = band
        self.active: list[str] = []
        self.cursor: str | None = None

    def flow_activated(self, flow: FlowQueue) -> None:
        if not flow.active:
            flow.active = True
            bisect.insort(self.active, flow.fairness_id)

    def flow_removed(self, flow: FlowQueue) -> None:
        if flow.active:
            flow.active = False
            self.active.remove(flow.fairness_id)

    def pick(self) -> FlowQueue | None:
        active = self.active
        flows = self.band.flows
        while active:
            i = 0 if self.cursor is None else bisect.bisect_right(active, self.cursor)
            if i == len(active):
                i = 0  # wrap around
            fid = active[i]
            flow = flows[fid]
            if flow.count > 0:
                self.cursor = fid
                return flow
            # Emptied by cancellations / expiry since it was listed: drop it, look again.
            flow.active = False
            del active[i]
        return None


class RoundRobinFairnessPolicy(FairnessPolicy):
    """Round-robin over the band's flows, so a noisy tenant cannot starve a quiet one.

    Keeps a per-band cursor over the flows' fairness ids in sorted order; each pick takes the
    next non-empty flow after the cursor (wrapping), skipping empty queues. A tenant with
    one waiting request waits at most one turn per other active tenant. Parameters: none.
    """

    type = "round-robin-fairness-policy"

    def new_state(self, band: PriorityBand) -> FairnessState:
        return _RoundRobinState(band)
