"""Flow-control extension points (reference `framework/interface/flowcontrol`).

    OrderingPolicy      which request inside a flow goes first      (fcfs, edf)
    FairnessPolicy      which flow inside a band goes next          (global-strict, round-robin)
    UsageLimitPolicy    saturation ceiling per band                 (static)
    SaturationDetector  how loaded the pool is, 0 = idle, ≥ 1 = full (utilization, concurrency)
    EvictionFilterPolicy    which dispatched requests may be revoked    (sheddable)
    EvictionOrderingPolicy  which of them goes first                    (priority, then newest)

Everything here runs on the event loop inside the dispatcher or the admit fast path:
keep it allocation-light. `AdmissionController` is what `build_admission` returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import Plugin
from llmepp.request.types import InferenceRequest

if TYPE_CHECKING:
    from llmepp.flowcontrol.queues import FlowQueue, PriorityBand
    from llmepp.flowcontrol.types import QueueItem


class OrderingPolicy(Plugin):
    """Orders requests inside one flow: the lowest `sort_key` is dispatched first.

    The key is computed once, at enqueue; ties go to the earlier arrival.
    """

    @abstractmethod
    def sort_key(self, item: QueueItem) -> float: ...


class FairnessState(ABC):
    """A fairness policy's bookkeeping for one band (cursor, index...)."""

    def flow_activated(self, flow: FlowQueue) -> None:
        """`flow` went from empty to non-empty."""

    def item_added(self, item: QueueItem) -> None:
        """An item entered one of the band's flows (after its sort key is set)."""

    def flow_removed(self, flow: FlowQueue) -> None:
        """`flow` was garbage-collected (it is empty)."""

    @abstractmethod
    def pick(self) -> FlowQueue | None:
        """A non-empty flow whose head goes next, or None when the band is empty."""


class FairnessPolicy(Plugin):
    """Chooses which flow of a band is served next."""

    @abstractmethod
    def new_state(self, band: PriorityBand) -> FairnessState: ...


class UsageLimitPolicy(Plugin):
    """Maps pool saturation to a ceiling per band: a band is gated while saturation ≥ its ceiling."""

    @abstractmethod
    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        """One ceiling per priority in `priorities` (highest priority first)."""


class EvictionFilterPolicy(Plugin):
    """In-flight eviction (flowControl.enableEviction): whether a dispatched request may ever be
    revoked for a blocked higher band. Asked once, when it is dispatched."""

    @abstractmethod
    def accept(self, request: InferenceRequest) -> bool: ...


class EvictionOrderingPolicy(Plugin):
    """In-flight eviction: revocable requests are revoked lowest `eviction_key` first. Computed once,
    at dispatch; `sequence` grows with dispatch order."""

    @abstractmethod
    def eviction_key(self, request: InferenceRequest, sequence: int) -> tuple[float, ...]: ...


@dataclass(slots=True)
class PendingLoad:
    """Requests the flow controller has released that the director has not yet charged to an endpoint's
    in-flight counts: it is still running data producers (a tokenizer, a latency predictor) or the scheduler
    for them. The controller adds a request when it dispatches it; `AdmissionController.release_pending`
    takes it away when the director charges it to its endpoint, or when it fails or is cancelled first.
    `tokens` sums their prompt-token estimates (`InferenceRequest.estimated_prompt_tokens`).

    The request keeps the figure it was counted with, so a producer that changes its prompt meanwhile
    cannot leave `tokens` off, and a second release is a no-op rather than a count below zero (which
    would admit one request too many for the rest of the process's life)."""

    requests: int = 0
    tokens: int = 0

    def add(self, request: InferenceRequest) -> None:
        if request.pending_tokens is not None:
            return
        tokens = request.pending_tokens = request.estimated_prompt_tokens
        self.requests += 1
        self.tokens += tokens

    def remove(self, request: InferenceRequest) -> None:
        tokens = request.pending_tokens
        if tokens is None:
            return
        request.pending_tokens = None
        self.requests -= 1
        self.tokens -= tokens


class SaturationDetector(Plugin):
    """Pool saturation in [0, ∞): below 1 there is room, at or above 1 the pool is full (NaN is read as full)."""

    # Endpoints counted stale by the last `saturation` call (flow_control_stale_endpoints).
    stale_endpoints: int = 0
    # How long the flow controller may reuse a computed value (seconds of real time). Scraped
    # inputs change once per scrape, so a millisecond is invisible; in-flight counts change
    # with every request, so detectors reading them must say 0.
    max_cache_age: ClassVar[float] = 0.0
    # True when saturation reads the director's in-flight counts: a dispatched request shows
    # up as soon as it is scheduled, so the dispatcher dispatches one request per cycle and
    # lets it be scheduled before reading saturation again (else one free slot could take
    # several requests). Scraped detectors see a dispatch only after the next scrape, so
    # batching changes nothing for them.
    counts_inflight: ClassVar[bool] = False
    # A counts_inflight detector whose saturation also counts the requests on their way to an endpoint sets
    # its own PendingLoad here; the flow controller keeps it up to date (None: not counted).
    pending: PendingLoad | None = None

    @abstractmethod
    def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        """`now` is time.monotonic() (the clock endpoint metrics are stamped with)."""


class AdmissionController(ABC):
    """What `Pipeline.admission` holds: legacy shedding or the flow controller."""

    @abstractmethod
    async def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> None: ...

    def start(self) -> None:
        """Start background work (dispatcher, objectives reload). Idempotent; admit() also starts it."""

    def request_completed(self, request: InferenceRequest) -> None:
        """A routed request finished: in-flight capacity was freed."""

    def release_pending(self, request: InferenceRequest) -> None:
        """An admitted request is no longer on its way to an endpoint (see PendingLoad): the director
        charged it to its endpoint's in-flight counts, or it failed or was cancelled before that. Called
        once for each `admit` that returned."""

    async def drain(self, grace: float) -> None:
        """Serve normally for up to `grace` seconds, then close (see FlowController.drain)."""
        await self.aclose()

    @abstractmethod
    async def aclose(self) -> None:
        """Reject everything still waiting (503 rejected-shutting-down) and stop background work."""

    # Set by subclasses: shown in logs and /debug.
    mode: ClassVar[str] = ""
