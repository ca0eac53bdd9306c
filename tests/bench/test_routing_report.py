"""benchmarks.report on the main routing comparison's repeat runs (workload seeds): medians, win counts, ties."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report


def _stage(rate: float, p90: float) -> dict[str, Any]:
    return {"warmup": False, "rate": rate, "label": f"{rate:g}", "ttft_p90_s": p90, "prefix_hit_rate": 0.8,
            "output_tokens_per_s": 100.0}  # fmt: skip


def _routing(seed: int, p90s: dict[str, list[float]]) -> dict[str, Any]:
    rates = [1.5, 5.0, 7.5]
    contenders = {name: {"status": "ok", "stages": [_stage(r, t) for r, t in zip(rates, ts)]}
                  for name, ts in p90s.items()}  # fmt: skip
    return {"seed": seed, "workloads": {"shared-prefix": {"contenders": contenders}}}


def test_seed_summary_uses_medians_and_calls_near_ties() -> None:
    vllm, smg = report.RIVALS
    runs = [
        _routing(1, {report.EPP: [0.4, 1.0, 1.0], vllm: [0.4, 2.0, 1.02], smg: [0.4, 0.5, 3.0]}),
        _routing(2, {report.EPP: [0.4, 1.0, 1.0], vllm: [0.4, 2.0, 0.99], smg: [0.4, 3.0, 3.0]}),
        _routing(3, {report.EPP: [0.4, 9.0, 1.0], vllm: [0.4, 0.5, 1.01], smg: [0.4, 3.0, 3.0]}),
    ]
    table, rows = report.seed_summary(runs)
    assert "| 5 | 1.00 (1.00-9.00) | 2.00 (0.50-2.00) | 2 of 3 | 3.00 (0.50-3.00) | 1 of 3 |" in table
    assert "| 1.5 |" not in table  # the lightest stage is not compared
    assert rows[0][2] == "not lower at 7.5 (tied: 1.00 vs 1.01 s) QPS" and rows[0][3] == "**not met**"
    assert rows[1][2] == "lower at every stage" and rows[1][3] == "**met**"
    assert report.seed_summary(runs[:1]) == ("_Fewer than two workload seeds._", [])


def test_a_seed_run_again_counts_once_with_its_newest_run() -> None:
    """The main run's seed re-run among the repeats (after a simulator change): the newer run replaces it."""
    vllm, smg = report.RIVALS
    old = _routing(1, {report.EPP: [0.4, 9.0, 9.0], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]})
    old["started"] = "2026-11-21 04:06:14 UTC"
    new = _routing(1, {report.EPP: [0.4, 0.5, 0.5], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]})
    new["started"] = "2026-11-23 12:00:00 UTC"
    other = _routing(2, {report.EPP: [0.4, 0.5, 0.5], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]})
    table, rows = report.seed_summary([old, other, new])
    assert table.startswith("Workload seeds 1, 2 ") and "| 5 | 0.50 (0.50-0.50) |" in table
    assert rows[0][3] == "**met**"


def test_a_seed_without_a_contender_or_the_epp_is_never_met() -> None:
    """A rival that failed (or was not run) in one seed, or an EPP that failed in one: nothing to compare is
    no win. Both used to come out met."""
    vllm, smg = report.RIVALS
    good = {report.EPP: [0.4, 0.5, 0.5], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]}
    one, two = _routing(1, good), _routing(2, good)
    two["workloads"]["shared-prefix"]["contenders"][smg]["status"] = "failed"
    _, rows = report.seed_summary([one, two])
    assert rows[0][3] == "**met**"
    assert rows[1][2] == "not lower at 5 (measured in 1 of 2 seeds), 7.5 (measured in 1 of 2 seeds) QPS"
    assert rows[1][3] == "**not met**"
    two["workloads"]["shared-prefix"]["contenders"][report.EPP]["status"] = "failed"
    table, rows = report.seed_summary([one, two])
    assert table.startswith("_No stage past light load") and [r[3] for r in rows] == ["not measured"] * 2


def test_a_quick_run_never_stands_in_for_a_seed() -> None:
    vllm, smg = report.RIVALS
    main = _routing(1, {report.EPP: [0.4, 0.5, 0.5], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]})
    main["quick"], main["started"] = False, "2026-11-21 00:00:00 UTC"
    other = _routing(2, {report.EPP: [0.4, 0.5, 0.5], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]})
    other["quick"] = False
    quick = _routing(1, {report.EPP: [0.4, 9.0, 9.0], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]})
    quick["quick"], quick["started"] = True, "2026-11-22 00:00:00 UTC"  # newer, but not like the main run
    table, rows = report.seed_summary([main, other, quick])
    assert "Left out, made with another mode or scale: seed 1 of 2026-11-22 00:00:00 UTC." in table
    assert "| 5 | 0.50 (0.50-0.50) |" in table and rows[0][3] == "**met**"


