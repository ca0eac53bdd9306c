"""The running EPP: builds every part from Settings + config, serves, drains on SIGTERM.

Settings ─► config.loader.build ─► Components (plugins, pipeline, discovery, sources)
Datastore ◄─ discovery plugin          MetricsCollector ─► endpoint.metrics
gRPC :9002 ext_proc ─► Director        gRPC :9003 health    HTTP :9090 /metrics
--watch-config-file: config.watch ─► App.reload_config ─► Director.use_pipeline
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from llmepp.config.loader import Components, build, load_config, rebuild_scheduling
from llmepp.config.schema import DEFAULT_CONFIG, EndpointPickerConfig
from llmepp.config.watch import ConfigWatcher
from llmepp.datalayer.collector import MetricsCollector
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.dcgm import DcgmPoller
from llmepp.datalayer.endpoint import join_hostport
from llmepp.datalayer.models import ModelsPoller
from llmepp.datalayer.multicluster import METRICS_SOURCE_TYPES
from llmepp.director import Director
from llmepp.filewatch import stat_signature
from llmepp.flowcontrol import AdmissionController
from llmepp.flowcontrol.config import warn_if_scrapes_outlast_staleness
from llmepp.flowcontrol.objectives import ObjectiveStore
from llmepp.framework.datalayer import NotificationExtractor, NotificationSource
from llmepp.framework.plugin import ConfigError, Plugin
from llmepp.gctuning import tune_gc
from llmepp.k8s.client import KubeClient
from llmepp.k8s.runtime import KubeOptions, KubeRuntime, kubernetes_target
from llmepp.observability.metrics import EppMetrics
from llmepp.observability.metrics_server import MetricsAuth, MetricsServer, metrics_ssl_context
from llmepp.server import health
from llmepp.server.extproc import ExtProcServicer, create_server
from llmepp.server.h2 import H2ExtProcServer, create_h2_server
from llmepp.server.listen import grpc_address
from llmepp.server.tls import ServingCert
from llmepp.settings import Settings
from llmepp.tasks import cancel_and_wait

if TYPE_CHECKING:
    from llmepp.observability.tracing import RequestTracing

log = logging.getLogger(__name__)

# Drain ends early once the gateway has let go of this EPP (h2: no connection, no stream) for this long.
_QUIET_PERIOD = 1.0
# Discovery gets this long to fail loudly at start-up (a bad endpoints file) before we serve.
_DISCOVERY_STARTUP_GRACE = 0.5
# A part (or plugin) still closing after this long is left behind, logged and counted as failed: one stuck
# close (a peer that never answers) must not hold the pod in Terminating until the kubelet's SIGKILL while
# the parts after it stay open.
CLOSE_TIMEOUT = 5.0


def config_text(settings: Settings) -> str:
    """The config's text; empty (an empty --config-text or file) is the built-in default, as the reference
    (its LoadRawConfig uses loadDefaultConfig for zero bytes)."""
    if settings.config_text:
        return settings.config_text
    if settings.config_file is not None:
        try:
            text = Path(settings.config_file).read_text()
            if text:
                return text
            log.warning("--config-file %s is empty: using the default config", settings.config_file)
            return DEFAULT_CONFIG
        except OSError as e:
            raise ConfigError(f"--config-file: cannot read {settings.config_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"--config-file: {settings.config_file} is not UTF-8 text: {e.reason} at byte {e.start}"
            ) from None
    return DEFAULT_CONFIG


class CloseFailed(Exception):
    """run(): the EPP stopped, but some parts failed to close (each logged with its traceback); exit code 1."""


class PartFailed(Exception):
    """run(): a part the EPP cannot serve without (endpoint discovery) ended while serving; the EPP drained and
    stopped, exit code 1, so Kubernetes restarts it (as the reference's manager stops when a runnable fails)."""


# Closing what failed start-ups set up inside a running event loop (App() cannot await it): run() awaits these.
_failed_start_ups: set[asyncio.Task[None]] = set()


async def failed_start_ups_closed() -> None:
    """Wait until every App that failed to start in this event loop has closed what it had set up."""
    await asyncio.gather(*_failed_start_ups, return_exceptions=True)


class App:
    def __init__(self, settings: Settings) -> None:
        self._built: list[Plugin] = []  # every plugin made, for a start-up refused part-way
        try:
            self._build(settings)
        except BaseException:
            # Plugins set up before a later check refused the config (datastore listeners, tasks, sockets,
            # worker threads) and the tracer's exporter thread.
            _close_soon(self._close_refused(), "failed-start-up", _failed_start_ups)
            raise
        self._built.clear()  # the running plugins are components.plugins (a reload retires some)

    async def _close_refused(self) -> None:
        """Close what a refused `App()` made: the plugins (set up or not), the tracer."""
        components: Components | None = getattr(self, "components", None)
        plugins = {id(p): p for p in [*self._built, *(components.plugins.values() if components else ())]}
        await _close_plugins(plugins.values())
        tracing: RequestTracing | None = getattr(self, "tracing", None)
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)

    def _build(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = EppMetrics()
        self.datastore = Datastore(settings.pool_name, settings.pool_namespace)
        self.datastore.add_listener(self.metrics)  # drops a removed endpoint's series
        if settings.watch_config_file and settings.config_file is None:
            raise ConfigError("--watch-config-file needs --config-file")
        # Taken before the read, so an edit racing the start-up is seen as a change.
        config_signature = stat_signature(settings.config_file) if settings.config_file else None
        text = config_text(settings)
        self.components: Components = build(
            load_config(text), datastore=self.datastore, settings=settings, metrics=self.metrics, built=self._built
        )
        self.metrics.config_last_reload_successful.set(1)
        self.metrics.config_last_reload_success_timestamp.set(time.time())
        self.config_watcher: ConfigWatcher | None = None
        if settings.watch_config_file:
            assert settings.config_file is not None
            self.config_watcher = ConfigWatcher(
                settings.config_file, config_signature, text, self.reload_config, self.metrics
            )
        self._closing: set[asyncio.Task[None]] = set()  # retired plugins' aclose()
        # Endpoint discovery: the config's plugin (file mode), else Kubernetes mode from the flags.
        self.kube: KubeRuntime | None = None
        if self.components.discovery is not None and settings.ha_enable_leader_election:
            raise ConfigError(
                f"--ha-enable-leader-election: leader election holds a Kubernetes Lease, so it runs in Kubernetes "
                f"mode only (--pool-name or --endpoint-selector, no dataLayer.discovery); with dataLayer.discovery "
                f"{self.components.discovery.name!r} (type {self.components.discovery.type}) there is no Lease and "
                f"every replica would report ready"
            )
        if self.components.discovery is not None and settings.endpoint_selector:
            # Not an error: a Helm chart passes its selector either way; but the operator should know.
            log.warning(
                "--endpoint-selector %r (and --endpoint-target-ports) ignored: dataLayer.discovery %r (type %s) "
                "finds the endpoints",
                settings.endpoint_selector, self.components.discovery.name, self.components.discovery.type,
            )  # fmt: skip
        if self.components.discovery is None:
            target = kubernetes_target(settings)
            if target is None:
                raise ConfigError(
                    "dataLayer.discovery: no endpoint discovery configured; add a file-discovery plugin "
                    "(see deploy/ and README), or run in Kubernetes mode with --pool-name or --endpoint-selector"
                )
            populate = self.components.feature_gates.get("haPopulateNonLeaderDatastore", True)
            self.kube = KubeRuntime(
                target, replace(KubeOptions.from_settings(settings), populate_followers=populate), self.datastore,
                self._objective_store(), self.metrics.registry, pool_name=settings.pool_name,
            )  # fmt: skip
        self.notification_sources = self._wire_notification_sources()
        self.tracing = request_tracing(settings.tracing)
        self.director = Director(
            self.datastore,
            self.components.pipeline,
            self.metrics,
            subset_filter=not settings.disable_endpoint_subset_filter,
            emit_scores=settings.emit_endpoint_scores,
            decision_header=settings.decision_header,
            rewriter=self.kube.rewriter if self.kube is not None else None,
            tracing=self.tracing,
        )
        self.collector = self._build_collector()
        if self.collector is not None:
            period = self.collector.interval * self.collector.ticks_per_poll
            warn_if_scrapes_outlast_staleness(self.components.plugins.values(), period)
        self.models_poller = self._build_models_poller()
        self.dcgm_pollers = self._build_dcgm_pollers()
        self._unsupported_parsers: list[str] = []
        self.health = health.HealthService(self.ready)
        self.draining = False
        self.grpc_port = 0
        self.health_port = 0
        self._extproc: grpc.aio.Server | H2ExtProcServer | None = None
        self._servicer: ExtProcServicer | None = None
        self._health_server: grpc.aio.Server | None = None
        self._discovery_task: asyncio.Task[None] | None = None
        # Set when a part the EPP cannot serve without ends while serving (`failure` says why): run() stops.
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        # /metrics: auth on by default where there is a Kubernetes API to ask (the reference always has one).
        auth = settings.metrics_endpoint_auth if settings.metrics_endpoint_auth is not None else self.kube is not None
        self.metrics_auth = MetricsAuth(self._auth_client) if auth else None
        self._auth_kube: KubeClient | None = None  # file mode with --metrics-endpoint-auth=true: our own client
        self._metrics_server = MetricsServer(
            self.metrics.registry,
            auth=self.metrics_auth,
            ssl_context=metrics_ssl_context(settings.metrics_cert_dir, settings.metrics_client_ca_file),
        )
        # TLS on the ext_proc port: made (or read from --cert-path) here so a bad certificate is a start-up error.
        self.serving_cert = ServingCert.from_settings(settings) if settings.secure_serving else None
        if not settings.secure_serving and (settings.cert_path or settings.enable_cert_reload):
            log.warning("--cert-path / --enable-cert-reload ignored: --secure-serving=false serves plaintext")
        self._cert_task: asyncio.Task[None] | None = None
        self.close_failures = 0  # parts that raised while stopping or closing (each logged once)

    def _build_collector(self) -> MetricsCollector | None:
        for ds in self.components.data_sources:
            if ds.source.type in METRICS_SOURCE_TYPES and ds.extractors:  # pods' pages, or clusters' EPPs'
                return MetricsCollector(
                    self.datastore,
                    self.metrics,
                    interval=self.settings.refresh_metrics_interval,
                    source=ds.source,  # type: ignore[arg-type]
                    extractor=ds.extractors[0],  # type: ignore[arg-type]
                    gauge_interval=self.settings.refresh_prometheus_metrics_interval,
                )
        log.warning("no metrics data source configured: endpoints are routed without scraped metrics")
        return None

    def _build_models_poller(self) -> ModelsPoller | None:
        for ds in self.components.data_sources:
            if ds.source.type == "models-data-source" and ds.extractors:
                return ModelsPoller(self.datastore, self.metrics, ds.source, ds.extractors[0])  # type: ignore[arg-type]
        return None

    def _build_dcgm_pollers(self) -> list[DcgmPoller]:
        """One per dcgm-data-source; ConfigError for a useNodeAddress source without node addresses
        (file discovery) or a source wired to anything but dcgm-extractors."""
        kube = self.kube is not None  # only Kubernetes discovery records node addresses
        pollers = []
        for ds in self.components.data_sources:
            if ds.source.type == "dcgm-data-source":
                src, extractors = ds.source, ds.extractors
                pollers.append(DcgmPoller(self.datastore, self.metrics, src, extractors, node_addresses=kube))  # type: ignore[arg-type]
        return pollers

    def _wire_notification_sources(self) -> list[NotificationSource]:
        """Sources watching Kubernetes objects (Kubernetes mode only), each given the notification
        extractors `dataLayer.sources` wires to it."""
        sources = [p for p in self.components.plugins.values() if isinstance(p, NotificationSource)]
        discovery = self.components.discovery
        if sources and discovery is not None:
            raise ConfigError(
                f"plugin {sources[0].name!r} (type {sources[0].type}): watches the Kubernetes API, so it runs in "
                f"Kubernetes mode only (--pool-name or --endpoint-selector), not with dataLayer.discovery "
                f"{discovery.name!r} (type {discovery.type})"
            )
        for i, ds in enumerate(self.components.data_sources):
            if isinstance(ds.source, NotificationSource):
                for extractor in ds.extractors:
                    if not isinstance(extractor, NotificationExtractor):
                        raise ConfigError(
                            f"dataLayer.sources[{i}]: plugin {extractor.name!r} (type {extractor.type}) is not a "
                            f"notification extractor; source {ds.source.name!r} (type {ds.source.type}) cannot feed it"
                        )
                    ds.source.attach(extractor)
        for source in sources:
            if not source.extractors:
                log.warning("%s: no extractor is wired to it in dataLayer.sources: its events go nowhere", source.name)
        return sources

    def reload_config(self, config: EndpointPickerConfig) -> None:
        """Route new requests with `config`'s scheduling (ConfigError: refused, nothing changed)."""
        running = self.components
        built: list[Plugin] = []  # new instances only: never one of the running config's
        try:
            new = rebuild_scheduling(
                running, config, datastore=self.datastore, settings=self.settings, metrics=self.metrics, built=built
            )
        except BaseException:
            # Refused after some plugins were built (and set up: tasks, clients): they never serve.
            self._close_later(built, "refused-config-plugins")
            raise
        self.components = new
        self.director.use_pipeline(new.pipeline)
        self._close_later(
            [p for name, p in running.plugins.items() if new.plugins.get(name) is not p], "retired-plugins"
        )
        log.info(
            "scheduling reconfigured",
            extra={"profiles": sorted(new.pipeline.scheduler.profiles), "plugins": sorted(new.plugins)},
        )

    def _close_later(self, plugins: list[Plugin], name: str) -> None:
        """`aclose()` the plugins in a task (awaited at shutdown); at once when no event loop runs."""
        if plugins:
            _close_soon(_close_plugins(plugins), name, self._closing)

    def _objective_store(self) -> ObjectiveStore:
        """The store admission resolves priorities from (Kubernetes mode feeds it InferenceObjectives)."""
        store = getattr(self.components.pipeline.admission, "objectives", None)
        return store if isinstance(store, ObjectiveStore) else ObjectiveStore()

    def ready(self) -> bool:
        # Kubernetes mode adds: the InferencePool exists and, with leader election, we lead.
        return (
            self.datastore.synced
            and not self.draining
            and (self.kube is None or self.kube.ready())
            and self._parsers_support_pool()
            and all(source.ready() for source in self.notification_sources)
        )

    def _parsers_support_pool(self) -> bool:
        """Every configured parser reads the pool's `appProtocol`, when it sets one (reference
        health.go::checkProtocolSupport). A change of the answer is logged once, not at every probe."""
        app_protocol = self.kube.app_protocol if self.kube is not None else ""
        unsupported = self.components.parsers.unsupported(app_protocol)
        if unsupported != self._unsupported_parsers:
            self._unsupported_parsers = unsupported
            if unsupported:
                log.warning(
                    "not ready: the InferencePool's appProtocol %r is not supported by parsers %s",
                    app_protocol, ", ".join(unsupported),
                )  # fmt: skip
        return not unsupported

    async def start(self) -> None:
        """Serve; on a failure (ConfigError: a port in use, discovery failing at once, ...) everything set up so
        far is stopped and closed before the error propagates."""
        try:
            await self._start()
        except BaseException:
            extproc = self._extproc
            if extproc is not None:
                await self._closing_step("the ext_proc server", lambda: extproc.stop(grace=None))
            admission = self.components.pipeline.admission
            if isinstance(admission, AdmissionController):
                await self._closing_step("flow control", admission.aclose)
            await self._close()
            raise

    async def _start(self) -> None:
        s = self.settings
        discovery = self.components.discovery
        for plugin in self.components.plugins.values():
            checked = plugin.check()  # a ConfigError (e.g. an external store refusing our credentials) refuses it
            if inspect.isawaitable(checked):  # an author's plain `def check` works too
                await checked
        if s.metrics_port and self.metrics_auth is not None and self.kube is None:
            try:
                self._auth_kube = await KubeClient.connect(s.kubeconfig)
            except ConfigError as e:
                raise ConfigError(f"--metrics-endpoint-auth: needs the Kubernetes API: {e}") from None
        if self.kube is not None:
            await self.kube.start()  # ConfigError on a bad kubeconfig; the API server may come later
            assert self.kube.client is not None
            for source in self.notification_sources:  # ConfigError when its kind does not exist
                await source.start(self.kube.client, self.kube.target.namespace, self.kube.options.informer)
        else:
            assert discovery is not None
            self._discovery_task = asyncio.create_task(discovery.run(self.datastore), name="discovery")
            done, _ = await asyncio.wait({self._discovery_task}, timeout=_DISCOVERY_STARTUP_GRACE)
            if done:
                self._discovery_task.result()  # raises the start-up error (e.g. a bad endpoints file)
                raise ConfigError(f"discovery plugin {discovery.name!r} stopped right after start")
            # Past the grace nobody awaits it until shutdown cancels it: an end now (a first read slower than the
            # grace that finds a bad file, a bug while a change is applied) leaves the pool frozen or never synced.
            self._discovery_task.add_done_callback(self._discovery_ended)
        if self.collector is not None:
            await self.collector.start()
        if self.models_poller is not None:
            await self.models_poller.start()
        for poller in self.dcgm_pollers:
            await poller.start()

        self._servicer = ExtProcServicer(
            self.director,
            self.metrics,
            s,
            destination_list=s.destination_fallback_list,
            request_parsers=self.components.parsers,
            out_of_band=getattr(self.components.pipeline.admission, "evictor", None) is not None,
        )
        admission = self.components.pipeline.admission
        if isinstance(admission, AdmissionController):
            admission.start()  # the dispatcher, flow GC and objectives-file watcher: now, not at the first request
        cert = self.serving_cert
        extproc_address = join_hostport(s.bind_address or "*", s.grpc_port)  # "*": every address
        if s.extproc_transport == "h2":
            h2 = create_h2_server(self._servicer, s, ssl=cert.ssl_context() if cert else None)
            with _listening("--grpc-port", extproc_address):
                await h2.start()
            self._extproc, self.grpc_port = h2, h2.port
        else:  # grpc.aio; message limits follow the body limit (server_options)
            credentials = cert.grpc_credentials() if cert else None
            with _listening("--grpc-port", extproc_address):
                server, self.grpc_port = create_server(self._servicer, s, credentials=credentials)
            await server.start()
            self._extproc = server
        if cert is not None and cert.reload:
            self._cert_task = asyncio.create_task(cert.watch(), name="cert-reload")
        if self.config_watcher is not None:
            self.config_watcher.start()

        # SO_REUSEPORT off (gRPC sets it by default), as on the ext_proc port: a second EPP must not share this one.
        self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health.add_to_server(self.health, self._health_server)
        health_address = grpc_address(s.bind_address, s.grpc_health_port)
        with _listening("--grpc-health-port", health_address):
            self.health_port = self._health_server.add_insecure_port(health_address)
        await self._health_server.start()

        if s.metrics_port:
            with _listening("--metrics-port", join_hostport(s.bind_address or "*", s.metrics_port)):
                await self._metrics_server.start(s.bind_address, s.metrics_port)
        log.info(
            "epp serving",
            extra={
                "grpc_port": self.grpc_port,
                "health_port": self.health_port,
                "metrics_port": s.metrics_port,
                "metrics_auth": self.metrics_auth is not None,
                "metrics_https": self._metrics_server.ssl_context is not None,
                "tls": _tls_label(self.serving_cert),
                "plugins": sorted(self.components.plugins),
                "config_watch": self.settings.config_file if self.config_watcher is not None else "",
            },
        )

    def _discovery_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.draining:
            return
        name = self.components.discovery.name if self.components.discovery is not None else "discovery"
        exc = task.exception()
        if isinstance(exc, ConfigError):  # the file's content: a configuration error (exit code 2)
            self.failure = exc
        else:
            self.failure = PartFailed(f"endpoint discovery {name!r} stopped" + (f": {exc!r}" if exc else ""))
        trace = exc if exc is not None and not isinstance(exc, ConfigError) else None
        log.error(
            "endpoint discovery %r ended while serving; the pool no longer follows its source: stopping (%s)",
            name, exc, exc_info=trace,
        )  # fmt: skip
        self.failed.set()

    def _auth_client(self) -> KubeClient | None:
        return self.kube.client if self.kube is not None else self._auth_kube

    async def _wait_for_quiet(self) -> None:
        """Keep serving (new connections and streams too) until the gateway has let go of this EPP for
        `_QUIET_PERIOD`, or the drain timeout ends (the reference serves the whole timeout).

        A gateway may route here well after SIGTERM: an EDS-fed one until it learns of the endpoint's
        removal, a ClusterIP-fed Envoy on its pooled connection for as long as it lives. A quiet moment
        without streams says nothing about that (at low traffic the EPP used to exit 1 s after SIGTERM and
        the next request got a 500). With the h2 transport the peers' connections are known: the drain
        ends early only once every one has been closed by its peer (an EDS-fed Envoy drains its pool to a
        removed endpoint) and no stream is open; else at the drain timeout. grpc.aio does not show its
        connections: there the drain ends once no stream has been open for `_QUIET_PERIOD`."""
        if self._servicer is None:
            return
        connections = self._extproc.connections if isinstance(self._extproc, H2ExtProcServer) else ()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        quiet_since = loop.time()
        while loop.time() < deadline:
            if self._servicer.active_streams or connections:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= _QUIET_PERIOD:
                return
            await asyncio.sleep(0.05)

    async def shutdown(self) -> int:
        """Drain: report NOT_SERVING at once, let in-flight streams finish, then stop. Returns how many parts
        failed to stop or close (each logged with its traceback; the others were closed all the same)."""
        self.draining = True
        self.health.drain()
        log.info("draining", extra={"drain_timeout": self.settings.drain_timeout})
        if self.kube is not None:
            await self._closing_step("the leader lease release", self.kube.release)  # now, not after the drain
        admission = self.components.pipeline.admission
        if isinstance(admission, AdmissionController):
            # Queued requests are served during the drain window, then answered 503
            # rejected-shutting-down rather than cut off when the gRPC grace ends.
            queue_drain = asyncio.create_task(admission.drain(max(0.0, self.settings.drain_timeout - 1.0)))
        await self._wait_for_quiet()
        extproc = self._extproc
        if extproc is not None:
            await self._closing_step("the ext_proc server", lambda: extproc.stop(grace=1.0))
        if isinstance(admission, AdmissionController):
            # aclose ends the drain window early once every stream is done.
            await self._closing_step("flow control", admission.aclose)
            await self._closing_step("the flow-control queue drain", lambda: queue_drain)
        await self._close()
        return self.close_failures

    async def _closing_step(self, part: str, close: Callable[[], Awaitable[object] | object]) -> None:
        """One step of stopping (`close` returns an awaitable, or closes at once): a failure is logged once with
        its traceback and counted, and the next steps still run (one broken part must not leave the others open)."""
        try:
            result = close()
            if inspect.isawaitable(result):
                await _within_close_timeout(result)
        except TimeoutError:
            self.close_failures += 1
            log.error("%s did not close within %gs: left behind", part, CLOSE_TIMEOUT)
        except Exception:
            self.close_failures += 1
            log.exception("%s failed to close", part)

    async def _close(self) -> None:
        """Stop the health and /metrics servers, close every part and plugin (after the drain, or a failed start).
        A part that fails is logged and counted (`close_failures`); the others are closed all the same."""
        step = self._closing_step
        health_server = self._health_server
        if health_server is not None:
            await step("the health server", lambda: health_server.stop(grace=None))
        if self.config_watcher is not None:
            await step("the config watcher", self.config_watcher.aclose)
        if self.collector is not None:
            await step("the metrics collector", self.collector.aclose)
        if self.models_poller is not None:
            await step("the models poller", self.models_poller.aclose)
        for poller in self.dcgm_pollers:
            await step("a DCGM poller", poller.aclose)
        tracing = self.tracing
        if tracing is not None:
            await step("tracing", lambda: asyncio.to_thread(tracing.shutdown))  # flushes the batched spans
        for source in self.notification_sources:
            await step(f"notification source {source.name}", source.aclose)  # before the client they watch through
        if self.kube is not None:
            await step("the Kubernetes mode", self.kube.aclose)
        with contextlib.suppress(Exception):  # discovery's failure was reported by start(); the cert watch logs its own
            # In a task of its own: closing a start-up cancelled by a signal runs in the cancelled task, where
            # cancel_and_wait would take the discovery task's CancelledError for ours and stop `_close` here.
            await _within_close_timeout(cancel_and_wait(self._discovery_task, self._cert_task))
        serving_cert = self.serving_cert
        if serving_cert is not None:
            await step("the serving certificate", serving_cert.close)
        await asyncio.gather(*self._closing, return_exceptions=True)
        self.close_failures += await _close_plugins(self.components.plugins.values())
        await step("the /metrics server", self._metrics_server.aclose)
        if self._auth_kube is not None:
            await step("the /metrics auth client", self._auth_kube.aclose)
        log.info("stopped")


async def _close_plugins(plugins: Iterable[Plugin]) -> int:
    """`aclose()` each plugin; one failing (or still closing after CLOSE_TIMEOUT) is logged and the others are
    still closed. Returns how many failed."""
    failed = 0
    for plugin in plugins:
        try:
            await _within_close_timeout(plugin.aclose())
        except TimeoutError:
            failed += 1
            log.error("plugin %s did not close within %gs: left behind", plugin.name, CLOSE_TIMEOUT)
        except Exception:
            failed += 1
            log.exception("plugin %s failed to close", plugin.name)
    return failed


async def _within_close_timeout(closing: Awaitable[object]) -> None:
    """Await `closing` for at most CLOSE_TIMEOUT (TimeoutError after that). Not `asyncio.wait_for`: it waits for
    the cancelled close to end, and a close that swallows the cancellation (suppressing CancelledError around
    its own task's end) would hold the caller all the same. A close left behind is cancelled, not awaited."""
    task = asyncio.ensure_future(closing)
    try:
        done, _ = await asyncio.wait((task,), timeout=CLOSE_TIMEOUT)
    except BaseException:  # the caller cancelled: so is its close
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise TimeoutError
    task.result()


def _close_soon(closing: Coroutine[Any, Any, object], name: str, tasks: set[asyncio.Task[Any]]) -> None:
    """Run `closing` as a task kept in `tasks` (awaited later); at once when no event loop runs (a caller that
    is not async cannot await it)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(closing)
        return
    task = loop.create_task(closing, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


@contextlib.contextmanager
def _listening(flag: str, address: str) -> Iterator[None]:
    """A server that cannot listen (port taken, address not local or unresolvable) is a start-up error
    naming the flag, not a traceback. grpc.aio says RuntimeError("Failed to bind ..."), asyncio OSError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(";")[0]
        raise ConfigError(f"{flag} / --bind-address: cannot listen on {address}: {reason}") from None


def _tls_label(cert: ServingCert | None) -> str:
    if cert is None:
        return "off"
    return "self-signed" if cert.self_signed else f"{cert.cert_file}" + (" (reloaded on change)" if cert.reload else "")


async def run(settings: Settings) -> None:
    """Build, start, serve until SIGTERM or SIGINT, drain, close. The signal handlers are installed first: a
    signal during the start-up (the config build, the discovery grace, the Kubernetes start) stops the start,
    closes what it had set up and returns, as after a drain (exit code 0). A second signal exits at once (1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: exit now, as the reference does (controller-runtime: exit 1)
            log.warning("second signal while stopping: exiting now")
            os._exit(1)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        await _serve(settings, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve(settings: Settings, stop: asyncio.Event) -> None:
    try:
        app = App(settings)  # synchronous: a signal meanwhile is handled once it returns
    except BaseException:
        await failed_start_ups_closed()
        raise
    # `starting` is scheduled first, so its first step (inside start()'s closing try) runs before a signal
    # seen at the same loop iteration can cancel it: a cancelled start always closes what it set up.
    starting = asyncio.create_task(app.start(), name="start-up")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.warning("signal during start-up: stopping before serving")
            await cancel_and_wait(starting)
            if app.close_failures:
                raise CloseFailed(f"{app.close_failures} part(s) failed to close (logged above)")
            return
        starting.result()  # a failed start: its error (it has closed what it set up)
        tune_gc()
        failing = asyncio.create_task(app.failed.wait(), name="part-failed")
        try:
            await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(failing)
    finally:
        # run() itself cancelled, or failed
        await cancel_and_wait(*(task for task in (starting, stopping) if not task.done()))
    failures = await app.shutdown()
    if app.failure is not None:
        raise app.failure
    if failures:
        raise CloseFailed(f"{failures} part(s) failed to close (logged above)")


def request_tracing(enabled: bool) -> RequestTracing | None:
    """The request tracer, or None. The OpenTelemetry SDK is imported only when tracing is on: it checks some
    OTEL_* variables as it loads (e.g. OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT=-1 raises), and a bad one is a
    configuration error naming it, not a traceback, nor one for an EPP started with --tracing=false."""
    if not enabled:
        return None
    try:
        from llmepp.observability import tracing

        return tracing.configure(True)
    except ValueError as e:
        raise ConfigError(f"tracing (the OTEL_* environment): {e}") from None
