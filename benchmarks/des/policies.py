"""Named routing policies (EndpointPickerConfig YAML) the DES and its validation run.

``default`` is the EPP's built-in config, ``optimized-baseline`` the reference's benchmark profile
(``benchmarks/configs/optimized-baseline.yaml``); ``random`` and ``load-only`` are the cache-blind
contenders of the llm-d "KV-cache wins" comparison; ``prefix-only`` scores on the approximate prefix index
alone. Anything else is read as a path to a config file.
"""

from __future__ import annotations

from pathlib import Path

from llmepp.config.schema import DEFAULT_CONFIG

_CONFIGS = Path(__file__).resolve().parent.parent / "configs"

RANDOM = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""

LOAD_ONLY = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
"""

PREFIX_ONLY = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 1}
"""

NAMED = ("random", "load-only", "prefix-only", "default", "optimized-baseline")


def policy_config(name: str) -> str:
    """The config YAML of a named policy, or of the file at ``name``."""
    if name == "default":
        return DEFAULT_CONFIG
    if name == "random":
        return RANDOM
    if name == "load-only":
        return LOAD_ONLY
    if name == "prefix-only":
        return PREFIX_ONLY
    if name == "optimized-baseline":
        return (_CONFIGS / "optimized-baseline.yaml").read_text()
    path = Path(name)
    if path.is_file():
        return path.read_text()
    raise ValueError(f"unknown policy {name!r}: one of {', '.join(NAMED)} or a config file path")
