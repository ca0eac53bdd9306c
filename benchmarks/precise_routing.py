"""Precise vs approximate prefix routing on the canonical shared-prefix benchmark (issue #8's proof).

    .venv/bin/python -m benchmarks.precise_routing [--quick] [--scenarios 1-epp,evict,2-replicas]
                                                   [--json benchmarks/results/routing_precise.json]

The main routing comparison's machinery (`benchmarks.routing`): the same `shared-prefix` workload, scale,
pods, ladder and per-stage metrics, but a separate run writing its own JSON, because the pods here publish
vLLM KV events over ZeroMQ (one PUB and one replay ROUTER socket per pod, on the same two ports of every pod
address), which the main run does not enable.

Two contenders, identical except for the prefix-match producer (`benchmarks/configs/`):

* `epp-precise` - `precise-prefix.yaml`, the reference's precise-prefix profile (active-request 4,
  kv-cache-utilization 2, prefix 2, no-hit-lru 2; `precise-prefix-cache-producer` fed by the pods' KV
  events, speculative indexing on);
* `epp-approx` - `precise-prefix-approx.yaml`, the same profile and token-producer with
  `approx-prefix-cache-producer` (the EPP's guess from its own routing history).

Each runs in three scenarios, one after the other on the same pods (caches emptied in between):

* `1-epp`: one EPP behind Envoy;
* `evict`: the same, while 20% of pod 0's KV capacity is evicted from its prefix cache every 30 simulated
  seconds behind the EPP's back: `POST /admin/evict` on the simulated pod, least recently used free cached
  blocks first (the allocator's order); the pod publishes `BlockRemoved` as vLLM would. This is the eviction
  of the earlier `benchmarks.precise_prefix` run (direct requests worth 20% of pod 0's KV every 30 simulated
  s) without those requests' GPU time, which would otherwise load pod 0 for both producers alike;
* `2-replicas`: two EPP processes behind one Envoy whose ext_proc cluster alternates between them per
  request, so each replica routes half of the traffic and sees only its own half.

Full: the main run's shared-prefix ladder (warm-up cycle, then `workloads.FULL_RATES`: 3 to 30 canonical QPS)
at time scale 4, about 15 minutes. `--quick`: the warm-up cycle and one stage past light load (15 canonical QPS)
at time scale 8, about 3 minutes; `make bench-quick` runs only its `2-replicas` scenario (about 1 minute). The
verdicts (benchmarks.report) compare every stage past light load.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.contenders import (
    Contender,
    EppReplicasBehindEnvoy,
    EvictionSpec,
    WithEviction,
)
from benchmarks.routing import _write, run_contender, run_header, stage_line, start_sim, stop_cleanly_on_sigterm
from benchmarks.workloads import Scale, SharedPrefix, build, kv_blocks_per_pod, shared_prefix_stages
from benchmarks.workloads import sim_args as base_sim_args
from llmepp.testing.ports import free_port
from llmepp_sim.tokenizer import TOKENIZER_PATH

HERE = Path(__file__).parent
RESULTS = HERE / "results"
# Per scheduling profile, the two configs (identical but for the prefix-match producer).
PROFILES = {
    "default": {
        "approx": HERE / "configs" / "approx-default.yaml",
        "precise": HERE / "configs" / "precise-default.yaml",
    },
    "reference": {
        "approx": HERE / "configs" / "precise-prefix-approx.yaml",
        "precise": HERE / "configs" / "precise-prefix.yaml",
    },
    # Diagnostic (results/diagnostics/README.md): precise with the routing history beside it.
    "history": {
        "approx": HERE / "configs" / "approx-default.yaml",
        "precise": HERE / "configs" / "diagnostics" / "precise-history.yaml",
    },
}
# Not the main run's 127.0.0.200+: the two runs may share the machine, and distinct addresses keep their pods,
# logs and ZeroMQ sockets apart.
FIRST_HOST = 220
WORKLOAD = "shared-prefix"
QUICK_RATES = (15,)  # canonical QPS: one stage past light load (the warm-up cycle dominates the time)
FULL_TIME_SCALE = 4.0
QUICK_TIME_SCALE = 8.0
PRODUCERS = ("approx", "precise")


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    replicas: int = 1
    evict: bool = False

    def contender_name(self, producer: str) -> str:
        return f"epp-{producer}" + ("" if self.key == "1-epp" else f"-{self.key}")


SCENARIOS = (
    Scenario("1-epp", "1 EPP"),
    Scenario("evict", "20% of pod 0's cache evicted behind the EPP's back", evict=True),
    Scenario("2-replicas", "2 EPP replicas splitting the traffic (one Envoy)", replicas=2),
)
# `make bench-quick` must stay within 10 minutes: its precise part runs the scenario where the two producers
# differ most (each replica's approximate index sees half of the traffic).
QUICK_SCENARIOS = tuple(s for s in SCENARIOS if s.key == "2-replicas")


def epp_config(path: Path, zmq_port: int, replay_port: int) -> str:
    """A config file with this run's values: the simulator's tokenizer and the pods' ports."""
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    for plugin in config["plugins"]:
        params = plugin.get("parameters") or {}
        tokenizer = params.get("tokenizer")
        if plugin["type"] == "token-producer" and tokenizer and tokenizer.get("backend") == "hf":
            tokenizer["path"] = str(TOKENIZER_PATH)
        if plugin["type"] == "precise-prefix-cache-producer":
            disc = params.setdefault("kvEventsConfig", {}).setdefault("podDiscoveryConfig", {})
            disc.update({"socketPort": zmq_port, "replaySocketPort": replay_port})
    return yaml.safe_dump(config, sort_keys=False)