def test_a_seed_made_with_another_default_profile_is_left_out() -> None:
    """After the default profile changed, a seed measured with the old one does not count (the main run's
    profile decides), and the summary says which runs were left out and why."""
    vllm, smg = report.RIVALS
    runs = [_routing(s, {report.EPP: [0.4, 0.5, 0.5], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]}) for s in (1, 2, 3)]
    for run, profile in zip(runs, ("prefix 6", "prefix 6", "prefix 3")):
        run["workloads"]["shared-prefix"]["contenders"][report.EPP]["description"] = profile
    runs[1]["workloads"]["shared-prefix"]["contenders"][report.EPP]["stages"][1]["ttft_p90_s"] = 0.7
    runs[2]["workloads"]["shared-prefix"]["contenders"][report.EPP]["stages"][1]["ttft_p90_s"] = 9.0
    runs[2]["started"] = "2026-11-20 00:00:00 UTC"
    table, rows = report.seed_summary(runs)
    assert table.startswith("Workload seeds 1, 2 ")
    assert (
        "Left out, made with another EPP default profile (`prefix 3`, not `prefix 6`): seed 3 of "
        "2026-11-20 00:00:00 UTC." in table
    )
    assert "| 5 | 0.60 (0.50-0.70) |" in table and rows[0][3] == "**met**"
    main_profile = report._epp_profile(runs[0])
    assert [r[0] for r in report.repeat_targets(runs[1:], main_profile)] == ["routing (#6), workload seed 2"] * 2
    assert len(report.repeat_targets(runs[1:])) == 4
    table, rows = report.seed_summary([runs[0], runs[2]])
    assert (
        table
        == "_Fewer than two workload seeds._ Left out, made with another EPP default profile (`prefix 3`, not "
        "`prefix 6`): seed 3 of 2026-11-20 00:00:00 UTC."
        and rows == []
    )


def test_the_config_hash_decides_when_both_runs_record_one() -> None:
    """Files since 2026-11-25 record the EPP config's SHA-256: two runs that both have one are the same profile
    exactly when the hashes match, whatever their descriptions say; against an older file without a hash the
    descriptions decide, as before."""
    vllm, smg = report.RIVALS
    runs = [_routing(s, {report.EPP: [0.4, 0.5, 0.5], vllm: [0.4, 1.0, 1.0], smg: [0.4, 1.0, 1.0]}) for s in (1, 2, 3)]
    epp = [run["workloads"]["shared-prefix"]["contenders"][report.EPP] for run in runs]
    for c, sha in zip(epp, ("aaaa", "bbbb", "aaaa")):
        c["description"], c["setup"] = "prefix 6", {"config_sha256": sha}
    epp[2]["description"] = "prefix 6, reworded"
    table, _ = report.seed_summary(runs)
    assert table.startswith("Workload seeds 1, 3 ")
    assert "(`prefix 6, config bbbb`, not `prefix 6, config aaaa`): seed 2 of ?." in table
    del epp[0]["setup"]  # the main run predates the hash: the descriptions decide
    table, _ = report.seed_summary(runs)
    assert table.startswith("Workload seeds 1, 2 ")
    assert "(`prefix 6, reworded, config aaaa`, not `prefix 6`): seed 3 of ?." in table


def test_multi_turn_seeds_have_rows_of_their_own() -> None:
    """The same median comparison on the multi-turn workload, labelled with it; shared-prefix runs do not count."""
    vllm, smg = report.RIVALS
    runs = []
    for seed, smg_p90 in ((1, 0.9), (2, 0.97), (3, 1.2)):
        run = _routing(seed, {report.EPP: [0.4, 1.0, 1.0], vllm: [0.4, 1.2, 1.2], smg: [0.4, smg_p90, 1.2]})
        run["workloads"]["multi-turn"] = run["workloads"].pop("shared-prefix")
        runs.append(run)
    table, rows = report.seed_summary(runs, "multi-turn")
    assert "| 5 | 1.00 (1.00-1.00) | 1.20 (1.20-1.20) | 3 of 3 | 0.97 (0.90-1.20) | 1 of 3 |" in table
    assert [r[0] for r in rows] == ["routing (#6), multi-turn, 3 workload seeds"] * 2
    assert rows[0][1].startswith(f"multi-turn vs {vllm}: median TTFT p90") and rows[0][3] == "**met**"
    assert rows[1][2] == "not lower at 5 (tied: 1.00 vs 0.97 s) QPS" and rows[1][3] == "**not met**"
    assert report.seed_summary(runs) == ("_Fewer than two workload seeds._", [])


