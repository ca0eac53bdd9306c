"""`session-affinity-filter`: pin a session's requests to the endpoint that served it."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Filter
from llmepp.plugins.filters.session import SessionAffinity
from llmepp.request.types import InferenceRequest


class SessionAffinityFilter(SessionAffinity, Filter):
    """Hard session affinity: when the request's session endpoint is among the candidates it
    is the only endpoint kept; otherwise (no session, unknown or departed endpoint) every
    candidate passes so the rest of the profile chooses. Never returns an empty set.

    Why: stateful or cache-heavy sessions (multi-turn chat, agents) must land on the endpoint
    that holds their context; a filter makes that absolute, the scorer makes it a preference.

    Strategies and parameters (`strategy` encoded_endpoint_header | session_id, `profileName`,
    `encodedEndpointHeaderConfig.header` x-session-token, `sessionIdConfig.sources`
    [{header: x-session-id}], `evictionTtlSeconds` 300, `evictionSweepSeconds` 10, deprecated
    `headerName`): see `plugins/filters/session.py`. With encoded_endpoint_header the response
    carries the token of the endpoint chosen (ResponseHeaderProcessor).
    """

    type = "session-affinity-filter"

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        target = self.session_target(request, endpoints)
        return endpoints if target is None else [target]
