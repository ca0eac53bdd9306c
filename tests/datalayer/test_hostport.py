"""host:port for IPv4, IPv6 and names: join_hostport / split_hostport, and where endpoints use them
(EndpointSpec.hostport, the data-parallel destination, metrics URLs, ZeroMQ endpoints, the endpoints file)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmepp.datalayer.endpoint import Endpoint, EndpointSpec, join_hostport, split_hostport
from llmepp.datalayer.endpointsfile import EndpointsFileError, parse_endpoints
from llmepp.datalayer.httpscrape import ScrapeTarget
from llmepp.framework.scheduling import ProfileResult, SchedulingResult
from llmepp.kvevents.pool import tcp
from llmepp.kvevents.subscriber import ipv6_endpoint
from llmepp.plugins.producers.precise_prefix import _zmq_bindable

IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)  # canonical text: "::1", "fd00::1", "::ffff:10.0.0.1", ...
V4_MAPPED = IPV4.map(lambda a: str(ipaddress.IPv6Address(f"::ffff:{a}")))
NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}", fullmatch=True)
PORTS = st.integers(0, 65535)


@settings(max_examples=500, deadline=None)
@given(host=st.one_of(IPV4, IPV6, V4_MAPPED, NAMES), port=PORTS)
@example(host="::1", port=8000)
@example(host="fd00::1", port=8000)
@example(host="::ffff:10.0.0.1", port=1)
@example(host="::", port=0)
@example(host="10.0.0.1", port=65535)
@example(host="vllm-0.pool.svc", port=8000)
def test_split_undoes_join(host: str, port: int) -> None:
    joined = join_hostport(host, port)
    assert split_hostport(joined) == (host, str(port))
    if ":" in host:  # IPv6: bracketed, as Go's net.JoinHostPort and Envoy's ORIGINAL_DST want it
        assert joined == f"[{host}]:{port}"
    else:
        assert joined == f"{host}:{port}"


@pytest.mark.parametrize(
    ("value", "split"),
    [
        ("[fd00::1]:8000", ("fd00::1", "8000")),
        ("10.0.0.1:8000", ("10.0.0.1", "8000")),
        ("vllm-0:8000", ("vllm-0", "8000")),
        ("fd00::1:8000", ("fd00::1", "8000")),  # unbracketed (what was written before): last colon
        ("10.0.0.1", ("10.0.0.1", "")),  # no port
        ("[fd00::1]", ("fd00::1", "")),
        ("*:5557", ("*", "5557")),
        ("[::1]:", ("::1", "")),
        ("[::1", ("[::1", "")),  # malformed: a host that matches no address
        ("[::1]x", ("[::1]x", "")),
        ("", ("", "")),
    ],
)
def test_split_hostport_shapes(value: str, split: tuple[str, str]) -> None:
    assert split_hostport(value) == split


def test_endpoint_hostport_brackets_ipv6_once_computed() -> None:
    v6 = EndpointSpec(name="a", address="fd00::1", port=8000)
    v4 = EndpointSpec(name="b", address="10.0.0.1", port=8000)
    assert v6.hostport == "[fd00::1]:8000" and Endpoint(v6).hostport == "[fd00::1]:8000"
    assert v4.hostport == "10.0.0.1:8000"
    assert "hostport" not in repr(v6)
    # Derived, not part of identity; a replaced spec recomputes it.
    assert v6 == EndpointSpec(name="a", address="fd00::1", port=8000)
    assert dataclasses.replace(v6, port=9000).hostport == "[fd00::1]:9000"
    assert dataclasses.replace(v6, address="10.0.0.2").hostport == "10.0.0.2:8000"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v6.hostport = "x"  # type: ignore[misc]


def test_data_parallel_destination_brackets_ipv6() -> None:
    ep = Endpoint(EndpointSpec(name="a", address="fd00::1", port=8001, rank=1))
    result = SchedulingResult(profiles={"p": ProfileResult(targets=[ep])}, primary_profile="p")
    assert result.destinations() == ["[fd00::1]:8001"]
    result.destination_port = 8000
    assert result.destinations() == ["[fd00::1]:8000"]


def test_metrics_target_and_zmq_endpoints_for_ipv6() -> None:
    target = ScrapeTarget("fd00::1", 9000)
    assert target.url == "http://[fd00::1]:9000/metrics"
    assert b"\r\nHost: [fd00::1]:9000\r\n" in target.request
    assert tcp("fd00::1", 5557) == "tcp://[fd00::1]:5557"
    assert tcp("10.0.0.1", 5557) == "tcp://10.0.0.1:5557"
    # zmq.IPV6 is needed for an IPv6 host (and a wildcard bind listens on both families with it).
    assert ipv6_endpoint("tcp://[fd00::1]:5557") and ipv6_endpoint("tcp://*:5557")
    assert not ipv6_endpoint("tcp://10.0.0.1:5557") and not ipv6_endpoint("tcp://epp.ns.svc:5557")
    assert not ipv6_endpoint("ipc:///tmp/kv") and not ipv6_endpoint("")
    # kvEventsConfig.zmqEndpoint: an IPv6 bind address is bracketed.
    assert _zmq_bindable("tcp://[::]:5557") and _zmq_bindable("tcp://*:5557") and _zmq_bindable("tcp://[::1]:1")
    assert not _zmq_bindable("tcp://[::1]") and not _zmq_bindable("tcp://[]:5557") and not _zmq_bindable("tcp://[::1")


def test_endpoints_file_takes_ipv6_pod_addresses_in_canonical_form() -> None:
    specs = parse_endpoints(
        b"endpoints:\n"
        b"- {name: a, address: 'FD00:0:0::1', port: 8000}\n"
        b"- {name: b, address: '::1', port: 8001, rank: 1}\n"
        b"- {name: c, address: 10.0.0.1, port: 8000}\n"
    )
    assert [(s.address, s.hostport) for s in specs] == [
        ("fd00::1", "[fd00::1]:8000"),
        ("::1", "[::1]:8001"),
        ("10.0.0.1", "10.0.0.1:8000"),
    ]
    # Two spellings of one address:port are one endpoint.
    with pytest.raises(EndpointsFileError, match=r"endpoints\[1\]: address:port \[fd00::1\]:8000 already used"):
        parse_endpoints(
            b"endpoints: [{name: a, address: 'fd00::1', port: 8000}, {name: b, address: 'fd00:0::1', port: 8000}]"
        )


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("[fd00::1]", "must be an IPv4 or IPv6 address without brackets, got '[fd00::1]'"),
        ("fe80::1%eth0", "must be an IP address without a zone, got 'fe80::1%eth0'"),
        ("fd00::1:8000:1:2:3:4:5", "must be an IPv4 or IPv6 address, got 'fd00::1:8000:1:2:3:4:5'"),
    ],
)
def test_endpoints_file_refuses_other_ipv6_spellings(address: str, problem: str) -> None:
    with pytest.raises(EndpointsFileError) as err:
        parse_endpoints(f"endpoints:\n- {{name: a, address: '{address}', port: 8000}}\n".encode())
    assert err.value.problems == [f"endpoints[0].address: {problem}"]
