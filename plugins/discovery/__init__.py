"""Endpoint discovery plugins: where the pool's endpoints come from."""

from __future__ import annotations

from llmepp.framework.plugin import Plugin
from llmepp.plugins.discovery.file import FileDiscovery
from llmepp.plugins.discovery.multicluster import MulticlusterFileDiscovery

PLUGINS: list[type[Plugin]] = [FileDiscovery, MulticlusterFileDiscovery]

__all__ = ["PLUGINS", "FileDiscovery", "MulticlusterFileDiscovery"]
