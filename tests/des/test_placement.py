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
