"""Latency-predictor routing (deploy/config/predicted-latency-file-discovery.yaml with `epp-latency-predictor`)
against the EPP's default profile, live, on the routing benchmark's pods and workloads.

    .venv/bin/python -m benchmarks.predicted_latency [--full] [--workloads no-sharing] [--time-scale 4] \\
        [--json benchmarks/results/predicted_latency.json]

Same machinery as `benchmarks.routing` (one `epp-sim` process for the run, caches reset and pods idle before
each contender, the workload's Poisson ladder; metrics per stage from `benchmarks.metrics`). The predictor
starts from its prior for each run and learns online from the run's own responses (retrained every 2 s).
The loadgen sends no SLO headers, so the preset routes on the lowest predicted latency; its streamed
answers carry no usage, so TPOT is not trained (its prior predicts it) and TTFT is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.contenders import Contender, EppBehindEnvoy, _write_epp_config, all_contenders, envoy_yaml
from benchmarks.routing import RESULTS, run_contender, start_sim, stop_cleanly_on_sigterm
from benchmarks.workloads import Scale, kv_blocks_per_pod, sim_args
from llmepp.testing.envoy import EnvoyProcess
from llmepp.testing.ports import free_port
from llmepp.testing.predictor import PredictorProcess
from llmepp.testing.stack import EppProcess

PRESET = Path(__file__).parents[1] / "deploy" / "config" / "predicted-latency-file-discovery.yaml"
FIRST_HOST = 210


def preset_text() -> str:
    """The preset without its file discovery (the benchmark writes its own)."""
    config = yaml.safe_load(PRESET.read_text())
    config["plugins"] = [p for p in config["plugins"] if p["type"] != "file-discovery"]
    config.pop("dataLayer", None)
    return yaml.safe_dump(config, sort_keys=False)


class EppWithPredictor(EppBehindEnvoy):
    """The EPP behind Envoy, with `epp-latency-predictor` beside it (PREDICTION_SERVER_URL / TRAINING_SERVER_URL)."""

    def __init__(self, name: str, config_text: str, description: str) -> None:
        super().__init__(name, config_text, description)
        self.predictor: PredictorProcess | None = None

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        self.predictor = PredictorProcess(workdir / "predictor.log", "--retraining-interval", "2")
        await self.predictor.start()
        config = _write_epp_config(self.config_text, pods, workdir)
        grpc_port, health, metrics = free_port(), free_port(), free_port()
        args = [
            "--config-file", str(config), "--grpc-port", str(grpc_port), "--grpc-health-port", str(health),
            "--metrics-port", str(metrics), "--bind-address", "127.0.0.1",
        ]  # fmt: skip
        self.epp = EppProcess(args, health, workdir / "epp.log", env=self.predictor.epp_env)
        await self.epp.start()
        port, admin = free_port(), free_port()
        self.envoy = EnvoyProcess(envoy_yaml(port, admin, epp_port=grpc_port), admin)
        await self.envoy.start()
        assert self.epp.proc is not None and self.envoy.proc is not None and self.predictor.proc is not None
        self.url = f"http://127.0.0.1:{port}"
        self.pids = {"epp": self.epp.proc.pid, "envoy": self.envoy.proc.pid, "predictor": self.predictor.proc.pid}

    async def stop(self) -> None:
        await super().stop()
        if self.predictor is not None:
            await self.predictor.stop()


def contenders() -> list[Contender]:
    default = [c for c in all_contenders() if c.name == "epp-default"]
    return [*default, EppWithPredictor("epp-predicted-latency", preset_text(), "EPP, latency-predictor preset")]


async def run(quick: bool, scale: Scale, workloads: Sequence[str], seed: int, out: Path) -> dict[str, Any]:
    kv_blocks, _ = kv_blocks_per_pod(scale, seed)
    hosts = [f"127.0.0.{FIRST_HOST + i}" for i in range(scale.pods)]
    port = free_port(hosts[0])
    args = ["--hosts", ",".join(hosts), "--port", str(port), *sim_args(scale, kv_blocks)]
    report: dict[str, Any] = {"quick": quick, "seed": seed, "scale": scale.__dict__, "sim_args": args,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "workloads": {}}  # fmt: skip
    sim, host_pids = await start_sim(args)
    pods = [(h, port) for h in hosts]
    raw: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
            for wl_name in workloads:
                entry: dict[str, Any] = {}
                report["workloads"][wl_name] = entry
                for c in contenders():
                    print(f"{wl_name}: {c.name} ({c.description})", flush=True)
                    entry[c.name] = await run_contender(c, wl_name, scale, quick, pods, Path(tmp), seed, raw, host_pids)
                    _write(report, out)
    finally:
        sim.stop()
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full ladder (default: the quick one)")
    p.add_argument("--workloads", default="no-sharing")
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=RESULTS / "predicted_latency.json")
    a = p.parse_args(argv)
    import uvloop

    stop_cleanly_on_sigterm()
    scale = Scale(time_scale=a.time_scale, pods=a.pods)
    uvloop.run(run(not a.full, scale, [w for w in a.workloads.split(",") if w], a.seed, a.json))


if __name__ == "__main__":
    main()
