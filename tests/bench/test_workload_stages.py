"""`--stages`: a workload's measured stages replaced for a diagnostic run, its warm-up kept."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.routing import parse_stages
from benchmarks.workloads import Scale, StageSpec, build


def test_parse_stages() -> None:
    assert parse_stages("12:60, 20:90") == [(12.0, 60.0), (20.0, 90.0)]
    for bad in ("", "12", "12:60:1", "a:60", "0:60", "12:-1", "nan:60", "12:inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_stages(bad)


def test_stages_replace_the_ladder_in_its_own_units() -> None:
    scale = Scale(pods=8)
    multi = build("multi-turn", scale, quick=False, stages=[(12, 60), (20, 30)])
    assert multi.stages == [StageSpec(24.0, 60.0), StageSpec(40.0, 30.0)]  # 4-pod rates, here 8 pods
    shared = build("shared-prefix", scale, quick=False, stages=[(25, 30)])
    default = build("shared-prefix", scale, quick=False)
    assert shared.stages == [default.stages[0], StageSpec(25.0, 30.0)]  # the warm-up kept; canonical (8-pod) QPS
    assert default.stages[0].warmup and len(default.stages) > 2
