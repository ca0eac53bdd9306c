"""`--watch-config-file`'s watcher: a changed, settled file is applied once; a bad one is counted and
logged, and the running config stays."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from llmepp.app import App
from llmepp.cli import settings_from_args
from llmepp.config.loader import build, load_config, rebuild_scheduling
from llmepp.config.schema import DEFAULT_CONFIG, EndpointPickerConfig
from llmepp.config.watch import ConfigWatcher
from llmepp.filewatch import SettledChanges, stat_signature
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics
from llmepp.settings import Settings

OTHER = DEFAULT_CONFIG.replace("weight: 6", "weight: 4")


class Harness:
    def __init__(self, tmp_path: Path, *, refuse: bool = False) -> None:
        self.path = tmp_path / "config.yaml"
        self.path.write_text(DEFAULT_CONFIG)
        self.applied: list[EndpointPickerConfig] = []
        self.refuse = refuse
        self.metrics = EppMetrics()
        self.watcher = ConfigWatcher(
            str(self.path), stat_signature(str(self.path)), DEFAULT_CONFIG, self.apply, self.metrics
        )
        self._mtime = 10**18

    def apply(self, config: EndpointPickerConfig) -> None:
        if self.refuse:
            raise ConfigError("plugin 'x' (type y): changed; restart the EPP to apply this")
        self.applied.append(config)

    def write(self, text: str) -> None:
        """A new version of the file (atomic, as a ConfigMap swap; distinct mtime however fast the test)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        self._mtime += 1
        os.utime(tmp, ns=(self._mtime, self._mtime))
        os.replace(tmp, self.path)

    def polls(self, n: int = 2) -> list[bool]:
        return [self.watcher.check() for _ in range(n)]

    def value(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


def test_a_changed_file_is_applied_once_it_has_held_still_for_a_poll(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.polls(3) == [False, False, False]  # unchanged
    h.write(OTHER)
    assert h.polls(3) == [False, True, False]  # seen, settled and applied, then quiet
    assert len(h.applied) == 1
    weights = [ref.weight for ref in h.applied[0].scheduling_profiles[0].plugins]
    assert 4.0 in weights
    assert h.value("llm_d_epp_config_reloads_total", result="applied") == 1
    assert h.value("llm_d_epp_config_last_reload_successful") == 1


def test_a_file_still_being_written_is_read_only_when_it_stops_changing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.write("apiVersion: llm-d.ai/v1alpha1\n")  # the first half of a write
    assert not h.watcher.check()
    h.write(OTHER)  # the rest, before the next poll
    assert h.polls(2) == [False, True]
    assert len(h.applied) == 1 and h.value("llm_d_epp_config_reloads_total", result="rejected") == 0


def test_only_a_change_of_content_counts(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.write(DEFAULT_CONFIG)  # touched: same text
    assert h.polls(3) == [False, False, False]
    assert h.applied == [] and h.value("llm_d_epp_config_reloads_total", result="applied") == 0


def test_a_bad_file_is_counted_logged_and_ignored_until_a_good_one_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path)
    with caplog.at_level(logging.ERROR, logger="llmepp.config.watch"):
        h.write("plugins: [unclosed\n")
        assert h.polls() == [False, False]
    assert "not applied, the running config stays: config is not valid YAML" in caplog.text
    assert h.value("llm_d_epp_config_reloads_total", result="rejected") == 1
    assert h.value("llm_d_epp_config_last_reload_successful") == 0
    assert h.polls(2) == [False, False]  # reported once, not every poll
    assert h.value("llm_d_epp_config_reloads_total", result="rejected") == 1
    h.write(DEFAULT_CONFIG)  # the bad edit reverted: the file is what runs again
    assert h.polls() == [False, False] and h.value("llm_d_epp_config_last_reload_successful") == 1
    assert h.applied == []
    h.write(OTHER)
    assert h.polls() == [False, True]
    assert h.value("llm_d_epp_config_last_reload_successful") == 1


def test_a_missing_file_and_a_refused_change_keep_the_running_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, refuse=True)
    with caplog.at_level(logging.ERROR, logger="llmepp.config.watch"):
        h.path.unlink()
        assert h.polls() == [False, False]
        assert "the file is missing" in caplog.text
        h.write(OTHER)
        assert h.polls() == [False, False]
    assert "restart the EPP to apply this" in caplog.text
    assert h.value("llm_d_epp_config_reloads_total", result="rejected") == 2
    assert h.applied == []


def test_a_truncated_file_is_not_applied_and_the_rewritten_one_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Truncated in place, then written: an empty file parses as a config with nothing in it (one default
    # profile, a max-score picker: random routing). Caught between the two writes it was applied.
    h = Harness(tmp_path)
    with caplog.at_level(logging.ERROR, logger="llmepp.config.watch"):
        h.path.write_text("")
        assert h.polls() == [False, False]
        assert "not applied, the running config stays: the file is empty" in caplog.text
    assert h.applied == [] and h.value("llm_d_epp_config_last_reload_successful") == 0
    h.path.write_text(OTHER)
    assert h.polls() == [False, True] and len(h.applied) == 1
    assert h.value("llm_d_epp_config_last_reload_successful") == 1


def test_a_commented_out_file_is_not_applied(tmp_path: Path) -> None:
    # Only comments (or blank lines, or `---`): no config, refused as the reference's decoder refuses it,
    # never a config without plugins (random routing) counted as applied.
    h = Harness(tmp_path)
    h.write("# " + OTHER.replace("\n", "\n# "))
    assert h.polls() == [False, False]
    assert h.applied == [] and h.value("llm_d_epp_config_reloads_total", result="rejected") == 1


def test_watching_without_a_config_file_is_a_start_up_error() -> None:
    with pytest.raises(ConfigError, match="--watch-config-file needs --config-file"):
        App(Settings(watch_config_file=True, config_text=DEFAULT_CONFIG))
    assert settings_from_args(["--config-file", "x.yaml", "--watch-config-file"]).watch_config_file


def test_a_new_file_the_loader_refuses_keeps_the_running_scheduler_and_names_the_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path)
    first = build(load_config(DEFAULT_CONFIG))
    running = [first]
    h.watcher = ConfigWatcher(
        str(h.path), stat_signature(str(h.path)), DEFAULT_CONFIG,
        lambda config: running.append(rebuild_scheduling(running[-1], config)), h.metrics,
    )  # fmt: skip
    bad = {
        # The default picker's name on a scorer (was logged as an internal error: AssertionError).
        DEFAULT_CONFIG.replace("- type: queue-scorer\n", "- {type: queue-scorer, name: max-score-picker}\n").replace(
            "pluginRef: queue-scorer", "pluginRef: max-score-picker"
        ): "plugin 'max-score-picker' (type queue-scorer): is not a picker",
        DEFAULT_CONFIG.replace("weight: 6", "weight: .nan"): "schedulingProfiles[0].plugins[3].weight: nan",
    }  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="llmepp.config.watch"):
        for text, message in bad.items():
            h.write(text)
            assert h.polls() == [False, False]
            assert f"not applied, the running config stays: {message}" in caplog.text
    assert "internal error" not in caplog.text
    assert running == [first] and h.value("llm_d_epp_config_reloads_total", result="rejected") == 2
    h.write(OTHER)
    assert h.polls() == [False, True] and len(running) == 2


