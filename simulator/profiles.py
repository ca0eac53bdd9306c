"""Named latency profiles (``--latency-profile NAME``), shipped as YAML in ``profiles/``.

A profile is a set of pod-config defaults (latencies, plus the deployment's batch size, context length and
KV capacity) for one model/GPU shape. Precedence: built-in defaults < profile < YAML config < CLI flags <
per-pod entries. Metadata keys (``description``, ``reference``, ``targets``) document where the figures come
from and what a fidelity check should compare against; they are not config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmepp_sim.config import normalize_keys

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
METADATA_KEYS = ("description", "reference", "targets")


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _read(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"unknown latency profile {name_or_path!r}; shipped: {list_profiles()}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"latency profile {path} must be a mapping")
    return data


def load_profile(name_or_path: str) -> dict[str, Any]:
    """Pod-config values of a profile (name of a shipped profile, or a path to a YAML file)."""
    data = _read(name_or_path)
    return normalize_keys({k: v for k, v in data.items() if k not in METADATA_KEYS})


def profile_targets(name_or_path: str) -> dict[str, Any]:
    """The public reference figures a profile claims to model (for fidelity checks)."""
    targets = _read(name_or_path).get("targets") or {}
    return dict(targets)
