"""Endpoint discovery plugins: where the pool's endpoints come from."""

from __future__ import annotations

from llmepp.framework.plugin import Plugin
from llmepp.plugins.discovery.file import FileDiscovery

PLUGINS: list[type[Plugin]] = [FileDiscovery]

__all__ = ["PLUGINS", "FileDiscovery"]
