"""The routers compared by `benchmarks.routing`, all in front of the same simulated pods.

Each contender is started, measured and stopped in turn; the pods stay up (their prefix caches are
reset in between by the runner):

| name | what sits between the client and the pods |
|---|---|
| `envoy-round-robin` | Envoy, one static cluster of every pod, `ROUND_ROBIN` (what a Kubernetes Service gives) |
| `envoy-least-request` | Envoy, same cluster, `LEAST_REQUEST` (power of two choices over active requests) |
| `epp-random` | Envoy + the EPP (ext_proc), profile: `random-picker` only |
| `epp-load` | Envoy + the EPP, profile: queue-scorer 2 + kv-cache-utilization-scorer 2 |
| `epp-default` | Envoy + the EPP, the default profile (`llmepp.config.schema.DEFAULT_CONFIG`) |
| `epp-optimized-baseline` | Envoy + the EPP, the reference's optimized-baseline profile (benchmarks/configs) |
| `vllm-router-cache-aware` | `vllm-router --policy cache_aware` (PyPI `vllm-router`, Rust), defaults otherwise |
| `vllm-router-power-of-two` | `vllm-router --policy power_of_two` |
| `smg-cache-aware` | `smg launch --policy cache_aware --backend vllm` (PyPI `smg`, Rust), defaults otherwise |

The precise-vs-approximate comparison (`benchmarks.precise_routing`) adds `EppReplicasBehindEnvoy` (n EPP
replicas behind one Envoy) and `WithEviction` (any contender while one pod's cache is evicted behind its back);
they are not in `all_contenders()`.

Every Envoy here runs with `--concurrency 1` and without the access log (the Rust routers run with their
log level at warning), so no contender pays for per-request logging. The EPP runs exactly as `epp` does
(default transport, 50 ms metrics refresh) behind the Envoy bootstrap of `llmepp.testing.envoy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import signal
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.des.policies import policy_config
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.lifetime import die_with_parent
from llmepp.testing.ports import free_port
from llmepp.testing.stack import EppProcess, loopback_epp_args, with_epp_endpoints, with_file_discovery

VENV_BIN = Path(sys.executable).parent


def envoy_yaml(
    listen_port: int,
    admin_port: int,
    *,
    epp_port: int | None = None,
    upstreams: list[tuple[str, int]] | None = None,
    lb_policy: str = "ROUND_ROBIN",
) -> str:
    """The project's Envoy bootstrap (llmepp.testing.envoy), without the access log.

    With `epp_port`: ext_proc to the EPP and ORIGINAL_DST routing (exactly `Stack`'s Envoy). With
    `upstreams`: no ext_proc, one static cluster holding every pod, balanced by `lb_policy`.
    """
    if epp_port is not None:
        text = render_envoy_config(listen_port, epp_port, admin_port, listen_address="127.0.0.1")
    else:
        assert upstreams
        text = render_envoy_config(
            listen_port, 0, admin_port, ext_proc=False, upstream=upstreams[0], listen_address="127.0.0.1"
        )
    config: dict[str, Any] = yaml.safe_load(text)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                f["typed_config"].pop("access_log", None)
    if upstreams is not None:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "upstream":
                cluster["lb_policy"] = lb_policy
                cluster["load_assignment"]["endpoints"] = [
                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
                                      for h, p in upstreams]}
                ]  # fmt: skip
    return yaml.safe_dump(config, sort_keys=False, width=1000)


def _write_epp_config(config_text: str, pods: list[tuple[str, int]], workdir: Path) -> Path:
    """The EPP's config file for these pods (file discovery of an endpoints file written beside it)."""
    endpoints = workdir / "endpoints.yaml"
    entries = [
        {"name": f"pod-{i}", "address": h, "port": p, "labels": {"llm-d.ai/role": "both"}}
        for i, (h, p) in enumerate(pods)
    ]
    endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
    config = workdir / "epp-config.yaml"
    config.write_text(with_file_discovery(config_text, endpoints))
    return config


@dataclass
class Contender(ABC):
    name: str
    family: str  # envoy | epp | rust
    description: str
    url: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    log_tail: str = ""

    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or None."""
        return None

    @abstractmethod
    def setup(self) -> dict[str, Any]:
        """What a results file records to rerun this contender exactly (config, arguments, versions)."""

    @abstractmethod
    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        """Start the router in front of `pods` ((host, port) pairs); set `url`."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the router and everything it started."""

    async def before_ladder(self) -> None:
        """Called once the router is up and the caches are empty, right before the first stage."""


class EnvoyLB(Contender):
    def __init__(self, name: str, lb_policy: str, description: str) -> None:
        super().__init__(name, "envoy", description)
        self.lb_policy = lb_policy
        self.envoy: EnvoyProcess | None = None

    def setup(self) -> dict[str, Any]:
        return {"lb_policy": self.lb_policy}

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        port, admin = free_port(), free_port()
        self.envoy = EnvoyProcess(envoy_yaml(port, admin, upstreams=pods, lb_policy=self.lb_policy), admin)
        await self.envoy.start()
        assert self.envoy.proc is not None
        self.url = f"http://127.0.0.1:{port}"
        self.pids = {"envoy": self.envoy.proc.pid}

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
            self.log_tail = self.envoy.log[-2000:]


class EppBehindEnvoy(Contender):
    def __init__(self, name: str, config_text: str, description: str, extra_args: list[str] | None = None) -> None:
        super().__init__(name, "epp", description)
        self.config_text = config_text
        self.extra_args = extra_args or []
        self.epp: EppProcess | None = None
        self.envoy: EnvoyProcess | None = None

    def setup(self) -> dict[str, Any]:
        # The hash tells two results files' configs apart at a glance; the text reruns it.
        digest = hashlib.sha256(self.config_text.encode()).hexdigest()[:16]
        return {"config_sha256": digest, "config": self.config_text, "extra_args": self.extra_args}

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        config = _write_epp_config(self.config_text, pods, workdir)
        grpc_port, health, metrics = free_port(), free_port(), free_port()
        args = loopback_epp_args(config, grpc_port, health, metrics, *self.extra_args)
        self.epp = EppProcess(args, health, workdir / "epp.log")
        await self.epp.start()
        port, admin = free_port(), free_port()
        self.envoy = EnvoyProcess(envoy_yaml(port, admin, epp_port=grpc_port), admin)
        await self.envoy.start()
        assert self.epp.proc is not None and self.envoy.proc is not None
        self.url = f"http://127.0.0.1:{port}"
        self.pids = {"epp": self.epp.proc.pid, "envoy": self.envoy.proc.pid}

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        if self.epp is not None:
            await self.epp.stop()
            self.log_tail = self.epp.log[-3000:]


class RustRouter(Contender):
    """A router from PyPI that proxies by itself (console script in the venv)."""

    def __init__(self, name: str, program: str, args: list[str], description: str) -> None:
        super().__init__(name, "rust", description)
        self.program = program
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path: Path | None = None

    def setup(self) -> dict[str, Any]:
        try:
            installed = version(self.program)  # the console script is named after its distribution
        except PackageNotFoundError:
            installed = None
        return {"program": self.program, "version": installed, "args": self.args}

    def binary(self) -> str | None:
        candidate = VENV_BIN / self.program
        return str(candidate) if candidate.exists() else shutil.which(self.program)

    def unavailable(self) -> str | None:
        if self.binary() is None:
            return f"`{self.program}` not installed (pip install the bench extra)"
        return None

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        binary = self.binary()
        assert binary is not None
        port, prom = free_port(), free_port()
        urls = [f"http://{h}:{p}" for h, p in pods]
        argv = [binary, *[a.format(port=port, prom=prom) for a in self.args]]
        i = argv.index("--worker-urls")
        argv[i + 1 : i + 1] = urls
        self.log_path = workdir / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *die_with_parent(argv), stdout=log, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self.pids = {"router": self.proc.pid}

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 8)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.log_path is not None and self.log_path.exists():
            self.log_tail = self.log_path.read_text(errors="replace")[-3000:]

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.returncode


async def wait_ready(contender: Contender, model: str, within: float = 60.0) -> None:
    """Until a one-token completion through the contender succeeds (workers registered, routes up)."""
    body = {"model": model, "prompt": "ready?", "max_tokens": 1}
    deadline = time.monotonic() + within
    last = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while time.monotonic() < deadline:
            if isinstance(contender, RustRouter) and contender.exited() is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.post(contender.url + "/v1/completions", json=body) as r:
                    last = f"HTTP {r.status}: {(await r.text())[:300]}"
                    if r.status == 200:
                        return
            await asyncio.sleep(0.25)
    tail = ""
    if isinstance(contender, RustRouter) and contender.log_path and contender.log_path.exists():
        tail = contender.log_path.read_text(errors="replace")[-1500:]
    raise RuntimeError(f"{contender.name} not ready after {within:.0f}s (last answer: {last or 'none'}) {tail}")


def all_contenders() -> list[Contender]:
    return [
        EnvoyLB("envoy-round-robin", "ROUND_ROBIN", "Envoy ROUND_ROBIN over all pods, no EPP"),
        EnvoyLB("envoy-least-request", "LEAST_REQUEST", "Envoy LEAST_REQUEST (P2C on active requests), no EPP"),
        EppBehindEnvoy("epp-random", policy_config("random"), "EPP, random-picker"),
        EppBehindEnvoy("epp-load", policy_config("load-only"), "EPP, queue 2 + kv-cache-utilization 2"),
        EppBehindEnvoy("epp-default", policy_config("default"),
                       "EPP, default profile (load-balance-filter 32/1.5x; queue 2, kv-cache 2, prefix 6, "
                       "no-hit-lru 2 spreadByBacklog)"),
        EppBehindEnvoy("epp-optimized-baseline", policy_config("optimized-baseline"),
                       "EPP, optimized-baseline (queue 2, kv 2, prefix 3, no-hit-lru 2, approx-prefix producer)"),
        RustRouter("vllm-router-cache-aware", "vllm-router",
                   ["--host", "127.0.0.1", "--port", "{port}", "--worker-urls", "--policy", "cache_aware",
                    "--prometheus-host", "127.0.0.1", "--prometheus-port", "{prom}", "--log-level", "warning"],
                   "vllm-router (Rust, PyPI) cache_aware, default thresholds"),
        RustRouter("vllm-router-power-of-two", "vllm-router",
                   ["--host", "127.0.0.1", "--port", "{port}", "--worker-urls", "--policy", "power_of_two",
                    "--prometheus-host", "127.0.0.1", "--prometheus-port", "{prom}", "--log-level", "warning"],
                   "vllm-router power_of_two"),
        RustRouter("smg-cache-aware", "smg",
                   ["launch", "--host", "127.0.0.1", "--port", "{port}", "--worker-urls", "--policy", "cache_aware",
                    "--backend", "vllm", "--prometheus-host", "127.0.0.1", "--prometheus-port", "{prom}",
                    "--log-level", "warn"],
                   "SMG (Shepherd Model Gateway, Rust, PyPI `smg`) cache_aware, default thresholds"),
    ]  # fmt: skip


CONTENDER_NAMES = [c.name for c in all_contenders()]


# ------------------------------------------------------------------------------------------------------
# Contenders of the precise-vs-approximate comparison (`benchmarks.precise_routing`). They are not in
# `all_contenders()`: the main routing run does not start the pods with KV events.
class EppReplicasBehindEnvoy(EppBehindEnvoy):
    """`replicas` EPP processes with the same config behind one Envoy whose ext_proc cluster balances
    over them (round robin per request stream), as `Stack(epp_replicas=n)` and the earlier
    `benchmarks.precise_prefix` did: each replica routes a share of the traffic with its own state.
    With one replica it is `EppBehindEnvoy`. Before stopping, it keeps the EPPs' prefix-index series
    (`epp_metrics`, summed over replicas): what the precise index ingested and what the producers predicted."""

    KEPT = ("llm_d_epp_kv_", "llm_d_epp_prefix_indexer_hit_ratio_sum", "llm_d_epp_prefix_indexer_hit_ratio_count")
    GAUGES = ("llm_d_epp_kv_index_", "llm_d_epp_kv_subscribers")

    def __init__(self, name: str, config_text: str, description: str, replicas: int = 1) -> None:
        super().__init__(name, config_text, description)
        self.replicas = replicas
        self.epps: list[EppProcess] = []
        self.metrics_ports: list[int] = []
        self.epp_metrics: dict[str, float] = {}
        self._baseline: dict[str, float] = {}

    def setup(self) -> dict[str, Any]:
        return {**super().setup(), "replicas": self.replicas}

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        config = _write_epp_config(self.config_text, pods, workdir)
        grpc_ports = []
        for i in range(self.replicas):
            grpc_port, health, metrics = free_port(), free_port(), free_port()
            args = loopback_epp_args(config, grpc_port, health, metrics)
            epp = EppProcess(args, health, workdir / f"epp-{i}.log")
            self.epps.append(epp)
            await epp.start()
            grpc_ports.append(grpc_port)
            self.metrics_ports.append(metrics)
        self.epp = self.epps[0]
        port, admin = free_port(), free_port()
        text = envoy_yaml(port, admin, epp_port=grpc_ports[0])
        self.envoy = EnvoyProcess(with_epp_endpoints(text, grpc_ports) if self.replicas > 1 else text, admin)
        await self.envoy.start()
        assert self.envoy.proc is not None
        self.url = f"http://127.0.0.1:{port}"
        self.pids = {("epp" if i == 0 else f"epp{i + 1}"): e.proc.pid for i, e in enumerate(self.epps) if e.proc}
        self.pids["envoy"] = self.envoy.proc.pid

    async def before_ladder(self) -> None:
        """Counters from before the ladder are not the run's: the JSON keeps the ladder's deltas. A precise
        EPP that joins pods publishing since earlier contenders replays their buffered history (a partial
        window: orphans, unknown removals, lost batches) once the cache reset's events reach it; nothing else
        flows before the first stage, so the baseline is taken once the counters have not moved for 2.5 s
        (longer than a stalled replay's 2 s idle timeout), at most 20 s. EPPs without KV events skip the wait."""
        self._baseline = await self._scrape()
        if not any(k.startswith("llm_d_epp_kv_") for k in self._baseline):
            return
        deadline, still = time.monotonic() + 20.0, 0
        while time.monotonic() < deadline and still < 5:
            await asyncio.sleep(0.5)
            now = await self._scrape()
            still = still + 1 if now == self._baseline else 0
            self._baseline = now

    async def _scrape(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for port in self.metrics_ports:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                        text = await r.text()
                    for line in text.splitlines():
                        if line.startswith(self.KEPT):
                            name, _, value = line.rpartition(" ")
                            with contextlib.suppress(ValueError):
                                totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    async def stop(self) -> None:
        end = await self._scrape()
        # Gauges (index size, subscribers) as they end; counters as ladder deltas.
        self.epp_metrics = {
            k: v if k.startswith(self.GAUGES) else v - self._baseline.get(k, 0.0) for k, v in end.items()
        }
        if self.envoy is not None:
            await self.envoy.stop()
        for epp in self.epps:
            await epp.stop()
        self.log_tail = "".join(e.log[-1500:] for e in self.epps)


@dataclass(frozen=True)
class EvictionSpec:
    """Evict `fraction` of pod `pod`'s KV capacity from its prefix cache every `every_s` simulated seconds,
    through the simulator's `POST /admin/evict`, i.e. behind the router's back (the pod publishes the
    `BlockRemoved` events a real vLLM would; nothing goes through the router)."""

    pod: int = 0
    fraction: float = 0.2
    every_s: float = 30.0
    order: str = "lru"
    seed: int = 1


class WithEviction(Contender):
    """Another contender, unchanged, while a background task evicts part of one pod's cache periodically."""

    def __init__(self, inner: Contender, spec: EvictionSpec, time_scale: float, name: str, description: str) -> None:
        super().__init__(name, inner.family, description)
        self.inner = inner
        self.spec = spec
        self.time_scale = time_scale
        self.evicted: list[int] = []  # blocks evicted per round
        self._task: asyncio.Task[None] | None = None
        self._pod_url = ""

    def unavailable(self) -> str | None:
        return self.inner.unavailable()

    def setup(self) -> dict[str, Any]:
        return {**self.inner.setup(), "eviction": asdict(self.spec)}

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        await self.inner.start(pods, workdir)
        self.url, self.pids = self.inner.url, self.inner.pids
        host, port = pods[self.spec.pod]
        self._pod_url = f"http://{host}:{port}"

    async def before_ladder(self) -> None:
        await self.inner.before_ladder()
        # From the first stage on (warm-up included), not while the runner probes and resets the caches.
        self._task = asyncio.create_task(self._evict_loop(self._pod_url))

    async def _evict_loop(self, pod_url: str) -> None:
        s = self.spec
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                await asyncio.sleep(s.every_s / self.time_scale)
                body = {"fraction": s.fraction, "order": s.order, "seed": s.seed + len(self.evicted)}
                try:
                    async with http.post(pod_url + "/admin/evict", json=body) as r:
                        self.evicted.append(int((await r.json())["evicted"]) if r.status == 200 else -1)
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                    self.evicted.append(-1)  # counted as a failed round; the run goes on

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.inner.stop()
        self.log_tail = self.inner.log_tail
