"""A P/D deployment on loopback: simulated prefill and decode pods, an `epp-pd-sidecar` in front
of every decode pod, the `epp` program and a real Envoy (used by tests/e2e/test_pd.py and
benchmarks/pd_disagg.py).

    Envoy ──ext_proc──► EPP (P/D config, file discovery)
      │  x-gateway-destination-endpoint = decode endpoint = the SIDECAR's address
      ▼
    sidecar 127.0.0.D:S ──(x-prefiller-host-port)──► prefill pod 127.0.0.P:port (1-token prefill)
      └──────────────────────────────────────────────► decode pod 127.0.0.D:port (remote-prefill decode)

As in a Kubernetes P/D pool, the decode endpoint the EPP knows is the sidecar (the pod's serving
port); the decode model server behind it listens on another port of the same address. Prefill
(and `both`) pods are listed directly. Every endpoint carries `llm-d.ai/role: <role>`.

    async with PDStack(PDStackOptions(prefill=2, decode=2, sim_args=[...])) as st:
        st.url                  # Envoy
        st.pod_url("decode-0")  # the sim pod itself (its /metrics), bypassing the sidecar
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmepp.sidecar.cli import READY_PREFIX
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.stack import EppProcess, free_port, with_file_discovery
from llmepp_sim.cluster import PodInfo, SimProcess

ROLE_LABEL = "llm-d.ai/role"

# Reference example B (deploy/config/pd-epp-config.yaml), unchanged.
PD_CONFIG = """\
plugins:
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 16384, lruCapacityPerServer: 31250}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 16}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
"""


class SidecarProcess:
    """`epp-pd-sidecar` in a child process; ready once it prints its listening line."""

    def __init__(self, args: list[str], log_path: Path, startup_timeout: float = 20.0) -> None:
        self.args = [sys.executable, "-m", "llmepp.sidecar.cli", *args]
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"epp-pd-sidecar exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            if READY_PREFIX in self.log:
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise TimeoutError(f"epp-pd-sidecar not ready after {self.startup_timeout}s:\n{self.log[-4000:]}")

    async def stop(self, grace: float = 5.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@dataclass
class PDStackOptions:
    prefill: int = 2
    decode: int = 2
    # Aggregated pods (role both), listed directly; e.g. prefill=decode=0, both=4 for a baseline.
    both: int = 0
    # Decode pods behind a sidecar (False: listed directly, P/D headers are then ignored).
    sidecars: bool = True
    sim_args: list[str] = field(default_factory=list)
    sidecar_args: list[str] = field(default_factory=list)
    epp_config: str = PD_CONFIG
    epp_args: list[str] = field(default_factory=list)
    # Pods get 127.0.0.<first_host>, <first_host + 1>, ... (prefill, then decode, then both).
    first_host: int = 120
    envoy_log_level: str = "warning"
    startup_timeout: float = 30.0


class PDStack:
    def __init__(self, options: PDStackOptions | None = None) -> None:
        self.options = o = options or PDStackOptions()
        self._dir = tempfile.TemporaryDirectory(prefix="epp-pdstack-")
        self.workdir = Path(self._dir.name)
        self.epp_port = free_port()
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.envoy_port = free_port()
        self.envoy_admin_port = free_port()
        self.roles = ["prefill"] * o.prefill + ["decode"] * o.decode + ["both"] * o.both
        if not 0 < len(self.roles) <= 254 - o.first_host:
            raise ValueError("pod count does not fit the 127.0.0.x range")
        self.sim: SimProcess | None = None
        self.sidecars: dict[str, SidecarProcess] = {}
        # Pod name → the address the EPP routes to (the sidecar's for decode pods).
        self.endpoint_address: dict[str, str] = {}
        self.epp: EppProcess | None = None
        self.envoy: EnvoyProcess | None = None
        self.endpoints_file = self.workdir / "endpoints.yaml"
        self.config_file = self.workdir / "epp-config.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pods(self) -> list[PodInfo]:
        return self.sim.pods if self.sim is not None else []

    def pods_with_role(self, role: str) -> list[PodInfo]:
        return [p for p in self.pods if p.role == role]

    def pod_url(self, name: str) -> str:
        return next(p.url for p in self.pods if p.name == name)

    def pod_of_endpoint(self, address: str) -> str:
        """The pod name behind an endpoint address (sidecar or pod) the EPP routed to."""
        return next(name for name, addr in self.endpoint_address.items() if addr == address)

    async def start(self) -> None:
        o = self.options
        counters: dict[str, int] = {}
        entries = []
        for i, role in enumerate(self.roles):
            index = counters[role] = counters.get(role, -1) + 1
            entries.append({"name": f"{role}-{index}", "host": f"127.0.0.{o.first_host + i}", "port": 0,
                            "role": role, "labels": {ROLE_LABEL: role}})  # fmt: skip
        sim_config = self.workdir / "sim.yaml"
        sim_config.write_text(yaml.safe_dump({"pods": entries}))
        self.sim = SimProcess(["--config", str(sim_config), *o.sim_args], ready_timeout=o.startup_timeout)
        await asyncio.to_thread(self.sim.start)
        starting = []
        for pod in self.pods:
            if pod.role == "decode" and o.sidecars:
                host = pod.address.rsplit(":", 1)[0]
                port = free_port(host)
                sidecar = SidecarProcess(
                    ["--host", host, "--port", str(port), "--decoder-url", pod.url, "--log-level", "warning",
                     *o.sidecar_args],
                    self.workdir / f"sidecar-{pod.name}.log",
                )  # fmt: skip
                self.sidecars[pod.name] = sidecar
                self.endpoint_address[pod.name] = f"{host}:{port}"
                starting.append(sidecar.start())
            else:
                self.endpoint_address[pod.name] = pod.address
        await asyncio.gather(*starting)
        self.write_endpoints()
        self.config_file.write_text(with_file_discovery(o.epp_config, self.endpoints_file))
        self.epp = EppProcess(self._epp_args(), self.health_port, self.workdir / "epp.log", o.startup_timeout)
        await self.epp.start()
        config = render_envoy_config(self.envoy_port, self.epp_port, self.envoy_admin_port, listen_address="127.0.0.1")
        self.envoy = EnvoyProcess(config, self.envoy_admin_port, log_level=o.envoy_log_level)
        await self.envoy.start()

    def _epp_args(self) -> list[str]:
        return [
            "--config-file", str(self.config_file),
            "--grpc-port", str(self.epp_port),
            "--grpc-health-port", str(self.health_port),
            "--metrics-port", str(self.metrics_port),
            "--bind-address", "127.0.0.1",
            *self.options.epp_args,
        ]  # fmt: skip

    def write_endpoints(self) -> None:
        entries = []
        for pod in self.pods:
            host, port = self.endpoint_address[pod.name].rsplit(":", 1)
            entries.append({"name": pod.name, "address": host, "port": int(port), "labels": {ROLE_LABEL: pod.role}})
        self.endpoints_file.write_text(yaml.safe_dump({"endpoints": entries}))

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        if self.epp is not None:
            await self.epp.stop()
        await asyncio.gather(*(s.stop() for s in self.sidecars.values()), return_exceptions=True)
        if self.sim is not None:
            await asyncio.to_thread(self.sim.stop)
        self._dir.cleanup()

    async def __aenter__(self) -> PDStack:
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


async def scrape(session: aiohttp.ClientSession, url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus /metrics page as (name, labels, value)."""
    async with session.get(url) as resp:
        resp.raise_for_status()
        text = await resp.text()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))
