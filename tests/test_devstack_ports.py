"""`make run`'s port check: a port something holds is "in use"; one it cannot listen on for another reason
(a privileged port without root, an address the machine lacks) is reported with that reason instead."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest

from llmepp.devstack import ports_in_use
from llmepp.testing.ports import free_port
from llmepp.testing.stack import StackOptions


def _options() -> StackOptions:
    return StackOptions(
        pods=1, pod_port=free_port(), envoy_port=free_port(), envoy_admin_port=free_port(), epp_port=free_port(),
        health_port=free_port(), metrics_port=free_port(),
    )  # fmt: skip


def test_a_held_port_is_in_use_and_a_refused_one_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    options = _options()
    assert ports_in_use(options) == ([], [])
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:
        if address[1] == options.metrics_port:
            raise PermissionError(errno.EACCES, "Permission denied")
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", options.epp_port))
        holder.listen()
        busy, unusable = ports_in_use(options)
    assert busy == [f"EPP 127.0.0.1:{options.epp_port} (--epp-port)"]
    assert unusable == [f"EPP metrics 127.0.0.1:{options.metrics_port} (--metrics-port): Permission denied"]
