"""topology-extractor, topology-affinity-filter and topology-affinity-scorer: the extractor's labels
and fallback (Kubernetes discovery's spec.hostname included), the co-location levels, fail-open,
the scorer's curve, parameter errors, and a reference-style P/D config through the loader."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest
from helpers import request

from llmepp.config.loader import Components, build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.framework.plugin import ConfigError, PluginContext
from llmepp.k8s.models import Pod
from llmepp.k8s.pool import PoolReconciler, PoolSpec
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.datasources.topology import Level, Topology, TopologyExtractor, decode_topology, shared_level
from llmepp.plugins.filters.topology_affinity import TopologyAffinityFilter
from llmepp.plugins.profile_handlers.disagg import PEER_ENDPOINT
from llmepp.plugins.scorers.topology_affinity import TopologyAffinityScorer
from llmepp.request.types import InferenceRequest

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
HOST, RACK = "kubernetes.io/hostname", "topology.kubernetes.io/rack"
ZONE, REGION = "topology.kubernetes.io/zone", "topology.kubernetes.io/region"
ROLE = "llm-d.ai/role"


def where(host: str = "", rack: str = "", zone: str = "", region: str = "", **extra: str) -> dict[str, str]:
    labels = {HOST: host, RACK: rack, ZONE: zone, REGION: region}
    return {k: v for k, v in labels.items() if v} | extra


def load(text: str, pods: list[tuple[str, dict[str, str]]]) -> tuple[Components, Datastore]:
    ds = Datastore()
    for i, (name, labels) in enumerate(pods):
        ds.upsert(EndpointSpec(name=name, address=f"10.2.0.{i + 1}", port=8000, labels=labels))
    return build(load_config(HEADER + text), datastore=ds, metrics=EppMetrics()), ds


def ep(ds: Datastore, name: str) -> Endpoint:
    found = ds.get(name)
    assert found is not None
    return found


def names(eps: Any) -> list[str]:
    return [e.name for e in eps]


def with_peer(peer: Endpoint | None, headers: dict[str, str] | None = None) -> InferenceRequest:
    req = request(b"x")
    req.headers.update(headers or {})
    if peer is not None:
        req.data[PEER_ENDPOINT] = peer
    return req


# -- the extractor --------------------------------------------------------------------------------
EXTRACTOR_ONLY = """
plugins:
- type: topology-extractor
- type: queue-scorer
"""


def test_the_extractor_reads_the_default_labels_and_falls_back_to_the_pod_hostname() -> None:
    c, ds = load(EXTRACTOR_ONLY, [("a", where("h1", "r1", "z1", "g1")), ("b", where(zone="z2")), ("c", {})])
    x = c.plugins["topology-extractor"]
    assert isinstance(x, TopologyExtractor)
    assert x.read(ep(ds, "a")) == Topology("h1", "r1", "z1", "g1")
    assert x.read(ep(ds, "b")) == Topology(zone="z2")
    assert x.read(ep(ds, "c")) is None  # nothing known: no record at all
    assert ep(ds, "a").attributes["Topology/topology-extractor"] == Topology("h1", "r1", "z1", "g1")
    # Only the host has a fallback: the pod's spec.hostname (Kubernetes discovery records it).
    ds.upsert(EndpointSpec(name="d", address="10.2.0.9", port=8000, labels=where(zone="z1"), hostname="pod-d"))
    assert x.read(ep(ds, "d")) == Topology("pod-d", "", "z1", "")
    # A label with an empty value counts as missing.
    ds.upsert(EndpointSpec(name="e", address="10.2.0.10", port=8000, labels={HOST: ""}, hostname="pod-e"))
    assert x.read(ep(ds, "e")) == Topology("pod-e")


def test_the_extractor_follows_label_changes_and_configured_label_names() -> None:
    config = """
plugins:
- type: topology-extractor
  name: topo
  parameters: {hostname: node, rack: nvl-domain, zone: "", region: geo}
