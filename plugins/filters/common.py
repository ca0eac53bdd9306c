"""Helpers shared by the filter and scorer plugins of this catalogue."""

from __future__ import annotations

from collections.abc import Iterable

from llmepp.framework.plugin import Plugin


def set_consumes(plugin: Plugin, keys: Iterable[str]) -> None:
    """Per-instance `consumes`: what a plugin needs can depend on its parameters (e.g. the
    in-flight producer only when an `active-requests` condition is configured), and the loader
    auto-creates a default producer for every consumed key, so declare only what is used."""
    # `consumes` is a ClassVar on Plugin; an instance attribute shadows it for the loader.
    plugin.__dict__["consumes"] = frozenset(keys)
