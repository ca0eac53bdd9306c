"""`k8s-notification-source` against the real API server: ConfigMaps and a custom resource created,
changed and deleted arrive at the extractors in order, across watch timeouts and a 410 relist; a
kind that does not exist stops start-up naming it; a failing extractor stops nothing; the App wires
extractors from `dataLayer.sources`, waits for the initial list to be ready, and refuses the source
in file-discovery mode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from helpers import FILE_CONFIG

from llmepp.app import App
from llmepp.framework.datalayer import (
    GroupVersionKind,
    NotificationEvent,
    NotificationExtractor,
    NotificationSource,
)
from llmepp.framework.plugin import ConfigError, registry
from llmepp.k8s.client import KubeClient
from llmepp.k8s.informer import InformerOptions
from llmepp.k8s.notifications import ClusterResource, resolve_kind
from llmepp.plugins.datasources.k8s_notification import K8sNotificationSource
from llmepp.settings import Settings

from .cluster import Cluster
from .harness import kube_settings, running_app
from .kubeapi import ApiError, TestKube, eventually
from .proxy import CuttableProxy
from .test_discovery import eventually_compacted

CONFIGMAP = GroupVersionKind("", "v1", "ConfigMap")
FAST = InformerOptions(backoff_initial=0.1, backoff_max=1.0)


class Recorder(NotificationExtractor):
    """Records (type, name, data) of every event; `fail_on` names objects it raises on."""

    type = "test-notification-recorder"

    def __init__(self, name: str = "", params: Any = None) -> None:
        super().__init__(name, params)
        self.events: list[tuple[str, str, Any]] = []
        self.labels: dict[str, dict[str, str]] = {}
        self.fail_on: set[str] = set()

    def extract_notification(self, event: NotificationEvent) -> None:
        content = event.object.get("data", event.object.get("spec"))
        self.events.append((event.type.value, event.name, dict(content) if content is not None else None))
        self.labels[event.name] = dict(event.metadata.get("labels") or {})
        if event.name in self.fail_on:
            raise RuntimeError(f"cannot handle {event.name}")
        if isinstance(event.object.get("data"), dict):
            event.object["data"]["scribbled"] = "by the recorder"  # its own copy: nobody else sees this


class AsyncRecorder(Recorder):
    type = "test-async-notification-recorder"

    async def extract_notification(self, event: NotificationEvent) -> None:  # type: ignore[override]
        await asyncio.sleep(0.001)
        super().extract_notification(event)


registry.register(Recorder)
registry.register(AsyncRecorder)


def source(kind: GroupVersionKind = CONFIGMAP, name: str = "watch") -> K8sNotificationSource:
    params = {"group": kind.group, "version": kind.version, "kind": kind.kind}
    plugin = registry.build("k8s-notification-source", name, params)
    assert isinstance(plugin, K8sNotificationSource)
    return plugin


@contextlib.asynccontextmanager
async def watching(
    kubeconfig: str, namespace: str, src: K8sNotificationSource, options: InformerOptions = FAST
) -> AsyncIterator[K8sNotificationSource]:
    client = await KubeClient.connect(kubeconfig)
    try:
        await src.start(client, namespace, options)
        yield src
    finally:
        await src.aclose()
        await client.aclose()


async def put_configmap(kube: TestKube, ns: str, name: str, data: dict[str, str]) -> None:
    path = f"/api/v1/namespaces/{ns}/configmaps"
    try:
        await kube.request("POST", path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                                          "data": data})  # fmt: skip
    except ApiError as e:
        if e.status != 409:
            raise
        await kube.merge_patch(f"{path}/{name}", {"data": data})


async def delete_configmap(kube: TestKube, ns: str, name: str) -> None:
    await kube.request("DELETE", f"/api/v1/namespaces/{ns}/configmaps/{name}")


async def test_configmap_events_arrive_in_order(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    ns = namespace
    await put_configmap(kube, ns, "before", {"k": "0"})
    src = source()
    first, second = Recorder("first"), AsyncRecorder("second")
    src.attach(first)
    src.attach(second)
    async with watching(str(cluster.kubeconfig), ns, src):
        await eventually(src.ready, within=10)
        assert first.events == [("add", "before", {"k": "0"})]  # the initial list, before ready
        await put_configmap(kube, ns, "hints", {"k": "1"})
        await put_configmap(kube, ns, "hints", {"k": "2"})
        await delete_configmap(kube, ns, "hints")
        await put_configmap(kube, ns, "before", {"k": "3"})
        expected = [
            ("add", "before", {"k": "0"}),
            ("add", "hints", {"k": "1"}),
            ("update", "hints", {"k": "2"}),
            ("delete", "hints", {"k": "2"}),
            ("update", "before", {"k": "3"}),
        ]
        await eventually(lambda: len(second.events) >= len(expected), within=10)
        assert first.events == expected and second.events == expected  # each saw its own, unscribbled copy
        assert src.stats.events == {"add": 2, "update": 2, "delete": 1} and not src.stats.errors


async def test_events_keep_coming_across_watch_timeouts(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    """The server ends every watch after 2-4 s (timeoutSeconds); the source watches again from where it
    was, without a relist and without losing or repeating an event."""
    src = source()
    rec = Recorder("rec")
    src.attach(rec)
    async with watching(str(cluster.kubeconfig), namespace, src, InformerOptions(watch_timeout=2)):
        await eventually(src.ready, within=10)
        for i in range(3):
            await put_configmap(kube, namespace, "c", {"i": str(i)})
            assert src.watch is not None and src.watch.informer is not None
            informer = src.watch.informer
            watches = informer.stats.watches
            await eventually(cast(Callable[[], bool], lambda i=informer, w=watches: i.stats.watches > w), within=15)
        await put_configmap(kube, namespace, "c", {"i": "last"})
        await eventually(lambda: len(rec.events) == 4, within=10)
        assert [e[2]["i"] for e in rec.events] == ["0", "1", "2", "last"]
        assert [e[0] for e in rec.events] == ["add", "update", "update", "update"]
        assert informer.stats.lists == 1 and informer.stats.gone == 0


async def test_a_410_relists_and_reports_only_the_difference(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    """The link breaks; meanwhile pods change and etcd compacts (the test server serves pods without a
    watch cache and compacts every 2 s), so the resumed watch is answered 410 Gone: the source relists
    and tells its extractor only what changed, as DELETE / ADD / UPDATE, then watches on."""
    ns = namespace
    labels = {"app": "other"}
    for name in ("stays", "changes", "goes"):
        await kube.create_pod(ns, name, labels)
    proxy = CuttableProxy(cluster.api_port)
    await proxy.start()
    kubeconfig = cluster.write_kubeconfig(
        cluster.workdir / f"proxy-{ns}.kubeconfig", "admin-token", server=f"https://127.0.0.1:{proxy.port}"
    )
    src = source(GroupVersionKind("", "v1", "Pod"))
    rec = Recorder("rec")
    src.attach(rec)
    try:
        async with watching(str(kubeconfig), ns, src):
            await eventually(src.ready, within=10)
            assert sorted(e[:2] for e in rec.events) == [("add", "changes"), ("add", "goes"), ("add", "stays")]
            rec.events.clear()
            assert src.watch is not None and src.watch.informer is not None
            informer = src.watch.informer

            proxy.cut()
            last_seen = informer.resource_version
            await kube.label_pod(ns, "changes", {"edited": "yes"})
            await kube.delete_pod(ns, "goes")
            await kube.create_pod(ns, "new", labels)
            for i in range(20):  # more history for the compactor to drop
                await kube.label_pod(ns, "changes", {"churn": str(i)})
            await eventually_compacted(kube, ns, last_seen)
            assert rec.events == []  # cut off

            proxy.restore()
            await eventually(lambda: len(rec.events) == 3, within=15)
            assert informer.stats.gone >= 1, "no 410: the test proves nothing"
            assert rec.events[0][:2] == ("delete", "goes")  # vanished objects first
            assert sorted(e[:2] for e in rec.events[1:]) == [("add", "new"), ("update", "changes")]
            assert rec.labels["changes"] == {"app": "other", "edited": "yes", "churn": "19"}
            await kube.label_pod(ns, "stays", {"after": "relist"})
            await eventually(lambda: rec.labels["stays"].get("after") == "relist", within=10)
            assert rec.events[-1][:2] == ("update", "stays") and len(rec.events) == 4
    finally:
        await proxy.aclose()


async def test_a_custom_resource_is_watched_too(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    gvk = GroupVersionKind("llm-d.ai", "v1alpha2", "InferenceObjective")
    src = source(gvk)
    rec = Recorder("rec")
    src.attach(rec)
    async with watching(str(cluster.kubeconfig), namespace, src):
        await eventually(src.ready, within=10)
        assert src.watch is not None and src.watch.resource is not None
        assert src.watch.resource.plural == "inferenceobjectives"
        await kube.apply_objective(namespace, "gold", "pool", 5)
        await kube.apply_objective(namespace, "gold", "pool", 9)
        await kube.delete_llmd(namespace, "inferenceobjectives", "gold")
        await eventually(lambda: len(rec.events) == 3, within=10)
        assert [(t, n, s["priority"]) for t, n, s in rec.events] == [
            ("add", "gold", 5), ("update", "gold", 9), ("delete", "gold", 9)
        ]  # fmt: skip


async def test_discovery_resolves_plural_and_scope(cluster: Cluster) -> None:
    client = await KubeClient.connect(str(cluster.kubeconfig))
    try:
        cm = await resolve_kind(client, CONFIGMAP)
        assert (cm.plural, cm.collection("ns")) == ("configmaps", "/api/v1/namespaces/ns/configmaps")
        nodes = await resolve_kind(client, GroupVersionKind("", "v1", "Node"))
        assert isinstance(nodes, ClusterResource) and nodes.collection("ns") == "/api/v1/nodes"
        deploy = await resolve_kind(client, GroupVersionKind("apps", "v1", "Deployment"))
        assert deploy.collection("ns") == "/apis/apps/v1/namespaces/ns/deployments"
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            GroupVersionKind("", "v1", "ConfigMapz"),
            r"kind 'ConfigMapz' \(/v1, Kind=ConfigMapz\) does not exist: v1 has",
        ),
        (GroupVersionKind("", "v1", "configmap"), r"did you mean 'ConfigMap'\?"),
        (GroupVersionKind("example.com", "v1", "Widget"), r"example\.com/v1, Kind=Widget\) does not exist: the API"),
        (GroupVersionKind("", "v1", "Binding"), r"cannot be watched: no list / watch verb"),
    ],
)
async def test_a_kind_that_does_not_exist_stops_start_up_naming_it(
    cluster: Cluster, namespace: str, kind: GroupVersionKind, message: str
) -> None:
    src = source(kind, name="hints")
    client = await KubeClient.connect(str(cluster.kubeconfig))
    try:
        with pytest.raises(ConfigError, match=r"plugin 'hints' \(type k8s-notification-source\): .*" + message):
            await src.start(client, namespace, FAST)
        assert not src.ready()
    finally:
        await src.aclose()
        await client.aclose()


@pytest.mark.parametrize("kind", ["ConfigMap", "RoutingHint"])
async def test_an_api_server_away_at_start_up_is_asked_again_in_the_background(
    cluster: Cluster, kube: TestKube, namespace: str, kind: str
) -> None:
    """Unreachable at start: no start-up error, not ready; once it answers, an existing kind is watched
    (ready) and a missing one keeps the source unready, the reason naming the GVK."""
    await put_configmap(kube, namespace, "existing", {"x": "1"})
    proxy = CuttableProxy(cluster.api_port)
    await proxy.start()
    proxy.cut()
    kubeconfig = cluster.write_kubeconfig(
        cluster.workdir / f"proxy-{namespace}.kubeconfig", "admin-token", server=f"https://127.0.0.1:{proxy.port}"
    )
    src = source(GroupVersionKind("", "v1", kind))
    rec = Recorder("rec")
    src.attach(rec)
    try:
        async with watching(str(kubeconfig), namespace, src):
            assert src.watch is not None and "API discovery of /v1, Kind=" in src.watch.error
            await asyncio.sleep(0.3)
            assert not src.ready()
            proxy.restore()
            if kind == "ConfigMap":
                await eventually(src.ready, within=10)
                assert rec.events == [("add", "existing", {"x": "1"})] and src.watch.error == ""
            else:
                await eventually(lambda: "does not exist" in src.watch.error, within=10)  # type: ignore[union-attr]
                assert "kind 'RoutingHint' (/v1, Kind=RoutingHint)" in src.watch.error and not src.ready()
    finally:
        await proxy.aclose()


async def test_a_failing_extractor_is_logged_and_counted_and_the_watch_goes_on(
    cluster: Cluster, kube: TestKube, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    src = source()
    bad, good = Recorder("bad"), Recorder("good")
    bad.fail_on = {"poison"}
    src.attach(bad)
    src.attach(good)
    async with watching(str(cluster.kubeconfig), namespace, src):
        await eventually(src.ready, within=10)
        with caplog.at_level(logging.ERROR, logger="llmepp.k8s.notifications"):
            await put_configmap(kube, namespace, "poison", {"a": "1"})
            await put_configmap(kube, namespace, "fine", {"a": "1"})
            await eventually(lambda: len(bad.events) == 2 and len(good.events) == 2, within=10)
        assert [e[1] for e in good.events] == ["poison", "fine"]
        assert src.stats.errors == {"bad": 1}
        assert "extractor bad failed on add of poison" in caplog.text


# -- in the App ------------------------------------------------------------------------------------
APP_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: k8s-notification-source
  name: hints
  parameters: {group: "", version: v1, kind: %s}
- type: test-notification-recorder
  name: recorder
- type: queue-scorer
dataLayer:
  sources:
  - pluginRef: hints
    extractors: [{pluginRef: recorder}]
"""


