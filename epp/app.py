"""The running EPP: builds every part from Settings + config, serves, drains on SIGTERM.

Settings ─► config.loader.build ─► Components (plugins, pipeline, discovery, sources)
Datastore ◄─ discovery plugin          MetricsCollector ─► endpoint.metrics
gRPC :9002 ext_proc ─► Director        gRPC :9003 health    HTTP :9090 /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpc
from prometheus_client import start_http_server

from llmepp.config.loader import Components, build, load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.collector import MetricsCollector
from llmepp.datalayer.datastore import Datastore
from llmepp.director import Director
from llmepp.framework.plugin import ConfigError
from llmepp.observability.metrics import EppMetrics
from llmepp.server import health
from llmepp.server.extproc import ExtProcServicer, create_server
from llmepp.settings import Settings

log = logging.getLogger(__name__)

# Discovery gets this long to fail loudly at start-up (a bad endpoints file) before we serve.
_DISCOVERY_STARTUP_GRACE = 0.5


def config_text(settings: Settings) -> str:
    if settings.config_text is not None:
        return settings.config_text
    if settings.config_file is not None:
        try:
            return Path(settings.config_file).read_text()
        except OSError as e:
            raise ConfigError(f"--config-file: cannot read {settings.config_file}: {e.strerror}") from None
    return DEFAULT_CONFIG


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = EppMetrics()
        self.datastore = Datastore(settings.pool_name, settings.pool_namespace)
        self.components: Components = build(
            load_config(config_text(settings)), datastore=self.datastore, settings=settings, metrics=self.metrics
        )
        if self.components.discovery is None:
            raise ConfigError(
                "dataLayer.discovery: no endpoint discovery configured; add a file-discovery plugin "
                "(see deploy/ and README)"
            )
        self.director = Director(
            self.datastore,
            self.components.pipeline,
            self.metrics,
            subset_filter=not settings.disable_endpoint_subset_filter,
            emit_scores=settings.emit_endpoint_scores,
            decision_header=settings.decision_header,
        )
        self.collector = self._build_collector()
        self.health = health.HealthService(self.ready)
        self.draining = False
        self.grpc_port = 0
        self.health_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._discovery_task: asyncio.Task[None] | None = None
        self._metrics_server: object | None = None

    def _build_collector(self) -> MetricsCollector | None:
        for ds in self.components.data_sources:
            if ds.source.type == "metrics-data-source" and ds.extractors:
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

    def ready(self) -> bool:
        return self.datastore.synced and not self.draining

    async def start(self) -> None:
        s = self.settings
        discovery = self.components.discovery
        assert discovery is not None
        self._discovery_task = asyncio.create_task(discovery.run(self.datastore), name="discovery")
        done, _ = await asyncio.wait({self._discovery_task}, timeout=_DISCOVERY_STARTUP_GRACE)
        if done:
            self._discovery_task.result()  # raises the start-up error (e.g. a bad endpoints file)
            raise ConfigError(f"discovery plugin {discovery.name!r} stopped right after start")
        if self.collector is not None:
            await self.collector.start()

        # gRPC message limits follow the body limit (server_options).
        self._grpc, self.grpc_port = create_server(ExtProcServicer(self.director, self.metrics, s), s)
        await self._grpc.start()

        self._health_server = grpc.aio.server()
        health.add_to_server(self.health, self._health_server)
        self.health_port = self._health_server.add_insecure_port(f"{s.bind_address}:{s.grpc_health_port}")
        await self._health_server.start()

        if s.metrics_port:
            self._metrics_server, _ = start_http_server(s.metrics_port, s.bind_address, registry=self.metrics.registry)
        log.info(
            "epp serving",
            extra={"grpc_port": self.grpc_port, "health_port": self.health_port, "metrics_port": s.metrics_port,
                   "plugins": sorted(self.components.plugins)},
        )  # fmt: skip

    async def shutdown(self) -> None:
        """Drain: report NOT_SERVING at once, let in-flight streams finish, then stop."""
        self.draining = True
        self.health.drain()
        log.info("draining", extra={"drain_timeout": self.settings.drain_timeout})
        if self._grpc is not None:
            await self._grpc.stop(grace=self.settings.drain_timeout)
        if self._health_server is not None:
            await self._health_server.stop(grace=None)
        if self.collector is not None:
            await self.collector.aclose()
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._discovery_task
        for plugin in self.components.plugins.values():
            try:
                await plugin.aclose()
            except Exception:
                log.exception("plugin %s failed to close", plugin.name)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
        log.info("stopped")


async def run(settings: Settings) -> None:
    app = App(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.shutdown()
