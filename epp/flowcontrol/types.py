"""Flow-control vocabulary: outcomes, queued items, and how outcomes become HTTP answers.

A *flow* is all requests sharing (fairness id, priority); a *band* is all flows of one
priority. An item is one waiting request; its `future` is what the request's task awaits.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING

from llmepp.errors import (
    REASON_CANCELLED,
    REASON_NO_ENDPOINTS,
    REASON_SATURATED,
    REASON_SHUTTING_DOWN,
    REASON_TTL_EXPIRED,
    RequestError,
    ResourceExhausted,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from llmepp.flowcontrol.queues import FlowQueue
    from llmepp.request.types import InferenceRequest

DEFAULT_FAIRNESS_ID = "default-flow"
# The flow of a band that takes requests with a new fairness id once flowControl.maxFlows flows all
# have requests waiting (controller: "Flow limit"). A request naming it joins it.
OVERFLOW_FAIRNESS_ID = "overflow-flow"
# request.data key, set only on a request queued in the overflow flow: the fairness id of the flow it
# was served from (program-aware fairness charges that flow's program).
FLOW_ID_KEY = "flow-control/flow-id"


class Outcome(enum.Enum):
    """Final state of a request in flow control (reference `QueueOutcome`, same strings)."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"  # not accepted: controller shutting down
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"  # was queued when the controller shut down


class ItemState(enum.IntEnum):
    QUEUED = 0
    DONE = 1  # dispatched, evicted or cancelled: a tombstone wherever it still sits


class QueueItem:
    """One waiting request. Heaps hold (sort_key, seq, item); seq breaks ties FCFS."""

    __slots__ = ("enqueued_at", "flow", "future", "request", "seq", "size", "sort_key", "state")

    def __init__(
        self,
        request: InferenceRequest,
        flow: FlowQueue,
        seq: int,
        enqueued_at: float,
        future: asyncio.Future[Outcome],
    ) -> None:
        self.request: InferenceRequest | None = request
        self.flow = flow
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.size = request.body_size
        self.future = future
        self.state = ItemState.QUEUED
        self.sort_key = 0.0  # set by the band's ordering policy on enqueue

    def __repr__(self) -> str:
        return f"QueueItem(seq={self.seq}, flow={self.flow.fairness_id}/{self.flow.priority}, state={self.state.name})"


def outcome_error(outcome: Outcome) -> RequestError:
    """The client-facing error for a non-dispatched outcome (reference §1.4)."""
    if outcome is Outcome.REJECTED_CAPACITY:
        return ResourceExhausted("flow control queues are at capacity", reason=REASON_SATURATED)
    if outcome is Outcome.EVICTED_TTL:
        return ResourceExhausted("request expired in the flow control queue", reason=REASON_TTL_EXPIRED)
    if outcome is Outcome.REJECTED_NO_ENDPOINTS:
        return ServiceUnavailable("no endpoints in the pool to queue for", reason=REASON_NO_ENDPOINTS)
    if outcome is Outcome.EVICTED_NO_ENDPOINTS:
        return ServiceUnavailable("no endpoints appeared while the request waited", reason=REASON_NO_ENDPOINTS)
    if outcome is Outcome.EVICTED_CONTEXT_CANCELLED:
        return ServiceUnavailable("request cancelled while queued", reason=REASON_CANCELLED)
    return ServiceUnavailable("flow control is shutting down", reason=REASON_SHUTTING_DOWN)