def test_main_run_rival_rows_cover_multi_turn_and_never_pass_without_the_epp() -> None:
    vllm, smg = report.RIVALS
    run = _routing(1, {report.EPP: [0.4, 1.0, 1.0], vllm: [0.4, 1.2, 0.9], smg: [0.4, 1.2, 1.2]})
    run["workloads"]["multi-turn"] = run["workloads"]["shared-prefix"]
    rows = report.routing_targets(run)[0]
    multi = [r for r in rows if r[1].startswith("multi-turn vs")]
    assert [r[3] for r in multi] == ["**not met**", "**met**"]
    assert multi[0][2].startswith("lost at 7.5 QPS: TTFT p90 1.00 vs 0.90 s; throughput tied")
    # Without the EPP's stages there is nothing to win: not measured (it read "won every stage").
    run["workloads"]["multi-turn"] = {"contenders": {**run["workloads"]["shared-prefix"]["contenders"],
                                                     report.EPP: {"status": "failed"}}}  # fmt: skip
    multi = [r for r in report.routing_targets(run)[0] if r[1].startswith("multi-turn vs")]
    assert [r[3] for r in multi] == ["not measured"] * 2
    assert multi[0][2] == f"{report.EPP} not run: failed"


def test_main_run_rows_without_the_epp_or_round_robin_are_not_measured() -> None:
    """No-sharing with the EPP failed read 'met' (nothing to miss); shared-prefix without round_robin dropped the
    two round_robin rows from the table instead of saying they were not measured."""
    vllm, smg = report.RIVALS
    run = _routing(1, {report.EPP: [0.4, 1.0, 1.0], vllm: [0.4, 1.2, 1.2], smg: [0.4, 1.2, 1.2]})
    served = run["workloads"]["shared-prefix"]["contenders"][vllm]
    run["workloads"]["no-sharing"] = {"contenders": {report.EPP: {"status": "failed"}, report.BASELINE: served}}
    rows = report.routing_targets(run)[0]
    assert [r[1:] for r in rows if r[1].startswith("no-sharing")] == [
        ["no-sharing: EPP default within 5% of the best other contender", f"{report.EPP}: failed", "not measured"]
    ]
    assert [r[1:] for r in rows if "round_robin saturates" in r[1]] == [[
        "shared-prefix: EPP default vs Envoy round_robin where round_robin saturates",
        f"no stage measured for both ({report.BASELINE}: not selected; {report.EPP}: ok)", "not measured",
    ]]  # fmt: skip


