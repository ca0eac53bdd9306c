"""The DES end to end: the real EPP pipeline routing to engines on virtual time."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from benchmarks.des.__main__ import main as cli_main
from benchmarks.des.results import percentile, stage_metrics
from benchmarks.des.sim import HEADERS, SimOptions, SimResult, Simulation, fresh_copy, simulate
from benchmarks.des.suite import scale_run, summarize
from benchmarks.des.vloop import VirtualTimeLoop, run
from benchmarks.des.workload import Arrival, NoSharing, Schedule, SharedPrefix, Stage, ladder, request_body, schedule
from llmepp.director import RoutingDecision
from llmepp.request.parsers import parse_request
from llmepp_sim.engine import SimRequest
from llmepp_sim.textgen import FillerStream

SMALL_KV = {"kv_cache_size": 1000, "max_num_seqs": 32}


def _affinity_run(policy: str, seed: int = 0) -> SimResult:
    # 24 x 1000-token system prompts ~ 1.5x one pod's KV cache: only an affine router keeps them resident.
    workload = SharedPrefix(num_groups=24, prompts_per_group=4, system_prompt_len=1000, question_len=200,
                            output_len=16, seed=seed)  # fmt: skip
    sched = schedule(workload, ladder([8.0], 20.0), seed=seed)
    options = SimOptions(pods=4, policy=policy, profile="llama-8b-h100", pod_overrides=SMALL_KV, seed=seed)
    return simulate(sched, options)


def test_same_seed_same_results_different_seed_different_results() -> None:
    a, b, c = _affinity_run("default", 1), _affinity_run("default", 1), _affinity_run("default", 2)
    assert len(a.records) > 100
    assert a.records == b.records
    assert a.stages() == b.stages()
    assert a.records != c.records


def test_prefix_affine_policy_beats_random_on_hit_rate() -> None:
    random_hit = _affinity_run("random").stages()[0]["prefix_hit_rate"]
    for policy in ("default", "optimized-baseline", "prefix-only"):
        stage = _affinity_run(policy).stages()[0]
        assert stage["completed"] == stage["requests"]
        assert stage["prefix_hit_rate"] > random_hit + 0.15, (policy, stage["prefix_hit_rate"], random_hit)


def test_stale_metrics_hurt_a_metrics_driven_policy() -> None:
    """load-only routes on scraped queue/KV only: with a 1 s refresh it herds onto the pod that looked idle."""
    workload = NoSharing(prompt_len=256, output_len=32)
    sched = schedule(workload, [Stage(20.0, 20.0)])  # ~80% of the 8 pods' 4 seats each
    p90 = {}
    for interval in (0.0, 0.05, 1.0):
        options = SimOptions(pods=8, policy="load-only", profile="llama-8b-h100",
                             pod_overrides={"max_num_seqs": 4}, refresh_interval=interval)  # fmt: skip
        stage = simulate(sched, options).stages()[0]
        assert stage["completed"] == stage["requests"]
        p90[interval] = stage["ttft_p90_s"]
    assert p90[0.0] <= p90[0.05] * 1.05
    assert p90[1.0] > 2 * p90[0.05], p90


def test_ttft_of_an_idle_request_is_the_latency_formula_plus_request_latency() -> None:
    workload = SharedPrefix(num_groups=1, prompts_per_group=1, system_prompt_len=600, question_len=40, output_len=5)
    sched = schedule(workload, [Stage(0.5, 8.0)], seed=3)
    base = SimOptions(pods=2, profile="llama-8b-h100", refresh_interval=0.05)
    first = simulate(sched, base).records[0]
    later = simulate(sched, dataclasses.replace(base, request_latency=0.02)).records[0]
    assert first.ttft is not None and later.ttft is not None
    assert first.ttft == pytest.approx((30 + 640 * 0.2) / 1e3)
    assert first.itl == pytest.approx(0.012)
    assert later.ttft == pytest.approx(first.ttft + 0.02)


def test_a_copied_parse_equals_a_real_parse() -> None:
    prompt = SharedPrefix(num_groups=2, prompts_per_group=2, system_prompt_len=50, question_len=10).prompt(1)
    body = request_body(prompt)
    template = parse_request(HEADERS, body, request_id="1", received_at=1.0)
    copied = fresh_copy(template, "2", 2.0)
    assert copied == parse_request(HEADERS, body, request_id="2", received_at=2.0)
    copied.data["x"] = 1
    copied.headers["y"] = "z"
    assert "x" not in template.data and "y" not in template.headers
    assert template.prompt_is_token_ids if hasattr(template, "prompt_is_token_ids") else True
    assert template.prompt is not None and len(template.prompt) == 4 * len(prompt)


def test_no_sharing_draws_each_requests_lengths_from_its_ranges() -> None:
    varied = NoSharing(prompt_len=(100, 300), output_len=(10, 50), seed=3)
    prompts = [varied.prompt(i) for i in range(200)]
    assert all(100 <= len(p) <= 300 and 10 <= p.output_len <= 50 for p in prompts)
    assert len({len(p) for p in prompts}) > 50 and len({p.output_len for p in prompts}) > 20
    assert [len(p) for p in prompts] == [len(varied.prompt(i)) for i in range(200)]  # a function of (seed, index)
    assert b'"max_tokens":%d' % prompts[0].output_len in request_body(prompts[0])
    fixed = NoSharing(prompt_len=256, output_len=32, seed=3)
    assert {(len(fixed.prompt(i)), fixed.prompt(i).output_len) for i in range(20)} == {(256, 32)}
    with pytest.raises(ValueError, match="prompt_len"):
        NoSharing(prompt_len=(300, 200))


def test_schedule_is_poisson_at_the_stage_rates_and_cycles_prompts() -> None:
    workload = SharedPrefix(num_groups=3, prompts_per_group=2, system_prompt_len=20, question_len=5)
    sched = schedule(workload, [Stage(50.0, 20.0), Stage(200.0, 20.0)], seed=4)
    per_stage = [sum(1 for a in sched.arrivals if a.stage == k) for k in (0, 1)]
    assert 800 < per_stage[0] < 1200 and 3500 < per_stage[1] < 4500
    times = [a.time for a in sched.arrivals]
    assert times == sorted(times) and times[-1] < 40.0
    keys = [workload.prompt(i).key for i in range(12)]
    assert sorted(keys[:6]) == list(range(6)) and keys[6:] == keys[:6]
    shared = workload.prompt(0)
    assert all(workload.prompt(i).prefix is shared.prefix for i in range(6) if workload.prompt(i).group == shared.group)


def test_stage_metrics_definitions() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([], 90) is None
    result = _affinity_run("default")
    row = stage_metrics(result.records, result.schedule, result.samples)[0]
    ok = [r for r in result.records if r.error is None]
    assert row["prefix_hit_rate"] == pytest.approx(sum(r.cached_tokens for r in ok) / sum(r.prompt_tokens for r in ok))
    assert row["itl_p50_s"] == pytest.approx(0.012, rel=0.2)
    assert row["mean_waiting_queue"] is not None


def test_cli_and_suite_entry_points(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--pods", "2", "--policy", "random,default", "--qps", "2,4", "--stage-duration", "3", "--groups", "3",
            "--prompts-per-group", "2", "--system-len", "64", "--question-len", "16", "--output-len", "4",
            "--profile", "llama-8b-h100", "--pod-config", "kv_cache_size=500", "--no-json"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "policy random" in out and "policy default" in out and "sim-s/wall-s" in out
    runs = scale_run(2, [1.0], 3.0, policies=("random", "default"))
    data = json.loads(json.dumps([summarize(r) for r in runs]))
    assert [d["policy"] for d in data] == ["random", "default"]
    assert data[0]["stages"][0]["requests"] == data[1]["stages"][0]["requests"] > 0


def test_a_drained_ladder_starts_each_stage_after_the_previous_one_finished() -> None:
    # Long outputs: stage 0's requests run well past its 4 s, so a drained stage 1 must start later.
    workload = NoSharing(prompt_len=128, output_len=400)
    sched = schedule(workload, [Stage(4.0, 4.0), Stage(4.0, 4.0)], seed=2)
    base = SimOptions(pods=2, profile="llama-8b-h100", refresh_interval=0.05)
    open_loop, drained = simulate(sched, base), simulate(sched, dataclasses.replace(base, drain_between_stages=True))
    assert open_loop.stage_starts == [0.0, 4.0]
    stage0_done = max(r.finished for r in drained.records if r.stage == 0 and r.finished is not None)
    assert stage0_done > 4.0
    assert drained.stage_starts == [0.0, pytest.approx(stage0_done)]
    first_of_1 = min(r.arrival for r in drained.records if r.stage == 1)
    planned_offset = min(a.time for a in sched.arrivals if a.stage == 1) - 4.0
    assert first_of_1 == pytest.approx(stage0_done + planned_offset)
    # Stage windows (throughput spans, queue samples) count from the actual start.
    assert drained.stages()[1]["requests"] == open_loop.stages()[1]["requests"]
    span = drained.stages()[1]["output_tokens_per_s"]
    assert span is not None and span > 0


def test_a_request_without_a_first_token_by_first_token_timeout_fails_as_in_the_live_client() -> None:
    """The live load generator fails a request with no first token 300 s after it was sent (total 420 s);
    the DES had only the total, so a 350 s TTFT counted as a success."""
    wl = SharedPrefix(num_groups=1, prompts_per_group=1, system_prompt_len=84, question_len=16, output_len=2, seed=0)
    sched = Schedule(wl, [Stage(1.0, 1.0)], [Arrival(0, 0.0, 0)])
    slow = {"prefill_time_per_token": 3500.0}  # 100 prompt tokens: ~350 s of prefill, done well before 420 s
    options = SimOptions(pods=1, policy="random", profile="llama-8b-h100", pod_overrides=slow, request_timeout=420.0)
    served = simulate(sched, options).records[0]
    assert served.error is None and served.ttft is not None and 300 < served.ttft < 420
    options.first_token_timeout = 300.0
    failed = simulate(sched, options)
    assert failed.records[0].error == "ttft-timeout"
    assert failed.stages()[0]["ttft_p50_s"] == math.inf


@pytest.mark.timeout(60)
def test_a_pod_with_no_prefill_latency_serves_in_simulated_time() -> None:
    """PodConfig accepts all-zero prefill latencies and the live engine serves such a request at once; so must the
    DES (its engine spun at one virtual instant for ever: no time passed, so the pass that ends a zero-length
    prefill never ran)."""
    wl = SharedPrefix(num_groups=1, prompts_per_group=1, system_prompt_len=64, question_len=16, output_len=4)
    sched = Schedule(wl, [Stage(1.0, 1.0)], [Arrival(0, 0.0, 0)])
    zero = {"time_to_first_token": 0.0, "prefill_overhead": 0.0, "prefill_time_per_token": 0.0}
    opts = SimOptions(pods=1, policy="random", profile="llama-8b-h100", pod_overrides=zero)
    (rec,) = simulate(sched, opts).records
    assert rec.error is None and rec.output_tokens == 4


UTILIZATION_FILTER = """
plugins:
- type: utilization-detector
  parameters: {queueDepthThreshold: 2}
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: utilization-detector
  - pluginRef: random-picker
