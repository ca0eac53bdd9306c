"""Endpoint discovery that ends while the EPP serves (after the start-up grace) stops the EPP with the cause:
a pool that no longer follows its source, or never synced, must not serve on silently, never ready. As the
reference's manager stops when a runnable fails, `run()` drains, closes and raises: the file's error as a
ConfigError (exit code 2), any other end as PartFailed (exit code 1)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from helpers import file_config, loopback_settings

from llmepp import app as app_module
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.framework.plugin import ConfigError
from llmepp.plugins.discovery.file import FileDiscovery


async def test_a_bad_endpoints_file_read_after_the_grace_stops_the_epp_naming_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {name: a, address: not-an-ip, port: 8000}\n")
    read = FileDiscovery.read

    def slow_read(self: FileDiscovery) -> list[EndpointSpec]:  # a slow volume: the first read outlasts the grace
        time.sleep(app_module._DISCOVERY_STARTUP_GRACE + 0.3)
        return read(self)

    monkeypatch.setattr(FileDiscovery, "read", slow_read)
    monkeypatch.setattr(app_module, "tune_gc", lambda: None)
    with pytest.raises(ConfigError, match="not-an-ip"):
        await asyncio.wait_for(app_module.run(loopback_settings(file_config(endpoints))), 10)


async def test_discovery_failing_while_serving_stops_the_epp_and_logs_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug while a change of the file is applied (here a datastore upsert that raises) ends the watch: the
    pool would follow the file no more."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {name: a, address: 127.0.0.1, port: 8000}\n")
    config = file_config(endpoints).replace(f"path: {endpoints}}}", f"path: {endpoints}, watchFile: true}}")
    assert "watchFile: true" in config
    monkeypatch.setattr(FileDiscovery, "poll_interval", 0.02)
    monkeypatch.setattr(app_module, "tune_gc", lambda: None)
    upsert = Datastore.upsert

    def broken_upsert(self: Datastore, spec: EndpointSpec) -> None:
        if spec.name == "b":
            raise RuntimeError("listener bug")
        upsert(self, spec)

    monkeypatch.setattr(Datastore, "upsert", broken_upsert)
    caplog.set_level(logging.INFO)
    running = asyncio.create_task(app_module.run(loopback_settings(config)))
    await asyncio.sleep(app_module._DISCOVERY_STARTUP_GRACE + 0.3)
    assert not running.done()
    endpoints.write_text("endpoints:\n- {name: b, address: 127.0.0.2, port: 8000}\n")
    with pytest.raises(app_module.PartFailed, match="listener bug"):
        await asyncio.wait_for(running, 10)
    assert any("endpoint discovery" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_a_signal_still_stops_a_serving_epp_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The discovery watch does not turn a normal stop into a failure: cancelled by the shutdown, it is no
    failure."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {name: a, address: 127.0.0.1, port: 8000}\n")
    monkeypatch.setattr(app_module, "tune_gc", lambda: None)
    stop = asyncio.Event()
    running = asyncio.create_task(app_module._serve(loopback_settings(file_config(endpoints)), stop))
    await asyncio.sleep(app_module._DISCOVERY_STARTUP_GRACE + 0.3)
    stop.set()
    await asyncio.wait_for(running, 10)  # returns: exit code 0
