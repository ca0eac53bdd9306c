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

NAMED = ("random", "load-only", "prefix-only", "default", "optimized-baseline")


def policy_config(name: str) -> str:
    """The config YAML of a named policy, or of the file at ``name``."""
    if name == "default":
        return DEFAULT_CONFIG
    if name in NAMED:
        return (_CONFIGS / f"{name}.yaml").read_text()
    path = Path(name)
    if path.is_file():
        return path.read_text()
    raise ValueError(f"unknown policy {name!r}: one of {', '.join(NAMED)} or a config file path")
