"""Request-level errors. Each becomes an Envoy ImmediateResponse, never a broken stream."""

from __future__ import annotations

# Values of the `x-llm-d-request-dropped-reason` header (reference §1.4).
REASON_NO_ENDPOINTS = "rejected-no-endpoints"
REASON_SATURATED = "rejected-saturated"
REASON_TTL_EXPIRED = "rejected-ttl-expired"
REASON_CANCELLED = "rejected-context-cancelled"
REASON_SHUTTING_DOWN = "rejected-shutting-down"
REASON_EVICTED = "evicted"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"


class RequestError(Exception):
    """An error answered to the client with an HTTP status and a JSON body.

    `code` is the reference's error code name (BadRequest, ServiceUnavailable, ...),
    `reason` fills x-llm-d-request-dropped-reason when set.
    """

    status: int = 500
    code: str = "Internal"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        if status is not None:
            self.status = status


class BadRequest(RequestError):
    status = 400
    code = "BadRequest"


class PayloadTooLarge(RequestError):
    status = 413
    code = "PayloadTooLarge"


class NotFound(RequestError):
    status = 404
    code = "NotFound"


class PreconditionFailed(RequestError):
    status = 412
    code = "PreconditionFailed"


class ServiceUnavailable(RequestError):
    status = 503
    code = "ServiceUnavailable"


class ResourceExhausted(RequestError):
    status = 429
    code = "ResourceExhausted"


class NoEndpoints(ServiceUnavailable):
    def __init__(self, message: str = "no ready endpoints in the pool") -> None:
        super().__init__(message, reason=REASON_NO_ENDPOINTS)


class Saturated(ResourceExhausted):
    def __init__(self, message: str = "all endpoints were filtered out", *, emptied_by: str = "") -> None:
        super().__init__(message, reason=REASON_SATURATED)
        self.emptied_by = emptied_by  # the type of the filter that removed every endpoint, if one did


class Evicted(ResourceExhausted):
    """Flow control revoked a dispatched request to make room for a higher-priority one."""

    def __init__(self, message: str = "request evicted by flow control") -> None:
        super().__init__(message, reason=REASON_EVICTED)
