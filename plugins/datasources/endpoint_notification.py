"""`endpoint-notification-source`: endpoint add/remove notifications for data-layer extractors.

What: a data-layer source with no polling. It listens to the datastore and forwards every endpoint
addition and removal, in order, to the extractors attached to it. Why: plugins that keep per-endpoint
machinery — the `precise-prefix-cache-producer` runs one KV-event subscriber per pod — must start and
stop it as pods come and go; the reference wires that through this source:

    plugins:
    - type: endpoint-notification-source
    - type: precise-prefix-cache-producer
    dataLayer:
      sources:
      - pluginRef: endpoint-notification-source
        extractors: [{pluginRef: precise-prefix-cache-producer}]

How extractors attach here: an extractor plugin calls `source.attach(self)` in its setup (the precise
producer attaches to the first notification source of the config, and listens to the datastore
directly when the config has none, so a config without the source works too). `attach` replays the
endpoints already known, so setup order does not matter. The `dataLayer.sources` entry is accepted
as written; this build does not need it to route notifications.

Parameters: none.
"""

from __future__ import annotations

from typing import Any, Protocol

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.plugin import Plugin, PluginContext


class EndpointExtractor(Protocol):
    def endpoint_added(self, endpoint: Endpoint) -> None: ...

    def endpoint_removed(self, endpoint: Endpoint) -> None: ...


class EndpointNotificationSource(Plugin):
    type = "endpoint-notification-source"

    def __init__(self, name: str = "", params: Any = None) -> None:
        super().__init__(name, params)
        self._extractors: list[EndpointExtractor] = []
        self._endpoints: dict[int, Endpoint] = {}
        self._listening = False

    def setup(self, ctx: PluginContext) -> None:
        if ctx.datastore is not None and not self._listening:
            self._listening = True
            ctx.datastore.add_listener(self)

    def attach(self, extractor: EndpointExtractor) -> None:
        if any(x is extractor for x in self._extractors):
            return
        self._extractors.append(extractor)
        for ep in self._endpoints.values():
            extractor.endpoint_added(ep)

    # -- DatastoreListener ---------------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        self._endpoints[id(endpoint)] = endpoint
        for x in self._extractors:
            x.endpoint_added(endpoint)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self._endpoints.pop(id(endpoint), None)
        for x in self._extractors:
            x.endpoint_removed(endpoint)
