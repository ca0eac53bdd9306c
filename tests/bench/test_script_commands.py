"""The benchmarks run as scripts (`python benchmarks/x.py`, as their docs and benchmarks.overhead run them)
start: a script's sys.path begins at benchmarks/, so `from benchmarks...` imports failed there while the
same module imported fine under pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["benchmarks/scrape_cost.py", "benchmarks/sim_fidelity.py"])
def test_a_benchmark_script_starts_from_its_documented_command(script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as `make bench` runs it, not as pytest does
    run = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout
