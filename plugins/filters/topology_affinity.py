"""`topology-affinity-filter`: keep the candidates co-located with the peer pick (P/D disaggregation).

Also the peer resolution `topology-affinity-scorer` shares: both read the `Topology` records a
`topology-extractor` attaches to endpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.plugins.datasources.topology import LEVELS, Topology, TopologyExtractor, decode_topology, shared_level
from llmepp.plugins.profile_handlers.disagg import PEER_ENDPOINT
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)


class TopologyParams(PluginParams):
    """What both topology affinity plugins take."""

    # The topology-extractor instance to read; empty: the only one configured.
    topology_producer_name: str = ""
    # Coordinator deployments (prefill and decode picked by separate EPPs): the request header that
    # carries the peer's topology, `host=..,rack=..,zone=..,region=..`. Unset: the peer endpoint only.
    peer_topology_header: str = ""


def resolve_extractor(plugin: Plugin, ctx: PluginContext, producer_name: str) -> TopologyExtractor | None:
    """The extractor `plugin` reads: the named one, else the only one (the one named
    `topology-extractor` among several). None, with a warning, when the config has none: the plugin
    then sees no topology at all (the reference treats the attribute as optional)."""
    if producer_name:
        return ctx.plugin(producer_name, TopologyExtractor, referrer=plugin, field="topologyProducerName")
    found = ctx.plugins_of(TopologyExtractor)
    if not found:
        log.warning(
            "plugin %r (type %s): no topology-extractor is configured, so no endpoint has a topology "
            "and the plugin has no effect; add one",
            plugin.name,
            plugin.type,
        )
        return None
    if len(found) == 1:
        return found[0]
    default = next((x for x in found if x.name == TopologyExtractor.type), None)
    if default is None:
        names = ", ".join(x.name for x in found)
        raise ConfigError(
            f"plugin {plugin.name!r} (type {plugin.type}): several topology extractors ({names}); "
            "name one with topologyProducerName"
        )
    return default


def peer_topology(request: InferenceRequest, extractor: TopologyExtractor | None, header: str) -> Topology | None:
    """The peer pick's topology: the `peer-endpoint` request data's (set by disagg-profile-handler
    before the second stage runs), else the `header`'s when one is configured; None when unknown."""
    peer = request.data.get(PEER_ENDPOINT)
    if extractor is not None and isinstance(peer, Endpoint):
        topology = extractor.read(peer)
        if topology is not None:
            return topology
    if header:
        value = request.headers.get(header)
        if value:
            decoded = decode_topology(value)
            return decoded if decoded.known else None
    return None


class TopologyAffinityFilter(Filter):
    """Keeps the candidates co-located with the peer pick at `minAffinity` or closer:

        keep(e) = level(peer, Topology(e)) ≤ minAffinity        host < rack < zone < region

    level = the tightest shared field (same host implies same rack, zone and region; an empty
    field never matches). peer = the endpoint the earlier stage picked (request data
    `peer-endpoint`: the decode pick when disagg-profile-handler runs the prefill profile), else,
    with `peerTopologyHeader`, the topology a coordinator forwards in that header.

    Fails open — every candidate is kept — when the peer's topology is unknown or no candidate
    qualifies: affinity is a preference and must never make a request unroutable. A candidate
    without a topology never qualifies.

    Why: the prefill pod hands its KV cache to the decode pod; on one host that is NVLink, across
    hosts a NIC and switches, hundreds of times slower (`minAffinity: rack` where a rack is the
    NVLink domain, e.g. NVL72).

    Parameters: `minAffinity` host|rack|zone|region (host), `topologyProducerName` (the
    topology-extractor to read; default: the only one), `peerTopologyHeader` (unset).
    """

    type = "topology-affinity-filter"

    class Params(TopologyParams):
        min_affinity: str = "host"

        def __post_init__(self) -> None:
            if self.min_affinity and self.min_affinity not in LEVELS:
                raise ValueError(f"minAffinity must be one of {', '.join(LEVELS)}, got {self.min_affinity!r}")

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        self.min_level = LEVELS[p.min_affinity or "host"]
        self.header = p.peer_topology_header.strip().lower()
        self.extractor: TopologyExtractor | None = None

    def setup(self, ctx: PluginContext) -> None:
        self.extractor = resolve_extractor(self, ctx, self.params.topology_producer_name)

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        extractor = self.extractor
        peer = peer_topology(request, extractor, self.header)
        if peer is None or extractor is None:
            return endpoints
        floor, read = self.min_level, extractor.read
        kept = [ep for ep in endpoints if (t := read(ep)) is not None and shared_level(peer, t) <= floor]
        return kept or endpoints
