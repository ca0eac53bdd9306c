"""Listening sockets. An empty host is every address of the machine: IPv6 and IPv4 on one dual-stack socket,
as Go's `:port` listens (the reference's servers), or IPv4 alone where the kernel has no IPv6. Binding
0.0.0.0 left an IPv6-only cluster's gateway refused while the gRPC health checks, bound dual-stack, passed."""

from __future__ import annotations

import errno
import socket

# A bind that fails with these means IPv6 is missing, not that the port is taken.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def any_address_socket(port: int) -> socket.socket:
    """A bound, non-blocking TCP socket on every address (`[::]` dual-stack, else `0.0.0.0`), ready to listen."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
        except OSError as e:
            sock.close()
            if e.errno not in _NO_IPV6:
                raise
            sock = None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
    sock.setblocking(False)
    return sock


def grpc_address(host: str, port: int) -> str:
    """A gRPC listening address; `[::]` for an empty host (gRPC binds it dual-stack and falls back to IPv4)."""
    return f"[{host or '::'}]:{port}" if ":" in host or not host else f"{host}:{port}"
