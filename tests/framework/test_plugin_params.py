"""Every registered plugin type through the config loader: with its default parameters and with each
parameter given a wrong-typed or out-of-range value, building either succeeds or raises a ConfigError
naming the plugin; never another exception (a start-up traceback)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import yaml

from llmepp.config.loader import build, load_config
from llmepp.framework.plugin import ConfigError, registry

WRONG = [None, -1, 0, "x", "-1s", [], {}, True, 2**70, 1e308, float("nan"), float("inf")]


def _build(type_name: str, parameters: dict[str, Any] | None) -> None:
    plugin: dict[str, Any] = {"type": type_name, "name": "probe"}
    if parameters is not None:
        plugin["parameters"] = parameters
    doc = {"featureGates": ["flowControl"], "plugins": [plugin, {"type": "queue-scorer", "name": "other"}]}
    try:
        build(load_config(yaml.safe_dump(doc)), datastore=None)
    except ConfigError as e:
        message = str(e)
        # models-responder's datastore check (no datastore here; the app always gives one) names no plugin.
        assert "'probe'" in message or "plugins[0]" in message or "datastore" in message, message


@pytest.mark.parametrize("type_name", registry.types())
def test_every_plugin_type_builds_or_fails_with_a_config_error(type_name: str) -> None:
    _build(type_name, None)
    cls = registry.get(type_name)
    assert cls is not None
    for field in msgspec.structs.fields(cls.Params):
        for value in WRONG:
            _build(type_name, {field.encode_name: value})
