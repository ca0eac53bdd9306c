"""`tune_gc`: what a serving `epp` process does to the cyclic collector once it serves (in a child process:
freezing the test process's heap would keep every later test's garbage)."""

from __future__ import annotations

import subprocess
import sys

from llmepp.gctuning import GC_THRESHOLDS

CHILD = """
import gc
from llmepp.gctuning import tune_gc
before = gc.get_freeze_count()
tune_gc()
print(gc.get_threshold(), before, gc.get_freeze_count() > 10_000)
"""


def test_serving_processes_freeze_startup_objects_and_collect_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    assert out == [f"({GC_THRESHOLDS[0]},", f"{GC_THRESHOLDS[1]},", f"{GC_THRESHOLDS[2]})", "0", "True"]
