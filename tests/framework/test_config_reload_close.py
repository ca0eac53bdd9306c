"""A refused config reload (the new file parses and its plugins get built, then a later step refuses it)
closes every plugin it built for the new config, and none of the running config's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import ClosingScorer

from llmepp.app import App
from llmepp.config.loader import load_config
from llmepp.framework.plugin import ConfigError
from llmepp.settings import Settings

RUNNING = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {path: /nonexistent/endpoints.yaml}
- type: queue-scorer
- type: approx-prefix-cache-producer
- type: inflight-load-producer
- {type: test-closing-scorer, name: recorder}
dataLayer:
  discovery: {pluginRef: file-discovery}
"""
SCORERS = "- {type: test-closing-scorer, name: recorder}\n"
# Each refused at a different step, after `recorder` (and `extra`) were built for it.
REFUSED = {
    "a later plugin's setup fails": SCORERS
    + "- {type: test-closing-scorer, name: extra}\n"
    + "- {type: test-closing-scorer, name: failing, parameters: {failSetup: true}}\n",
    "a later plugin cannot be built": SCORERS
    + "- {type: test-closing-scorer, name: extra}\n"
    + "- {type: test-closing-scorer, name: bad, parameters: {nope: 1}}\n",
    "a profile names no plugin": SCORERS
    + "- {type: test-closing-scorer, name: extra}\n"
    + "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: recorder}, {pluginRef: missing}]\n",
    "the wiring check refuses it": SCORERS
    + "- {type: test-closing-scorer, name: extra}\n"
    + "- type: multicluster-queue-scorer\n",
}


def app_with(tmp_path: Path, text: str) -> App:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return App(Settings(config_file=str(path), watch_config_file=True))


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_refused_reload_closes_what_it_built_and_nothing_running(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ClosingScorer.register(monkeypatch)
    app = app_with(tmp_path, RUNNING)
    running = app.components
    (old,) = ClosingScorer.instances
    text = RUNNING.replace(SCORERS, REFUSED[case])
    with pytest.raises(ConfigError):
        app.reload_config(load_config(text))
    await asyncio.gather(*app._closing)
    assert app.components is running and app.director.pipeline is running.pipeline
    built = [p for p in ClosingScorer.instances if p is not old]
    assert built, "the reload built nothing: the case does not test what it says"
    assert [(p.name, p.closed) for p in built] == [(p.name, 1) for p in built]
    assert all(p.task is None or p.task.cancelled() or p.task.done() for p in built)
    assert old.closed == 0  # the running instance (a swappable plugin has a new one in the new config)
    # And the running config still reloads, retiring (closing) the running instance only then.
    app.reload_config(load_config(RUNNING))
    await asyncio.gather(*app._closing)
    assert old.closed == 1 and app.components.plugins["recorder"].closed == 0  # type: ignore[attr-defined]
    await app.components.plugins["recorder"].aclose()
