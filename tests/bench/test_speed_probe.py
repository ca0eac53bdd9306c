"""The machine-speed probe beside the live benchmarks: a real child process, read back per stage window."""

from __future__ import annotations

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
