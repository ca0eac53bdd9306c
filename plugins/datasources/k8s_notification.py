"""`k8s-notification-source`: changes of Kubernetes objects of one kind, pushed to extractors.

What: a data-layer source with no polling. It watches every object of one kind (`group`, `version`,
`kind`; group "" is the core group) in the EPP's namespace (`--pool-namespace`; cluster-scoped
kinds cluster-wide) and delivers each ADD / UPDATE / DELETE, in order, to the notification
extractors wired to it, so a plugin can react to a ConfigMap or a custom resource:

    plugins:
    - type: k8s-notification-source
      name: routing-hints
      parameters: {group: "", version: v1, kind: ConfigMap}
    - type: my-hints-extractor            # a NotificationExtractor (llmepp.framework.datalayer)
    dataLayer:
      sources:
      - pluginRef: routing-hints
        extractors: [{pluginRef: my-hints-extractor}]

How: at start-up the kind is resolved to its resource (plural) by API discovery; a kind the API
server does not serve stops start-up with an error naming the GVK (an API server that cannot be
reached yet is asked again in the background, and the EPP stays unready, the reason logged, until
the kind resolves). Then list, and watch from the list's resourceVersion with bookmarks; a watch
the server ends is resumed, 410 Gone relists (extractors hear only the difference: ADD for new
objects, UPDATE for changed ones, DELETE for vanished ones), connection errors reconnect with
jittered exponential backoff (`llmepp.k8s.informer`). Readiness waits until the initial list has
reached every extractor. Events are delivered by one task per source, never on a request's path;
an extractor's exception is logged and counted, and the watch goes on.

Metrics: `llm_d_epp_notification_events_total{source, type}` (add / update / delete) and
`llm_d_epp_notification_extractor_errors_total{source, extractor}`.

Kubernetes mode only (`--pool-name` / `--endpoint-selector`): with `dataLayer.discovery` (file
discovery) there is no API server to watch and start-up refuses the plugin. The EPP's service
account needs `list` and `watch` on the resource (a Role in its namespace; a ClusterRole for a
cluster-scoped kind).

Parameters: `group` (""), `version` (required), `kind` (required, as the API spells it: `ConfigMap`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from llmepp.framework.datalayer import GroupVersionKind, NotificationSource
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams
from llmepp.k8s.client import KubeClient
from llmepp.k8s.informer import InformerOptions
from llmepp.k8s.notifications import KindNotFound, NotificationStats, NotificationWatch
from llmepp.observability.metrics import PREFIX


class K8sNotificationSource(NotificationSource):
    type = "k8s-notification-source"

    class Params(PluginParams):
        group: str = ""
        version: str = ""
        kind: str = ""

        def __post_init__(self) -> None:
            if not self.version.strip() or not self.kind.strip():
                raise ValueError('version and kind are required (group "" is the core group)')

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        if params is None:
            raise ConfigError("parameters: group, version and kind are required")
        super().__init__(name, params)
        self.gvk = GroupVersionKind(params.group.strip(), params.version.strip(), params.kind.strip())
        self.stats = NotificationStats()
        self.watch: NotificationWatch | None = None

    def setup(self, ctx: PluginContext) -> None:
        registry = getattr(ctx.metrics, "registry", None)
        sources = ctx.plugins_of(K8sNotificationSource)
        # One collector per registry, reporting every source (two would collide on the metric names).
        if registry is not None and sources and sources[0] is self:
            registry.register(_NotificationCollector(sources))

    async def start(self, client: KubeClient, namespace: str, options: InformerOptions) -> None:
        if self.watch is not None:
            return
        watch = NotificationWatch(self.name, self.gvk, self.extractors, client, namespace, options, self.stats)
        try:
            await watch.start()
        except KindNotFound as e:
            raise ConfigError(f"plugin {self.name!r} (type {self.type}): {e}") from None
        self.watch = watch

    def ready(self) -> bool:
        return self.watch is not None and self.watch.ready

    async def aclose(self) -> None:
        watch, self.watch = self.watch, None
        if watch is not None:
            await watch.aclose()


class _NotificationCollector(Collector):
    def __init__(self, sources: list[K8sNotificationSource]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[CounterMetricFamily]:
        events = CounterMetricFamily(
            PREFIX + "notification_events",
            "Kubernetes object events delivered to extractors.",
            labels=["source", "type"],
        )
        errors = CounterMetricFamily(
            PREFIX + "notification_extractor_errors",
            "Exceptions raised by notification extractors.",
            labels=["source", "extractor"],
        )
        for src in self.sources:  # copies: /metrics renders in a worker thread while the event loop counts
            for kind, n in list(src.stats.events.items()):
                events.add_metric([src.name, kind], n)
            for extractor, n in list(src.stats.errors.items()):
                errors.add_metric([src.name, extractor], n)
        yield events
        yield errors
