"""`always-disagg-pd-decider`: disaggregate every request."""

from __future__ import annotations

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Decider
from llmepp.request.types import InferenceRequest


class AlwaysDisaggPDDecider(Decider):
    """Approves every request: decision = true.

    Why: a deployment whose decode pods should never prefill (or tests and benchmarks that
    need a deterministic P/D path) routes every request through a prefill pod, whatever its
    length or cache state. Parameters: none.
    """

    type = "always-disagg-pd-decider"

    def disaggregate(self, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        return True
