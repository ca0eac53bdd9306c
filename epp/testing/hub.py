"""A multicluster hub on loopback: a real Envoy + the `epp` program in multicluster mode, in front of
clusters that are each a whole `Stack` (their own Envoy, EPP and simulated pods).

    client ─► hub Envoy ─► hub EPP ── scrapes every cluster EPP's /metrics (pool averages)
                 └─► cluster Envoy (the gateway the hub EPP picked) ─► cluster EPP ─► pod

    async with Stack(a_options) as a, Stack(b_options) as b, HubStack([a, b], HUB_CONFIG) as hub:
        await session.post(f"{hub.url}/v1/completions", json={...})

The hub's config is an EndpointPickerConfig with a `multicluster-file-discovery` plugin; its `path` is
set here to the cluster list this class writes: one entry per cluster, named `cluster-<i>`, whose
address is the cluster's Envoy and whose `metricsAddress` / `metricsPort` labels are its EPP's metrics.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import yaml

from llmepp.datalayer.multicluster import DISCOVERY_TYPE, METRICS_ADDRESS_LABEL, METRICS_PORT_LABEL
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.ports import free_port
from llmepp.testing.stack import EppProcess, Stack, loopback_epp_args, serves_tls, write_yaml_atomically


class HubStack:
    def __init__(
        self,
        clusters: Sequence[Stack],
        epp_config: str,
        epp_args: Sequence[str] = (),
        *,
        startup_timeout: float = 30.0,
        envoy_log_level: str = "warning",
    ) -> None:
        self.clusters = list(clusters)
        self.epp_config = epp_config
        self.epp_args = list(epp_args)
        self.startup_timeout = startup_timeout
        self.envoy_log_level = envoy_log_level
        self._dir = tempfile.TemporaryDirectory(prefix="epp-hub-")
        self.workdir = Path(self._dir.name)
        self.clusters_file = self.workdir / "clusters.yaml"
        self.config_file = self.workdir / "hub-config.yaml"
        self.epp_port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()
        self.envoy_port, self.envoy_admin_port = free_port(), free_port()
        self.epp: EppProcess | None = None
        self.envoy: EnvoyProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def cluster_name(self, index: int) -> str:
        return f"cluster-{index}"

    def write_clusters(self, clusters: Sequence[Stack]) -> None:
        """(Re)write the cluster list (the hub reloads it live when its discovery watches the file)."""
        entries = [
            {
                "name": self.cluster_name(i),
                "address": "127.0.0.1",
                "port": c.envoy_port,
                "labels": {METRICS_ADDRESS_LABEL: "127.0.0.1", METRICS_PORT_LABEL: str(c.metrics_port)},
            }
            for i, c in enumerate(clusters)
        ]
        write_yaml_atomically(self.clusters_file, {"endpoints": entries})

    async def start(self) -> None:
        self.write_clusters(self.clusters)
        self.config_file.write_text(with_cluster_file(self.epp_config, self.clusters_file))
        args = loopback_epp_args(self.config_file, self.epp_port, self.health_port, self.metrics_port, *self.epp_args)
        self.epp = EppProcess(args, self.health_port, self.workdir / "hub-epp.log", self.startup_timeout)
        await self.epp.start()
        config = render_envoy_config(
            self.envoy_port,
            self.epp_port,
            self.envoy_admin_port,
            listen_address="127.0.0.1",
            epp_tls=serves_tls(self.epp_args),
        )
        self.envoy = EnvoyProcess(config, self.envoy_admin_port, log_level=self.envoy_log_level)
        await self.envoy.start()

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        if self.epp is not None:
            await self.epp.stop()
        self._dir.cleanup()

    async def __aenter__(self) -> HubStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def with_cluster_file(config_text: str, clusters_file: Path) -> str:
    """The hub config with its multicluster-file-discovery plugin reading `clusters_file`."""
    config = yaml.safe_load(config_text) or {}
    found = [p for p in config.get("plugins", []) if p.get("type") == DISCOVERY_TYPE]
    if len(found) != 1:
        raise ValueError(f"the hub config needs exactly one {DISCOVERY_TYPE} plugin")
    found[0].setdefault("parameters", {})["path"] = str(clusters_file)
    return yaml.safe_dump(config, sort_keys=False)
