"""An informer the API server keeps refusing, against the real API server: the failure is logged at
its start and then once per interval while it lasts (before: at the 1st, 10th, 50th, 100th... attempt,
i.e. ~20 minutes apart once the backoff is at its cap, debug-level in between), at ERROR for answers
that retrying cannot fix, with what to check; the recovery is logged; and the counters reach /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from llmepp.k8s import informer as informer_module
from llmepp.k8s.client import KubeClient
from llmepp.k8s.informer import Informer, InformerMetrics, InformerOptions, KubeObject
from llmepp.k8s.models import InferenceObjective, Pod
from llmepp.k8s.resources import INFERENCE_OBJECTIVES, PODS, Resource
from llmepp.k8s.selector import SelectorError, parse_selector

from .cluster import EPP_SERVICE_ACCOUNT, RBAC_NAMESPACE, Cluster
from .harness import endpoints, kube_settings, running_app
from .kubeapi import TestKube, eventually

FAST = InformerOptions(backoff_initial=0.02, backoff_max=0.1)
INTERVAL = 0.5


class Nothing:
    def upsert(self, obj: object) -> None: ...

    def delete(self, obj: object) -> None: ...


@contextlib.asynccontextmanager
async def running_informer(
    kubeconfig: str, resource: Resource, ns: str, kind: type, options: InformerOptions
) -> AsyncIterator[Informer[KubeObject]]:
    client = await KubeClient.connect(kubeconfig)
    inf: Informer[KubeObject] = Informer(client, resource, ns, kind, Nothing(), options)
    task = asyncio.create_task(inf.run())
    try:
        yield inf
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


def failure_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llmepp.k8s.informer" and r.levelno >= logging.WARNING]


async def test_a_selector_the_api_server_refuses_is_an_error_logged_once_per_interval(
    cluster: Cluster, namespace: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--endpoint-selector` is checked at start-up; a selector refused for a reason that check does not know
    (here: one bypassing it) must still say so, loudly and regularly, not once and then at debug level."""
    monkeypatch.setattr(informer_module, "FAILURE_LOG_INTERVAL", INTERVAL)
    selector = "app in (vllm"
    with pytest.raises(SelectorError):
        parse_selector(selector)
    options = InformerOptions(label_selector=selector, backoff_initial=0.02, backoff_max=0.1)
    with caplog.at_level(logging.DEBUG, logger="llmepp.k8s.informer"):
        async with running_informer(str(cluster.kubeconfig), PODS, namespace, Pod, options) as inf:
            await eventually(lambda: len(failure_records(caplog)) >= 4, within=10)
            assert not inf.synced.is_set()
            attempts = inf.stats.errors
    records = failure_records(caplog)
    assert attempts > len(records) + 5, "every attempt logged at warning level: that floods the log"
    assert all(r.levelno == logging.ERROR for r in records), [r.levelname for r in records]
    first = records[0].getMessage()
    assert "list failed" in first and "400" in first and f"labelSelector {selector!r}" in first, first
    assert "in a row over" in records[1].getMessage() and "400" in records[1].getMessage()
    gaps = [b.created - a.created for a, b in itertools.pairwise(records)]
    assert all(INTERVAL * 0.9 <= gap <= INTERVAL * 3 for gap in gaps), gaps


