"""The placement study: the quota oracle places groups as told, and the per-pod counts add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.des.placement import main as placement_main


def test_quota_oracle_places_groups_by_quota(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "placement.json"
    assert placement_main(["--seeds", "1", "--quotas", "17,17,17,24", "--json", str(out)]) == 0
    assert "median over 1 seeds" in capsys.readouterr().out
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["quota 17,17,17,24"]["groups_per_pod"] == [17, 17, 17, 24]
    assert sum(runs["default"]["groups_per_pod"]) == 75
    assert max(runs["default"]["groups_per_pod"]) - min(runs["default"]["groups_per_pod"]) <= 1  # even
    for run in runs.values():  # every completed request of every stage is counted on its pod, warm-up first
        by_stage = [sum(n for _, n in stage.values()) for stage in run["full_hits_by_group_count"][1:]]
        assert by_stage == [s["completed"] for s in run["stages"]]


def test_unpacking_moves_the_groups_beyond_the_fit_from_the_stage_on(tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    args = ["--seeds", "1", "--quotas", "18,18,18,21", "--unpack-stage", "4", "--json", str(out)]
    assert placement_main(args) == 0
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    packed, unpacked = runs["quota 18,18,18,21"], runs["quota 18,18,18,21, unpacked at 10 QPS"]
    # Identical until the stage (the same decisions on the same arrivals), then 3 groups moved, one per pod.
    assert unpacked["stages"][:3] == packed["stages"][:3]
    assert packed["groups_per_pod_by_stage"][5] == [18, 18, 18, 21]
    assert unpacked["groups_per_pod_by_stage"][5] == [19, 19, 19, 18]
