"""Built-in plugins. Each subpackage lists its plugin classes in `PLUGINS`.

They are registered through the `epp.plugins` entry point (see pyproject.toml), the same
way an out-of-tree package registers its own.
"""

from __future__ import annotations

from llmepp.framework.plugin import Plugin, PluginRegistry


def builtin_plugins() -> list[type[Plugin]]:
    from llmepp.plugins import (
        admitters,
        datasources,
        discovery,
        filters,
        flowcontrol,
        parsers,
        pickers,
        producers,
        profile_handlers,
        reporters,
        responders,
        scorers,
        screeners,
    )

    return [
        *filters.PLUGINS,
        *scorers.PLUGINS,
        *pickers.PLUGINS,
        *profile_handlers.PLUGINS,
        *producers.PLUGINS,
        *discovery.PLUGINS,
        *datasources.PLUGINS,
        *flowcontrol.PLUGINS,
        *parsers.PLUGINS,
        *admitters.PLUGINS,
        *responders.PLUGINS,
        *reporters.PLUGINS,
        *screeners.PLUGINS,
    ]


def register_builtins(registry: PluginRegistry) -> None:
    for cls in builtin_plugins():
        registry.register(cls)