async def test_forbidden_until_rbac_allows_it_then_recovered_and_counted(
    cluster: Cluster, kube: TestKube, namespace: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The EPP's service account before its Role exists: 403 names RBAC; once the Role is applied the
    informer syncs, logs the recovery, and the counters on /metrics say what happened."""
    monkeypatch.setattr(informer_module, "FAILURE_LOG_INTERVAL", INTERVAL)
    metrics = InformerMetrics()
    registry = CollectorRegistry()
    registry.register(metrics)
    options = InformerOptions(backoff_initial=0.02, backoff_max=0.1, metrics=metrics)
    kubeconfig = str(cluster.epp_kubeconfig)
    with caplog.at_level(logging.INFO, logger="llmepp.k8s.informer"):
        async with running_informer(kubeconfig, INFERENCE_OBJECTIVES, namespace, InferenceObjective, options) as inf:
            await eventually(lambda: inf.stats.errors >= 3, within=10)
            text = generate_latest(registry).decode()
            labels = f'namespace="{namespace}",owner="epp",resource="inferenceobjectives.llm-d.ai"'
            assert f"llm_d_epp_kubernetes_informer_synced{{{labels}}} 0.0" in text
            assert f"llm_d_epp_kubernetes_informer_consecutive_errors{{{labels}}} " in text
            assert f"llm_d_epp_kubernetes_informer_consecutive_errors{{{labels}}} 0.0" not in text
            await grant_objectives(kube, namespace)
            await asyncio.wait_for(inf.synced.wait(), 10)
            text = generate_latest(registry).decode()
            errors = inf.stats.errors
    first = failure_records(caplog)[0]
    assert first.levelno == logging.ERROR and "403" in first.getMessage(), first.getMessage()
    assert "RBAC" in first.getMessage() and "list" in first.getMessage()
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1 and f"{errors} failed attempts" in recovered[0], recovered
    assert f"llm_d_epp_kubernetes_informer_errors_total{{{labels}}} {float(errors)}" in text
    assert f"llm_d_epp_kubernetes_informer_lists_total{{{labels}}} 1.0" in text
    assert f"llm_d_epp_kubernetes_informer_consecutive_errors{{{labels}}} 0.0" in text
    assert f"llm_d_epp_kubernetes_informer_synced{{{labels}}} 1.0" in text


async def grant_objectives(kube: TestKube, namespace: str) -> None:
    rules = [{"apiGroups": ["llm-d.ai"], "resources": ["inferenceobjectives"], "verbs": ["get", "list", "watch"]}]
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    await kube.request("POST", f"{rbac}/roles", {"metadata": {"name": "objectives"}, "rules": rules})
    await kube.request("POST", f"{rbac}/rolebindings", {
        "metadata": {"name": "objectives"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "objectives"},
        "subjects": [{"kind": "ServiceAccount", "name": EPP_SERVICE_ACCOUNT, "namespace": RBAC_NAMESPACE}],
    })  # fmt: skip


async def test_the_apps_informers_are_on_its_metrics(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    """Through the app's own registry (what /metrics serves): pool mode's four informers, their lists,
    events and cache sizes."""
    await kube.create_pool(namespace, "llama", {"app": "llama"}, [8000])
    await kube.ready_pod(namespace, "p1", {"app": "llama"}, "10.0.0.1")
    await kube.apply_objective(namespace, "critical", "llama", 3)
    async with running_app(kube_settings(cluster.kubeconfig, namespace)) as app:
        await eventually(lambda: app.datastore.synced and len(endpoints(app.datastore)) == 1, within=15)
        await kube.ready_pod(namespace, "p2", {"app": "llama"}, "10.0.0.2")
        await eventually(lambda: len(endpoints(app.datastore)) == 2, within=10)
        assert app.kube is not None
        await eventually(lambda: all(i.synced.is_set() for i in app.kube.informers), within=10)  # type: ignore[union-attr]
        text = generate_latest(app.metrics.registry).decode()

    def sample(name: str, resource: str) -> float:
        labels = f'namespace="{namespace}",owner="epp",resource="{resource}"'
        prefix = f"llm_d_epp_kubernetes_informer_{name}{{{labels}}} "
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        assert len(lines) == 1, f"{prefix!r} not in:\n{text}"
        return float(lines[0][len(prefix) :])

    pools = "inferencepools.inference.networking.k8s.io"
    for resource in ("pods", pools, "inferenceobjectives.llm-d.ai", "inferencemodelrewrites.llm-d.ai"):
        assert sample("lists_total", resource) == 1 and sample("synced", resource) == 1
        assert sample("errors_total", resource) == 0 and sample("consecutive_errors", resource) == 0
        assert sample("rejected_total", resource) == 0
        assert sample("watches_total", resource) >= 1
    assert sample("objects", "pods") == 2 and sample("objects", pools) == 1
    assert sample("objects", "inferenceobjectives.llm-d.ai") == 1
    assert sample("events_total", "pods") >= 2  # p2 added, then its status (Ready) patched
    assert "# TYPE llm_d_epp_kubernetes_informer_watch_expired_total counter" in text


async def test_a_notification_sources_informer_is_on_the_metrics_too(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    from .test_notifications import selector_settings  # registers the test's recorder plugin

    async with running_app(selector_settings(cluster, namespace)) as app:
        await eventually(app.ready, within=10)
        text = generate_latest(app.metrics.registry).decode()
    synced = f'llm_d_epp_kubernetes_informer_synced{{namespace="{namespace}",owner=%s}} 1.0'
    assert synced % '"hints",resource="configmaps"' in text and synced % '"epp",resource="pods"' in text