def contender(
    scenario: Scenario, producer: str, path: Path, config: str, eviction: EvictionSpec, time_scale: float
) -> Contender:
    name = scenario.contender_name(producer)
    what = f"EPP, {path.name} ({producer} prefix producer)"
    if scenario.replicas > 1:
        return EppReplicasBehindEnvoy(name, config, f"{scenario.replicas} x {what}", scenario.replicas)
    inner = EppReplicasBehindEnvoy(name, config, what)
    if scenario.evict:
        desc = (f"{what}; {eviction.fraction:.0%} of pod {eviction.pod}'s KV evicted ({eviction.order}) every "
                f"{eviction.every_s:g} simulated s")  # fmt: skip
        return WithEviction(inner, eviction, time_scale, name, desc)
    return inner


def workload(scale: Scale, quick: bool, seed: int, rates: Sequence[float] = ()) -> SharedPrefix:
    """The main run's shared-prefix workload (full ladder); --quick (or `rates`, canonical QPS, for diagnostics)
    keeps its prompts and warm-up with a shorter ladder."""
    wl = build(WORKLOAD, scale, quick=False, seed=seed)
    assert isinstance(wl, SharedPrefix)
    if quick or rates:
        wl.stages = shared_prefix_stages(scale, rates or QUICK_RATES, len(wl.prompts))
    return wl


async def run(
    quick: bool,
    scale: Scale,
    out: Path,
    seed: int = 1,
    scenarios: Sequence[Scenario] = SCENARIOS,
    producers: Sequence[str] = PRODUCERS,
    eviction: EvictionSpec | None = None,
    rates: Sequence[float] = (),
    profile: str = "default",
) -> dict[str, Any]:
    eviction = eviction or EvictionSpec(seed=seed)
    configs = PROFILES[profile]
    kv_blocks, sp = kv_blocks_per_pod(scale, seed)
    hosts = [f"127.0.0.{FIRST_HOST + i}" for i in range(scale.pods)]
    port, zmq_port, replay_port = free_port(hosts[0]), free_port(hosts[0]), free_port(hosts[0])
    # One PUB + one replay socket per pod, the same port numbers on every pod address (the CLI re-targets
    # the endpoint to each pod's host), which is what the producer's podDiscoveryConfig expects.
    args = ["--hosts", ",".join(hosts), "--port", str(port), *base_sim_args(scale, kv_blocks),
            "--zmq-endpoint", f"tcp://{hosts[0]}:{zmq_port}",
            "--kv-events-replay-endpoint", f"tcp://{hosts[0]}:{replay_port}"]  # fmt: skip
    wl = workload(scale, quick, seed, rates)
    report: dict[str, Any] = {
        **run_header(quick, seed, scale, kv_blocks, sp, args),
        "loadavg": {"start": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "profile": profile,
        "configs": {p: str(configs[p].relative_to(HERE.parent)) for p in producers},
        "eviction": asdict(eviction),
        "scenarios": [{**asdict(s), "contenders": {p: s.contender_name(p) for p in producers}} for s in scenarios],
        "workloads": {WORKLOAD: {"workload": wl.describe(), "contenders": {}}},
    }
    entries: dict[str, Any] = report["workloads"][WORKLOAD]["contenders"]
    stages = ", ".join(s.label for s in wl.stages)
    print(f"precise routing: {scale.pods} pods, KV {kv_blocks} blocks/pod, time scale {scale.time_scale:g}, "
          f"stages {stages}; KV events on tcp://<pod>:{zmq_port}", flush=True)  # fmt: skip
    sim, host_pids = await start_sim(args)
    pods = [(h, port) for h in hosts]
    raw: list[dict[str, Any]] = []
    t_all = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-precise-") as tmp:
            for scenario in scenarios:
                for producer in producers:
                    path = configs[producer]
                    c = contender(scenario, producer, path, epp_config(path, zmq_port, replay_port), eviction,
                                  scale.time_scale)  # fmt: skip
                    print(f"  {c.name} ({c.description}) - {time.monotonic() - t_all:.0f}s into the run", flush=True)
                    entry = await run_contender(c, WORKLOAD, scale, quick, pods, Path(tmp), seed, raw, host_pids, wl)
                    entry.update({"scenario": scenario.key, "producer": producer})
                    epp = c.inner if isinstance(c, WithEviction) else c
                    if isinstance(epp, EppReplicasBehindEnvoy):
                        entry["epp_metrics"] = epp.epp_metrics
                    if isinstance(c, WithEviction):
                        done = [n for n in c.evicted if n >= 0]
                        entry["evictions"] = {"rounds": len(c.evicted), "failed": len(c.evicted) - len(done),
                                              "blocks": sum(done), "per_round": c.evicted}  # fmt: skip
                        print(f"    evictions: {len(done)} rounds, {sum(done)} blocks", flush=True)
                    entries[c.name] = entry
                    _write(report, out)
    finally:
        await asyncio.to_thread(sim.stop)
    report["wall_s"] = time.monotonic() - t_all
    report["loadavg"]["end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    _write(report, out)
    with gzip.open(out.with_name(out.stem + "-requests.json.gz"), "wt") as f:
        json.dump(raw, f)
    print(summary(report), flush=True)
    return report


def summary(report: dict[str, Any]) -> str:
    """Per scenario and stage: TTFT p90 and hit rate of both producers (the console's last word)."""
    lines = []
    entries = report["workloads"][WORKLOAD]["contenders"]
    for s in report["scenarios"]:
        lines.append(f"{s['title']}:")
        for producer, name in s["contenders"].items():
            e = entries.get(name, {})
            lines.extend(f"  {producer:>7} " + stage_line(st) for st in e.get("stages", []) if not st["warmup"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"canonical QPS {QUICK_RATES} at time scale 8")
    p.add_argument("--json", type=Path, default=RESULTS / "routing_precise.json")
    p.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS))
    p.add_argument("--producers", default=",".join(PRODUCERS))
    p.add_argument("--time-scale", type=float, default=None, help="default 4 (--quick: 8)")
    p.add_argument("--token-unit", type=int, default=16)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--evict-every", type=float, default=EvictionSpec.every_s, help="simulated seconds")
    p.add_argument("--evict-fraction", type=float, default=EvictionSpec.fraction)
    p.add_argument("--rates", default="", help="canonical QPS after the warm-up, e.g. 10,20 (diagnostics)")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="default",
        help="scheduling profile of both contenders: the EPP's default or the reference's precise-prefix",
    )
    a = p.parse_args(argv)
    ts = a.time_scale or (QUICK_TIME_SCALE if a.quick else FULL_TIME_SCALE)
    keys = a.scenarios.split(",")
    scenarios = [s for s in SCENARIOS if s.key in keys]
    producers = [x for x in PRODUCERS if x in a.producers.split(",")]
    eviction = EvictionSpec(fraction=a.evict_fraction, every_s=a.evict_every, seed=a.seed)
    import uvloop

    stop_cleanly_on_sigterm()
    scale = Scale(token_unit=a.token_unit, time_scale=ts, pods=a.pods)
    rates = [float(r) for r in a.rates.split(",") if r]
    uvloop.run(run(a.quick, scale, a.json, a.seed, scenarios, producers, eviction, rates, a.profile))


if __name__ == "__main__":
    main()
