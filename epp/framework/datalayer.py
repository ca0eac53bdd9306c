"""Data-layer extension points: where endpoints come from, and what extractors attach to them."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from llmepp.datalayer.datastore import DiscoveryNotifier
from llmepp.framework.datakeys import scoped
from llmepp.framework.plugin import Plugin


class EndpointDiscovery(Plugin):
    """Feeds the datastore. `run` lives for the process; it calls notifier.mark_synced()
    once the initial set of endpoints is known (readiness waits for it)."""

    @abstractmethod
    async def run(self, notifier: DiscoveryNotifier) -> None: ...


class AttributeExtractor(Plugin):
    """A data-layer extractor that attaches values to endpoints (`endpoint.attributes`), not to
    requests: the DCGM extractor's GPU utilisation, the topology extractor's locality.

    `endpoint_attributes` names what it attaches; each value lives under `attribute_key(name)` — the name
    scoped by this instance's name, so two instances of one extractor type never overwrite each
    other. `endpoint-attribute-filter` / `-scorer` read scalar ones (by `attribute`, optionally
    `producer` = this plugin's name).
    """

    endpoint_attributes: ClassVar[frozenset[str]] = frozenset()

    def attribute_key(self, attribute: str) -> str:
        return scoped(attribute, self.name)