def selector_settings(cluster: Cluster, ns: str, kind: str = "ConfigMap") -> Settings:
    return kube_settings(
        cluster.kubeconfig, ns, pool=None, endpoint_selector="app=vllm", endpoint_target_ports=(8000,),
        config_text=APP_CONFIG % kind,
    )  # fmt: skip


async def test_the_app_wires_extractors_and_is_ready_after_the_initial_list(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    await put_configmap(kube, namespace, "existing", {"x": "1"})
    async with running_app(selector_settings(cluster, namespace)) as app:
        recorder = app.components.plugins["recorder"]
        assert isinstance(recorder, Recorder)
        await eventually(app.ready, within=10)
        assert recorder.events == [("add", "existing", {"x": "1"})]
        await put_configmap(kube, namespace, "existing", {"x": "2"})
        await eventually(lambda: len(recorder.events) == 2, within=10)
        sources = app.notification_sources
        assert len(sources) == 1 and isinstance(sources[0], NotificationSource)
    assert sources[0].ready() is False  # stopped with the app


async def test_the_app_refuses_to_start_with_a_kind_that_does_not_exist(cluster: Cluster, namespace: str) -> None:
    app = App(selector_settings(cluster, namespace, kind="RoutingHint"))
    try:
        with pytest.raises(ConfigError, match=r"plugin 'hints' .*kind 'RoutingHint' \(/v1, Kind=RoutingHint\)"):
            await app.start()
    finally:
        await app.shutdown()


def test_file_discovery_mode_refuses_the_source_naming_it() -> None:
    plugin = "- type: k8s-notification-source\n  name: hints\n  parameters: {version: v1, kind: Pod}\n"
    config = FILE_CONFIG.replace("- type: queue-scorer\n", "- type: queue-scorer\n" + plugin)
    assert "k8s-notification-source" in config
    with pytest.raises(ConfigError, match=r"plugin 'hints' \(type k8s-notification-source\): watches the Kubernetes"):
        App(Settings(config_text=config))


def test_an_extractor_of_another_kind_or_type_is_refused() -> None:
    src = source()

    class PodsOnly(Recorder):
        type = "test-pods-only"
        gvk = GroupVersionKind("", "v1", "Pod")

    with pytest.raises(ConfigError, match=r"handles /v1, Kind=Pod, but source 'watch' .* watches /v1, Kind=ConfigMap"):
        src.attach(PodsOnly("pods"))
    config = (APP_CONFIG % "ConfigMap").replace(
        "extractors: [{pluginRef: recorder}]", "extractors: [{pluginRef: queue-scorer}]"
    )
    with pytest.raises(ConfigError, match=r"dataLayer.sources\[0\]: plugin 'queue-scorer' .* is not a notification"):
        App(Settings(endpoint_selector="app=v", endpoint_target_ports=(8000,), config_text=config))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"version": "v1"}, r"version and kind are required"),
        ({"kind": "Pod"}, r"version and kind are required"),
        (None, r"version and kind are required"),
        ({"version": "v1", "kind": "Pod", "namespace": "x"}, r"Object contains unknown field `namespace`"),
    ],
)
def test_bad_parameters_name_the_field(params: dict[str, str] | None, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"plugin 'w' \(type k8s-notification-source\): parameters: " + expected):
        registry.build("k8s-notification-source", "w", params)


def test_a_scrape_survives_a_first_extractor_error_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    # /metrics renders in a worker thread while the event loop counts events: an extractor failing for the
    # first time between two steps of the scrape must not fail it ("dictionary changed size": a 500).
    from prometheus_client.core import CounterMetricFamily

    from llmepp.plugins.datasources.k8s_notification import _NotificationCollector

    src = source()
    src.stats.errors["first"] = 1
    add_metric = CounterMetricFamily.add_metric

    def add_metric_while_the_loop_runs(self: CounterMetricFamily, labels: Any, value: float) -> None:
        src.stats.errors.setdefault(f"other-{len(src.stats.errors)}", 1)  # what the event loop may do
        add_metric(self, labels, value)

    monkeypatch.setattr(CounterMetricFamily, "add_metric", add_metric_while_the_loop_runs)
    families = {m.name: m for m in _NotificationCollector([src]).collect()}
    assert families["llm_d_epp_notification_extractor_errors"].samples
