"""The overhead section: runs the existing overhead benchmarks and keeps their JSON.

    .venv/bin/python -m benchmarks.overhead [--quick] [--out benchmarks/results]

Parts and the commands they run (full mode; `--quick` shortens each):

* added latency vs Envoy alone and vs a no-op processor, requests/s per core, per-chunk cost:
  `python -m benchmarks.extproc_overhead all --json`
* scheduling cost vs endpoint count, default profile, and 400 KB hashing:
  `python -m benchmarks.scheduling --endpoints 4,16,64,256,1024 -n 3000 --json ...`
* the same for the optimized-baseline profile (the plugin catalogue's target):
  `python -m benchmarks.scheduling --config optimized-baseline --endpoints 16,256 -n 3000 --json ...`
* scraping cost vs pod count at 50 ms: `python benchmarks/scrape_cost.py --endpoints N --seconds 8 --json`,
  N = 25, 50, 100, 200
* flow control: `python -m benchmarks.flowcontrol_overhead --json ...`
* simulator error at the routing benchmark's time scales (full mode only): `python benchmarks/sim_fidelity.py
  --profile qwen3-32b-h100-tp2 --time-scale 1 4 8 --skip-capacity --requests 16 --output ...`

Each child runs alone (nothing else of ours runs meanwhile); every command and its wall time go into
`overhead.json` so the README can print them next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def _run(cmd: list[str], timeout: float) -> tuple[str, float, str | None]:
    print(f"  $ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "", time.monotonic() - t0, f"timed out after {timeout:.0f}s"
    err = None if p.returncode == 0 else f"exit {p.returncode}: {p.stderr[-2000:]}"
    return p.stdout, time.monotonic() - t0, err


def _display(cmd: list[str]) -> str:
    shown = [".venv/bin/python" if c == sys.executable else c for c in cmd]
    return " ".join(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c for c in shown)


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    py = sys.executable
    out_dir.mkdir(parents=True, exist_ok=True)
    n = "500" if quick else "3000"
    report: dict[str, Any] = {"quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}

    def part(name: str, cmd: list[str], timeout: float, parse: str, path: Path | None = None) -> None:
        stdout, wall, err = _run(cmd, timeout)
        entry: dict[str, Any] = {"command": _display(cmd), "wall_s": round(wall, 1), "error": err}
        if err is None:
            try:
                if parse == "stdout-json":
                    entry["data"] = json.loads(stdout)
                elif parse == "stdout-jsonl":
                    entry["data"] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
                elif parse == "file-json" and path is not None:
                    entry["data"] = json.loads(path.read_text())
                elif parse == "file-text" and path is not None:
                    entry["data"] = path.read_text()
            except (ValueError, OSError) as exc:
                entry["error"] = f"could not read the output: {exc}"
        print(f"    {name}: {'ok' if entry['error'] is None else entry['error'][:300]} ({wall:.0f}s)", flush=True)
        report["parts"][name] = entry

    extproc = [py, "-m", "benchmarks.extproc_overhead", "all", "--json", *(["--quick"] if quick else [])]
    part("extproc", extproc, 900, "stdout-json")
    sched = out_dir / "scheduling-default.json"
    part("scheduling", [py, "-m", "benchmarks.scheduling", "--endpoints", "4,16,64,256,1024", "-n", n, "--json",
                        str(sched)], 900, "file-json", sched)  # fmt: skip
    opt = out_dir / "scheduling-optimized-baseline.json"
    part("scheduling-optimized-baseline", [py, "-m", "benchmarks.scheduling", "--config", "optimized-baseline",
                                           "--endpoints", "16,256", "-n", n, "--json", str(opt)],
         600, "file-json", opt)  # fmt: skip
    counts = (50, 100) if quick else (25, 50, 100, 200)
    seconds, warm = ("3", "1") if quick else ("8", "2")
    scrape: list[Any] = []
    for count in counts:
        stdout, wall, err = _run(
            [py, "benchmarks/scrape_cost.py", "--endpoints", str(count), "--seconds", seconds, "--warmup", warm,
             "--json"], 300)  # fmt: skip
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")] if err is None else []
        scrape.append({"endpoints": count, "wall_s": round(wall, 1), "error": err, "data": rows})
        print(f"    scrape {count}: {'ok' if err is None else err[:300]} ({wall:.0f}s)", flush=True)
    report["parts"]["scrape"] = {
        "command": f".venv/bin/python benchmarks/scrape_cost.py --endpoints N --seconds {seconds} --warmup {warm} "
        f"--json  (N = {', '.join(map(str, counts))})",
        "data": scrape,
        "error": None,
    }
    fc = out_dir / "flowcontrol.json"
    part("flowcontrol", [py, "-m", "benchmarks.flowcontrol_overhead", "--json", str(fc),
                         *(["--quick"] if quick else [])], 600, "file-json", fc)  # fmt: skip
    if not quick:
        fid = out_dir / "sim_fidelity_timescales.md"
        part("sim_fidelity", [py, "benchmarks/sim_fidelity.py", "--profile", "qwen3-32b-h100-tp2", "--time-scale",
                              "1", "4", "8", "--skip-capacity", "--requests", "16", "--output", str(fid)],
             1800, "file-text", fid)  # fmt: skip
    (out_dir / "overhead.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    run(a.quick, a.out)


if __name__ == "__main__":
    main()
