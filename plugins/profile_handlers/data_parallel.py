"""`data-parallel-profile-handler` (deprecated in the reference): one profile; the picked rank is
reached through its pod's primary port."""

from __future__ import annotations

from llmepp.framework.plugin import PluginParams
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.plugins.profile_handlers.single import SingleProfileHandler
from llmepp.request import parsers
from llmepp.request.types import InferenceRequest

# Header the pod's rank-0 server (the reference's sidecar with --data-parallel-size) reads to
# forward the request to the picked rank (reference pkg/common/routing/common.go).
DATA_PARALLEL_HEADER = parsers.H_DATA_PARALLEL


class DataParallelProfileHandler(SingleProfileHandler):
    """Runs the only profile, like `single-profile-handler`, then sends the request to the picked
    endpoint's pod on `primaryPort` and names the picked rank in a header.

    Why: a data-parallel pod serves one rank per port (one endpoint per pod × target port), but
    gateways before Istio 1.28.1 route only to an InferencePool's first target port; the pod's
    server there forwards each request to the rank the EPP chose. With a gateway that routes to
    every target port, `single-profile-handler` does the same without the extra hop.

    Behaviour, for the picked endpoints e₁ … eₙ (n = the picker's maxNumOfEndpoints):
      x-gateway-destination-endpoint (and envoy.lb metadata) = ip(e₁):primaryPort, …, ip(eₙ):primaryPort,
        each pod once, in pick order (two ranks of one pod share its primary port)
      x-data-parallel-host-port = ip(e₁):port(e₁)   (a client-sent value is overwritten)
    Load, in-flight and prefix-cache accounting stay with the picked rank endpoints. Exactly one
    scheduling profile must be configured (a start-up error otherwise).

    Parameters: `primaryPort` (8000, 1-65535).
    """

    type = "data-parallel-profile-handler"

    class Params(PluginParams):
        primary_port: int = 8000

        def __post_init__(self) -> None:
            if not 1 <= self.primary_port <= 65535:
                raise ValueError(f"primaryPort must be 1-65535, got {self.primary_port}")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.primary_port = params.primary_port

    def process_results(self, request: InferenceRequest, results: dict[str, ProfileResult | None]) -> SchedulingResult:
        result = super().process_results(request, results)
        targets = result.targets
        if targets:  # none: the scheduler answers 429 and nothing goes upstream
            request.upstream_headers[DATA_PARALLEL_HEADER] = targets[0].hostport
            result.destination_port = self.primary_port
        return result
