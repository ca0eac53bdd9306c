"""`data-parallel-profile-handler`: the reference's data-parallel config through the config loader and
the Director; the picked rank is reached through its pod's primary port and named in a header."""

from __future__ import annotations

import pytest
from helpers import request

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.errors import ResourceExhausted
from llmepp.framework.plugin import ConfigError, registry
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.filters.header_testing import SELECTION_HEADER
from llmepp.plugins.profile_handlers.data_parallel import DATA_PARALLEL_HEADER, DataParallelProfileHandler
from llmepp.request.types import InferenceRequest

# The reference's e2e config for vLLM data parallelism (test/e2e), plus the testing filter to force a rank.
DATA_PARALLEL = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: decode-filter
- type: max-score-picker
- type: data-parallel-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
"""

# Two pods, two ranks each: rank r of pod p listens on 8000 + r (one endpoint per pod x target port).
RANKS = [("pod-a", "10.2.0.1"), ("pod-b", "10.2.0.2")]


def director(config: str = DATA_PARALLEL) -> tuple[Director, Datastore]:
    ds = Datastore()
    for name, ip in RANKS:
        for rank in (0, 1):
            ds.upsert(EndpointSpec(name=f"{name}-rank-{rank}", address=ip, port=8000 + rank, rank=rank))
    metrics = EppMetrics()
    return Director(ds, build(load_config(config), datastore=ds, metrics=metrics).pipeline, metrics), ds


def forced(hostport: str) -> InferenceRequest:
    req = request(b"x")
    req.headers[SELECTION_HEADER] = hostport
    return req


async def test_reference_config_routes_to_the_primary_port_and_names_the_rank() -> None:
    d, ds = director()
    assert isinstance(d.pipeline.scheduler.handler, DataParallelProfileHandler)
    decision = await d.handle_request(forced("10.2.0.2:8001"), None)
    assert isinstance(decision, RoutingDecision)
    assert decision.destination == "10.2.0.2:8000"  # x-gateway-destination-endpoint and envoy.lb metadata
    assert decision.headers[DATA_PARALLEL_HEADER] == "10.2.0.2:8001"
    # The rank stays the target: its in-flight load (and its prefix cache) is what the request adds to.
    rank1 = ds.by_hostport["10.2.0.2:8001"]
    assert decision.targets == [rank1] and rank1.inflight.requests == 1
    assert ds.by_hostport["10.2.0.2:8000"].inflight.requests == 0
    assert decision.result is not None and decision.result.destinations() == ["10.2.0.2:8000"]


async def test_ipv6_pods_get_bracketed_destination_and_rank_header() -> None:
    """An IPv6 pod: Envoy's ORIGINAL_DST and the sidecar parse `[ip]:port` (net.JoinHostPort)."""
    ds = Datastore()
    for rank in (0, 1):
        ds.upsert(EndpointSpec(name=f"pod-v6-rank-{rank}", address="fd00::2", port=8000 + rank, rank=rank))
    metrics = EppMetrics()
    d = Director(ds, build(load_config(DATA_PARALLEL), datastore=ds, metrics=metrics).pipeline, metrics)
    decision = await d.handle_request(forced("[fd00::2]:8001"), None)
    assert isinstance(decision, RoutingDecision)
    assert decision.destination == "[fd00::2]:8000"
    assert decision.headers[DATA_PARALLEL_HEADER] == "[fd00::2]:8001"
    assert decision.targets == [ds.by_hostport["[fd00::2]:8001"]]


async def test_rank_zero_is_named_too_and_every_pick_gets_the_header() -> None:
    d, _ = director()
    decision = await d.handle_request(forced("10.2.0.1:8000"), None)
    assert isinstance(decision, RoutingDecision)
    assert decision.destination == "10.2.0.1:8000"
    assert decision.headers[DATA_PARALLEL_HEADER] == "10.2.0.1:8000"
    unforced = await d.handle_request(request(b"x"), None)
    assert isinstance(unforced, RoutingDecision)
    target = unforced.targets[0]
    assert unforced.destination == f"{target.address}:8000"
    assert unforced.headers[DATA_PARALLEL_HEADER] == target.hostport


async def test_primary_port_parameter_and_a_client_sent_header_is_overwritten() -> None:
    handler = "- type: data-parallel-profile-handler"
    config = DATA_PARALLEL.replace(handler, handler + "\n  parameters: {primaryPort: 9000}")
    d, _ = director(config)
    req = forced("10.2.0.1:8001")
    req.headers[DATA_PARALLEL_HEADER] = "203.0.113.9:1"
    decision = await d.handle_request(req, None)
    assert isinstance(decision, RoutingDecision)
    assert decision.destination == "10.2.0.1:9000"
    assert decision.headers[DATA_PARALLEL_HEADER] == "10.2.0.1:8001"


