"""A scriptable stand-in for `llmepp.director.Director` (protocol tests, e2e, benchmarks).

Routes round-robin over fixed `ip:port` endpoints and records every call. Tests steer it
per request either through attributes (`fail_with`, `raise_exc`, `fallbacks`, ...) or
through request headers, which also works through a real Envoy:

    x-test-error: <status>[:<reason>]   raise the matching RequestError
    x-test-route: ip:port[,ip:port]     route there instead of round-robin
    x-test-delay-ms: <n>                 await this long before deciding
    x-test-crash: 1                      raise RuntimeError (→ 500)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from llmepp.datalayer.endpoint import Endpoint, EndpointSpec, split_hostport
from llmepp.director import RoutingDecision
from llmepp.errors import (
    BadRequest,
    RequestError,
    ResourceExhausted,
    ServiceUnavailable,
)
from llmepp.request.types import InferenceRequest, ResponseInfo


@dataclass(slots=True)
class Completion:
    request: InferenceRequest
    response: ResponseInfo
    decision: RoutingDecision


def _endpoint(hostport: str) -> Endpoint:
    address, port = split_hostport(hostport)
    return Endpoint(EndpointSpec(name=hostport, address=address, port=int(port)))


def error_for(status: int, reason: str | None = None, message: str = "") -> RequestError:
    classes: dict[int, type[RequestError]] = {400: BadRequest, 429: ResourceExhausted, 503: ServiceUnavailable}
    cls = classes.get(status, RequestError)
    msg = message or f"test error {status}"
    if cls is RequestError:
        return RequestError(msg, reason=reason, status=status)
    return cls(msg, reason=reason)


@dataclass
class FakeDirector:
    endpoints: list[str]
    # Endpoints per decision (>1 gives a comma-separated fallback list).
    fallbacks: int = 1
    fail_with: RequestError | None = None
    raise_exc: BaseException | None = None
    delay: float = 0.0
    extra_headers: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] | None = None
    response_header_extra: dict[str, str] | None = None
    honour_test_headers: bool = True
    # Stands in for an InferenceModelRewrite rule: the director sets this target model.
    rewrite_to: str = ""
    # Records.
    requests: list[InferenceRequest] = field(default_factory=list)
    subsets: list[Sequence[str] | None] = field(default_factory=list)
    response_headers_calls: list[tuple[InferenceRequest, ResponseInfo, dict[str, str]]] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    first_chunks: list[InferenceRequest] = field(default_factory=list)
    record: bool = True
    # Stands in for ResponseMetadataProcessors: response → {namespace: {key: value}}.
    metadata: Callable[[ResponseInfo], dict[str, dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        self._endpoints = [_endpoint(hp) for hp in self.endpoints]
        self._rr = itertools.count()
        # Routed and not yet completed, by request id (the accounting tests check it drains).
        self.inflight: dict[str, int] = {}

    def _pick(self, subset: Sequence[str] | None) -> list[Endpoint]:
        pool = self._endpoints
        if subset is not None:
            ips = {split_hostport(s)[0] for s in subset}
            pool = [ep for ep in pool if ep.address in ips]
        if not pool:
            raise ServiceUnavailable("no ready endpoints in the pool", reason="rejected-no-endpoints")
        start = next(self._rr) % len(pool)
        n = min(self.fallbacks, len(pool))
        return [pool[(start + i) % len(pool)] for i in range(n)]

    def _decide(self, request: InferenceRequest, subset: Sequence[str] | None) -> RoutingDecision:
        if self.rewrite_to:
            request.target_model = self.rewrite_to
        if self.record:
            self.requests.append(request)
            self.subsets.append(subset)
        if self.raise_exc is not None:
            raise self.raise_exc
        if self.fail_with is not None:
            raise self.fail_with
        h = request.headers
        targets: list[Endpoint]
        if self.honour_test_headers and h:
            if "x-test-crash" in h:
                raise RuntimeError("test crash")
            err = h.get("x-test-error")
            if err:
                status, _, reason = err.partition(":")
                raise error_for(int(status), reason or None)
            route = h.get("x-test-route")
            targets = [_endpoint(hp.strip()) for hp in route.split(",")] if route else self._pick(subset)
        else:
            targets = self._pick(subset)
        body = None
        if request.payload is not None and request.target_model != request.model:
            payload = dict(request.payload)
            payload["model"] = request.target_model
            body = msgspec.json.encode(payload)
        decision = RoutingDecision(
            targets=targets,
            destination=",".join(ep.hostport for ep in targets),
            body=body,
            headers=dict(self.extra_headers),
            scores=self.scores,
        )
        self.inflight[request.request_id] = self.inflight.get(request.request_id, 0) + 1
        return decision

    async def handle_request(self, request: InferenceRequest, subset: Sequence[str] | None) -> RoutingDecision:
        delay = self.delay
        if self.honour_test_headers and "x-test-delay-ms" in request.headers:
            delay = int(request.headers["x-test-delay-ms"]) / 1000
        if delay:
            await asyncio.sleep(delay)
        return self._decide(request, subset)

    def handle_bodyless(self, request: InferenceRequest, subset: Sequence[str] | None) -> RoutingDecision:
        return self._decide(request, subset)

    def response_headers(
        self, request: InferenceRequest, response: ResponseInfo, headers: dict[str, str]
    ) -> dict[str, str] | None:
        if self.record:
            self.response_headers_calls.append((request, response, headers))
        return dict(self.response_header_extra) if self.response_header_extra else None

    def response_first_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None:
        if self.record:
            self.first_chunks.append(request)

    @property
    def reports_metadata(self) -> bool:
        return self.metadata is not None

    def response_metadata(self, request: InferenceRequest, response: ResponseInfo) -> dict[str, dict[str, Any]]:
        """`metadata(response)`: what a ResponseMetadataProcessor would report."""
        return self.metadata(response) if self.metadata is not None else {}

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, decision: RoutingDecision) -> None:
        if self.record:
            self.completions.append(Completion(request, response, decision))
        left = self.inflight.get(request.request_id, 0) - 1
        if left <= 0:
            self.inflight.pop(request.request_id, None)
        else:
            self.inflight[request.request_id] = left
        if left < 0:
            raise AssertionError(f"response_complete called twice for {request.request_id}")
