"""Kubernetes mode for one App: client, discovery, CRD informers, leader election.

The mode is chosen in the app (`kubernetes_target`): a config with `dataLayer.discovery`
runs that plugin (file mode); otherwise `--pool-name` (InferencePool mode) or
`--endpoint-selector` (standalone selector mode) — exactly one — runs this.

    start()     connects (kubeconfig / in-cluster), starts the pool + pod informers
                (→ datastore), the InferenceObjective (→ ObjectiveStore) and
                InferenceModelRewrite (→ ModelRewriter) informers in pool mode, and the
                leader elector with --ha-enable-leader-election
    ready()     pool mode: the InferencePool exists; HA: this replica leads. (The app adds
                "datastore synced", "not draining" and "the parsers support the pool's
                appProtocol", see `app_protocol`.)
    release()   SIGTERM: stop electing and give the lease up at once
    aclose()    stop everything, close the client

A lost API server never stops the process: informers retry with backoff and keep the
last known endpoints; the leader stops leading after its renew deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry

from llmepp.datalayer.datastore import DiscoveryNotifier
from llmepp.flowcontrol.objectives import ObjectiveStore
from llmepp.framework.plugin import ConfigError
from llmepp.k8s.client import KubeClient
from llmepp.k8s.discovery import DiscoveryTarget, KubernetesDiscovery
from llmepp.k8s.informer import Informer, InformerMetrics, InformerOptions
from llmepp.k8s.leader import LeaderElector, LeaseConfig, default_identity, lease_name
from llmepp.k8s.modelrewrite import ModelRewriter, ModelRewriteStore, RewriteSync
from llmepp.k8s.models import InferenceModelRewrite, InferenceObjective
from llmepp.k8s.objectives import ObjectiveSync
from llmepp.k8s.resources import INFERENCE_MODEL_REWRITES, INFERENCE_OBJECTIVES
from llmepp.k8s.selector import dns_name_problem
from llmepp.settings import Settings
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def kubernetes_target(settings: Settings) -> DiscoveryTarget | None:
    """The Kubernetes-mode target the flags ask for, or None (no --pool-name / --endpoint-selector)."""
    pool = settings.pool_name if settings.pool_name_set else None
    # An empty --endpoint-selector is the flag unset, as in the reference (`--endpoint-selector=` from a template).
    selector = settings.endpoint_selector or None
    if pool is None and selector is None:
        return None
    problem = dns_name_problem(settings.pool_namespace, label=True)
    if problem:
        raise ConfigError(f"--pool-namespace (or $NAMESPACE) {settings.pool_namespace!r}: {problem}")
    if pool is not None and (problem := dns_name_problem(pool, label=False)):
        raise ConfigError(f"--pool-name {pool!r}: {problem}")
    if pool is not None and settings.objectives_file:
        # Both would write the same store; each file reload would wipe the pool's objectives.
        raise ConfigError(
            "--objectives-file: with --pool-name, objectives come from InferenceObjective resources "
            "(the file is for file-discovery and --endpoint-selector modes)"
        )
    return DiscoveryTarget(
        namespace=settings.pool_namespace,
        pool_name=pool,
        pool_group=settings.pool_group,
        selector=selector,
        target_ports=tuple(settings.endpoint_target_ports),
    )


def _check_lease_flags(o: KubeOptions) -> None:
    """ConfigError naming the exact `--ha-*` flag to change (client-go's rule: retry < renew < lease)."""
    rule = "(leader election needs retry period < renew deadline < lease duration)"
    if o.retry_period <= 0:
        raise ConfigError(f"--ha-retry-period: must be > 0, got {o.retry_period:g}s {rule}")
    if o.renew_deadline >= o.lease_duration:
        raise ConfigError(
            f"--ha-renew-deadline: {o.renew_deadline:g}s must be shorter than --ha-lease-duration "
            f"({o.lease_duration:g}s) {rule}"
        )
    if o.retry_period >= o.renew_deadline:
        raise ConfigError(
            f"--ha-retry-period: {o.retry_period:g}s must be shorter than --ha-renew-deadline "
            f"({o.renew_deadline:g}s) {rule}"
        )


@dataclass(frozen=True, slots=True)
class KubeOptions:
    kubeconfig: str | None = None
    leader_election: bool = False
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str = field(default_factory=default_identity)
    informer: InformerOptions = field(default_factory=InformerOptions)
    # featureGates haPopulateNonLeaderDatastore (reference default true): followers run the reconcilers too,
    # so a new leader routes at once; false: only the leader watches pods and CRDs (less API load).
    populate_followers: bool = True

    @classmethod
    def from_settings(cls, s: Settings) -> KubeOptions:
        return cls(
            kubeconfig=s.kubeconfig,
            leader_election=s.ha_enable_leader_election,
            lease_duration=s.ha_lease_duration,
            renew_deadline=s.ha_renew_deadline,
            retry_period=s.ha_retry_period,
        )


class KubeRuntime:
    def __init__(
        self,
        target: DiscoveryTarget,
        options: KubeOptions,
        notifier: DiscoveryNotifier,
        objectives: ObjectiveStore,
        registry: CollectorRegistry | None = None,
        *,
        pool_name: str = "epp",
    ) -> None:
        self.target = target
        self.options = options
        self.notifier = notifier
        self.objectives = objectives
        self.rewrites = ModelRewriteStore()
        # Standalone selector mode has no CRDs, hence no rewrites.
        self.rewriter = ModelRewriter(self.rewrites, registry) if target.pool_mode else None
        self.lease: LeaseConfig | None = None
        if options.leader_election:
            _check_lease_flags(options)
            try:
                self.lease = LeaseConfig(
                    name=lease_name(target.namespace, target.pool_name or pool_name),
                    namespace=target.namespace,
                    identity=options.identity,
                    lease_duration=options.lease_duration,
                    renew_deadline=options.renew_deadline,
                    retry_period=options.retry_period,
                )
            except ValueError as e:
                raise ConfigError(f"--ha-lease-duration / --ha-renew-deadline / --ha-retry-period: {e}") from None
        self.client: KubeClient | None = None
        self.discovery: KubernetesDiscovery | None = None
        self.elector: LeaderElector | None = None
        self.informers: list[Informer[Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # running ones: leadership flaps spawn new tasks each time
        self._reconcilers: list[asyncio.Task[None]] = []  # discovery and the CRD informers, while they run
        self._elector_task: asyncio.Task[None] | None = None
        self._released = False  # the lease was given up (or that was tried): aclose does not try again
        # llm_d_epp_kubernetes_informer_* for every informer built with `options.informer` once started
        # (ours, and the notification sources' the app starts with them).
        self.informer_metrics = InformerMetrics()
        if registry is not None:
            registry.register(self.informer_metrics)

    async def start(self) -> None:
        self.options = replace(self.options, informer=replace(self.options.informer, metrics=self.informer_metrics))
        t, o = self.target, self.options
        client = self.client = await KubeClient.connect(o.kubeconfig)
        log.info(
            "kubernetes mode",
            extra={"api_server": client.info.host, "config": client.info.source, "namespace": t.namespace,
                   "pool": t.pool_name, "selector": t.selector, "leader_election": self.lease is not None},
        )  # fmt: skip
        leader_only = self.lease is not None and not o.populate_followers
        if not leader_only:
            self._start_reconcilers()
        if self.lease is not None:
            self.elector = LeaderElector(client, self.lease, on_change=self._leadership if leader_only else None)
            self._elector_task = self._spawn(self.elector.run(), "k8s-leader-election")

    def _start_reconcilers(self) -> None:
        t, o, client = self.target, self.options, self.client
        assert client is not None
        self.discovery = KubernetesDiscovery(client, t, o.informer)
        self._reconcilers = [self._spawn(self.discovery.run(self.notifier), "k8s-discovery")]
        if t.pool_mode:
            assert t.pool_name is not None and self.rewriter is not None
            objectives: Informer[InferenceObjective] = Informer(
                client, INFERENCE_OBJECTIVES, t.namespace, InferenceObjective,
                ObjectiveSync(self.objectives, t.pool_name, t.pool_group), o.informer,
            )  # fmt: skip
            rewrites: Informer[InferenceModelRewrite] = Informer(
                client, INFERENCE_MODEL_REWRITES, t.namespace, InferenceModelRewrite,
                RewriteSync(self.rewrites, t.pool_name, t.pool_group), o.informer,
            )  # fmt: skip
            self.informers = [objectives, rewrites]
            self._reconcilers += [self._spawn(i.run(), f"k8s-{i.name}") for i in self.informers]

    def _leadership(self, leader: bool) -> None:
        """haPopulateNonLeaderDatastore=false: the reconcilers run while this replica leads; a replica that
        stops leading forgets the pool's endpoints, objectives and rewrites (it is not ready meanwhile).
        A lease given up on SIGTERM (`release`) forgets nothing: the drain keeps routing what the gateway
        still sends here with the endpoints it had, as the reference keeps its datastore."""
        if self._released:
            return
        if leader and not self._reconcilers:
            log.info("leading: watching the pool's pods and CRDs")
            self._start_reconcilers()
        elif not leader and self._reconcilers:
            log.info("no longer leading: forgetting the pool's endpoints, objectives and rewrites")
            tasks, discovery = self._reconcilers, self.discovery
            self._reconcilers, self.discovery, self.informers = [], None, []
            self._spawn(self._forget(tasks, discovery), "k8s-forget")

    async def _forget(self, tasks: list[asyncio.Task[None]], discovery: KubernetesDiscovery | None) -> None:
        # Stopped first (an informer's last event must not land after the clearing), then cleared.
        await cancel_and_wait(*tasks)
        if discovery is not None and discovery.reconciler is not None:
            discovery.reconciler.set_pool(None)  # deletes every endpoint it upserted
        self.objectives.replace({})
        self.rewrites.clear()

    def ready(self) -> bool:
        # This term's discovery must have listed (haPopulateNonLeaderDatastore=false starts a new one each time
        # this replica leads again, while the datastore is still marked synced from the first).
        if self.discovery is None or not self.discovery.synced:
            return False
        if self.target.pool_mode and not self.discovery.has_pool:
            return False
        return self.elector is None or self.elector.is_leader

    @property
    def app_protocol(self) -> str:
        """The InferencePool's `appProtocol` ("" when unset or in standalone mode)."""
        return self.discovery.app_protocol if self.discovery is not None else ""

    async def release(self) -> None:
        """Stop competing for leadership and hand the lease over (drain)."""
        task, self._elector_task = self._elector_task, None
        await cancel_and_wait(task)
        if self.elector is not None and not self._released:
            self._released = True
            await self.elector.release()

    async def aclose(self) -> None:
        """Stop everything and close the client, even when the lease release fails (its error is raised after)."""
        try:
            await self.release()
        finally:
            tasks, self._tasks = self._tasks, set()
            with contextlib.suppress(Exception):  # a crash was logged when it happened (_report_crash)
                await cancel_and_wait(*tasks)
            if self.client is not None:
                client, self.client = self.client, None
                await client.aclose()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        task.add_done_callback(_report_crash)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("kubernetes task %s stopped", task.get_name(), exc_info=task.exception())