async def test_a_fallback_list_goes_to_each_pick_s_primary_port() -> None:
    picker = "- type: max-score-picker"
    config = DATA_PARALLEL.replace(picker, picker + "\n  parameters: {maxNumOfEndpoints: 2}")
    d, _ = director(config)
    decision = await d.handle_request(forced("10.2.0.2:8001,10.2.0.1:8001"), None)
    assert isinstance(decision, RoutingDecision)
    first, second = decision.targets
    assert decision.destination == f"{first.address}:8000,{second.address}:8000"
    assert {first.hostport, second.hostport} == {"10.2.0.2:8001", "10.2.0.1:8001"}
    assert decision.headers[DATA_PARALLEL_HEADER] == first.hostport  # the first pick's rank, as the reference


async def test_two_ranks_of_one_pod_give_its_primary_port_once() -> None:
    """Both picks are ranks of pod-b: one destination, not `10.2.0.2:8000,10.2.0.2:8000` (Envoy would retry
    the endpoint that just failed); the targets stay both ranks."""
    picker = "- type: max-score-picker"
    config = DATA_PARALLEL.replace(picker, picker + "\n  parameters: {maxNumOfEndpoints: 2}")
    d, _ = director(config)
    decision = await d.handle_request(forced("10.2.0.2"), None)
    assert isinstance(decision, RoutingDecision)
    assert {ep.hostport for ep in decision.targets} == {"10.2.0.2:8000", "10.2.0.2:8001"}
    assert decision.destination == "10.2.0.2:8000"
    assert decision.headers[DATA_PARALLEL_HEADER] == decision.targets[0].hostport


def test_destinations_at_the_primary_port_are_deduplicated_in_order() -> None:
    eps = {(ip, rank): Endpoint(EndpointSpec(name=f"{ip}-{rank}", address=ip, port=8000 + rank, rank=rank))
           for ip in ("10.2.0.1", "10.2.0.2", "10.2.0.3") for rank in (0, 1)}  # fmt: skip
    picks = [eps["10.2.0.2", 1], eps["10.2.0.1", 0], eps["10.2.0.2", 0], eps["10.2.0.3", 1], eps["10.2.0.1", 1]]
    result = SchedulingResult(profiles={"p": ProfileResult(targets=picks)}, primary_profile="p", destination_port=8000)
    assert result.destinations() == ["10.2.0.2:8000", "10.2.0.1:8000", "10.2.0.3:8000"]
    assert result.targets == picks  # accounting stays with every picked rank


async def test_no_endpoint_is_429_without_a_header() -> None:
    d, _ = director()
    req = forced("10.9.9.9")
    with pytest.raises(ResourceExhausted):
        await d.handle_request(req, None)
    assert DATA_PARALLEL_HEADER not in req.upstream_headers


def test_other_profile_handlers_keep_their_targets_own_ports() -> None:
    d, _ = director(DATA_PARALLEL.replace("data-parallel-profile-handler", "single-profile-handler"))
    result = d.pipeline.scheduler.schedule(forced("10.2.0.2:8001"), d.datastore.endpoints)
    assert result.destination_port == 0 and result.destinations() == ["10.2.0.2:8001"]


TWO_PROFILES = DATA_PARALLEL + "- name: other\n  plugins: [{pluginRef: decode-filter}]\n"


def test_more_than_one_profile_is_a_start_up_error() -> None:
    with pytest.raises(ConfigError, match=r"data-parallel-profile-handler.*exactly one scheduling profile, found 2"):
        build(load_config(TWO_PROFILES))


def test_no_profile_is_refused_too() -> None:
    handler = registry.build("data-parallel-profile-handler", "dp", None)
    assert isinstance(handler, DataParallelProfileHandler)
    with pytest.raises(ConfigError, match="exactly one scheduling profile, found 0"):
        handler.validate_profiles({})


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"primaryPort": 0}, r"primaryPort must be 1-65535, got 0"),
        ({"primaryPort": 65536}, r"primaryPort must be 1-65535, got 65536"),
        ({"primaryPort": "8000"}, r"Expected `int`, got `str` - at `parameters.primaryPort`"),
        ({"primaryPorts": 8000}, r"unknown field `primaryPorts`"),
    ],
)
def test_bad_parameters_are_start_up_errors_naming_the_field(params: dict[str, object], expected: str) -> None:
    label = r"plugin 'dp' \(type data-parallel-profile-handler\): parameters: .*"
    with pytest.raises(ConfigError, match=label + expected):
        registry.build("data-parallel-profile-handler", "dp", params)


def test_default_primary_port_is_8000() -> None:
    handler = registry.build("data-parallel-profile-handler", "dp", None)
    assert isinstance(handler, DataParallelProfileHandler) and handler.primary_port == 8000
