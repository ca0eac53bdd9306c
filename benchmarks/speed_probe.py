"""A gauge of the machine's speed during a live benchmark, measured beside the contenders.

The live comparisons run one router after another on a shared VM, and the VM's speed drifts: in one
routing run every process behind the EPP (the load generator too, whose work does not depend on the
router) used about 1.75x the CPU per request it used an hour before. A contender that meets such a phase
looks slower than it is. This probe makes the phase visible instead of inferred.

In its own process it runs a fixed, deterministic piece of pure-Python work (a sort, a dict count, a
join: about 0.9 ms of CPU here) every `interval` seconds and records the CPU time of each run
(`thread_time`: the work's own cycles, not the wait for a core). The contenders' load does not move it
much: this VM has two cores and no SMT siblings, and with a busy loop on the other core the median was
857-861 µs against 893 µs idle. It costs about 0.2% of a core at the default interval.

    .venv/bin/python -m benchmarks.speed_probe --out probe.txt [--interval 0.5]

Each line of the output file is "<CLOCK_MONOTONIC seconds> <CPU µs of one run>", the clock shared with
the harness, so a stage's runs are the lines inside its window (`SpeedProbe.median_between`).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llmepp.testing.lifetime import die_with_parent

_rng = random.Random(7)
_DATA = [_rng.randrange(1 << 30) for _ in range(4000)]
_WORDS = [f"w{x % 977}" for x in _DATA]


def work() -> int:
    """The fixed piece of work: the same operations on the same data every run."""
    ordered = sorted(_DATA)
    counts: dict[str, int] = {}
    for w in _WORDS:
        counts[w] = counts.get(w, 0) + 1
    return ordered[100] + len(counts) + len(",".join(_WORDS[:500]))


def run(out: Path, interval: float) -> None:
    with out.open("a") as f:
        while True:
            t0 = time.thread_time_ns()
            work()
            cpu_us = (time.thread_time_ns() - t0) / 1e3
            f.write(f"{time.monotonic():.3f} {cpu_us:.0f}\n")
            f.flush()
            time.sleep(interval)


def parse(text: str) -> list[tuple[float, float]]:
    """(monotonic s, CPU µs) per run. Only whole lines count: a last line without its newline is torn (the
    probe killed mid-write) and may still look like two numbers."""
    samples: list[tuple[float, float]] = []
    for line in text.split("\n")[:-1]:
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            samples.append((float(parts[0]), float(parts[1])))
        except ValueError:
            continue
    return samples


class SpeedProbe:
    """The probe as a child process writing to `path`; `stop()` reads what it measured."""

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.speed_probe", "--out", str(self.path)]
        cmd += ["--interval", str(self.interval)]
        # An endless loop: it must end with the harness, also one killed without clean-up.
        self._proc = subprocess.Popen(
            die_with_parent(cmd), cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self.samples = parse(self.path.read_text()) if self.path.exists() else []

    def median_between(self, a: float, b: float) -> float | None:
        """Median CPU µs of the runs inside [a, b]; None without any (a stage shorter than the interval)."""
        inside = [us for t, us in self.samples if a <= t <= b]
        return statistics.median(inside) if inside else None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--interval", type=float, default=0.5)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C on a foreground run
        run(args.out, args.interval)


if __name__ == "__main__":
    main()
