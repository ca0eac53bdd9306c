"""`session-affinity-scorer`: prefer the endpoint that served the request's session."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Scorer, ScorerCategory
from llmepp.plugins.filters.session import SessionAffinity
from llmepp.request.types import InferenceRequest


class SessionAffinityScorer(SessionAffinity, Scorer):
    """Soft session affinity: score(e) = 1.0 for the session's endpoint, 0.0 for every other
    candidate (all 0.0 when there is no session or its endpoint is not a candidate).

    Why: keeps a session on the endpoint holding its context while letting load scorers
    with enough combined weight move it off an overloaded endpoint.

    Same strategies and parameters as `session-affinity-filter` (`strategy`
    encoded_endpoint_header | session_id, `profileName`, `encodedEndpointHeaderConfig.header`
    x-session-token, `sessionIdConfig` {sources [{header: x-session-id}], evictionTtlSeconds
    300, evictionSweepSeconds 10}, deprecated `headerName`); see `plugins/filters/session.py`.
    With encoded_endpoint_header every response carries the chosen endpoint's token
    (ResponseHeaderProcessor), which the client sends back on its next request.
    """

    type = "session-affinity-scorer"
    category = ScorerCategory.AFFINITY

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        target = self.session_target(request, endpoints)
        if target is None:
            return [0.0] * len(endpoints)
        return [1.0 if ep is target else 0.0 for ep in endpoints]
