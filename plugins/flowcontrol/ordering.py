"""Ordering policies: which request inside a flow is dispatched first."""

from __future__ import annotations

import math

from llmepp.flowcontrol.interfaces import OrderingPolicy
from llmepp.flowcontrol.types import QueueItem

SLO_TTFT_HEADER = "x-llm-d-slo-ttft-ms"


class FcfsOrderingPolicy(OrderingPolicy):
    """First come, first served (the default).

    key(item) = enqueue time; ties (same clock tick) by arrival sequence.
    Parameters: none.
    """

    type = "fcfs-ordering-policy"

    def sort_key(self, item: QueueItem) -> float:
        return item.enqueued_at


class EdfOrderingPolicy(OrderingPolicy):
    """Earliest deadline first: the request closest to expiring goes first.

    key(item) = enqueue time + the effective TTL in force when it was enqueued; with no TTL
    (defaultRequestTTL 0s) the deadline is +inf (far future), so such requests fall back to
    FCFS among themselves (ties by arrival sequence) and go after every request that has a
    deadline. Parameters: none.

    With one TTL for everything this orders like FCFS; it differs when TTLs differ, e.g. a
    request enqueued while the pool was empty (noEndpointRequestTTL) next to one enqueued
    under defaultRequestTTL.
    """

    type = "edf-ordering-policy"

    def sort_key(self, item: QueueItem) -> float:
        return item.deadline


class SloDeadlineOrderingPolicy(OrderingPolicy):
    """The request whose TTFT objective runs out first goes first.

    key(item) = the request's arrival (its headers, monotonic) + `x-llm-d-slo-ttft-ms` / 1000;
    without the header, or with one that is not a positive number, the deadline is +inf: such
    requests go after every request with an objective, FCFS among themselves. Parameters: none.
    """

    type = "slo-deadline-ordering-policy"

    def sort_key(self, item: QueueItem) -> float:
        request = item.request
        raw = request.headers.get(SLO_TTFT_HEADER) if request is not None else None
        if not raw:
            return math.inf
        try:
            ms = float(raw)
        except ValueError:
            return math.inf
        if not 0 < ms < math.inf:
            return math.inf
        assert request is not None
        return request.received_at + ms / 1000.0