def _nosharing(seed: int, stages: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """A no-sharing seed run: per contender, (TTFT p90, output tokens/s) at 2 and 7.5 QPS."""
    contenders = {name: {"status": "ok", "stages": [{**_stage(r, t), "output_tokens_per_s": x}
                                                    for r, (t, x) in zip([2.0, 7.5], ts)]}
                  for name, ts in stages.items()}  # fmt: skip
    return {
        "seed": seed,
        "started": f"2026-11-24 10:0{seed}:00 UTC",
        "workloads": {"no-sharing": {"contenders": contenders}},
    }


def test_nosharing_seed_summary_compares_medians_with_the_best_other_contender() -> None:
    rr, smg = "envoy-round-robin", "smg-cache-aware"
    runs = [
        _nosharing(
            1, {rr: [(1.0, 400), (5.0, 1800)], report.EPP: [(1.0, 400), (4.0, 1800)], smg: [(1.1, 400), (4.4, 1800)]}
        ),
        _nosharing(
            2, {rr: [(1.0, 400), (3.0, 1800)], report.EPP: [(1.0, 400), (2.5, 1800)], smg: [(1.0, 400), (9.0, 1800)]}
        ),
        _nosharing(
            3, {rr: [(1.0, 400), (5.0, 1800)], report.EPP: [(1.0, 400), (4.8, 1700)], smg: [(1.0, 400), (5.0, 1800)]}
        ),
    ]
    table, rows = report.nosharing_seed_summary(runs)
    assert table.startswith("Workload seeds 1, 2, 3, from 2026-11-24 10:01:00 UTC")
    assert "| 7.5 | 5.00 (3.00-5.00) / 1800 | 4.00 (2.50-4.80) / 1800 | 5.00 (4.40-9.00) / 1800 |" in table
    assert rows[0][2].startswith("2 QPS: TTFT p90 +0%, throughput +0.0%; 7.5 QPS: TTFT p90 -20%")
    assert rows[0][3] == "**met**"
    # Within 5% of the best median is met; 6% above it is not.
    runs[0]["workloads"]["no-sharing"]["contenders"][rr]["stages"][1]["ttft_p90_s"] = 3.77  # rr median 3.77 vs EPP 4.0
    _, rows = report.nosharing_seed_summary(runs)
    assert rows[0][3] == "**not met** (at 7.5 QPS)"
    # Timeouts count as the timeout: in two of three seeds they are the median.
    runs[0]["workloads"]["no-sharing"]["contenders"][rr]["stages"][1]["ttft_p90_s"] = 5.0
    epp = [run["workloads"]["no-sharing"]["contenders"][report.EPP]["stages"][1] for run in runs]
    epp[0]["ttft_p90_s"] = epp[1]["ttft_p90_s"] = "timeout"
    table, rows = report.nosharing_seed_summary(runs)
    assert "| 7.5 | 5.00 (3.00-5.00) / 1800 | 300.00 (4.80-300.00) / 1800 |" in table
    assert rows[0][3] == "**not met** (at 7.5 QPS)"
    # A stage without a TTFT in one seed (nothing completed) is not measured: not met either.
    epp[0]["ttft_p90_s"], epp[1]["ttft_p90_s"] = None, 2.5
    _, rows = report.nosharing_seed_summary(runs)
    assert rows[0][3] == "**not met** (at 7.5 QPS)" and "7.5 QPS: TTFT p90 -%" in rows[0][2]
    assert report.nosharing_seed_summary(runs[:1]) == ("_Fewer than two workload seeds._", [])


def test_long_prompt_table_shows_each_size_and_the_epp_minus_noop_difference() -> None:
    def row(kb: int, noop: float, epp: float) -> dict[str, Any]:
        added = {"envoy+noop-h2": {"p50_ms": noop, "p99_ms": noop}, "envoy+epp-h2": {"p50_ms": epp, "p99_ms": epp}}
        return {"kb": kb, "body_bytes": kb * 1024, "latency": {"added_over_envoy": added},
                "epp_minus_noop_p50_ms": {"epp-h2": epp - noop}}  # fmt: skip

    table = report.long_prompt_table([row(16, 0.25, 0.35), row(2048, 3.0, 4.5)])
    assert "| prompt | noop-h2 | epp-h2 | EPP − no-op, grpc.aio | EPP − no-op, h2 |" in table
    assert "| 16 KiB | 0.250 | 0.350 | - | +0.100 |" in table
    assert "| 2,048 KiB | 3.000 | 4.500 | - | +1.500 |" in table


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no workloads: empty plots
def test_the_routing_run_line_names_the_command_that_wrote_routing_json(tmp_path: Path) -> None:
    """results/run.json is the last run_all's, rewritten by any `--only <section>`: the routing header takes its
    command from routing.json, and "whole run" only from the run_all that wrote routing.json (it named the
    command of a later `--only overhead` run and that run's 5 min as the whole run around a 57 min section)."""
    results = tmp_path / "results"
    results.mkdir()
    routing: dict[str, Any] = {
        "quick": False, "seed": 1, "started": "2026-11-21 03:06:24 UTC", "wall_s": 3400.0,
        "scale": {"token_unit": 16, "time_scale": 4.0, "pods": 4, "block_size": 16, "max_num_seqs": 256},
        "kv_blocks_per_pod": 1233, "kv_real_tokens_per_pod": 315648, "footprint_blocks": 3600,
        "footprint_share": 0.73, "sim_args": ["--time-scale", "4"], "ttft_timeout_s": 300.0, "workloads": {},
    }  # fmt: skip
    template = tmp_path / "README.template.md"
    template.write_text("{{RUN}}\n")

    def run_line(own_argv: list[str] | None, run_argv: list[str]) -> str:
        if own_argv is not None:
            routing["argv"] = own_argv
        (results / "routing.json").write_text(json.dumps(routing))
        run = {"machine": {"nproc": "2"}, "argv": run_argv, "wall_s": 311.7}
        (results / "run.json").write_text(json.dumps(run))
        return report.render(results, tmp_path / "README.md", template).splitlines()[0]

    line = run_line(None, ["--only", "overhead"])
    assert "--only overhead" not in line and "whole run" not in line, line
    line = run_line(["benchmarks.routing", "--seed", "3"], ["--only", "overhead"])
    assert "`python -m benchmarks.routing --seed 3`" in line and "whole run" not in line, line
    line = run_line(["benchmarks.run_all"], [])
    assert "`make bench`" in line and "whole run 5.2 min" in line, line


def test_seed_files_are_read_in_seed_order(tmp_path: Path) -> None:
    """Seed 10 comes after seed 9 (a name sort put it after seed 1), and a file of another workload is skipped."""
    for seed in (10, 2, 1, 9):
        run: dict[str, Any] = {"seed": seed, "workloads": {"multi-turn": {"contenders": {}}}}
        (tmp_path / f"routing_multiturn_seed{seed}.json").write_text(json.dumps(run))
    (tmp_path / "routing_multiturn_seed3.json").write_text(json.dumps({"seed": 3, "workloads": {"no-sharing": {}}}))
    assert [run["seed"] for run in report.multiturn_runs(tmp_path)] == [1, 2, 9, 10]
