"""In-flight eviction policies (flowControl.enableEviction): which dispatched requests may be revoked for
a blocked higher band, and in what order."""

from __future__ import annotations

from llmepp.flowcontrol.interfaces import EvictionFilterPolicy, EvictionOrderingPolicy
from llmepp.request.types import InferenceRequest


class SheddableEvictionFilter(EvictionFilterPolicy):
    """Only sheddable requests (priority < 0) may be revoked: work a client marked as droppable.
    The default. No parameters (the reference's README calls it `eviction-sheddable-filter`)."""

    type = "sheddable-eviction-filter"

    def accept(self, request: InferenceRequest) -> bool:
        return request.priority < 0


class PriorityThenTimeEvictionOrder(EvictionOrderingPolicy):
    """key = (priority, −dispatch order): the lowest priority first, then the most recently dispatched,
    which has done the least work. The default. No parameters (README name
    `eviction-priority-then-time-ordering`)."""

    type = "priority-then-time-eviction-order-policy"

    def eviction_key(self, request: InferenceRequest, sequence: int) -> tuple[float, ...]:
        return (request.priority, -sequence)
