"""Config inputs the reference reads in its own way: empty text or file, trailing YAML documents, an unnamed
profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmepp.app import config_text
from llmepp.cli import settings_from_args
from llmepp.config.loader import build, load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.framework.plugin import ConfigError
from llmepp.settings import Settings

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def _scorers(components: Any) -> list[tuple[str, float]]:
    (profile,) = components.pipeline.scheduler.profiles.values()
    return [(w.scorer.name, w.weight) for w in profile.scorers]


def _default_scorers() -> list[tuple[str, float]]:
    return _scorers(build(load_config(DEFAULT_CONFIG)))


# -- an empty config ------------------------------------------------------------------------------
# Reference runner: configBytes stays empty for an empty --config-text (it falls through) and for an
# empty --config-file; LoadRawConfig then uses the built-in default config (`len(configBytes) == 0`).
# Read as YAML it would be a config with no plugins: one profile with no scorers (random routing).


def test_an_empty_config_file_uses_the_default_config_as_in_the_reference(tmp_path: Path) -> None:
    empty = tmp_path / "config.yaml"
    empty.write_text("")
    components = build(load_config(config_text(Settings(config_file=str(empty)))))
    assert _scorers(components) == _default_scorers()


def test_an_empty_config_text_flag_uses_the_default_config_as_in_the_reference() -> None:
    settings = settings_from_args(["--config-text", ""])
    components = build(load_config(config_text(settings)))
    assert _scorers(components) == _default_scorers()


# -- several YAML documents ----------------------------------------------------------------------
# The reference decodes YAML with sigs.k8s.io/yaml (go-yaml Unmarshal: the first document in the stream);
# a generated file ending in a `---` separator, or followed by a comment-only document, loads there.


@pytest.mark.parametrize("tail", ["---\n", "---\n# end of generated config\n"])
def test_a_trailing_document_separator_loads_as_in_the_reference(tail: str) -> None:
    text = HEADER + "plugins:\n- type: queue-scorer\n" + tail
    components = build(load_config(text))
    assert _scorers(components) == [("queue-scorer", 1.0)]


# -- an unnamed profile ----------------------------------------------------------------------------
# Reference validation.go::validateSchedulingProfiles: `schedulingProfiles[%d] is missing a name`.
# `name: ""` (e.g. an unset Helm value) would be a profile no profile handler can name.


def test_an_empty_profile_name_is_refused_naming_the_field() -> None:
    text = (
        HEADER
        + "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: ''\n  plugins: [{pluginRef: queue-scorer}]\n"
    )
    with pytest.raises(ConfigError, match=r"schedulingProfiles\[0\]"):
        build(load_config(text))