async def test_many_reloads_under_traffic_keep_nothing_of_the_retired_schedulers(tmp_path: Path) -> None:
    # The director's plugin timers (one request in 16) kept every scheduling plugin they ever timed:
    # each reload leaked the rebuilt filters, scorers and picker, and a dict entry per plugin.
    import gc
    import weakref

    from helpers import FILE_CONFIG, request

    from llmepp.datalayer.endpoint import EndpointSpec
    from llmepp.director import RoutingDecision
    from llmepp.framework.plugin import Plugin
    from llmepp.request.types import ResponseInfo

    path = tmp_path / "config.yaml"
    path.write_text(FILE_CONFIG)
    app = App(Settings(config_file=str(path), watch_config_file=True))
    for i in range(3):
        app.datastore.upsert(EndpointSpec(name=f"pod-{i}", address=f"10.0.0.{i + 1}", port=8000, labels={}))

    async def traffic() -> None:
        for _ in range(32):  # two sampled requests
            r = request(b"hello")
            decision = await app.director.handle_request(r, None)
            assert isinstance(decision, RoutingDecision)
            app.director.response_complete(r, ResponseInfo(status=200), decision)

    def live_plugins() -> int:
        gc.collect()
        return sum(isinstance(o, Plugin) for o in gc.get_objects())

    await traffic()
    before = live_plugins()
    first = weakref.ref(app.components.plugins["queue-scorer"])
    for _ in range(200):
        app.reload_config(load_config(FILE_CONFIG))
        await traffic()
    await asyncio.gather(*app._closing)
    assert live_plugins() == before
    assert first() is None
    assert len(app.director._timers._children) <= 2 * len(app.components.plugins)


def test_a_file_deleted_after_a_retry_is_reported_missing(tmp_path: Path) -> None:
    """retry() (the file moved while it was read) must not hide a deletion that follows: the next settled
    state is reported whatever it is."""
    path = tmp_path / "f"
    path.write_text("a")
    changes = SettledChanges(str(path), stat_signature(str(path)))
    os.utime(path, ns=(1, 1))
    assert [changes.settled(), changes.settled()] == [False, True]
    changes.retry()
    path.unlink()
    assert [changes.settled(), changes.settled()] == [False, True] and changes.missing
