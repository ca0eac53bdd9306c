"""Pool membership: which pods, on which ports, are the pool's endpoints (reference §4.1).

A pod contributes endpoints when the pool selects it (its labels match the pool's
`matchLabels`), it is Ready (PodReady=True, not terminating) and it has an IP. It then
contributes one endpoint per pool target port, named `<pod>-rank-<idx>` where idx is the
port's position in `targetPorts` (data-parallel ranks). The pod annotation
`llm-d.ai/active-ports` (legacy `inference.networking.k8s.io/active-ports`), a
comma-separated port list, restricts which of the target ports are live; the indices keep
their positions. Labels are copied to every endpoint, so plugins can filter on them, and so are
the pod's name, `spec.hostname` and node address (`status.hostIP`).

`PoolReconciler` holds the latest pod objects and the pool spec and keeps the datastore
equal to "every endpoint every selected pod should contribute": a pod event re-evaluates
that pod; a pool change (selector or ports) re-evaluates every pod. Deletes go before
upserts, so an endpoint never lingers after the event that ended it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from llmepp.datalayer.datastore import DiscoveryNotifier
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.k8s.models import Pod

log = logging.getLogger(__name__)

ACTIVE_PORTS_ANNOTATION = "llm-d.ai/active-ports"
LEGACY_ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
MAX_TARGET_PORTS = 8


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What selects endpoints. `selector` None: the API server already filtered the pods
    (standalone `--endpoint-selector` mode), every pod we see is selected."""

    target_ports: tuple[int, ...]
    selector: Mapping[str, str] | None = None
    app_protocol: str = ""  # the InferencePool's spec.appProtocol ("" unset); readiness checks it

    def selects(self, pod: Pod) -> bool:
        if self.selector is None:
            return True
        labels = pod.metadata.labels
        return all(labels.get(k) == v for k, v in self.selector.items())


def active_ports(pod: Pod, target_ports: tuple[int, ...]) -> set[int]:
    """The target ports the pod serves: all of them, or those its annotation lists."""
    notes = pod.metadata.annotations
    value = notes.get(ACTIVE_PORTS_ANNOTATION, notes.get(LEGACY_ACTIVE_PORTS_ANNOTATION))
    if value is None:
        return set(target_ports)
    listed = set()
    for part in value.split(","):
        part = part.strip()
        if part.isascii() and part.isdigit():  # int("²") would raise
            listed.add(int(part))
    return listed & set(target_ports)


def endpoint_specs(pod: Pod, pool: PoolSpec) -> dict[str, EndpointSpec]:
    """The endpoints `pod` contributes to `pool` (empty when it is not selected or not Ready)."""
    if not pool.selects(pod) or not pod.ready:
        return {}
    live = active_ports(pod, pool.target_ports)
    meta = pod.metadata
    labels = dict(meta.labels)
    specs = {}
    for idx, port in enumerate(pool.target_ports):
        if port in live:
            name = f"{meta.name}-rank-{idx}"
            specs[name] = EndpointSpec(
                name=name, address=pod.status.pod_ip, port=port, namespace=meta.namespace, labels=labels, rank=idx,
                pod_name=meta.name, hostname=pod.spec.hostname, node_address=pod.status.host_ip,
            )  # fmt: skip
    return specs


class PoolReconciler:
    """Pods + pool spec → datastore upserts / deletes (the pod and pool handlers call it)."""

    def __init__(self, notifier: DiscoveryNotifier, namespace: str) -> None:
        self.notifier = notifier
        self.namespace = namespace
        self.pool: PoolSpec | None = None
        self._pods: dict[str, Pod] = {}
        # pod name → the endpoints it currently has in the datastore
        self._endpoints: dict[str, dict[str, EndpointSpec]] = {}

    @property
    def endpoint_count(self) -> int:
        return sum(len(e) for e in self._endpoints.values())

    # -- pool ----------------------------------------------------------------------------
    def set_pool(self, pool: PoolSpec | None) -> None:
        """A new or changed pool re-evaluates every pod; None (pool deleted) empties the datastore."""
        if pool == self.pool:
            return
        log.info(
            "pool spec changed",
            extra={
                "selector": dict(pool.selector) if pool and pool.selector is not None else None,
                "target_ports": list(pool.target_ports) if pool else None,
                "app_protocol": pool.app_protocol if pool else None,
            },
        )
        self.pool = pool
        for name in list(self._endpoints.keys() | self._pods.keys()):
            self._reconcile(name)

    # -- pods ----------------------------------------------------------------------------
    def pod_changed(self, pod: Pod) -> None:
        self._pods[pod.metadata.name] = pod
        self._reconcile(pod.metadata.name)

    def pod_deleted(self, pod: Pod) -> None:
        self._pods.pop(pod.metadata.name, None)
        self._reconcile(pod.metadata.name)

    def _reconcile(self, pod_name: str) -> None:
        pod = self._pods.get(pod_name)
        desired = endpoint_specs(pod, self.pool) if pod is not None and self.pool is not None else {}
        current = self._endpoints.get(pod_name, {})
        if desired == current:
            return
        for name in current.keys() - desired.keys():
            self.notifier.delete(name, self.namespace)
        for name, spec in desired.items():
            if current.get(name) != spec:
                self.notifier.upsert(spec)
        if desired:
            self._endpoints[pod_name] = desired
        else:
            self._endpoints.pop(pod_name, None)
