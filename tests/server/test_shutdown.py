"""SIGTERM on a real EPP (`app.run`): readiness NOT_SERVING at once (liveness stays SERVING), an in-flight
ext_proc stream keeps being served through the drain, and `run` returns (exit code 0) once it is done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ClosingScorer, file_config, loopback_settings

from llmepp import app as app_module
from llmepp.settings import Settings
from llmepp.testing.ports import free_port

from .client import Stream, response_body, response_headers


@contextlib.contextmanager
def socket_bound(port: int) -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        yield


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_sigterm_drains_an_in_flight_stream_then_run_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "tune_gc", lambda: None)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {name: pod-a, address: 127.0.0.1, port: 18000}\n")
    grpc_port, health_port = free_port(), free_port()
    config = file_config(endpoints)
    settings = Settings(config_text=config, bind_address="127.0.0.1", grpc_port=grpc_port,
                        grpc_health_port=health_port, metrics_port=0, secure_serving=False, drain_timeout=3.0,
                        tracing=False)  # fmt: skip
    running = asyncio.create_task(app_module.run(settings))
    try:
        await _drain(running, grpc_port, health_port)
    finally:
        running.cancel()


async def _drain(running: asyncio.Task[None], grpc_port: int, health_port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as health_channel:
        health = health_pb2_grpc.HealthStub(health_channel)

        async def status(service: str) -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status

        for _ in range(200):
            assert not running.done(), running.exception()
            try:
                if await status("readiness") == SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
        else:
            pytest.fail("never ready")
        # Its own subchannel pool: close() then closes the connection (Envoy's EDS drain of a removed endpoint).
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
        stream = Stream(pb_grpc.ExternalProcessorStub(channel).Process())
        routed = await stream.route(b'{"model": "m", "prompt": "x"}')  # the response phases are still to come
        assert routed[0].WhichOneof("response") == "request_headers"
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await status("readiness") == NOT_SERVING
        assert await status("liveness") == SERVING
        await asyncio.sleep(1.5)  # longer than the quiet period: the open stream holds the drain
        assert not running.done()
        await stream.send(response_headers(), response_body(b"data: [DONE]\n\n", eos=True))
        answers = [await stream.recv(), await stream.recv()]  # still served during the drain
        assert [a.WhichOneof("response") for a in answers] == ["response_headers", "response_body"]
        await stream.close()
        await channel.close()
    await asyncio.wait_for(running, 10)  # at the end of --drain-timeout at the latest
    assert running.result() is None


def _kubeconfig_with_slow_credentials(tmp_path: Path) -> tuple[Path, Path]:
    """A kubeconfig whose exec credential plugin (an `aws eks get-token` that hangs) writes its pid to a marker
    file, then never answers: the EPP's Kubernetes start waits on it."""
    marker = tmp_path / "credentials-plugin.pid"
    plugin = tmp_path / "slow-credentials.sh"
    plugin.write_text(f"#!/bin/sh\necho $$ > {marker}.tmp && mv {marker}.tmp {marker}\nexec sleep 60\n")
    plugin.chmod(0o755)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:1"}}}}]
