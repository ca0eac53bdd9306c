"""Latency-predictor routing (deploy/config/predicted-latency-file-discovery.yaml with `epp-latency-predictor`)
against the EPP's default profile, live, on the routing benchmark's pods and workloads.

    .venv/bin/python -m benchmarks.predicted_latency [--full] [--workloads no-sharing] [--time-scale 4] \\
        [--json benchmarks/results/predicted_latency.json]
    .venv/bin/python -m benchmarks.predicted_latency --workloads slo-mix --full --seeds 1,2 \\
        [--json benchmarks/results/predicted_latency_slo.json]
    .venv/bin/python -m benchmarks.predicted_latency --table benchmarks/results/predicted_latency_slo.json

Same machinery as `benchmarks.routing` (one `epp-sim` process for the run, caches reset and pods idle before
each contender, the workload's Poisson ladder; metrics per stage from `benchmarks.metrics`). The predictor
starts from its prior for each contender run and learns online from the run's own responses (retrained
every 2 s).

* `no-sharing` (the routing benchmark's workload): no SLO headers, so the preset routes on the lowest
  predicted latency; its streamed answers carry no usage, so TPOT is not trained (its prior predicts it).
* `slo-mix` (`benchmarks.workloads.SloMix`): what the preset is for. Interactive requests (70%: short
  prompts, tight TTFT and TPOT SLOs) and batch requests (30%: long prompts and answers, loose SLOs) state
  their SLOs in `x-llm-d-slo-ttft-ms` / `x-llm-d-slo-tpot-ms` and ask for usage, so TTFT and TPOT are both
  trained. The ladder opens with a warm-up stage (both contenders; not reported) so the predictor has
  learnt before the measured stages. Reported per stage and per class: SLO attainment (the share of the
  class's requests, failures included, whose TTFT and TPOT were both within the class's SLOs), TTFT and
  TPOT p50/p90, output tokens/s, success rate. `--seeds` repeats the whole comparison per workload seed
  (contender order alternating) in one JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.contenders import Contender, EppBehindEnvoy, _write_epp_config, all_contenders, envoy_yaml
from benchmarks.loadgen import Outcome
from benchmarks.metrics import _censored, _finite, pct, request_tpot_ms, request_ttft_s
from benchmarks.routing import RESULTS, run_contender, start_sim, stop_cleanly_on_sigterm
from benchmarks.workloads import RequestClass, Scale, SloMix, build, kv_blocks_per_pod, sim_args
from llmepp.testing.envoy import EnvoyProcess
from llmepp.testing.ports import free_port
from llmepp.testing.predictor import PredictorProcess
from llmepp.testing.stack import EppProcess, loopback_epp_args

PRESET = Path(__file__).parents[1] / "deploy" / "config" / "predicted-latency-file-discovery.yaml"
FIRST_HOST = 210


def preset_text(headroom_strategy: str | None = None) -> str:
    """The preset without its file discovery (the benchmark writes its own); `headroom_strategy` overrides
    latency-scorer's `headroomSelectionStrategy` (the preset's is the default, `least`)."""
    config = yaml.safe_load(PRESET.read_text())
    config["plugins"] = [p for p in config["plugins"] if p["type"] != "file-discovery"]
    config.pop("dataLayer", None)
    if headroom_strategy is not None:
        for plugin in config["plugins"]:
            if plugin["type"] == "latency-scorer":
                plugin["parameters"] = {**plugin.get("parameters", {}), "headroomSelectionStrategy": headroom_strategy}
    return yaml.safe_dump(config, sort_keys=False)


class EppWithPredictor(EppBehindEnvoy):
    """The EPP behind Envoy, with `epp-latency-predictor` beside it (PREDICTION_SERVER_URL / TRAINING_SERVER_URL)."""

    def __init__(self, name: str, config_text: str, description: str) -> None:
        super().__init__(name, config_text, description)
        self.predictor: PredictorProcess | None = None
        self.metrics_url = ""
        self.diagnostics: dict[str, Any] = {}

    async def start(self, pods: list[tuple[str, int]], workdir: Path) -> None:
        self.predictor = PredictorProcess(workdir / "predictor.log", "--retraining-interval", "2")
        await self.predictor.start()
        config = _write_epp_config(self.config_text, pods, workdir)
        grpc_port, health, metrics = free_port(), free_port(), free_port()
        args = loopback_epp_args(config, grpc_port, health, metrics)
        self.epp = EppProcess(args, health, workdir / "epp.log", env=self.predictor.epp_env)
        await self.epp.start()
        port, admin = free_port(), free_port()
        self.envoy = EnvoyProcess(envoy_yaml(port, admin, epp_port=grpc_port), admin)
        await self.envoy.start()
        assert self.epp.proc is not None and self.envoy.proc is not None and self.predictor.proc is not None
        self.url = f"http://127.0.0.1:{port}"
        self.pids = {"epp": self.epp.proc.pid, "envoy": self.envoy.proc.pid, "predictor": self.predictor.proc.pid}
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"

    async def stop(self) -> None:
        self.diagnostics = await self._diagnostics()
        await super().stop()
        if self.predictor is not None:
            await self.predictor.stop()

    async def _diagnostics(self) -> dict[str, Any]:
        """Over the whole run (warm-up included): the EPP's prediction series and the predictor's fitted models."""
        out: dict[str, Any] = {}
        if self.predictor is None or not self.metrics_url:
            return out
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                async with s.get(self.metrics_url) as r:
                    out["epp"] = epp_prediction_metrics(await r.text())
                for target in ("ttft", "tpot"):
                    async with s.get(f"{self.predictor.training_url}/model/{target}/download") as r:
                        out[f"model_{target}"] = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        return out


def epp_prediction_metrics(text: str) -> dict[str, dict[str, float]]:
    """Per model name (one per slo-mix class): sums and counts of the EPP's latency-prediction series (seconds),
    SLO violations and requests routed without predictions; with the means in ms."""
    wanted = {
        "llm_d_epp_request_predicted_ttft_seconds": "predicted_ttft",
        "llm_d_epp_request_predicted_tpot_seconds": "predicted_tpot",
        "llm_d_epp_request_ttft_seconds": "ttft",
        "llm_d_epp_request_ttft_prediction_duration_seconds": "prediction_call",
    }
    out: dict[str, dict[str, float]] = {}

    def add(model: str, key: str, value: float) -> None:
        d = out.setdefault(model, {})
        d[key] = d.get(key, 0.0) + value

    for family in text_string_to_metric_families(text):
        key = wanted.get(family.name)
        for sample in family.samples:
            model = sample.labels.get("model_name", "")
            if key and sample.name in (family.name + "_sum", family.name + "_count"):
                add(model, f"{key}_{sample.name.rsplit('_', 1)[1]}", sample.value)
            elif sample.name == "llm_d_epp_request_slo_violation_total":
                add(model, f"slo_violations_{sample.labels.get('type', '')}", sample.value)
            elif sample.name == "llm_d_epp_latency_prediction_unavailable_total":
                add("", f"unavailable_{sample.labels.get('reason', '')}", sample.value)
    for d in out.values():
        for key in wanted.values():
            if d.get(f"{key}_count"):
                d[f"{key}_mean_ms"] = d[f"{key}_sum"] / d[f"{key}_count"] * 1000
    return out


CONTENDERS = ("epp-default", "epp-predicted-latency")
# A diagnostic variant (--contenders): the preset with latency-scorer spreading (`most` headroom wins) instead of
# bin-packing up to the SLO (`least`).
MOST = "epp-predicted-latency-most"


def contenders(names: Sequence[str] = CONTENDERS) -> list[Contender]:
    made: dict[str, Contender] = {c.name: c for c in all_contenders() if c.name == "epp-default"}
    made["epp-predicted-latency"] = EppWithPredictor(
        "epp-predicted-latency", preset_text(), "EPP, latency-predictor preset"
    )
    made[MOST] = EppWithPredictor(
        MOST, preset_text("most"), "EPP, latency-predictor preset, headroomSelectionStrategy most"
    )
    return [made[n] for n in names]


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


# ------------------------------------------------------------------------------------------------ slo-mix
def class_stats(mine: Sequence[Outcome], cls: RequestClass, scale: Scale, sim_seconds: float) -> dict[str, Any]:
    """One class's requests in one stage: SLO attainment (failures count as misses), latencies, throughput."""
    ts, k = scale.time_scale, scale.token_unit
    ok = [o for o in mine if o.ok]
    ttft = [request_ttft_s(o, ts) for o in mine]
    tpot = [t for o in ok if (t := request_tpot_ms(o, ts, k)) is not None]
    ttft_met = tpot_met = both = 0
    for o in ok:
        t = request_ttft_s(o, ts) * 1000
        p = request_tpot_ms(o, ts, k)
        a = cls.ttft_slo_ms <= 0 or t <= cls.ttft_slo_ms
        b = cls.tpot_slo_ms <= 0 or (p is not None and p <= cls.tpot_slo_ms)
        ttft_met += a
        tpot_met += b
        both += a and b
    n = len(mine)
    tokens = sum(o.tokens for o in mine)

    def share(x: int) -> float | None:
        return x / n if n else None

    return {
        "sent": n, "ok": len(ok), "success_rate": share(len(ok)),
        "slo_attainment": share(both), "ttft_slo_attainment": share(ttft_met), "tpot_slo_attainment": share(tpot_met),
        "ttft_p50_s": _censored(pct(ttft, 0.5)), "ttft_p90_s": _censored(pct(ttft, 0.9)),
        "tpot_p50_ms": _finite(pct(tpot, 0.5)), "tpot_p90_ms": _finite(pct(tpot, 0.9)),
        "output_tokens_per_s": tokens * k / sim_seconds if sim_seconds > 0 else None,
        "pods": {pod: sum(1 for o in mine if o.pod == pod) for pod in sorted({o.pod for o in mine})},
    }  # fmt: skip


