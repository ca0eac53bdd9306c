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

`decode_ranks=N` (> 1) makes every decode pod a data-parallel one: N simulated pods
`decode-<i>-rank-<r>` on the pod's address and consecutive ports (its vLLM ranks), one sidecar with
`--data-parallel-size N` in front (rank r on its port + r), and one endpoint per rank port.

    async with PDStack(PDStackOptions(prefill=2, decode=2, sim_args=[...])) as st:
        st.url                  # Envoy
        st.pod_url("decode-0")  # the sim pod itself (its /metrics), bypassing the sidecar
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmepp.sidecar.cli import READY_PREFIX
from llmepp.testing.ports import free_port_run
from llmepp.testing.stack import ChildProcess, Stack, StackOptions
from llmepp_sim.cluster import PodInfo, SimProcess

ROLE_LABEL = "llm-d.ai/role"

# Reference example B, shipped as deploy/config/pd-epp-config.yaml.
_CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "config"
PD_CONFIG = (_CONFIGS / "pd-epp-config.yaml").read_text()
# The same split in the deprecated plugins of llm-d before v0.7 (pd-profile-handler).
LEGACY_PD_CONFIG = (_CONFIGS / "pd-legacy-epp-config.yaml").read_text()


class SidecarProcess(ChildProcess):
    """`epp-pd-sidecar`; ready once it prints its listening line."""

    name = "epp-pd-sidecar"

    def __init__(self, args: list[str], log_path: Path, startup_timeout: float = 20.0) -> None:
        super().__init__([sys.executable, "-m", "llmepp.sidecar.cli", *args], log_path, startup_timeout)

    async def ready(self) -> bool:
        return READY_PREFIX in self.log


@dataclass
class PDStackOptions(StackOptions):
    prefill: int = 2
    decode: int = 2
    # Aggregated pods (role both), listed directly; e.g. prefill=decode=0, both=4 for a baseline.
    both: int = 0
    # Decode pods behind a sidecar (False: listed directly, P/D headers are then ignored).
    sidecars: bool = True
    sidecar_args: list[str] = field(default_factory=list)
    # Data-parallel ranks of every decode pod (> 1: one sidecar with --data-parallel-size in front).
    decode_ranks: int = 1
    epp_config: str = PD_CONFIG
    # Pods get 127.0.0.<first_host>, <first_host + 1>, ... (prefill, then decode, then both).
    first_host: int = 120


class PDStack(Stack):
    """`Stack` with per-pod roles and a sidecar in front of every decode pod."""

    options: PDStackOptions

    def __init__(self, options: PDStackOptions | None = None) -> None:
        o = options or PDStackOptions()
        self.roles = ["prefill"] * o.prefill + ["decode"] * o.decode + ["both"] * o.both
        if not 0 < len(self.roles) <= 254 - o.first_host:
            raise ValueError("pod count does not fit the 127.0.0.x range")
        o.pods = len(self.roles)
        super().__init__(o)
        self.sidecars: dict[str, SidecarProcess] = {}
        # Pod name → the address the EPP routes to (the sidecar's for decode pods).
        self.routed_address: dict[str, str] = {}

    def pods_with_role(self, role: str) -> list[PodInfo]:
        return [p for p in self.pods if p.role == role]

    def endpoint_address(self, pod: PodInfo) -> str:
        return self.routed_address.get(pod.name, pod.address)

    async def start_pods(self) -> None:
        o = self.options
        counters: dict[str, int] = {}
        entries = []
        for host, role in zip(self.hosts, self.roles):
            index = counters[role] = counters.get(role, -1) + 1
            entry = {"name": f"{role}-{index}", "host": host, "port": 0, "role": role, "labels": {ROLE_LABEL: role}}
            if role == "decode" and o.decode_ranks > 1:  # a data-parallel pod: its ranks on consecutive ports
                first = free_port_run(host, o.decode_ranks)
                entries += [{**entry, "name": f"{role}-{index}-rank-{r}", "port": first + r, "data_parallel_rank": r}
                            for r in range(o.decode_ranks)]  # fmt: skip
            else:
                entries.append(entry)
        sim_config = self.workdir / "sim.yaml"
        sim_config.write_text(yaml.safe_dump({"pods": entries}))
        self.sim = SimProcess(["--config", str(sim_config), *o.sim_args], ready_timeout=o.startup_timeout)
        await self.sim.start_async()
        if not o.sidecars:
            return
        by_host: dict[str, list[PodInfo]] = {}  # a decode pod's ranks share its address
        for pod in self.pods_with_role("decode"):
            by_host.setdefault(pod.address.rsplit(":", 1)[0], []).append(pod)
        for host, ranks in by_host.items():
            ranks.sort(key=lambda p: int(p.address.rsplit(":", 1)[1]))
            name = ranks[0].name.rsplit("-rank-", 1)[0]
            port = free_port_run(host, len(ranks))
            dp = ["--data-parallel-size", str(len(ranks)), "--pod-ip", host] if len(ranks) > 1 else []
            self.sidecars[name] = SidecarProcess(
                ["--host", host, "--port", str(port), "--decoder-url", ranks[0].url, *dp, "--log-level", "warning",
                 *o.sidecar_args],
                self.workdir / f"sidecar-{name}.log",
            )  # fmt: skip
            for rank, pod in enumerate(ranks):
                self.routed_address[pod.name] = f"{host}:{port + rank}"
        await asyncio.gather(*(sidecar.start() for sidecar in self.sidecars.values()))

    async def stop_pods(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.sidecars.values()), return_exceptions=True)
        await super().stop_pods()


async def scrape(session: aiohttp.ClientSession, url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus /metrics page as (name, labels, value)."""
    async with session.get(url) as resp:
        resp.raise_for_status()
        text = await resp.text()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))
