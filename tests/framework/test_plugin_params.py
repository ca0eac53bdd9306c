"""Every registered plugin type through the config loader: with its default parameters and with each
parameter given a wrong-typed or out-of-range value, building either succeeds or raises a ConfigError
naming the plugin; never another exception (a start-up traceback)."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmepp.config.loader import build, load_config
from llmepp.framework.plugin import ConfigError, registry

WRONG: list[Any] = [None, -1, 0, "x", "-1s", [], {}, True, 2**70, 1e308, float("nan"), float("inf")]


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


# Anything a YAML document can hold, wrong for most fields: scalars at the edges, nested lists and mappings.
_SCALARS = (
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**70, 10**9, 1e300, -1e300, 5e-324, 0.999999])
    | st.text(max_size=5)
    | st.sampled_from(["", "x", "1s", "-1s", "0s", "10ms", "1Gi", "-1Gi", "true", "0", "-1", "prefill", "decode",
                       "a.b", "(", "[", "*", "other", "probe", "1e3", "http://", "/nonexistent", "a==b", "${", "%s",
                       "\ud800"])
)  # fmt: skip
_ANY = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["name", "type", "key", "value", "x", "\udfff"]), inner, max_size=2)
    ),
    max_leaves=5,
)


def _values(info: mi.Type, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for a parameter of type `info`: right-typed ones (nested structs with their own field names, so
    the draw reaches past the type check into each plugin's own validation) or anything at all."""
    if depth > 4:
        return _ANY
    if isinstance(info, mi.Metadata):
        return _values(info.type, depth)
    if isinstance(info, mi.UnionType):
        return st.one_of([_values(t, depth + 1) for t in info.types])
    if isinstance(info, mi.StructType):
        optional = {f.encode_name: _values(f.type, depth + 1) for f in info.fields}
        return st.fixed_dictionaries({}, optional=optional) | _ANY
    if isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return st.lists(_values(info.item_type, depth + 1), max_size=3) | _ANY
    if isinstance(info, mi.DictType):
        return st.dictionaries(st.sampled_from(["a", "x", "", "prefill"]), _values(info.value_type, depth + 1),
                               max_size=3) | _ANY  # fmt: skip
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(list(info.values)) | _ANY
    return _ANY


_WITH_PARAMS = [t for t in registry.types() if msgspec.structs.fields(registry.get(t).Params)]  # type: ignore[union-attr]


@st.composite
def _plugin_with_random_parameters(draw: st.DrawFn) -> tuple[str, Any]:
    type_name = draw(st.sampled_from(_WITH_PARAMS))
    cls = registry.get(type_name)
    assert cls is not None
    return type_name, draw(_values(mi.type_info(cls.Params)))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(_plugin_with_random_parameters())
def test_every_plugin_type_with_random_parameters_builds_or_fails_with_a_config_error(
    case: tuple[str, Any],
) -> None:
    type_name, parameters = case
    _build(type_name, parameters)


@pytest.mark.parametrize(
    ("producer", "picker", "tokens", "n"),
    [("1e5", "1", 100000, 1), ("100000", "2.0", 100000, 2), ("131072.0", "1e0", 131072, 1)],
)
def test_a_whole_number_float_is_accepted_for_an_int_parameter_as_in_the_reference(
    producer: str, picker: str, tokens: int, n: int
) -> None:
    """The reference turns the YAML into JSON before Go decodes `parameters`: a whole-number float (`1e5`,
    `2.0`) is the JSON number 100000 / 2 there, which an int field takes."""
    text = f"""\
plugins:
- type: approx-prefix-cache-producer
  parameters: {{maxPrefixTokensToMatch: {producer}}}
- type: prefix-cache-scorer
- type: max-score-picker
  parameters: {{maxNumOfEndpoints: {picker}}}
"""
    c = build(load_config(text))
    assert c.plugins["approx-prefix-cache-producer"].params.max_prefix_tokens_to_match == tokens
    count = c.plugins["max-score-picker"].params.max_num_of_endpoints
    assert count == n and isinstance(count, int)


def test_a_fractional_float_for_an_int_parameter_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"parameters\.maxNumOfEndpoints"):
        build(load_config("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2.5}\n"))
