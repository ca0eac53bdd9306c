"""A plugin author's scorer, in its own package, found through the `epp.plugins` entry point."""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
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


@contextlib.contextmanager
def installed(site: Path, package: str, source: str, entry_point: str) -> Iterator[None]:
    """`package` (its `__init__` is `source`) importable from `site`, ahead of everything else on the path,
    with a dist-info declaring the `epp.plugins` `entry_point`: exactly what pip would install."""
    (site / package).mkdir()
    (site / package / "__init__.py").write_text(source)
    dist = site / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[epp.plugins]\n{entry_point}\n")
    sys.path.insert(0, str(site))
    try:
        yield
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(package, None)


@pytest.fixture
def installed_plugin_package(tmp_path: Path) -> Iterator[None]:
    with installed(tmp_path, "author_scorers", PACKAGE, "prefer-label = author_scorers:PreferLabel"):
        yield


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
    with installed(tmp_path, "clash_plugins", CLASHING, "clash = clash_plugins:register"):  # found before ours
        reg = PluginRegistry()
        queue = reg.get("queue-scorer")
        assert queue is not None and queue.__module__ != "clash_plugins"  # the built-in keeps its name
        assert reg.get("clash-other-scorer") is not None  # the package's other plugin still registers
        assert all(reg.get(t) is not None for t in ("max-score-picker", "single-profile-handler", "file-discovery"))
        assert "'queue-scorer' already registered by llmepp.plugins" in caplog.text
