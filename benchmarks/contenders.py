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

Every Envoy here runs with `--concurrency 1` and without the access log (the Rust routers run with their
log level at warning), so no contender pays for per-request logging. The EPP runs exactly as `epp` does
(default transport, 50 ms metrics refresh) behind the Envoy bootstrap of `llmepp.testing.envoy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.des.policies import policy_config
from llmepp.testing.envoy import EnvoyProcess, render_envoy_config
from llmepp.testing.stack import EppProcess, free_port, with_file_discovery

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
    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        """Start the router in front of `pods` ((host, port) pairs); set `url`."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the router and everything it started."""


class EnvoyLB(Contender):
    def __init__(self, name: str, lb_policy: str, description: str) -> None:
        super().__init__(name, "envoy", description)
        self.lb_policy = lb_policy
        self.envoy: EnvoyProcess | None = None

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

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        endpoints = workdir / "endpoints.yaml"
        entries = [
            {"name": f"pod-{i}", "address": h, "port": p, "labels": {"llm-d.ai/role": "both"}}
            for i, (h, p) in enumerate(pods)
        ]
        endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
        config = workdir / "epp-config.yaml"
        config.write_text(with_file_discovery(self.config_text, endpoints))
        grpc_port, health, metrics = free_port(), free_port(), free_port()
        args = [
            "--config-file", str(config), "--grpc-port", str(grpc_port), "--grpc-health-port", str(health),
            "--metrics-port", str(metrics), "--bind-address", "127.0.0.1", *self.extra_args,
        ]  # fmt: skip
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
                *argv, stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
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
        EppBehindEnvoy("epp-default", policy_config("default"), "EPP, default profile (queue 2, kv-cache 2, prefix 3)"),
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
