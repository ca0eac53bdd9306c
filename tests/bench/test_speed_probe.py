"""The machine-speed probe beside the live benchmarks: a real child process, read back per stage window."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.speed_probe import SpeedProbe, parse, work


def test_the_probe_process_records_runs_inside_a_window(tmp_path: Path) -> None:
    probe = SpeedProbe(tmp_path / "probe.txt", interval=0.02)
    probe.start()
    t0 = time.monotonic()
    deadline = t0 + 30
    while time.monotonic() < deadline:  # the child starts an interpreter first: wait for a few runs
        time.sleep(0.1)
        if len(parse((tmp_path / "probe.txt").read_text() if (tmp_path / "probe.txt").exists() else "")) >= 5:
            break
    t1 = time.monotonic()
    probe.stop()
    assert len(probe.samples) >= 5
    times = [t for t, _ in probe.samples]
    assert times == sorted(times) and t0 <= times[0] and times[-1] <= time.monotonic()
    assert all(us > 0 for _, us in probe.samples)
    median = probe.median_between(t0, t1)
    assert median is not None and min(us for _, us in probe.samples) <= median <= max(us for _, us in probe.samples)
    assert probe.median_between(t1 + 100, t1 + 200) is None  # no run in a window after the probe stopped


def test_a_torn_or_garbled_line_is_skipped() -> None:
    assert parse("10.5 900\n11.0 880\n11.5 9") == [(10.5, 900.0), (11.0, 880.0)]
    assert parse("x y\n12.0 870\n\n") == [(12.0, 870.0)]


def test_the_work_is_the_same_every_run() -> None:
    assert work() == work()


def _running(pid: int) -> bool:
    """The process exists and is no zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_probe_ends_with_a_harness_killed_without_clean_up(tmp_path: Path) -> None:
    """The probe loops for ever: a harness killed with SIGKILL (no `stop()`) must not leave it running."""
    harness = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from benchmarks.speed_probe import SpeedProbe\n"
        "probe = SpeedProbe(Path(sys.argv[1]), interval=0.05)\n"
        "probe.start()\n"
        "print(probe.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(
        [sys.executable, "-c", harness, str(tmp_path / "probe.txt")], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while not (tmp_path / "probe.txt").exists() and time.monotonic() < deadline:  # the probe runs
        time.sleep(0.05)
    assert _running(pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)