def per_class(
    workload: SloMix, outcomes: Sequence[Outcome], stages: Sequence[dict[str, Any]], scale: Scale
) -> list[dict[str, Any]]:
    """Per stage (as in `stages`, the runner's summaries): per class, `class_stats`."""
    classes = {c.name: c for c in workload.classes}
    out = []
    for st in stages:
        mine = [o for o in outcomes if o.stage == st["stage"]]
        entry: dict[str, Any] = {"stage": st["stage"], "label": st["label"], "rate": st["rate"],
                                 "warmup": st["warmup"], "classes": {}}  # fmt: skip
        for name, cls in classes.items():
            of = [o for o in mine if o.key.split("/", 1)[0] == name]
            entry["classes"][name] = class_stats(of, cls, scale, st["sim_s"])
        out.append(entry)
    return out


async def run_slo(
    quick: bool, scale: Scale, seeds: Sequence[int], out: Path, names: Sequence[str] = CONTENDERS,
    workload_name: str = "slo-mix",
) -> dict[str, Any]:  # fmt: skip
    kv_blocks, _ = kv_blocks_per_pod(scale, seeds[0])
    hosts = [f"127.0.0.{FIRST_HOST + i}" for i in range(scale.pods)]
    port = free_port(hosts[0])
    first = build(workload_name, scale, quick, seeds[0])
    assert isinstance(first, SloMix)
    args = ["--hosts", ",".join(hosts), "--port", str(port), *sim_args(scale, kv_blocks),
            "--served-model-name", *first.served_models()]  # fmt: skip
    report: dict[str, Any] = {"quick": quick, "seeds": list(seeds), "scale": scale.__dict__, "sim_args": args,
                              "workload": first.describe(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "runs": []}  # fmt: skip
    sim, host_pids = await start_sim(args)
    pods = [(h, port) for h in hosts]
    raw: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-latency-slo-") as tmp:
            for i, seed in enumerate(seeds):
                workload = build(workload_name, scale, quick, seed)
                assert isinstance(workload, SloMix)
                order = contenders(names) if i % 2 == 0 else contenders(names)[::-1]
                run: dict[str, Any] = {"seed": seed, "order": [c.name for c in order], "contenders": {}}
                report["runs"].append(run)
                for c in order:
                    print(f"seed {seed}: {c.name} ({c.description}) - {time.monotonic() - t0:.0f}s into the run",
                          flush=True)  # fmt: skip
                    outcomes: list[Outcome] = []
                    wdir = Path(tmp) / f"seed{seed}"
                    wdir.mkdir(exist_ok=True)
                    result = await run_contender(c, workload_name, scale, quick, pods, wdir, seed, raw, host_pids,
                                                 workload=workload, outcomes_sink=outcomes)  # fmt: skip
                    if result.get("status") == "ok":
                        result["classes"] = per_class(workload, outcomes, result["stages"], scale)
                        for st in result["classes"]:
                            if not st["warmup"]:
                                print("    " + class_line(st), flush=True)
                    if isinstance(c, EppWithPredictor):
                        result["diagnostics"] = c.diagnostics
                    run["contenders"][c.name] = result
                    _write(report, out)
    finally:
        sim.stop()
    report["wall_s"] = time.monotonic() - t0
    _write(report, out)
    return report


def class_line(st: dict[str, Any]) -> str:
    parts = []
    for name, c in st["classes"].items():
        att = c["slo_attainment"]
        parts.append(f"{name} {c['ok']}/{c['sent']} SLO met {att * 100 if att is not None else math.nan:.0f}% "
                     f"TTFT p50/p90 {_f(c['ttft_p50_s'], '.2f')}/{_f(c['ttft_p90_s'], '.2f')} s "
                     f"TPOT p90 {_f(c['tpot_p90_ms'], '.1f')} ms")  # fmt: skip
    return f"{st['label']:>6}: " + "; ".join(parts)


def _f(x: Any, spec: str) -> str:
    if x is None:
        return "-"
    return x if isinstance(x, str) else format(x, spec)


def _median_range(values: Sequence[Any], spec: str, scale: float = 1.0) -> str:
    """ "median (min-max)" over seeds; a "timeout" percentile sorts last."""
    xs = [math.inf if isinstance(v, str) else v * scale for v in values if v is not None]
    if not xs:
        return "-"

    def f(x: float) -> str:
        return "timeout" if math.isinf(x) else format(x, spec)

    lo, med, hi = f(min(xs)), f(statistics.median(xs)), f(max(xs))
    return med if lo == hi else f"{med} ({lo}-{hi})"


def slo_tables(report: dict[str, Any]) -> str:
    """Markdown: per class, a table of the measured stages, each cell the median over seeds (min-max)."""
    names = [n for n in (*CONTENDERS, MOST) if any(n in r["contenders"] for r in report["runs"])]
    short = {"epp-default": "default", "epp-predicted-latency": "predicted", MOST: "predicted, most"}
    classes = [c["name"] for c in report["workload"]["classes"]]
    lines: list[str] = []
    for cls in classes:
        lines += [f"**{cls}**", "",
                  "| stage (req/s) | requests | contender | SLO met % | TTFT p50 / p90 s | TPOT p50 / p90 ms | "
                  "output tok/s | success % |",
                  "|---|---:|---|---:|---|---|---:|---:|"]  # fmt: skip
        first = next(c["classes"] for r in report["runs"] for c in r["contenders"].values() if c.get("classes"))
        for si, st in enumerate(first):
            if st["warmup"]:
                continue
            for name in names:
                cells = [r["contenders"].get(name, {}).get("classes", [])[si]["classes"][cls]
                         for r in report["runs"] if r["contenders"].get(name, {}).get("status") == "ok"]  # fmt: skip
                if not cells:
                    continue
                sent = _median_range([c["sent"] for c in cells], ".0f")
                lines.append(
                    f"| {st['label']} | {sent} | {short[name]} | "
                    f"{_median_range([c['slo_attainment'] for c in cells], '.0f', 100)} | "
                    f"{_median_range([c['ttft_p50_s'] for c in cells], '.2f')} / "
                    f"{_median_range([c['ttft_p90_s'] for c in cells], '.2f')} | "
                    f"{_median_range([c['tpot_p50_ms'] for c in cells], '.1f')} / "
                    f"{_median_range([c['tpot_p90_ms'] for c in cells], '.1f')} | "
                    f"{_median_range([c['output_tokens_per_s'] for c in cells], '.0f')} | "
                    f"{_median_range([c['success_rate'] for c in cells], '.1f', 100)} |"
                )
        lines.append("")
    return "\n".join(lines)


def _write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full ladder (default: the quick one)")
    p.add_argument("--workloads", default="no-sharing", help="no-sharing (and others of benchmarks.routing) or slo-mix")
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seeds", help="slo-mix: comma-separated workload seeds, one comparison each (default --seed)")
    p.add_argument("--json", type=Path, help="default results/predicted_latency.json (slo-mix: _slo.json)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"slo-mix: of {', '.join((*CONTENDERS, MOST))}")
    p.add_argument("--table", type=Path, metavar="JSON", help="print the slo-mix tables of a results file and exit")
    a = p.parse_args(argv)
    if a.table:
        print(slo_tables(json.loads(a.table.read_text())))
        return
    import uvloop

    stop_cleanly_on_sigterm()
    scale = Scale(time_scale=a.time_scale, pods=a.pods)
    workloads = [w for w in a.workloads.split(",") if w]
    if workloads == ["slo-mix"]:
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
        out = a.json or RESULTS / "predicted_latency_slo.json"
        names = [n for n in a.contenders.split(",") if n]
        report = uvloop.run(run_slo(not a.full, scale, seeds, out, names))
        print(slo_tables(report))
        return
    if "slo-mix" in workloads:
        raise SystemExit("--workloads slo-mix runs alone")
    uvloop.run(run(not a.full, scale, workloads, a.seed, a.json or RESULTS / "predicted_latency.json"))


if __name__ == "__main__":
    main()