"""


def test_plugins_judge_metrics_freshness_on_simulated_time() -> None:
    """The DES stamps metrics with simulated time: a plugin judging their freshness (utilization-detector as a
    filter) must read the same clock, as live both are time.monotonic(). On the wall clock every endpoint read
    stale (or fresh) for ever, and the filter kept a pod whose fresh metrics show a queue over its threshold."""
    wl = SharedPrefix(num_groups=1, prompts_per_group=1, system_prompt_len=64, question_len=16, output_len=4)
    sched = Schedule(wl, [Stage(1.0, 1.0)], [])
    opts = SimOptions(pods=2, epp_config=UTILIZATION_FILTER, profile="llama-8b-h100", refresh_interval=0.0)

    async def main(loop: VirtualTimeLoop) -> list[str]:
        sim = Simulation(loop, sched, opts)
        busy = sim.pods[0]
        prompt = wl.prompt(0)
        ids = prompt.token_ids()
        for i in range(10):  # its engine loop is not started: the 10 stay waiting
            busy.engine.submit(SimRequest(f"q{i}", ids, 4, FillerStream(sim.fillers, 0, ids)))
        sim._refresh_all()  # as before every decision with refresh_interval 0
        assert busy.endpoints[0].metrics.waiting_queue_size == 10
        picks = []
        for i in range(40):
            request = parse_request(HEADERS, request_body(prompt), request_id=str(i), received_at=loop.time())
            decision = await sim.directors[0].handle_request(request, None)
            assert isinstance(decision, RoutingDecision)
            picks.append(decision.targets[0].name)
        return picks

    # Virtual time far behind the wall clock (time.monotonic() is well past 10 s by now).
    picks = run(main, start=10.0)
    assert "sim-0" not in picks, f"the queued pod was picked {picks.count('sim-0')} times of 40"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pods", "0"], "argument --pods: must be > 0, got '0'"),
        (["--qps", "0,5"], "argument --qps: expected positive numbers, got '0,5'"),
        (["--qps", "nan"], "argument --qps: expected positive numbers, got 'nan'"),
        (["--stage-duration", "-1"], "argument --stage-duration: must be > 0, got '-1'"),
        (["--prompt-len", "300:200"], "argument --prompt-len: expected 0 < LOW <= HIGH, got '300:200'"),
        (["--prompt-len", "1k"], "argument --prompt-len: expected N or LOW:HIGH, got '1k'"),
        (["--output-len", "10:20"], "argument --output-len: a LOW:HIGH range is for --workload no-sharing"),
    ],
)
def test_the_cli_rejects_an_empty_pool_or_ladder_with_a_usage_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main([*argv, "--no-json"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


ACTIVE_REQUESTS = """
plugins:
- type: endpoint-attribute-scorer
  parameters:
    attributeKey: active-requests
    algorithm: {type: linear_lower_is_better}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: endpoint-attribute-scorer, weight: 1}
  - pluginRef: max-score-picker