- type: queue-scorer
"""
    c, ds = load(config, [("a", {"node": "n1", "nvl-domain": "nvl72-a", ZONE: "z1", "geo": "eu"})])
    x = c.plugins["topo"]
    assert isinstance(x, TopologyExtractor)
    assert x.read(ep(ds, "a")) == Topology("n1", "nvl72-a", "z1", "eu")  # zone "" = the default label
    assert x.key == "Topology/topo"
    # Labels edited in place (same address): the datastore keeps the endpoint, the record follows.
    ds.upsert(EndpointSpec(name="a", address="10.2.0.1", port=8000, labels={"node": "n2"}))
    assert x.read(ep(ds, "a")) == Topology("n2")
    ds.upsert(EndpointSpec(name="a", address="10.2.0.1", port=8000, labels={}))
    assert x.read(ep(ds, "a")) is None
    # A removed endpoint is forgotten; a new one (another address: a new Endpoint) is stamped.
    ds.delete("a")
    assert x._seen == {}
    ds.upsert(EndpointSpec(name="a", address="10.2.0.7", port=8000, labels={"node": "n3"}))
    assert x.read(ep(ds, "a")) == Topology("n3")


def test_kubernetes_discovery_records_the_pod_name_hostname_and_node_address() -> None:
    pod = msgspec.convert(
        {
            "metadata": {"name": "vllm-0", "namespace": "ns", "labels": {"app": "v", ZONE: "z1"}},
            "spec": {"hostname": "vllm-0-host", "nodeName": "node-7"},
            "status": {"podIP": "10.3.0.5", "hostIP": "192.168.1.7",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        },
        Pod,
    )  # fmt: skip
    ds = Datastore()
    x = TopologyExtractor("topology-extractor", TopologyExtractor.Params())
    x.setup(PluginContext({x.name: x}, ds, None, None))
    r = PoolReconciler(ds, "ns")
    r.set_pool(PoolSpec((8000, 8001), {"app": "v"}))
    r.pod_changed(pod)
    spec = ep_ns(ds, "vllm-0-rank-1").spec
    assert (spec.pod_name, spec.pod, spec.hostname, spec.node_address) == ("vllm-0", "vllm-0", "vllm-0-host",
                                                                            "192.168.1.7")  # fmt: skip
    assert x.read(ep_ns(ds, "vllm-0-rank-0")) == Topology(hostname="vllm-0-host", zone="z1")
    # File discovery records none of them: the pod is the endpoint's own name.
    assert EndpointSpec(name="f", address="10.0.0.1", port=1).pod == "f"


def ep_ns(ds: Datastore, name: str) -> Endpoint:
    found = ds.get(name, "ns")
    assert found is not None
    return found


# -- co-location levels ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        (Topology("h1", "r1", "z1", "g1"), Topology("h1", "r9", "z9", "g9"), Level.HOST),  # host decides alone
        (Topology("h1", "r1", "z1", "g1"), Topology("h2", "r1", "z1", "g1"), Level.RACK),
        (Topology("h1", "r1", "z1", "g1"), Topology("h2", "r2", "z1", "g1"), Level.ZONE),
        (Topology("h1", "r1", "z1", "g1"), Topology("h2", "r2", "z2", "g1"), Level.REGION),
        (Topology("h1", "r1", "z1", "g1"), Topology("h2", "r2", "z2", "g2"), Level.NONE),
        (Topology(zone="z1"), Topology(zone="z1"), Level.ZONE),  # empty fields never match each other
        (Topology(region="g"), Topology(hostname="h", region="g"), Level.REGION),
        (Topology(), Topology(), Level.NONE),
    ],
)
def test_shared_level_is_the_tightest_non_empty_match(a: Topology, b: Topology, level: Level) -> None:
    assert shared_level(a, b) == level
    assert shared_level(b, a) == level


def test_the_coordinator_header_decodes_loosely() -> None:
    assert decode_topology("host=h,rack=r,zone=z,region=g") == Topology("h", "r", "z", "g")
    assert decode_topology("region=g,future=x,junk,zone=z") == Topology(zone="z", region="g")
    assert not decode_topology("garbage").known


# -- filter and scorer ----------------------------------------------------------------------------
# One decode pod and prefill candidates at every distance from it.
PODS = [
    ("d0", where("h1", "r1", "z1", "g1")),
    ("same-host", where("h1", "r1", "z1", "g1")),
    ("same-rack", where("h2", "r1", "z1", "g1")),
    ("same-zone", where("h3", "r2", "z1", "g1")),
    ("same-region", where("h4", "r3", "z2", "g1")),
    ("far", where("h5", "r4", "z3", "g2")),
    ("unknown", {}),
]
AFFINITY = """
plugins:
- type: topology-extractor
- type: topology-affinity-filter
  parameters: {minAffinity: MIN}
