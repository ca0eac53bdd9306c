"""A plugin author's scorer, in its own package, found through the `epp.plugins` entry point."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from helpers import endpoint, request

from llmepp import PluginRegistry
from llmepp.config.loader import build, load_config
from llmepp.framework.plugin import ConfigError

PACKAGE = textwrap.dedent(
    '''
    from llmepp import PluginParams, Scorer

    class PreferLabel(Scorer):
        """1.0 for endpoints carrying `label=value`, else 0."""

        type = "prefer-label-scorer"

        class Params(PluginParams):
            label: str
            value: str = "true"

        def score(self, request, endpoints):
            key, value = self.params.label, self.params.value
            return [1.0 if ep.labels.get(key) == value else 0.0 for ep in endpoints]
    '''
)


@pytest.fixture
def installed_plugin_package(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An importable package with a dist-info entry point, exactly what pip would install."""
    (tmp_path / "author_scorers").mkdir()
    (tmp_path / "author_scorers" / "__init__.py").write_text(PACKAGE)
    dist = tmp_path / "author_scorers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: author-scorers\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[epp.plugins]\nprefer-label = author_scorers:PreferLabel\n")
    sys.path.insert(0, str(tmp_path))
    yield
    sys.path.remove(str(tmp_path))
    sys.modules.pop("author_scorers", None)


CONFIG = """
plugins:
- type: prefer-label-scorer
  parameters: {label: gpu, value: h100}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefer-label-scorer, weight: 5}]
"""


async def test_out_of_tree_scorer_loads_by_type_string(installed_plugin_package: None) -> None:
    reg = PluginRegistry()  # a fresh registry reads entry points anew
    c = build(load_config(CONFIG), plugin_registry=reg)
    assert "max-score-picker" in c.plugins  # built-ins come through the same entry-point group
    profile = c.pipeline.scheduler.profiles["default"]
    eps = [endpoint(0, labels={"gpu": "a100"}), endpoint(1, labels={"gpu": "h100"})]
    assert profile.run(request(), eps).targets == [eps[1]]


def test_out_of_tree_parameters_are_validated(installed_plugin_package: None) -> None:
    with pytest.raises(ConfigError) as err:
        build(load_config("plugins:\n- type: prefer-label-scorer\n"), plugin_registry=PluginRegistry())
    assert "plugin 'prefer-label-scorer' (type prefer-label-scorer): parameters: Object missing required field" in str(
        err.value
    )
    assert "`label`" in str(err.value)


CLASHING = textwrap.dedent(
    """
    from llmepp import PluginParams, Scorer

    class MyQueueScorer(Scorer):
        type = "queue-scorer"  # a built-in's type string

        def score(self, request, endpoints):
            return [0.0 for _ in endpoints]

    class Other(Scorer):
        type = "clash-other-scorer"

        def score(self, request, endpoints):
            return [1.0 for _ in endpoints]

    def register(registry):
        registry.register(MyQueueScorer)
        registry.register(Other)
    """
)


def test_a_package_taking_a_built_in_type_string_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the clash was a bare ValueError out of the first lookup (a traceback at start-up), and the
    entry points after it never loaded; found before llm-epp's own, it left most built-ins unregistered."""
    (tmp_path / "clash_plugins").mkdir()
    (tmp_path / "clash_plugins" / "__init__.py").write_text(CLASHING)
    dist = tmp_path / "clash_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clash-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[epp.plugins]\nclash = clash_plugins:register\n")
    sys.path.insert(0, str(tmp_path))  # found before llm-epp's distribution
    try:
        reg = PluginRegistry()
        queue = reg.get("queue-scorer")
        assert queue is not None and queue.__module__ != "clash_plugins"  # the built-in keeps its name
        assert reg.get("clash-other-scorer") is not None  # the package's other plugin still registers
        assert all(reg.get(t) is not None for t in ("max-score-picker", "single-profile-handler", "file-discovery"))
        assert "'queue-scorer' already registered by llmepp.plugins" in caplog.text
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("clash_plugins", None)