"""


def test_each_replica_counts_only_its_own_requests_in_flight() -> None:
    """Replicas are separate EPP processes live, each with its own datastore. The DES built them on one, so the
    director's in-flight counters (read by endpoint-attribute scorers, active-request / token-load scorers
    without an inflight producer, concurrency detection) counted the other replicas' requests too."""
    wl = SharedPrefix(num_groups=1, prompts_per_group=1, system_prompt_len=64, question_len=16, output_len=4)
    opts = SimOptions(pods=4, epp_config=ACTIVE_REQUESTS, profile="llama-8b-h100", replicas=2, seed=1)
    body = request_body(wl.prompt(0))

    async def main(loop: VirtualTimeLoop) -> tuple[list[int], list[int]]:
        sim = Simulation(loop, Schedule(wl, [Stage(1.0, 1.0)], []), opts)
        zero, one = sim.directors
        held = await one.handle_request(parse_request(HEADERS, body, request_id="r1", received_at=loop.time()), None)
        assert isinstance(held, RoutingDecision)  # in flight on replica 1
        return [ep.inflight.requests for ep in zero.datastore.endpoints], [
            ep.inflight.requests for ep in one.datastore.endpoints
        ]

    seen_by_zero, seen_by_one = run(main, start=1000.0)
    assert seen_by_zero == [0, 0, 0, 0]
    assert sorted(seen_by_one) == [0, 0, 0, 1]


def test_a_request_task_that_raises_fails_the_run_instead_of_vanishing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug inside the DES or a plugin left the request with no error and no TTFT: an infinite TTFT that no
    error count explained. The run now fails, naming how many requests it lost."""
    wl = SharedPrefix(num_groups=1, prompts_per_group=2, system_prompt_len=84, question_len=16, output_len=2, seed=0)
    sched = Schedule(wl, [Stage(1.0, 1.0)], [Arrival(0, 0.0, 0), Arrival(1, 0.5, 0)])
    options = SimOptions(pods=1, policy="random", profile="llama-8b-h100")
    assert all(r.error is None for r in simulate(sched, options).records)
    real = Simulation._prompt

    def buggy(self: Simulation, prompt: object, index: int, arrived: float) -> object:
        if index == 1:
            raise ZeroDivisionError("a plugin's bug")
        return real(self, prompt, index, arrived)  # type: ignore[arg-type]

    monkeypatch.setattr(Simulation, "_prompt", buggy)
    with pytest.raises(RuntimeError, match="1 simulated requests failed") as failed:
        simulate(sched, options)
    assert isinstance(failed.value.__cause__, ZeroDivisionError)
