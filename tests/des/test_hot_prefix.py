"""One prefix carrying all traffic (benchmarks.des.hot_prefix): affinity alone pins it, the default's escape hatch
spreads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.des.hot_prefix import main as hot_prefix_main


def test_without_the_escape_hatch_one_hot_prefix_stays_on_one_pod_and_the_default_spreads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hot-prefix.json"
    argv = ["--seeds", "1", "--rates", "8", "--stage-duration", "40", "--json", str(out)]
    assert hot_prefix_main([*argv, "--only", "default,default-no-hatch,load-only"]) == 0
    assert "median over seeds" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["argv"][:2] == ["--seeds", "1"] and data["rates"] == [8.0]
    stage = {r["contender"]: r["stages"][0] for r in data["runs"]}
    assert set(stage) == {"default", "default-no-hatch", "load-only"}
    for s in stage.values():
        assert s["completed"] == s["requests"] > 150, s
    # No load score outweighs the shared system prompt's match: every request on the pod that cached it first.
    assert stage["default-no-hatch"]["busiest_pod_share"] == 1.0
    # Dropping the pod whose in-flight count ran 32 and 1.5x above the least loaded one spreads the prompt.
    assert stage["default"]["busiest_pod_share"] < 0.75
    assert stage["load-only"]["busiest_pod_share"] < 0.4
    assert stage["default"]["ttft_p90_s"] < stage["default-no-hatch"]["ttft_p90_s"] / 3, stage

    assert data["benchmark_workloads"] == []  # not asked for

    table = report.hot_prefix_table(data)
    assert "python -m benchmarks.des.hot_prefix --seeds 1" in table and "| 8 req/s |" in table
    assert "| default-no-hatch | " in table and "(100%)" in table


def test_report_says_when_the_hot_prefix_run_is_missing() -> None:
    assert "not run yet" in report.hot_prefix_table(None)


def test_check_seeds_counts_what_the_escape_hatch_reroutes_in_the_benchmark_workloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hot-prefix.json"
    argv = ["--seeds", "1", "--rates", "3", "--stage-duration", "10", "--only", "default", "--check-seeds", "2"]
    assert hot_prefix_main([*argv, "--json", str(out)]) == 0
    assert "no-sharing seed 2: " in capsys.readouterr().out
    checks = json.loads(out.read_text())["benchmark_workloads"]
    assert [(c["workload"], c["seed"]) for c in checks] == [("shared-prefix", 2), ("no-sharing", 2)]
    for c in checks:
        assert c["requests"] > 500 and 0 <= c["rerouted"] <= c["requests"], c
    table = report.hot_prefix_table(json.loads(out.read_text()))
    assert "Routed to another pod by the default than by the default without" in table
    assert "shared-prefix (seeds 2): " in table
