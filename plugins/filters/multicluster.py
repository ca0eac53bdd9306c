"""`multicluster-session-affinity-filter`: session-affinity-filter over clusters."""

from __future__ import annotations

from llmepp.datalayer.multicluster import SESSION_FILTER_TYPE
from llmepp.plugins.filters.session_affinity import SessionAffinityFilter


class MulticlusterSessionAffinityFilter(SessionAffinityFilter):
    """Pins a session to its cluster: session-affinity-filter unchanged, the endpoint being a cluster
    (reference: a pure delegation). Parameters: session-affinity-filter's.

    With the default `encoded_endpoint_header` strategy the hub answers `x-session-token` =
    base64(`namespace/cluster name`). A cluster EPP running session affinity with the same header would
    have its pod token overwritten by the hub's on the way out (the response passes the hub last), so
    the session keeps its cluster but not its pod; give one of the two levels its own header (e.g.
    `encodedEndpointHeaderConfig: {header: x-cluster-session-token}` here) to keep both.
    """

    type = SESSION_FILTER_TYPE
