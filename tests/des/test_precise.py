"""The DES with KV events: precise-prefix routing, eviction behind the EPP's back, EPP replicas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.des import vloop
from benchmarks.des.precise import live_durations
from benchmarks.des.precise import main as precise_main
from benchmarks.des.sim import Eviction, SimOptions, SimResult, Simulation, simulate
from benchmarks.des.workload import SharedPrefix, Stage, schedule

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
SMALL_KV = {"kv_cache_size": 1000, "max_num_seqs": 32}


def _run(producer: str, replicas: int = 1, eviction: Eviction | None = None) -> SimResult:
    # 24 x 1000-token system prompts ~ 1.5x one pod's KV: only affinity keeps them resident.
    workload = SharedPrefix(num_groups=24, prompts_per_group=4, system_prompt_len=1000, question_len=200,
                            output_len=16, seed=3)  # fmt: skip
    sched = schedule(workload, [Stage(4.0, 30.0, warmup=True), Stage(8.0, 20.0)], seed=3)
    config = (CONFIGS / f"{producer}-default.yaml").read_text()
    options = SimOptions(pods=4, epp_config=config, profile="llama-8b-h100", pod_overrides=SMALL_KV, seed=3,
                         replicas=replicas, eviction=eviction)  # fmt: skip
    return simulate(sched, options)


def test_pods_events_feed_the_precise_index_and_it_routes_on_them() -> None:
    precise = _run("precise")
    assert len(precise.kv_events) == 1
    events = precise.kv_events[0]
    assert events["stored"] > 1000 and events["index_keys"] > 1000, events
    stage = precise.stages()[-1]
    assert stage["completed"] == stage["requests"]
    assert stage["prefix_hit_rate"] > 0.8, stage
    assert _run("approx").kv_events == []  # no precise producer: the pods publish nothing


def test_eviction_behind_the_back_is_published_as_removals() -> None:
    evicted = _run("precise", eviction=Eviction(pod=0, fraction=0.2, every=10.0))
    assert len(evicted.evictions) == 5  # at 10, 20, 30, 40, 50 simulated s (the run lasts 50 s)
    assert sum(evicted.evictions) > 0
    assert evicted.kv_events[0]["removed"] >= sum(evicted.evictions)


def test_replicas_split_the_traffic_and_only_precise_ones_share_what_pods_hold() -> None:
    """Two replicas each see half the requests: the approximate index of each knows half the history and
    scatters groups; every precise replica consumes all events and keeps the single-replica hit rate."""
    hit = {}
    for producer in ("approx", "precise"):
        for replicas in (1, 2):
            result = _run(producer, replicas)
            hit[producer, replicas] = result.stages()[-1]["prefix_hit_rate"]
            if producer == "precise":
                assert len(result.kv_events) == replicas
                assert len({e["stored"] for e in result.kv_events}) == 1  # every replica saw every event
    assert hit["precise", 2] == pytest.approx(hit["precise", 1], abs=0.05), hit
    assert hit["approx", 2] < hit["approx", 1] - 0.05, hit


def test_precise_cli_runs_the_live_scale_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "des-precise.json"
    assert precise_main(["--seeds", "1", "--scenarios", "evict", "--rates", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "median over seeds" in printed
    data = json.loads(out.read_text())
    runs = {r["contender"]: r for r in data["runs"]}
    assert set(runs) == {"approx", "precise"}
    for run in runs.values():
        assert run["scenario"] == "evict" and len(run["stages"]) == 1
        assert run["stages"][0]["completed"] > 0


def test_the_event_feed_sends_a_full_batch_at_once_and_a_partial_one_after_the_flush_delay() -> None:
    """As the live publisher (llmepp_sim.kvevents): the DES held full batches for the flush delay too."""
    import asyncio

    from benchmarks.des.sim import _EventFeed
    from benchmarks.des.vloop import run
    from llmepp.kvevents.wire import EventBatch, Message
    from llmepp_sim.kvwire import BlockStored

    delivered: list[tuple[float, int]] = []

    class Ingest:
        async def on_batch(self, msg: Message, batch: EventBatch) -> None:
            delivered.append((asyncio.get_running_loop().time(), len(batch.events)))

    def stored(i: int) -> BlockStored:
        return BlockStored(block_hashes=[i + 1], parent_block_hash=None, token_ids=list(range(16)), block_size=16)

    async def main(loop: object) -> None:
        feed = _EventFeed(loop, b"kv@sim-0@m", 16, 0.025)  # type: ignore[arg-type]
        feed.ingests.append(Ingest())  # type: ignore[arg-type]
        feed([stored(i) for i in range(20)])
        await asyncio.sleep(0.1)

    run(main, start=1000.0)
    assert delivered == [(1000.0, 16), (1000.025, 4)]


def test_the_precise_index_reads_simulated_time() -> None:
    """Its speculative entries lapse in simulated time, as its events arrive."""
    workload = SharedPrefix(num_groups=1, prompts_per_group=1, system_prompt_len=64, question_len=16, output_len=4)
    config = (CONFIGS / "precise-default.yaml").read_text()

    async def main(loop: vloop.VirtualTimeLoop) -> bool:
        sim = Simulation(loop, schedule(workload, [Stage(1.0, 1.0)]), SimOptions(pods=2, epp_config=config))
        return bool(sim.producers) and all(p.index.clock == loop.time for p in sim.producers)

    assert vloop.run(main, start=10.0)


def test_the_speculative_durations_are_stretched_as_the_live_time_scale_stretches_them() -> None:
    """The EPP times `speculativeTTL` / `speculativeMaxHold` on the wall clock: at the live run's time scale 4
    the defaults (2 s, 5 m) last 8 and 1200 simulated s; the DES times them on its simulated clock."""
    document = yaml.safe_load(live_durations((CONFIGS / "precise-prefix.yaml").read_text()))
    (producer,) = [p for p in document["plugins"] if p["type"] == "precise-prefix-cache-producer"]
    assert producer["parameters"]["speculativeTTL"] == "8s"
    assert producer["parameters"]["speculativeMaxHold"] == "1200s"
    assert producer["parameters"]["speculativeIndexing"] is True  # the rest kept
    given = (
        "plugins:\n- type: precise-prefix-cache-producer\n  parameters: {speculativeTTL: 500ms}\n"
        "- type: random-picker\n"
    )
    document = yaml.safe_load(live_durations(given))
    assert document["plugins"][0]["parameters"]["speculativeTTL"] == "2s"
    assert document["plugins"][1] == {"type": "random-picker"}