- type: topology-affinity-scorer
- type: queue-scorer
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: topology-affinity-filter}, {pluginRef: topology-affinity-scorer}]
"""


def affinity(min_affinity: str = "host") -> tuple[TopologyAffinityFilter, TopologyAffinityScorer, Datastore]:
    c, ds = load(AFFINITY.replace("MIN", min_affinity), PODS)
    f, s = c.plugins["topology-affinity-filter"], c.plugins["topology-affinity-scorer"]
    assert isinstance(f, TopologyAffinityFilter) and isinstance(s, TopologyAffinityScorer)
    return f, s, ds


@pytest.mark.parametrize(
    ("min_affinity", "kept"),
    [
        ("host", ["d0", "same-host"]),
        ("rack", ["d0", "same-host", "same-rack"]),
        ("zone", ["d0", "same-host", "same-rack", "same-zone"]),
        ("region", ["d0", "same-host", "same-rack", "same-zone", "same-region"]),
    ],
)
def test_the_filter_keeps_candidates_within_min_affinity(min_affinity: str, kept: list[str]) -> None:
    f, _, ds = affinity(min_affinity)
    assert names(f.filter(with_peer(ep(ds, "d0")), ds.endpoints)) == kept


def test_the_filter_fails_open() -> None:
    f, _, ds = affinity("host")
    everyone = names(ds.endpoints)
    # No peer (the decode profile itself, or no P/D at all).
    assert names(f.filter(with_peer(None), ds.endpoints)) == everyone
    # A peer whose topology is unknown.
    assert names(f.filter(with_peer(ep(ds, "unknown")), ds.endpoints)) == everyone
    # Nothing co-located at the floor: everything rather than nothing.
    candidates = [ep(ds, n) for n in ("same-rack", "far", "unknown")]
    assert names(f.filter(with_peer(ep(ds, "d0")), candidates)) == ["same-rack", "far", "unknown"]


def test_the_scorer_curve_is_fixed() -> None:
    _, s, ds = affinity()
    scores = s.score(with_peer(ep(ds, "d0")), ds.endpoints)
    assert dict(zip(names(ds.endpoints), scores, strict=True)) == {
        "d0": 1.0, "same-host": 1.0, "same-rack": 0.20, "same-zone": 0.05, "same-region": 0.02,
        "far": 0.0, "unknown": 0.0,
    }  # fmt: skip
    assert s.score(with_peer(None), ds.endpoints) == [0.0] * len(PODS)
    assert s.score(with_peer(ep(ds, "unknown")), ds.endpoints) == [0.0] * len(PODS)


def test_the_peer_topology_header_serves_coordinator_deployments() -> None:
    config = """
plugins:
- type: topology-extractor
- type: topology-affinity-filter
  parameters: {minAffinity: rack, peerTopologyHeader: X-Peer-Topology}
- type: topology-affinity-scorer
  parameters: {peerTopologyHeader: x-peer-topology}
"""
    c, ds = load(config, PODS)
    f, s = c.plugins["topology-affinity-filter"], c.plugins["topology-affinity-scorer"]
    assert isinstance(f, TopologyAffinityFilter) and isinstance(s, TopologyAffinityScorer)
    req = with_peer(None, {"x-peer-topology": "rack=r1,zone=z1"})
    assert names(f.filter(req, ds.endpoints)) == ["d0", "same-host", "same-rack"]
    assert s.score(req, [ep(ds, "same-rack"), ep(ds, "same-zone")]) == [0.20, 0.05]
    # The peer endpoint wins over the header when both are there.
    req = with_peer(ep(ds, "far"), {"x-peer-topology": "rack=r1"})
    assert names(f.filter(req, ds.endpoints)) == ["far"]


async def test_a_pd_config_places_the_prefill_next_to_the_decode_pick() -> None:
    """Reference single-EPP P/D: decode first, then the prefill profile with the topology plugins."""
    config = """
plugins:
- type: topology-extractor
- type: decode-filter
- type: prefill-filter
- type: topology-affinity-filter
  name: prefill-topology-affinity
  parameters: {minAffinity: rack}
- type: topology-affinity-scorer
  name: prefill-topology-score
