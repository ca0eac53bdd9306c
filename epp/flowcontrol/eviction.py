"""In-flight eviction (`flowControl.enableEviction: true`, reference `pkg/epp/flowcontrol/eviction`).

When saturation holds a band back, requests already dispatched from sheddable bands are revoked
so the capacity they hold comes back for the blocked, more important work:

    victims  = dispatched, unfinished, accepted by the EvictionFilterPolicy (default
               `sheddable-eviction-filter`: priority < 0), below the blocked band's priority,
               still answerable, and served by an endpoint still in the pool (one on a pod that
               left frees nothing the saturation detector reads)
    order    = the EvictionOrderingPolicy's (default `priority-then-time-eviction-order-policy`:
               lowest priority first, then the most recently dispatched first: the least work lost)
    per decision: one revocation per request waiting in the blocked band, at most 2; the next
               decision waits `grace`, so saturation is read
               again only once the freed capacity can show (a scraped detector: one metrics
               refresh + the staleness threshold + 250 ms; an in-flight one: 10 ms)

A revoked request is answered 429 `request evicted by flow control` (reason `evicted`) by its
ext_proc stream, which makes Envoy reset the upstream request (the model server stops working on
it) and reply to the client, or reset the client's stream if the response had started.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from llmepp.datalayer.endpoint import Endpoint
from llmepp.flowcontrol.interfaces import EvictionFilterPolicy, EvictionOrderingPolicy
from llmepp.observability.fast import Tally
from llmepp.observability.logging import LogLimiter
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)

MAX_PER_DECISION = 2
SCRAPED_GRACE_EXTRA = 0.25  # seconds on top of refresh + staleness for scraped detectors
INFLIGHT_GRACE = 0.010  # seconds: in-flight counts drop the moment a request is released


class Evictor:
    """The dispatched sheddable requests, and the revocation decision over them."""

    def __init__(
        self,
        grace: float,
        revoked: Callable[[int], Tally],
        accept: EvictionFilterPolicy,
        ordering: EvictionOrderingPolicy,
        confirmed: Tally | None = None,
    ) -> None:
        self.grace = grace
        # The blocked band's priority -> the revocations issued for it (the reference's
        # flow_control_revocations_issued_total{priority}); and the confirmed ones (the victim's stream was
        # answered and released, at once: flow_control_revocations_total{outcome="confirmed"}).
        self._revoked = revoked
        self._confirmed = confirmed
        self._accept = accept
        self._ordering = ordering
        self._seq = itertools.count()
        # id(request) -> (request, eviction key, dispatch order)
        self._inflight: dict[int, tuple[InferenceRequest, Any, int]] = {}
        # priority -> how many of `_inflight` have it: a decision with no victim priority below the blocked
        # band (asked every dispatcher tick while it is blocked) returns without walking `_inflight`.
        self._priorities: dict[int, int] = {}
        self._next_decision = -1.0
        self._policy_log = LogLimiter(log, 60.0)

    def __len__(self) -> int:
        return len(self._inflight)

    def dispatched(self, request: InferenceRequest) -> None:
        # The policies may be a plugin author's: one that raises leaves the request unevictable rather than
        # failing a request that was admitted.
        seq = next(self._seq)
        try:
            if not self._accept.accept(request):
                return
            order = self._ordering.eviction_key(request, seq)
        except Exception:
            self._policy_log.error(
                "raised",
                "eviction policy %r or %r raised; the dispatched request cannot be evicted",
                self._accept.type, self._ordering.type, exc_info=True,
            )  # fmt: skip
            return
        key = id(request)
        if key in self._inflight:
            self._forget(key)
        self._inflight[key] = (request, order, seq)
        priorities = self._priorities
        priorities[request.priority] = priorities.get(request.priority, 0) + 1

    def completed(self, request: InferenceRequest) -> None:
        if id(request) in self._inflight:
            self._forget(id(request))

    def _forget(self, key: int) -> None:
        request = self._inflight.pop(key)[0]
        priorities = self._priorities
        left = priorities[request.priority] - 1
        if left:
            priorities[request.priority] = left
        else:
            del priorities[request.priority]

    def reclaim(self, blocked_priority: int, waiting: int, now: float, pool: Iterable[Endpoint]) -> int:
        """Revoke up to min(`waiting`, MAX_PER_DECISION) victims for a band of `blocked_priority` held
        back by saturation with `waiting` requests queued; at most one decision per `grace`. Returns
        how many were revoked. Only requests on endpoints of `pool` (the pool the detector reads) qualify."""
        if now < self._next_decision or not any(p < blocked_priority for p in self._priorities):
            return 0
        candidates = [
            (key, seq, req)
            for req, key, seq in self._inflight.values()
            if req.priority < blocked_priority and req.evict is not None
        ]
        if candidates:
            members = set(pool)
            candidates = [c for c in candidates if _served_in(c[2], members)]
        if not candidates:
            return 0
        candidates.sort(key=lambda c: (c[0], c[1]))
        wanted = min(waiting, MAX_PER_DECISION)
        revoked = 0
        for _, _, req in candidates:
            if revoked == wanted:
                break
            evict = req.evict
            assert evict is not None
            self._forget(id(req))
            if evict():
                revoked += 1
                priority = req.priority
                self._revoked(blocked_priority).inc()
                if self._confirmed is not None:
                    self._confirmed.inc()
                log.info(
                    "evicted an in-flight request of priority %d for blocked priority %d",
                    priority,
                    blocked_priority,
                    extra={"request_id": req.request_id},
                )
        if revoked:
            self._next_decision = now + self.grace
        return revoked


def _served_in(request: InferenceRequest, pool: set[Endpoint]) -> bool:
    """The request runs on an endpoint of `pool` (a request without a scheduling result, routed by a
    plugin-less path, is assumed to)."""
    result = request.scheduling
    if result is None:
        return True
    return any(ep in pool for ep in result.targets)
