"""benchmarks.precise_routing: its pieces, quickly and without timing (the benchmark itself is `make bench`).

The two configs load and differ only in the prefix-match producer; the run-specific values are rewritten; each
scenario gets the right contender and none of them joins the main run; the verdicts are computed from the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import precise_routing as pr
from benchmarks import report
from benchmarks.contenders import CONTENDER_NAMES, EppReplicasBehindEnvoy, EvictionSpec, WithEviction
from benchmarks.workloads import Scale, SharedPrefix, build
from llmepp.config.loader import build as build_components
from llmepp.config.loader import load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.plugins.producers.approx_prefix import ApproxPrefixCacheProducer
from llmepp.plugins.producers.precise_prefix import PrecisePrefixCacheProducer
from llmepp_sim.tokenizer import TOKENIZER_PATH


def _without_producer(text: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(text)
    config["plugins"] = [
        p for p in config["plugins"] if not p["type"].endswith("prefix-cache-producer")
        and p["type"] != "endpoint-notification-source"
    ]  # fmt: skip
    for p in config["plugins"]:
        if p["type"] == "prefix-cache-scorer":
            p["parameters"].pop("prefixMatchInfoProducerName")
    config.pop("dataLayer", None)  # the precise producer's endpoint notifications
    return config


@pytest.mark.parametrize("profile", ["default", "reference"])
def test_configs_load_and_differ_only_in_the_prefix_producer(profile: str) -> None:
    texts = {p: pr.epp_config(pr.PROFILES[profile][p], 41000, 41001) for p in pr.PRODUCERS}
    plugins = {p: build_components(load_config(t)).plugins for p, t in texts.items()}
    assert any(isinstance(x, PrecisePrefixCacheProducer) for x in plugins["precise"].values())
    assert not any(isinstance(x, PrecisePrefixCacheProducer) for x in plugins["approx"].values())
    assert any(isinstance(x, ApproxPrefixCacheProducer) for x in plugins["approx"].values())
    assert _without_producer(texts["approx"]) == _without_producer(texts["precise"])


def test_the_history_diagnostic_runs_both_producers() -> None:
    plugins = build_components(load_config(pr.epp_config(pr.PROFILES["history"]["precise"], 41000, 41001))).plugins
    assert {"precise-prefix-cache-producer", "approx-prefix-cache-producer", "history-prefix"} <= set(plugins)


def test_the_default_profile_is_the_built_in_one_as_8_measured_it() -> None:
    """precise-default.yaml's scorers and weights are the EPP's built-in default profile but for the prefix weight,
    which the built-in default has since doubled (3 -> 6), and its escape hatch (load-balance-filter), added
    since; the committed precise results used neither."""
    ours = yaml.safe_load(pr.PROFILES["default"]["precise"].read_text())["schedulingProfiles"]
    built_in = yaml.safe_load(DEFAULT_CONFIG)["schedulingProfiles"]
    assert built_in[0]["plugins"][0] == {"pluginRef": "load-balance-filter"}
    del built_in[0]["plugins"][0]
    (prefix,) = [p for p in built_in[0]["plugins"] if p["pluginRef"] == "prefix-cache-scorer"]
    assert prefix["weight"] == 6
    prefix["weight"] = 3
    assert ours == built_in


def test_run_specific_values_are_rewritten() -> None:
    config = yaml.safe_load(pr.epp_config(pr.PROFILES["default"]["precise"], 41000, 41001))
    by_type = {p["type"]: p.get("parameters") or {} for p in config["plugins"]}
    disc = by_type["precise-prefix-cache-producer"]["kvEventsConfig"]["podDiscoveryConfig"]
    assert disc == {"socketPort": 41000, "replaySocketPort": 41001}
    assert by_type["token-producer"]["tokenizer"]["path"] == str(TOKENIZER_PATH)
    assert by_type["precise-prefix-cache-producer"]["speculativeIndexing"] is True


def test_each_scenario_gets_its_contender_and_none_joins_the_main_run() -> None:
    spec = EvictionSpec()
    made = {
        (s.key, p): pr.contender(s, p, path, pr.epp_config(path, 41000, 41001), spec, 4.0)
        for s in pr.SCENARIOS
        for p, path in pr.PROFILES["default"].items()
    }
    one, evict, two = (made[(k, "precise")] for k in ("1-epp", "evict", "2-replicas"))
    assert isinstance(one, EppReplicasBehindEnvoy) and one.replicas == 1
    assert isinstance(evict, WithEviction) and isinstance(evict.inner, EppReplicasBehindEnvoy)
    assert evict.spec.fraction == 0.2 and evict.spec.pod == 0 and evict.spec.every_s == 30.0
    assert isinstance(two, EppReplicasBehindEnvoy) and two.replicas == 2
    names = {c.name for c in made.values()}
    assert len(names) == 6 and not names & set(CONTENDER_NAMES)


def test_quick_keeps_the_canonical_prompts_with_a_shorter_ladder() -> None:
    scale = Scale(time_scale=8.0)
    full, quick = pr.workload(scale, False, 1), pr.workload(scale, True, 1)
    main = build("shared-prefix", scale, quick=False, seed=1)
    assert isinstance(main, SharedPrefix)
    assert full.prompts == quick.prompts == main.prompts and full.stages == main.stages
    assert [s.warmup for s in quick.stages] == [True, False]
    assert [s.rate for s in quick.stages[1:]] == [r * scale.pods / 8 for r in pr.QUICK_RATES]


def _stage(rate: float, p90: float | str, hit: float) -> dict[str, Any]:
    return {"warmup": False, "rate": rate, "label": f"{rate:g}", "sent": 10, "ttft_p50_s": 0.5, "ttft_p90_s": p90,
            "ttft_p99_s": p90, "prefix_hit_rate": hit, "output_tokens_per_s": 100.0, "success_rate": 1.0}  # fmt: skip


def _result(precise_stages: list[dict[str, Any]], approx_stages: list[dict[str, Any]]) -> dict[str, Any]:
    scenarios: list[dict[str, Any]] = [
        {"key": s.key, "title": s.title, "contenders": {p: s.contender_name(p) for p in pr.PRODUCERS}}
        for s in pr.SCENARIOS
    ]
    contenders = {}
    for s in scenarios:
        contenders[s["contenders"]["precise"]] = {"status": "ok", "stages": precise_stages}
        contenders[s["contenders"]["approx"]] = {"status": "ok", "stages": approx_stages}
    workload = {"name": "shared-prefix", "kind": "open", "stages": [], "groups": 75, "prompts_per_group": 5,
                "real_tokens": {"system": 6000, "question": 1200, "output": 1000},
                "sim_tokens": {"system": 375, "question": 75, "output": 62}, "footprint_blocks": 3600}  # fmt: skip
    return {"quick": False, "started": "now", "wall_s": 60.0, "loadavg": {}, "scale": {"pods": 4, "time_scale": 4,
            "token_unit": 16}, "kv_blocks_per_pod": 1233, "footprint_share": 0.73, "configs": {},
            "eviction": EvictionSpec().__dict__, "scenarios": scenarios,
            "workloads": {"shared-prefix": {"workload": workload, "contenders": contenders}}}  # fmt: skip


def test_verdicts_skip_light_load_and_need_both_metrics(tmp_path: Path) -> None:
    approx = [_stage(1.5, 0.5, 0.7), _stage(5, 2.0, 0.7), _stage(10, "timeout", 0.5)]
    won = _result([_stage(1.5, 0.9, 0.6), _stage(5, 1.0, 0.8), _stage(10, 3.0, 0.8)], approx)
    rows = report.precise_targets(won)
    assert len(rows) == 6 and all(r[3] == "**met**" for r in rows)
    assert "1.5" not in rows[0][2]  # light load is not compared
    lost = _result([_stage(1.5, 0.9, 0.6), _stage(5, 1.0, 0.7), _stage(10, 3.0, 0.8)], approx)
    verdicts = [r[3] for r in report.precise_targets(lost)]
    assert verdicts[0::2] == ["**met**"] * 3  # TTFT p90 rows
    assert verdicts[1::2] == ["**not met** (at 5 QPS)"] * 3  # a tied hit rate is not a win
    text = report.precise_section(lost, tmp_path, [])
    assert "2.00 / 1.00 ✔" in text and "70.0% / 70.0% ✘" in text
    assert "| epp-precise | - | 0.70 | - | - | - |" in text  # no EPP counters: served rate only
    assert report.precise_targets(None)[0][3] == "not measured"
    # Another profile's run gets its own rows, and none when it was not run.
    assert all(
        r[0] == "precise prefix (#8), reference profile" for r in report.precise_targets(won, "reference profile")
    )
    assert report.precise_targets(None, "reference profile") == []


def test_the_run_line_names_a_workload_seed_other_than_the_default(tmp_path: Path) -> None:
    approx = [_stage(5, 2.0, 0.7)]
    run = _result([_stage(5, 1.0, 0.8)], approx) | {"profile": "reference"}
    assert "`python -m benchmarks.precise_routing --profile reference`" in report.precise_section(run, tmp_path, [])
    text = report.precise_section(run | {"seed": 4}, tmp_path, [])
    assert "`python -m benchmarks.precise_routing --profile reference --seed 4`" in text


def test_the_seed_medians_need_every_scenario_in_every_seed() -> None:
    """A seed whose run died (or is still running) before a scenario, or whose producer failed in it: that
    scenario is not measured, never met on the seeds that have it."""
    approx = [_stage(1.5, 0.5, 0.7), _stage(5, 2.0, 0.7), _stage(10, 4.0, 0.6)]
    precise = [_stage(1.5, 0.5, 0.7), _stage(5, 1.0, 0.8), _stage(10, 2.0, 0.8)]
    runs = [_result(precise, approx) | {"seed": s, "started": f"2026-11-2{s}"} for s in (1, 2, 3)]
    table, rows = report.precise_seed_summary(runs, "reference profile")
    assert len(rows) == 2 * len(pr.SCENARIOS) and {r[3] for r in rows} == {"**met**"}
    assert "| 5 | 2.00 / 1.00 | 3 of 3 | 70.0% / 80.0% |" in table
    last = pr.SCENARIOS[-1]
    partial = runs[2]
    partial["scenarios"] = [s for s in partial["scenarios"] if s["key"] != last.key]
    _, rows = report.precise_seed_summary(runs, "reference profile")
    assert [r[2:] for r in rows if r[1].startswith(last.title)] == [["run in 2 of 3 seeds", "not measured"]]
    partial["scenarios"] = runs[0]["scenarios"]
    partial["workloads"]["shared-prefix"]["contenders"][last.contender_name("precise")] = {"status": "failed"}
    _, rows = report.precise_seed_summary(runs, "reference profile")
    assert [r[3] for r in rows if r[1].startswith(last.title)] == ["not measured"]
    # A stage with no value in one seed (nothing completed: no TTFT, no hit rate) is not a smaller sample: not met.
    empty = {**_stage(10, 0.0, 0.0), "ttft_p90_s": None, "prefix_hit_rate": None}
    runs = [_result(precise, approx) | {"seed": s, "started": f"2026-11-2{s}"} for s in (1, 2)]
    runs.append(_result([*precise[:2], empty], approx) | {"seed": 3, "started": "2026-11-23"})
    table, rows = report.precise_seed_summary(runs, "reference profile")
    first = pr.SCENARIOS[0].title
    assert "| 10 | 4.00 / - | 2 of 3 | 60.0% / - |" in table
    assert [r[2:] for r in rows if r[1].startswith(first)] == [
        ["not lower at 10 (- vs 4.00 s) QPS", "**not met**"], ["not higher at 10 (- vs 60.0%) QPS", "**not met**"]
    ]  # fmt: skip
    # A seed run twice counts once, with its newest run.
    again = _result(precise, [_stage(1.5, 0.5, 0.7), _stage(5, 0.5, 0.9), _stage(10, 1.0, 0.9)])
    table, rows = report.precise_seed_summary([*runs[:2], again | {"seed": 1, "started": "2026-11-29"}], "p")
    assert table.startswith("Workload seeds 1, 2, profile p.") and "| 5 | 1.25 / 1.00 | 1 of 2 |" in table
