"""Data-layer extension point: where endpoints come from."""

from __future__ import annotations

from abc import abstractmethod

from llmepp.datalayer.datastore import DiscoveryNotifier
from llmepp.framework.plugin import Plugin


class EndpointDiscovery(Plugin):
    """Feeds the datastore. `run` lives for the process; it calls notifier.mark_synced()
    once the initial set of endpoints is known (readiness waits for it)."""

    @abstractmethod
    async def run(self, notifier: DiscoveryNotifier) -> None: ...
