"""`topology-extractor`: where each endpoint runs — host, rack, zone, region — from its labels.

    Topology(e) = {hostname: labels(e)[hostname] or e's pod spec.hostname,
                   rack:     labels(e)[rack],
                   zone:     labels(e)[zone],
                   region:   labels(e)[region]}

Parameters, each the label to read (empty = the default): `hostname` (`kubernetes.io/hostname`),
`rack` (`topology.kubernetes.io/rack`), `zone` (`topology.kubernetes.io/zone`), `region`
(`topology.kubernetes.io/region`). Only the host has a fallback: the pod's `spec.hostname`, which
Kubernetes discovery records (file discovery has none; give such endpoints the label). An endpoint
with none of the four has no topology, which `topology-affinity-filter` / `-scorer` treat as unknown.

Why labels: the reference reads the pod's own labels, so the operator decides what "host" and
"rack" mean (e.g. a rack label that names an NVL72 NVLink domain). Node labels reach a pod only
when something copies them there (e.g. a mutating webhook); `spec.hostname` is the pod's own
hostname, set by its author (a StatefulSet sets it), not its node's name.

The record is attached to the endpoint (`endpoint.attributes`, key `Topology/<plugin name>`) when
discovery adds it and again whenever its labels change, so scheduling only reads it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.framework.datalayer import AttributeExtractor
from llmepp.framework.plugin import PluginContext, PluginParams

TOPOLOGY = "Topology"
DEFAULT_HOSTNAME_LABEL = "kubernetes.io/hostname"
DEFAULT_RACK_LABEL = "topology.kubernetes.io/rack"
DEFAULT_ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_REGION_LABEL = "topology.kubernetes.io/region"


@dataclass(frozen=True, slots=True)
class Topology:
    """An endpoint's locality; an empty field is unknown."""

    hostname: str = ""
    rack: str = ""
    zone: str = ""
    region: str = ""

    @property
    def known(self) -> bool:
        return bool(self.hostname or self.rack or self.zone or self.region)


class Level(enum.IntEnum):
    """How closely two endpoints are co-located, tightest first (a lower value is closer)."""

    HOST = 0
    RACK = 1
    ZONE = 2
    REGION = 3
    NONE = 4


# `minAffinity` values (the reference's spelling).
LEVELS = {"host": Level.HOST, "rack": Level.RACK, "zone": Level.ZONE, "region": Level.REGION}


def shared_level(a: Topology, b: Topology) -> Level:
    """The tightest level at which `a` and `b` are co-located. The same host implies the same rack,
    zone and region, so the first match decides; an empty field never matches, not even another
    empty one (two endpoints without a rack label are not known to share a rack)."""
    if a.hostname and a.hostname == b.hostname:
        return Level.HOST
    if a.rack and a.rack == b.rack:
        return Level.RACK
    if a.zone and a.zone == b.zone:
        return Level.ZONE
    if a.region and a.region == b.region:
        return Level.REGION
    return Level.NONE


def decode_topology(value: str) -> Topology:
    """The coordinator's peer-topology header, `host=h,rack=r,zone=z,region=g` (any order, any
    subset): unknown keys and pairs without `=` are ignored, as in the reference."""
    fields = {"host": "", "rack": "", "zone": "", "region": ""}
    for pair in value.split(","):
        key, sep, val = pair.partition("=")
        if sep and key in fields:
            fields[key] = val
    return Topology(fields["host"], fields["rack"], fields["zone"], fields["region"])


class TopologyExtractor(AttributeExtractor):
    """Attaches each endpoint's `Topology` (see the module docstring for the labels it reads)."""

    type = "topology-extractor"

    class Params(PluginParams):
        hostname: str = ""
        rack: str = ""
        zone: str = ""
        region: str = ""

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        # An empty or blank value means the default label (the reference's reading).
        self.hostname_label = p.hostname.strip() or DEFAULT_HOSTNAME_LABEL
        self.rack_label = p.rack.strip() or DEFAULT_RACK_LABEL
        self.zone_label = p.zone.strip() or DEFAULT_ZONE_LABEL
        self.region_label = p.region.strip() or DEFAULT_REGION_LABEL
        self.key = self.attribute_key(TOPOLOGY)
        self._datastore: Datastore | None = None
        # The spec each endpoint's record was computed from: a spec replaced in place (labels
        # changed) is recomputed, an unchanged one is not.
        self._seen: dict[Endpoint, EndpointSpec] = {}

    def setup(self, ctx: PluginContext) -> None:
        if isinstance(ctx.datastore, Datastore) and self._datastore is None:
            self._datastore = ctx.datastore
            # on_change fires on every membership or spec change (after the datastore rebuilt its
            # endpoint list), so one pass covers additions, label edits and removals.
            ctx.datastore.on_change(self.refresh)
            self.refresh()

    def topology_of(self, spec: EndpointSpec) -> Topology:
        labels = spec.labels
        return Topology(
            hostname=labels.get(self.hostname_label) or spec.hostname,
            rack=labels.get(self.rack_label, ""),
            zone=labels.get(self.zone_label, ""),
            region=labels.get(self.region_label, ""),
        )

    def refresh(self) -> None:
        """Stamp every endpoint whose spec is new since the last pass; forget removed ones."""
        assert self._datastore is not None
        seen: dict[Endpoint, EndpointSpec] = {}
        previous = self._seen
        for ep in self._datastore.endpoints:
            spec = ep.spec
            if previous.get(ep) is not spec:
                topology = self.topology_of(spec)
                if topology.known:
                    ep.attributes[self.key] = topology
                else:
                    ep.attributes.pop(self.key, None)
            seen[ep] = spec
        self._seen = seen

    def read(self, endpoint: Endpoint) -> Topology | None:
        """The endpoint's attached topology, None when unknown."""
        value = endpoint.attributes.get(self.key)
        return value if isinstance(value, Topology) else None
