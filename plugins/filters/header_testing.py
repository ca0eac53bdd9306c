"""`header-based-testing-filter`: the endpoints a request names in a header (conformance tests, debugging)."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Filter
from llmepp.request.types import InferenceRequest

SELECTION_HEADER = "test-epp-endpoint-selection"


class HeaderBasedTestingFilter(Filter):
    """Keeps the endpoints listed in `test-epp-endpoint-selection` ("10.0.0.7,10.0.0.8"; an entry may
    carry a port, "10.0.0.7:8000", to pick one rank), in the header's order. Without the header every
    endpoint passes; a header naming no candidate leaves none (the request fails like any fully
    filtered one). For the Gateway API Inference Extension's conformance tests and for forcing a
    request onto one pod while debugging: do not list it in a profile clients can reach untrusted.
    """

    type = "header-based-testing-filter"

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        value = request.headers.get(SELECTION_HEADER)
        if not value:
            return endpoints
        kept: list[Endpoint] = []
        for entry in value.split(","):
            entry = entry.strip()
            for ep in endpoints:
                if (ep.address == entry or ep.hostport == entry) and ep not in kept:
                    kept.append(ep)
        return kept
