"""Endpoint discovery from the API server: pool and pod informers feeding a PoolReconciler.

    InferencePool mode   watches the one pool (`fieldSelector=metadata.name=<pool>`) and every
                         pod of its namespace; the pool's selector is applied here, so a
                         selector change needs no new watch
    selector mode        (`--endpoint-selector`, `--endpoint-target-ports`) watches only the
                         pods the API server selects; no CRDs

The datastore is marked synced once the initial lists are in and (pool mode) the pool
exists — readiness waits for it, as in the reference (`PoolHasSynced`). A pool marked for
deletion (deletionTimestamp, held by finalizers) counts as deleted, as in the reference.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any

from llmepp.datalayer.datastore import DiscoveryNotifier
from llmepp.framework.plugin import ConfigError
from llmepp.k8s.client import KubeClient
from llmepp.k8s.informer import Informer, InformerOptions
from llmepp.k8s.models import InferencePool, Pod
from llmepp.k8s.pool import MAX_TARGET_PORTS, PoolReconciler, PoolSpec
from llmepp.k8s.resources import PODS, inference_pools
from llmepp.k8s.selector import SelectorError, parse_selector
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DiscoveryTarget:
    """What to watch: a named InferencePool, or pods by label selector on fixed ports."""

    namespace: str
    pool_name: str | None = None
    pool_group: str = "inference.networking.k8s.io"
    selector: str | None = None
    target_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if (self.pool_name is None) == (self.selector is None):
            raise ConfigError("Kubernetes mode needs exactly one of --pool-name and --endpoint-selector")
        if self.selector is not None:
            # The API server would answer every list with 400 (never ready): refuse it here, saying why.
            try:
                requirements = parse_selector(self.selector)
            except SelectorError as e:
                raise ConfigError(f"--endpoint-selector {self.selector!r}: {e}") from None
            if not requirements:
                raise ConfigError(
                    f"--endpoint-selector {self.selector!r}: no requirements; it would select every pod of "
                    f"namespace {self.namespace} (example: app=vllm)"
                )
            if not 1 <= len(self.target_ports) <= MAX_TARGET_PORTS:
                raise ConfigError(
                    f"--endpoint-target-ports: {MAX_TARGET_PORTS} ports at most and at least one with "
                    f"--endpoint-selector (got {len(self.target_ports)})"
                )
            for i, port in enumerate(self.target_ports):
                if not 1 <= port <= 65535:
                    raise ConfigError(f"--endpoint-target-ports: {port} is not a port number")
                if port in self.target_ports[:i]:
                    raise ConfigError(f"--endpoint-target-ports: {port} is listed twice (a port is one rank)")

    @property
    def pool_mode(self) -> bool:
        return self.pool_name is not None


class _PodEvents:
    def __init__(self, reconciler: PoolReconciler) -> None:
        self.reconciler = reconciler

    def upsert(self, obj: Pod) -> None:
        self.reconciler.pod_changed(obj)

    def delete(self, obj: Pod) -> None:
        self.reconciler.pod_deleted(obj)


class _PoolEvents:
    def __init__(self, reconciler: PoolReconciler, name: str) -> None:
        self.reconciler = reconciler
        self.name = name
        self.seen = asyncio.Event()  # the pool existed (not marked for deletion) at least once
        self.deleting = False  # the latest object carries deletionTimestamp

    def upsert(self, obj: InferencePool) -> None:
        if obj.metadata.name != self.name:
            return
        if obj.metadata.deletion_timestamp:
            # Deleted but held by finalizers: a deleted pool, as in the reference (inferencepool_reconciler
            # clears the datastore). Every finalizer removed is one more event: logged once.
            if not self.deleting:
                self.deleting = True
                log.warning(
                    "InferencePool %s is being deleted (deletionTimestamp %s): the pool has no endpoints",
                    self.name, obj.metadata.deletion_timestamp,
                )  # fmt: skip
            self.reconciler.set_pool(None)
            return
        if self.deleting:
            self.deleting = False
            log.info("InferencePool %s is no longer being deleted: the pool is active again", self.name)
        ports = obj.ports()
        if not ports:
            log.warning("InferencePool %s has no target ports: no endpoints", self.name)
        self.reconciler.set_pool(
            PoolSpec(
                target_ports=ports[:MAX_TARGET_PORTS], selector=obj.match_labels(), app_protocol=obj.spec.app_protocol
            )
        )
        self.seen.set()

    def delete(self, obj: InferencePool) -> None:
        if obj.metadata.name == self.name:
            if self.deleting:  # already without endpoints since its deletionTimestamp (warned then)
                log.info("InferencePool %s is gone (its finalizers are done)", self.name)
            else:
                log.warning("InferencePool %s was deleted: the pool has no endpoints", self.name)
            self.deleting = False  # a pool re-created under the name starts afresh
            self.reconciler.set_pool(None)


class KubernetesDiscovery:
    def __init__(self, client: KubeClient, target: DiscoveryTarget, options: InformerOptions | None = None) -> None:
        self.client = client
        self.target = target
        self.options = options or InformerOptions()
        self.reconciler: PoolReconciler | None = None
        self.pods: Informer[Pod] | None = None
        self.pool: Informer[InferencePool] | None = None
        # The initial lists are in and (pool mode) the pool exists: what the datastore's `synced` says at
        # start-up, for this discovery (a replica that leads again runs a new one, the datastore stays synced).
        self.synced = False

    @property
    def has_pool(self) -> bool:
        """Pool mode: the InferencePool exists (a deleted pool, or one marked for deletion, makes the EPP unready)."""
        return self.reconciler is not None and self.reconciler.pool is not None

    @property
    def app_protocol(self) -> str:
        """The pool's `appProtocol`; "" when unset, without a pool, or in standalone mode."""
        pool = self.reconciler.pool if self.reconciler is not None else None
        return pool.app_protocol if pool is not None else ""

    async def run(self, notifier: DiscoveryNotifier) -> None:
        t = self.target
        reconciler = self.reconciler = PoolReconciler(notifier, t.namespace)
        o = self.options
        pool_events: _PoolEvents | None = None
        if t.pool_mode:
            assert t.pool_name is not None
            pod_options = o
            pool_events = _PoolEvents(reconciler, t.pool_name)
            self.pool = Informer(
                self.client,
                inference_pools(t.pool_group),
                t.namespace,
                InferencePool,
                pool_events,
                replace(o, field_selector=f"metadata.name={t.pool_name}"),
            )
        else:
            assert t.selector is not None
            reconciler.set_pool(PoolSpec(target_ports=t.target_ports, selector=None))
            pod_options = replace(o, label_selector=t.selector)
        self.pods = Informer(self.client, PODS, t.namespace, Pod, _PodEvents(reconciler), pod_options)
        informers: list[Informer[Any]] = [i for i in (self.pool, self.pods) if i is not None]
        tasks = [asyncio.create_task(i.run(), name=f"informer-{i.name}") for i in informers]
        tasks.append(asyncio.create_task(self._mark_synced(notifier, informers, pool_events), name="discovery-sync"))
        try:
            # gather: an informer that dies of a bug fails discovery instead of hanging it.
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(*tasks)

    async def _mark_synced(
        self, notifier: DiscoveryNotifier, informers: list[Informer[Any]], pool_events: _PoolEvents | None
    ) -> None:
        await asyncio.gather(*(i.synced.wait() for i in informers))
        t = self.target
        if pool_events is not None and not pool_events.seen.is_set():
            why = "is being deleted" if pool_events.deleting else "not found"
            log.warning("InferencePool %s/%s %s: not ready until it exists", t.namespace, t.pool_name, why)
            await pool_events.seen.wait()
        self.synced = True
        notifier.mark_synced()
        count = self.reconciler.endpoint_count if self.reconciler is not None else 0
        log.info("endpoints synced from kubernetes", extra={"endpoints": count})
