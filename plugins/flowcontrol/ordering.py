"""Ordering policies: which request inside a flow is dispatched first."""

from __future__ import annotations

import math

from llmepp.flowcontrol.interfaces import OrderingPolicy
from llmepp.flowcontrol.types import QueueItem
from llmepp.request.slo import TTFT_SLO_HEADERS, slo_ms


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

    A request expires once the TTL of the current regime (noEndpointRequestTTL while the pool is
    empty, else defaultRequestTTL) has passed since the later of its enqueue and the last regime
    change (the controller's "fresh budget"): every waiting request has the same TTL, so the one
    closest to expiring is the earliest enqueued, and key(item) = its enqueue time, as FCFS. The
    reference keys on enqueue time + the TTL in force at enqueue, which goes stale at a regime
    change: after scale from zero, requests that waited for the first pod (keyed with the long
    noEndpointRequestTTL) went after newer ones and expired first. Per-request TTLs would make
    the two differ; like the reference, this build has none. Parameters: none.
    """

    type = "edf-ordering-policy"

    def sort_key(self, item: QueueItem) -> float:
        return item.enqueued_at


class SloDeadlineOrderingPolicy(OrderingPolicy):
    """The request whose TTFT objective runs out first goes first.

    key(item) = the request's arrival (its headers, monotonic) + `x-llm-d-slo-ttft-ms` (or the deprecated
    `x-slo-ttft-ms`) / 1000; without the header, or with one that is not a positive number, the deadline
    is +inf: such requests go after every request with an objective, FCFS among themselves. Parameters: none.
    """

    type = "slo-deadline-ordering-policy"

    def sort_key(self, item: QueueItem) -> float:
        request = item.request
        ms = slo_ms(request.headers, TTFT_SLO_HEADERS) if request is not None else 0.0
        if not ms:
            return math.inf
        assert request is not None
        return request.received_at + ms / 1000.0
