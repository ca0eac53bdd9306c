"""Configuration input against anything (property-based): real configs with random parts replaced,
removed or added, arbitrary endpoints files and objectives files either load or fail with an error
that says where; never with another exception (a start-up traceback instead of a message)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.config.loader import (
    DEFAULT_HANDLER,
    DEFAULT_PICKER,
    DEFAULT_PRODUCERS,
    build,
    load_config,
    rebuild_scheduling,
)
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.endpointsfile import EndpointsFileError, parse_endpoints
from llmepp.flowcontrol.objectives import parse_objectives
from llmepp.framework.plugin import ConfigError
from llmepp.testing.pdstack import LEGACY_PD_CONFIG, PD_CONFIG

FLOW_CONTROL = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 4}
- type: round-robin-fairness-policy
- type: priority-holdback-policy
  parameters: {minCeiling: 0.5}
- type: queue-scorer
- type: request-attribute-reporter
  parameters:
    attributes:
    - key: {name: cost}
      expression: usage.prompt_tokens + usage.completion_tokens
schedulingProfiles:
- name: default
  plugins: [{pluginRef: concurrency-detector}, {pluginRef: queue-scorer, weight: 2}]
flowControl:
  defaultRequestTTL: 30s
  usageLimitPolicyPluginRef: priority-holdback-policy
  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy, maxRequests: 100}
  priorityBands: [{priority: 10, maxBytes: 1Mi}]
  saturationDetector: {pluginRef: concurrency-detector}
  enableEviction: true
"""
ROOT = Path(__file__).parents[2]


def _shipped() -> list[str]:
    """Every EndpointPickerConfig the repository ships (deploy/, benchmarks/), its tokenizer path made absolute."""
    texts = []
    for path in sorted([*ROOT.glob("deploy/config/*.yaml"), *ROOT.glob("benchmarks/configs/**/*.yaml")]):
        text = path.read_text()
        if "kind: EndpointPickerConfig" in text:
            texts.append(text.replace("path: simulator/tokenizer.json", f"path: {ROOT / 'simulator/tokenizer.json'}"))
    return texts


SHIPPED = _shipped()
# Names the loader gives the plugins it creates itself.
LOADER_NAMES = [
    DEFAULT_PICKER,
    DEFAULT_HANDLER,
    *DEFAULT_PRODUCERS.values(),
    "metrics-data-source",
    "core-metrics-extractor",
]
SEEDS = [yaml.safe_load(text) for text in (DEFAULT_CONFIG, PD_CONFIG, LEGACY_PD_CONFIG, FLOW_CONTROL, *SHIPPED)]

values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from([2**70, -(2**63)]) | st.floats(width=32)
    | st.sampled_from(["", "x", "queue-scorer", "prefill", "10s", "-1", "1Gi", "usage.prompt_tokens +", "-1s", "ü🙂"])
    | st.sampled_from(LOADER_NAMES),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["type", "name", "x", "pluginRef"]), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    config = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(config)
        path = draw(st.sampled_from(paths[1:] or paths))
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
        if not path:
            continue
        last = path[-1]
        if action == "duplicate" and isinstance(parent, list):  # a second plugin / profile / ref of one name
            parent.append(copy.deepcopy(parent[last]))
        elif action == "replace" or action == "duplicate":
            parent[last] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif action == "delete" and isinstance(parent, list):
            parent.pop(last)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["unknownField", "weight", "parameters", "plugins", "name"]))] = draw(values)
    plugins = config.get("plugins") if isinstance(config, dict) else None
    if isinstance(plugins, list) and plugins and draw(st.booleans()):
        # A plugin renamed to a name the loader would give a plugin it creates itself.
        plugin = draw(st.sampled_from(plugins))
        if isinstance(plugin, dict):
            plugin["name"] = draw(st.sampled_from(LOADER_NAMES))
    return yaml.safe_dump(config)


@settings(max_examples=400, deadline=None)
@given(mutated_configs())
def test_any_config_loads_or_fails_with_a_config_error(text: str) -> None:
    try:
        build(load_config(text))
    except ConfigError as e:
        assert str(e).strip()


def test_every_shipped_config_loads() -> None:
    assert len(SHIPPED) >= 10
    for text in SHIPPED:
        build(load_config(text))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([DEFAULT_CONFIG, PD_CONFIG, FLOW_CONTROL, *SHIPPED]), mutated_configs())
def test_any_new_file_reloads_or_is_refused_with_a_config_error(running: str, text: str) -> None:
    # What --watch-config-file does with the file's new text (a refusal keeps the running config).
    components = build(load_config(running))
    try:
        rebuild_scheduling(components, load_config(text))
    except ConfigError as e:
        assert str(e).strip()


endpoint_entries = st.dictionaries(
    st.sampled_from(["name", "namespace", "address", "port", "metricsPort", "rank", "labels", "extra"]),
    values | st.sampled_from(["10.0.0.1", 8000, "vllm-0", {"llm-d.ai/role": "decode"}]),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.builds(lambda entries: yaml.safe_dump({"endpoints": entries}), st.lists(endpoint_entries, max_size=4)),
        st.builds(yaml.safe_dump, values),
        st.text(max_size=64),
    )
)
def test_any_endpoints_file_parses_or_fails_naming_the_entry(text: str) -> None:
    try:
        specs = parse_endpoints(text.encode())
    except EndpointsFileError as e:
        assert str(e).strip()
        return
    assert all(s.address and 0 < s.port < 65536 for s in specs)


objective_docs = st.fixed_dictionaries(
    {},
    optional={
        "apiVersion": st.sampled_from(["llm-d.ai/v1alpha2", "v1"]) | values,
        "kind": st.sampled_from(["InferenceObjective", "InferenceObjectiveList"]) | values,
        "metadata": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["premium", ""]) | values}) | values,
        "spec": st.fixed_dictionaries(
            {}, optional={"priority": st.integers(-(2**40), 2**40) | values, "poolRef": values}
        )
        | values,
        "items": st.lists(values, max_size=2) | values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(objective_docs, max_size=3).map(yaml.safe_dump_all) | st.text(max_size=64))
def test_any_objectives_file_parses_or_fails_naming_the_document(text: str) -> None:
    try:
        objectives = parse_objectives(text)
    except ValueError as e:
        assert str(e).startswith("objectives")
        return
    assert all(o.name and -(2**31) <= o.priority < 2**31 for o in objectives)
