"""`destination-endpoint-served` (and `-verifier`): which endpoint served a request, as a response header."""

from __future__ import annotations

from llmepp.framework.requestcontrol import ResponseHeaderProcessor
from llmepp.request.types import InferenceRequest, ResponseInfo

SERVED_HEADER = "x-conformance-test-served-endpoint"


class DestinationEndpointServed(ResponseHeaderProcessor):
    """Sets `x-conformance-test-served-endpoint: ip:port` on the response: the endpoint the request was
    routed to (Envoy dials exactly that one: the ORIGINAL_DST cluster follows the EPP's header). The
    conformance tests read it; so can a harness attributing cost or latency per pod. No parameters.
    """

    type = "destination-endpoint-served"

    def response_headers(
        self, request: InferenceRequest, response: ResponseInfo, headers: dict[str, str]
    ) -> dict[str, str] | None:
        result = request.scheduling
        targets = result.targets if result is not None else []
        return {SERVED_HEADER: targets[0].hostport} if targets else None


class DestinationEndpointServedVerifier(DestinationEndpointServed):
    """The conformance suite's name for the same header (the reference reads it from Envoy's LB metadata,
    which an ORIGINAL_DST cluster never writes; here the routed endpoint is known either way)."""

    type = "destination-endpoint-served-verifier"