- type: queue-scorer
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]
- name: prefill
  plugins:
  - {pluginRef: prefill-filter}
  - {pluginRef: prefill-topology-affinity}
  - {pluginRef: prefill-topology-score, weight: 10}
  - {pluginRef: queue-scorer}
"""
    pods = [
        ("d0", where("h1", "r1", "z1", "g1", **{ROLE: "decode"})),
        ("p-rack", where("h2", "r1", "z1", "g1", **{ROLE: "prefill"})),
        ("p-host", where("h1", "r1", "z1", "g1", **{ROLE: "prefill"})),
        ("p-far", where("h9", "r9", "z9", "g9", **{ROLE: "prefill"})),
    ]
    c, ds = load(config, pods)
    d = Director(ds, c.pipeline, EppMetrics())
    for _ in range(10):
        decision = await d.handle_request(request(b"x"), None)
        assert isinstance(decision, RoutingDecision)
        assert decision.targets[0].name == "d0"
        assert decision.headers["x-prefiller-host-port"] == ep(ds, "p-host").hostport
    # The co-located prefill pod is gone: the filter still keeps the same-rack one, never p-far.
    ds.delete("p-host")
    for _ in range(10):
        decision = await d.handle_request(request(b"x"), None)
        assert isinstance(decision, RoutingDecision)
        assert decision.headers["x-prefiller-host-port"] == ep(ds, "p-rack").hostport


def test_without_an_extractor_the_plugins_warn_and_do_nothing(caplog: pytest.LogCaptureFixture) -> None:
    config = """
plugins:
- type: topology-affinity-filter
- type: topology-affinity-scorer
"""
    with caplog.at_level(logging.WARNING):
        c, ds = load(config, PODS)
    assert "no topology-extractor is configured" in caplog.text
    f, s = c.plugins["topology-affinity-filter"], c.plugins["topology-affinity-scorer"]
    assert isinstance(f, TopologyAffinityFilter) and isinstance(s, TopologyAffinityScorer)
    req = with_peer(ep(ds, "d0"))
    assert names(f.filter(req, ds.endpoints)) == names(ds.endpoints)
    assert s.score(req, ds.endpoints) == [0.0] * len(PODS)


def test_two_extractors_are_told_apart_by_topology_producer_name() -> None:
    config = """
plugins:
- type: topology-extractor
  name: by-node
- type: topology-extractor
  name: by-domain
  parameters: {hostname: nvl-domain}
- type: topology-affinity-filter
  parameters: {topologyProducerName: by-domain}
"""
    c, ds = load(config, [("d0", {"nvl-domain": "a", HOST: "h1"}), ("p1", {"nvl-domain": "a", HOST: "h2"})])
    f = c.plugins["topology-affinity-filter"]
    assert isinstance(f, TopologyAffinityFilter)
    assert names(f.filter(with_peer(ep(ds, "d0")), [ep(ds, "p1")])) == ["p1"]  # same NVLink domain


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        ("- {type: topology-affinity-filter, parameters: {minAffinity: node}}",
         "minAffinity must be one of host, rack, zone, region, got 'node'"),
        ("- {type: topology-affinity-filter, parameters: {minAffinity: 1}}", "`parameters.minAffinity`"),
        ("- {type: topology-affinity-filter, parameters: {min_affinity: host}}", "unknown field `min_affinity`"),
        ("- {type: topology-affinity-scorer, parameters: {minAffinity: host}}", "unknown field `minAffinity`"),
        ("- {type: topology-extractor, parameters: {zone: 5}}", "`parameters.zone`"),
        ("- {type: topology-extractor, parameters: {node: x}}", "unknown field `node`"),
        ("- {type: topology-affinity-filter, parameters: {topologyProducerName: nope}}",
         "topologyProducerName: no plugin named 'nope'"),
        ("- {type: queue-scorer}\n- {type: topology-affinity-scorer, parameters: {topologyProducerName: queue-scorer}}",
         "plugin 'queue-scorer' (type queue-scorer) is not a TopologyExtractor"),
        ("- {type: topology-extractor, name: a}\n- {type: topology-extractor, name: b}\n"
         "- {type: topology-affinity-scorer}",
         "several topology extractors (a, b); name one with topologyProducerName"),
    ],
)  # fmt: skip
def test_bad_parameters_are_start_up_errors_naming_the_field(plugins: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load("plugins:\n" + plugins + "\n", [])
    assert message in str(e.value)
