"""`topology-affinity-scorer`: prefer the candidates closest to the peer pick (P/D disaggregation)."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import PluginContext
from llmepp.framework.scheduling import Scorer, ScorerCategory
from llmepp.plugins.datasources.topology import Level, TopologyExtractor, shared_level
from llmepp.plugins.filters.topology_affinity import TopologyParams, peer_topology, resolve_extractor
from llmepp.request.types import InferenceRequest

# Indexed by Level. Shaped by KV-transfer bandwidth, not evenly spaced (the reference's curve,
# hard-coded there too): same host is NVLink, same rack one NIC and switch, each looser level more
# hops. Host beats rack 5:1 and zone 20:1, so co-location wins outright while the looser levels
# still break ties among candidates that are not co-located.
LEVEL_SCORES: tuple[float, ...] = (1.0, 0.20, 0.05, 0.02, 0.0)
assert len(LEVEL_SCORES) == len(Level)


class TopologyAffinityScorer(Scorer):
    """score(e) = by the tightest level e shares with the peer pick:

        host 1.0   rack 0.20   zone 0.05   region 0.02   none 0

    peer as in `topology-affinity-filter` (request data `peer-endpoint`: the decode pick when the
    prefill profile runs; or `peerTopologyHeader`). Every candidate scores 0 when the peer's
    topology is unknown; a candidate without a topology scores 0; an empty field never matches.

    Why: the soft form of the filter — keeps the prefill next to the decode pod when one there is
    not much busier, and lets load scorers decide otherwise.

    Parameters: `topologyProducerName` (the topology-extractor to read; default: the only one),
    `peerTopologyHeader` (unset). The curve is fixed.
    """

    type = "topology-affinity-scorer"
    category = ScorerCategory.AFFINITY
    Params = TopologyParams

    def __init__(self, name: str = "", params: TopologyParams | None = None) -> None:
        p = params if params is not None else TopologyParams()
        super().__init__(name, p)
        self.header = p.peer_topology_header.strip().lower()
        self.extractor: TopologyExtractor | None = None

    def setup(self, ctx: PluginContext) -> None:
        self.extractor = resolve_extractor(self, ctx, self.params.topology_producer_name)

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        extractor = self.extractor
        peer = peer_topology(request, extractor, self.header)
        if peer is None or extractor is None:
            return [0.0] * len(endpoints)
        read = extractor.read
        return [0.0 if (t := read(ep)) is None else LEVEL_SCORES[shared_level(peer, t)] for ep in endpoints]
