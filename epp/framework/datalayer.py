"""Data-layer extension points: where endpoints come from, and what extractors attach to them."""

from __future__ import annotations

import enum
from abc import abstractmethod
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from llmepp.datalayer.datastore import DiscoveryNotifier
from llmepp.framework.datakeys import scoped
from llmepp.framework.plugin import ConfigError, Plugin

if TYPE_CHECKING:
    from llmepp.k8s.client import KubeClient
    from llmepp.k8s.informer import InformerOptions


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


# -- notifications: events about Kubernetes objects ------------------------------------------------
@dataclass(frozen=True, slots=True)
class GroupVersionKind:
    """A Kubernetes kind: `group` "" is the core group (ConfigMap, Pod, ...)."""

    group: str
    version: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def __str__(self) -> str:  # as Go's schema.GroupVersionKind prints: "apps/v1, Kind=Deployment"
        return f"{self.group}/{self.version}, Kind={self.kind}"


class NotificationEventType(enum.Enum):
    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """One change of one watched object, as the API server reported it.

    `object` is the whole object as JSON (its last state for DELETE); `old` is the state before an
    UPDATE (None otherwise). Each extractor gets its own copy: changing it affects nobody else.
    """

    type: NotificationEventType
    gvk: GroupVersionKind
    object: Mapping[str, Any]
    old: Mapping[str, Any] | None = None

    @property
    def metadata(self) -> Mapping[str, Any]:
        meta = self.object.get("metadata")
        return meta if isinstance(meta, Mapping) else {}

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))

    @property
    def resource_version(self) -> str:
        return str(self.metadata.get("resourceVersion", ""))


class NotificationExtractor(Plugin):
    """Reacts to changes of Kubernetes objects of one kind, delivered by the notification source it is
    wired to (`dataLayer.sources[].extractors`), e.g. a ConfigMap holding routing hints or a custom
    resource:

        plugins:
        - type: k8s-notification-source
          name: hints
          parameters: {group: "", version: v1, kind: ConfigMap}
        - type: my-hints-extractor
        dataLayer:
          sources:
          - pluginRef: hints
            extractors: [{pluginRef: my-hints-extractor}]

    `extract_notification` is called once per event, in the order the API server reported them:
    first an ADD for every existing object (readiness waits for these), then ADD / UPDATE / DELETE as
    objects change; after a lost watch the source relists and reports only the difference. It runs on
    the event loop but never on a request's path; it may be `async def` (the next event waits for it).
    An exception is logged and counted (`llm_d_epp_notification_extractor_errors_total`); the watch
    goes on. Set `gvk` to the one kind you understand: a source of another kind refuses you at start-up.
    """

    gvk: GroupVersionKind | None = None  # None: any kind

    @abstractmethod
    def extract_notification(self, event: NotificationEvent) -> Awaitable[None] | None: ...


class NotificationSource(Plugin):
    """A data-layer source pushing events about the objects of one kind to its extractors. It watches
    the Kubernetes API, so the app starts it in Kubernetes mode only (file discovery refuses it)."""

    gvk: GroupVersionKind

    def __init__(self, name: str, params: Any = None) -> None:
        super().__init__(name, params)
        self.extractors: list[NotificationExtractor] = []

    def attach(self, extractor: NotificationExtractor) -> None:
        """Wire an extractor (the app does, from `dataLayer.sources`); ConfigError on a kind mismatch."""
        if extractor.gvk is not None and extractor.gvk != self.gvk:
            raise ConfigError(
                f"plugin {extractor.name!r} (type {extractor.type}) handles {extractor.gvk}, but source "
                f"{self.name!r} (type {self.type}) watches {self.gvk}"
            )
        if all(x is not extractor for x in self.extractors):
            self.extractors.append(extractor)

    @abstractmethod
    async def start(self, client: KubeClient, namespace: str, options: InformerOptions) -> None:
        """Begin watching (`namespace`: the EPP's). Raises ConfigError when the kind does not exist."""

    @abstractmethod
    def ready(self) -> bool:
        """True once the initial list has reached every extractor."""