users: [{{name: u, user: {{exec: {{apiVersion: client.authentication.k8s.io/v1beta1, command: {plugin},
                                   interactiveMode: Never}}}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    return kubeconfig, marker


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_the_start_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    # The handlers were installed only once the start had finished: a SIGTERM during it (a rollout, a scale-down
    # while the EPP waits on its API server or credentials) killed the process (exit 143) without closing anything.
    kubeconfig, marker = _kubeconfig_with_slow_credentials(tmp_path)
    argv = ["--pool-name", "p", "--kubeconfig", str(kubeconfig), "--bind-address", "127.0.0.1",
            "--grpc-port", str(free_port()), "--grpc-health-port", str(free_port()), "--metrics-port", "0",
            "--secure-serving=false", "--tracing=false", "--log-format", "text"]  # fmt: skip
    epp = subprocess.Popen(
        [sys.executable, "-m", "llmepp", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():  # the start is now waiting on the credentials plugin
            assert epp.poll() is None, epp.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the credentials plugin never ran"
            time.sleep(0.05)
        epp.send_signal(sig)
        _, err = epp.communicate(timeout=30)
    finally:
        if epp.poll() is None:
            epp.kill()
            epp.communicate()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(marker.read_text()), signal.SIGKILL)
    assert epp.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "signal during start-up: stopping before serving" in err, err[-3000:]
    assert err.rstrip().endswith("stopped"), err[-3000:]  # closed what the start had set up


async def _sigterm_in_the_discovery_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scorer: str = "type: queue-scorer"
) -> tuple[asyncio.Task[None], app_module.App]:
    """run() of a file-discovery config with `scorer`, sent SIGTERM while its start waits in the discovery grace:
    the run's task (ended) and its App."""
    monkeypatch.setattr(app_module, "_DISCOVERY_STARTUP_GRACE", 30.0)  # the start waits here until the signal
    started: list[app_module.App] = []
    start = app_module.App.start

    async def record_start(self: app_module.App) -> None:
        started.append(self)
        await start(self)

    monkeypatch.setattr(app_module.App, "start", record_start)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    running = asyncio.create_task(app_module.run(loopback_settings(file_config(endpoints, scorer))))
    for _ in range(200):
        if started and started[0]._discovery_task is not None:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the start never reached the discovery grace")
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait({running}, timeout=5)  # not the 30 s grace
    assert running.done()
    return running, started[0]


async def test_a_sigterm_during_the_discovery_grace_stops_the_start_and_closes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, app = await _sigterm_in_the_discovery_grace(tmp_path, monkeypatch)
    assert running.result() is None
    assert app._discovery_task is not None and app._discovery_task.done()
    assert app._extproc is None  # never served
    # The handlers are run()'s only while it runs: this SIGTERM is the default one again (not os._exit(1)).
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


class _BrokenCloseScorer(ClosingScorer):
    type = "test-broken-close-scorer"

    async def aclose(self) -> None:
        await super().aclose()
        raise RuntimeError("aclose broke")


async def test_a_signal_during_the_discovery_grace_closes_everything_the_start_set_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every plugin's aclose and the /metrics server, "stopped" logged. (The close, run inside the cancelled
    start-up task, took the discovery task's cancellation for its own and stopped half-way.)"""
    ClosingScorer.register(monkeypatch)
    caplog.set_level(logging.INFO, logger="llmepp.app")
    running, _ = await _sigterm_in_the_discovery_grace(
        tmp_path, monkeypatch, f"{{type: {ClosingScorer.type}, name: scorer}}"
    )
    assert running.exception() is None
    [scorer] = ClosingScorer.instances
    assert scorer.closed == 1
    assert any(r.getMessage() == "stopped" for r in caplog.records)


async def test_a_part_failing_to_close_after_a_signal_during_start_up_is_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _BrokenCloseScorer.register(monkeypatch)
    running, app = await _sigterm_in_the_discovery_grace(
        tmp_path, monkeypatch, f"{{type: {_BrokenCloseScorer.type}, name: scorer}}"
    )
    [scorer] = ClosingScorer.instances
    assert scorer.closed == 1 and app.close_failures == 1  # logged
    # The help: "1 stopped, but a part failed to close (logged)"; run() returning normally is exit code 0.
    assert isinstance(running.exception(), app_module.CloseFailed)


class _BrokenElector:
    """A leader elector whose lease release fails with what the elector does not catch (a bug, an API answer
    it does not expect)."""

    is_leader = True
    releases = 0

    async def release(self) -> None:
        self.releases += 1
        raise RuntimeError("lease release broke")


class _BrokenCollector:
    async def aclose(self) -> None:
        raise RuntimeError("collector aclose broke")


class _BrokenTracing:
    def shutdown(self) -> None:
        raise RuntimeError("tracing shutdown broke")


class _Client:
    closed = False

    async def aclose(self) -> None:
        self.closed = True


async def _started_with_a_closing_scorer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, health_port: int, metrics_port: int
) -> app_module.App:
    """A started EPP (no endpoints, drain 0.2 s) whose config holds one ClosingScorer."""
    ClosingScorer.register(monkeypatch)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    config = file_config(endpoints, f"{{type: {ClosingScorer.type}, name: closing}}")
    app = app_module.App(Settings(config_text=config, bind_address="127.0.0.1", grpc_port=free_port(),
                                  grpc_health_port=health_port, metrics_port=metrics_port, secure_serving=False,
                                  tracing=False, drain_timeout=0.2))  # fmt: skip
    await app.start()
    return app


async def test_parts_failing_to_close_do_not_skip_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # One raising step ended the shutdown: the lease release skipped the whole drain and every close after it, a
    # collector's aclose the tracing flush, the Kubernetes client, the plugins and the /metrics server.
    from llmepp.flowcontrol.objectives import ObjectiveStore
    from llmepp.k8s.discovery import DiscoveryTarget
    from llmepp.k8s.runtime import KubeOptions, KubeRuntime

    health_port = free_port()
    app = await _started_with_a_closing_scorer(tmp_path, monkeypatch, health_port, free_port())
    kube = KubeRuntime(DiscoveryTarget(namespace="ns", pool_name="p", pool_group="g", selector=None, target_ports=()),
                       KubeOptions(), app.datastore, ObjectiveStore())  # fmt: skip
    elector, client = _BrokenElector(), _Client()
    kube.elector, kube.client = elector, client  # type: ignore[assignment]
    app.kube, app.collector, app.tracing = kube, _BrokenCollector(), _BrokenTracing()  # type: ignore[assignment]
    discovery = app.components.plugins["file-discovery"]

    async def broken_aclose() -> None:
        raise RuntimeError("plugin aclose broke")

    monkeypatch.setattr(discovery, "aclose", broken_aclose)
    caplog.set_level("INFO", logger="llmepp.app")
    assert await app.shutdown() == 4  # nothing raised: the count, for run() to exit 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert sorted(str(r.exc_info[1]) for r in errors if r.exc_info) == [
        "collector aclose broke", "lease release broke", "plugin aclose broke", "tracing shutdown broke"
    ]  # fmt: skip
    assert len(errors) == 4, [r.getMessage() for r in errors]  # each once, with its traceback
    assert elector.releases == 1  # not re-tried (and logged again) by the Kubernetes close
    assert client.closed  # the Kubernetes client was closed after the failed release
    assert [p.closed for p in ClosingScorer.instances] == [1]
    assert app._discovery_task is not None and app._discovery_task.done()
    assert caplog.records[-1].getMessage() == "stopped"
    with socket_bound(health_port):  # the health server let go of its port
        pass


async def test_a_part_stuck_closing_is_left_behind_and_the_rest_still_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A close that never returns (a peer that never answers) held the shutdown for good: the plugins and the
    # /metrics server after it stayed open until the kubelet's SIGKILL.
    monkeypatch.setattr(app_module, "CLOSE_TIMEOUT", 0.2)
    metrics_port = free_port()
    app = await _started_with_a_closing_scorer(tmp_path, monkeypatch, free_port(), metrics_port)
    stuck = asyncio.Event()

    async def hanging_aclose() -> None:
        stuck.set()
        with contextlib.suppress(asyncio.CancelledError):  # as a close awaiting its cancelled task does
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    monkeypatch.setattr(app.components.plugins["file-discovery"], "aclose", hanging_aclose)
    monkeypatch.setattr(app.collector, "aclose", hanging_aclose)
    caplog.set_level("INFO", logger="llmepp.app")
    assert await asyncio.wait_for(app.shutdown(), 10) == 2
    assert stuck.is_set()
    errors = sorted(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert errors == [
        "plugin file-discovery did not close within 0.2s: left behind",
        "the metrics collector did not close within 0.2s: left behind",
    ], errors
    assert [p.closed for p in ClosingScorer.instances] == [1]
    assert caplog.records[-1].getMessage() == "stopped"
    with socket_bound(metrics_port):  # the /metrics server, closed after the plugins, let go of its port
        pass


def test_the_exit_code_is_1_when_a_part_failed_to_close(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmepp import cli
    from llmepp.observability import logging as epp_logging

    async def run(settings: Settings) -> None:
        raise app_module.CloseFailed("1 part failed to close (logged above)")

    monkeypatch.setattr(app_module, "run", run)
    monkeypatch.setattr(epp_logging, "configure_logging", lambda *args: None)  # keep pytest's log handlers
    assert cli.main(["--tracing=false"]) == 1
    assert capsys.readouterr().err == "epp: stopped, but 1 part failed to close (logged above)\n"
