"""Runs llmepp's Kubernetes discovery against the test cluster and reads what it produced."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from llmepp.app import App
from llmepp.datalayer.datastore import Datastore
from llmepp.k8s.client import KubeClient
from llmepp.k8s.discovery import DiscoveryTarget, KubernetesDiscovery
from llmepp.k8s.informer import InformerOptions
from llmepp.settings import Settings

# Reconnect fast in tests (production: up to 30 s between attempts).
TEST_INFORMER = InformerOptions(backoff_initial=0.1, backoff_max=1.0)

# featureGates haPopulateNonLeaderDatastore=false: only the leader watches and holds endpoints.
LEADER_ONLY_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: ["haPopulateNonLeaderDatastore=false"]
plugins:
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
"""


@contextlib.asynccontextmanager
async def running_discovery(
    kubeconfig: Path, target: DiscoveryTarget, options: InformerOptions = TEST_INFORMER
) -> AsyncIterator[tuple[Datastore, KubernetesDiscovery]]:
    client = await KubeClient.connect(str(kubeconfig))
    datastore = Datastore(target.pool_name or "epp", target.namespace)
    discovery = KubernetesDiscovery(client, target, options)
    task = asyncio.create_task(discovery.run(datastore))
    try:
        yield datastore, discovery
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


def endpoints(datastore: Datastore) -> dict[str, str]:
    """endpoint name → ip:port"""
    return {ep.name: ep.hostport for ep in datastore.endpoints}


def kube_settings(kubeconfig: Path, namespace: str, pool: str | None = "llama", **overrides: object) -> Settings:
    """Settings of an EPP in Kubernetes mode on free loopback ports (default config, no file discovery)."""
    values: dict[str, object] = {
        "grpc_port": 0,
        "grpc_health_port": 0,
        "metrics_port": 0,
        "bind_address": "127.0.0.1",
        "kubeconfig": str(kubeconfig),
        "pool_namespace": namespace,
        "drain_timeout": 0.2,
    }
    if pool is not None:
        values.update(pool_name=pool, pool_name_set=True)
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[App]:
    app = App(settings)
    assert app.kube is not None, "not in Kubernetes mode"
    app.kube.options = replace(app.kube.options, informer=TEST_INFORMER)
    await app.start()
    try:
        yield app
    finally:
        await app.shutdown()
