"""Every benchmark in one run: overhead section, flow control under saturation, live routing comparison, plots,
README.

    make bench          # .venv/bin/python -m benchmarks.run_all          (full: ~2 h on 2 cores)
    make bench-quick    # .venv/bin/python -m benchmarks.run_all --quick  (≤ 10 min: fewer stages/contenders)

    .venv/bin/python -m benchmarks.run_all --only routing --workloads no-sharing --contenders epp-default,...
    .venv/bin/python -m benchmarks.run_all --only report     # regenerate plots + README from the JSON
    .venv/bin/python -m benchmarks.run_all --only precise [--quick]  # precise vs approx prefix routing alone

Results: benchmarks/results/{routing.json, routing-requests.json.gz, overhead.json, scheduling-*.json,
flowcontrol.json, flowcontrol_tenants.json, routing_precise.json, routing_precise_reference.json, run.json,
des/precise-{default,reference}.json, des/hot-prefix.json, *.png}; benchmarks/README.md is regenerated from
README.template.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import flowcontrol_tenants, overhead, precise_routing, report, routing
from benchmarks.des import hot_prefix as des_hot_prefix
from benchmarks.des import precise as des_precise

RESULTS = Path(__file__).parent / "results"
QUICK_TIME_SCALE = 8.0
FULL_TIME_SCALE = 4.0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="≤ 10 minutes: fewer stages and contenders")
    p.add_argument(
        "--only",
        choices=("all", "overhead", "flowcontrol", "routing", "precise", "hot-prefix", "report"),
        default="all",
    )
    p.add_argument("--results", type=Path, default=RESULTS)
    routing.add_args(p)
    a = p.parse_args(argv)
    if a.time_scale is None:
        a.time_scale = QUICK_TIME_SCALE if a.quick else FULL_TIME_SCALE
    a.results.mkdir(parents=True, exist_ok=True)
    routing.stop_cleanly_on_sigterm()
    t0 = time.monotonic()
    meta_path = a.results / "run.json"
    meta: dict[str, Any] = {"machine": report.machine_info(), "loadavg": {"start": _load()}, "argv": sys.argv[1:],
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    print(f"machine: {meta['machine']}", flush=True)
    print(f"load average at start: {meta['loadavg']['start']}", flush=True)
    if a.only in ("all", "overhead"):
        print("== overhead section", flush=True)
        overhead.run(a.quick, a.results)
    if a.only in ("all", "flowcontrol"):
        print("== flow control under saturation (noisy neighbour, priority)", flush=True)
        flowcontrol_tenants.run_section(a.quick, a.results)
    if a.only in ("all", "routing"):
        print("== routing section", flush=True)
        names = a.contenders.split(",") if a.contenders else None
        workloads = [w for w in a.workloads.split(",") if w]
        import uvloop

        uvloop.run(
            routing.run(
                a.quick,
                routing.scale_from_args(a),
                workloads,
                names,
                a.seed,
                a.results / "routing.json",
                routing.parse_extra(a.extra_epp),
                a.stages,
            )
        )
    if a.only in ("all", "precise"):
        # Its own pods (KV events on) and its own JSON; the ladder is the main run's shared-prefix one.
        print("== precise vs approximate prefix routing (shared-prefix; 1 EPP, eviction, 2 replicas)", flush=True)
        import uvloop

        scenarios = precise_routing.QUICK_SCENARIOS if a.quick else precise_routing.SCENARIOS
        scale = routing.scale_from_args(a)
        uvloop.run(precise_routing.run(a.quick, scale, a.results / "routing_precise.json", a.seed, scenarios))
        if not a.quick:
            # The same comparison with the reference's precise-prefix profile (another ~16 min).
            print("== precise vs approximate, the reference's precise-prefix profile", flush=True)
            out = a.results / "routing_precise_reference.json"
            uvloop.run(precise_routing.run(False, scale, out, a.seed, scenarios, profile="reference"))
            # And both profiles over eight workload seeds in simulated time (DES.md; ~3 min, deterministic).
            print("== precise vs approximate in simulated time, eight seeds per profile", flush=True)
            for profile in ("default", "reference"):
                des_precise.main(["--seeds", "1-8", "--profile", profile,
                                  "--json", str(a.results / "des" / f"precise-{profile}.json")])  # fmt: skip
    if a.only in ("all", "hot-prefix"):
        # One prefix carrying all traffic, in simulated time (~1 min, deterministic): what prefix affinity does
        # without the default's escape hatch, which the benchmark workloads' many prefixes do not show, and what
        # the hatch changes in those workloads.
        print("== one hot prefix in simulated time, five seeds", flush=True)
        des_hot_prefix.main(["--seeds", "1-5", "--check-seeds", "1-10",
                             "--json", str(a.results / "des" / "hot-prefix.json")])  # fmt: skip
    if a.only != "report":
        meta["loadavg"]["end"] = _load()
        meta["wall_s"] = time.monotonic() - t0
        meta_path.write_text(json.dumps(meta, indent=1))
    print("== report", flush=True)
    # A results directory elsewhere (trial runs) gets its own README next to it.
    readme = report.README if a.results.resolve() == RESULTS.resolve() else a.results.parent / "README.md"
    report.render(a.results, readme)
    print(f"done in {(time.monotonic() - t0) / 60:.1f} min; README: {readme}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
