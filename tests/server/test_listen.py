"""The EPP's default listening address is every address, IPv6 and IPv4, as the reference's `:port`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from helpers import file_config

from llmepp.app import App
from llmepp.server.listen import any_address_socket, grpc_address
from llmepp.settings import Settings
from llmepp.testing.ports import free_port


async def _answers(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except OSError:
        return False
    writer.close()
    return True


@pytest.mark.parametrize("transport", ["h2", "grpc"])
async def test_by_default_every_server_answers_on_ipv6_and_ipv4(tmp_path: Path, transport: str) -> None:
    """Before: ext_proc (h2) and /metrics bound 0.0.0.0, so on an IPv6-only cluster the gateway was refused
    while the gRPC health checks (bound dual-stack) passed and the EPP showed ready."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    ports = {"ext_proc": free_port(), "health": free_port(), "metrics": free_port()}
    settings = Settings(
        config_text=file_config(endpoints),
        grpc_port=ports["ext_proc"],
        grpc_health_port=ports["health"],
        metrics_port=ports["metrics"],
        extproc_transport=transport,
        secure_serving=False,
        tracing=False,
    )  # the default bind address, as a Deployment runs it
    app = App(settings)
    await app.start()
    try:
        reachable = {
            (host, name): await _answers(host, port) for host in ("127.0.0.1", "::1") for name, port in ports.items()
        }
        assert all(reachable.values()), reachable
    finally:
        await app.shutdown()


def test_any_address_is_one_dual_stack_socket_on_one_port() -> None:
    sock = any_address_socket(0)
    try:
        assert sock.family == socket.AF_INET6 and sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        sock.listen()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2),
            socket.create_connection(("::1", port), timeout=2),
        ):
            pass
    finally:
        sock.close()
    assert grpc_address("", 9002) == "[::]:9002" and grpc_address("10.0.0.1", 9002) == "10.0.0.1:9002"
    assert grpc_address("fd00::1", 9002) == "[fd00::1]:9002"
