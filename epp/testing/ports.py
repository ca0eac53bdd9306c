"""Free TCP ports for test and benchmark processes that are told a port before they bind it.

`bind(port 0)` hands out a port from the kernel's ephemeral range, the same range outgoing connections draw
their local ports from; between choosing a port and Envoy (or a pod) binding it, any client socket on the
machine may take it ("Address already in use" in CI). So ports come from just below the ephemeral range, where
only explicit binds land, and one process never hands the same port out twice. Each process starts at an
offset derived from its pid so concurrent test and benchmark runs rarely probe the same ports.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from collections.abc import Iterator

_LOWEST = 10_000  # below this sit well-known services (Redis 6379, ...)


def _range() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768  # Linux default
    return range(_LOWEST, max(_LOWEST + 1_000, ephemeral_low))


def _candidates() -> Iterator[int]:
    ports = _range()
    start = (os.getpid() * 7919) % len(ports)
    return itertools.cycle([*ports[start:], *ports[:start]])


_lock = threading.Lock()
_next = _candidates()
_SCAN_LIMIT = 2_000


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _scan(hosts: list[str], span: int) -> int:
    """The first candidate p with p .. p + span - 1 free at every host; all of them are used up."""
    stop = _range().stop
    with _lock:
        for _ in range(_SCAN_LIMIT):
            port = next(_next)
            if port + span <= stop and all(_bindable(h, p) for p in range(port, port + span) for h in hosts):
                for _ in range(span - 1):
                    next(_next)  # p + 1 ...: the candidates run in order, so they are the next ones
                return port
    raise RuntimeError(f"no {span} consecutive free port(s) for {hosts} after {_SCAN_LIMIT} tries")


def free_shared_port(hosts: list[str]) -> int:
    """A port nothing listens on at any of `hosts` (pods share one port across their 127.0.0.x addresses)."""
    return _scan(hosts, 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host`, outside the ephemeral range and not handed out before by this process."""
    return _scan([host], 1)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p with p and p + 1 both free at `host` (and neither handed out before): a data-parallel
    pod's two ranks, whose sockets sit on consecutive ports."""
    return _scan([host], 2)


def free_port_run(host: str, count: int) -> int:
    """A port p with p .. p + count - 1 all free at `host` (and none handed out before): the ports of a
    data-parallel pod's `count` ranks, which sit on consecutive ports."""
    return _scan([host], count)
