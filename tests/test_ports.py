"""The test harness's port allocator: never the ephemeral range, never a port in use, never the same port twice."""

import socket

import pytest

from llmepp.testing import ports


def test_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    handed = [ports.free_port() for _ in range(300)]
    assert len(set(handed)) == len(handed)
    assert all(10_000 <= p < ephemeral_low for p in handed)


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_next", iter([busy, *range(20_000, 20_100)]))  # the busy port comes first
        assert ports.free_port() != busy


def test_a_shared_port_is_free_on_every_host(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = ["127.0.0.61", "127.0.0.62"]
    with socket.socket() as taken:
        taken.bind((hosts[1], 0))  # free on the first host, taken on the second
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_next", iter([busy, *range(20_000, 20_100)]))
        port = ports.free_shared_port(hosts)
    assert port != busy
    for h in hosts:
        with socket.socket() as s:
            s.bind((h, port))


def test_a_port_pair_is_two_free_consecutive_ports_and_neither_is_handed_out_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = "127.0.0.63"
    busy = ports.free_port(host)  # within the allocator's range, so only its neighbour check can skip busy - 1
    with socket.socket() as taken:
        taken.bind((host, busy))
        taken.listen()
        # busy - 1 is free but its neighbour is not; then two free ones in a row.
        after = [p for p in range(21_000, 21_100) if p not in (busy - 1, busy)]
        monkeypatch.setattr(ports, "_next", iter([busy - 1, busy, *after]))
        first = ports.free_port_pair(host)
        assert first == after[0] and first + 1 == after[1] and ports.free_port(host) == after[2]
    for p in (first, first + 1):
        with socket.socket() as s:
            s.bind((host, p))
