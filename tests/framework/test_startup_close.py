"""A start-up that fails part-way (the config refused by a later check, a bad flag read after the plugins
were built, a port in use) closes everything it had set up: plugins' tasks, sockets and workers, the
servers already listening, the tracer's exporter thread. Before, only a normal shutdown closed them."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import ClosingScorer, loopback_settings

from llmepp import app as app_module
from llmepp.app import App
from llmepp.framework.plugin import ConfigError, registry
from llmepp.settings import Settings
from llmepp.testing.ports import free_port


@pytest.fixture(autouse=True)
def set_up_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    ClosingScorer.register(monkeypatch)


def pods_config(endpoints: str = "/nonexistent/endpoints.yaml", extra: str = "") -> str:
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: file-discovery, parameters: {{path: {endpoints}}}}}
- type: queue-scorer
- {{type: {ClosingScorer.type}, name: first}}
- {{type: {ClosingScorer.type}, name: second}}
{extra}dataLayer:
  discovery: {{pluginRef: file-discovery}}
"""


# A multicluster hub refuses a plugin that reads per-pod state: a check after every plugin was set up.
HUB_WITH_POD_ONLY = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: multicluster-file-discovery, name: clusters, parameters: {{path: /nonexistent/clusters.yaml}}}}
- {{type: multicluster-metrics-data-source, name: src}}
- {{type: multicluster-metrics-extractor, name: ext}}
- type: multicluster-queue-scorer
- {{type: {ClosingScorer.type}, name: first}}
- {{type: {ClosingScorer.type}, name: second}}
- type: lora-affinity-scorer
dataLayer:
  discovery: {{pluginRef: clusters}}
  sources: [{{pluginRef: src, extractors: [{{pluginRef: ext}}]}}]
"""

REFUSED: dict[str, tuple[str, dict[str, Any], str]] = {
    "a hub refuses a pod-only plugin": (HUB_WITH_POD_ONLY, {}, "lora-affinity-scorer"),
    "a later plugin's setup fails": (
        pods_config(extra=f"- {{type: {ClosingScorer.type}, name: failing, parameters: {{failSetup: true}}}}\n"),
        {},
        "failSetup",
    ),
    "a profile names no plugin": (
        pods_config(extra="schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: first}, {pluginRef: nope}]\n"),
        {},
        "no plugin with that name",
    ),
    "a flag read after the build": (pods_config(), {"metrics_cert_dir": "/nonexistent/certs"}, "--metrics-cert-dir"),
}


def assert_all_closed() -> None:
    scorers = ClosingScorer.instances
    assert len(scorers) >= 2, "nothing was set up: the case does not test what it says"
    assert [(p.name, p.closed) for p in scorers] == [(p.name, 1) for p in scorers]
    assert all(p.task is None or p.task.cancelled() for p in scorers)


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_refused_start_up_closes_every_plugin_it_set_up(case: str) -> None:
    text, settings, message = REFUSED[case]
    with pytest.raises(ConfigError, match=message):
        App(Settings(config_text=text, **settings))
    await app_module.failed_start_ups_closed()  # App() cannot await: run() awaits the closing
    await asyncio.sleep(0)  # the cancelled tasks finish
    assert_all_closed()


def test_a_refused_start_up_without_an_event_loop_closes_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []

    async def aclose(self: Any) -> None:
        closed.append(self.name)

    monkeypatch.setattr(type(registry.build("queue-scorer", "q", None)), "aclose", aclose)
    with pytest.raises(ConfigError, match="--metrics-cert-dir"):
        App(Settings(config_text=pods_config().replace(f"- {{type: {ClosingScorer.type}, name: first}}\n", "")
                     .replace(f"- {{type: {ClosingScorer.type}, name: second}}\n", ""),
                     metrics_cert_dir="/nonexistent/certs"))  # fmt: skip
    assert closed == ["queue-scorer"]


async def test_a_failed_start_closes_the_plugins_and_the_servers_already_listening(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    grpc_port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        app = App(Settings(config_text=pods_config(str(endpoints)), bind_address="127.0.0.1", grpc_port=grpc_port,
                           grpc_health_port=taken, metrics_port=0, secure_serving=False))  # fmt: skip
        with pytest.raises(
            ConfigError, match=f"--grpc-health-port / --bind-address: cannot listen on 127.0.0.1:{taken}"
        ):
            await app.start()
    await asyncio.sleep(0)
    assert_all_closed()
    assert app._discovery_task is not None and app._discovery_task.done()
    with socket.socket() as again:  # the ext_proc server that was listening let go of its port
        again.bind(("127.0.0.1", grpc_port))


async def test_a_part_failing_to_close_after_a_failed_start_neither_hides_its_error_nor_skips_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")

    class BrokenTracing:
        def shutdown(self) -> None:
            raise RuntimeError("tracing shutdown broke")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        app = App(Settings(config_text=pods_config(str(endpoints)), bind_address="127.0.0.1", grpc_port=free_port(),
                           grpc_health_port=taken, metrics_port=0, secure_serving=False, tracing=False))  # fmt: skip
        app.tracing = BrokenTracing()  # type: ignore[assignment]
        # The start's own error, not the tracer's (which replaced it, and left every plugin open).
        with pytest.raises(ConfigError, match="--grpc-health-port"):
            await app.start()
    await asyncio.sleep(0)
    assert_all_closed()
    logged = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "tracing shutdown broke"]
    assert [r.getMessage() for r in logged] == ["tracing failed to close"]


class _CheckedScorer(ClosingScorer):
    """A plugin whose start-up check refuses (an external store refusing its credentials), written as an
    author may: `async def check`, or a plain `def check`."""

    type = "test-checked-scorer"

    class Params(ClosingScorer.Params):
        refuse: bool = False
        sync: bool = False

    def check(self) -> Any:
        if self.params.sync:
            if self.params.refuse:
                raise ConfigError(f"plugin {self.name!r}: refused by its check")
            return None
        return self._async_check()

    async def _async_check(self) -> None:
        if self.params.refuse:
            raise ConfigError(f"plugin {self.name!r}: refused by its check")


@pytest.mark.parametrize("sync", [False, True], ids=["async-check", "sync-check"])
async def test_a_plugin_check_refusing_stops_the_start_and_closes_every_plugin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sync: bool
) -> None:
    monkeypatch.setitem(registry._types, _CheckedScorer.type, _CheckedScorer)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {name: a, address: 127.0.0.1, port: 8000}\n")
    ok = f"- {{type: {_CheckedScorer.type}, name: ok, parameters: {{sync: {str(sync).lower()}}}}}\n"
    app = App(loopback_settings(pods_config(str(endpoints), extra=ok)))
    await app.start()  # a check that passes
    await app.shutdown()
    refusing = ok.replace("name: ok, parameters: {", "name: refuser, parameters: {refuse: true, ")
    app = App(loopback_settings(pods_config(str(endpoints), extra=refusing)))
    with pytest.raises(ConfigError, match="refused by its check"):
        await app.start()
    await asyncio.sleep(0)
    assert [p.closed for p in ClosingScorer.instances[-3:]] == [1, 1, 1]  # first, second, refuser
