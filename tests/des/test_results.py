"""The DES's per-stage metrics."""

from __future__ import annotations

import math

from benchmarks.des.results import RequestRecord, percentile, stage_metrics
from benchmarks.des.workload import NoSharing, Schedule, Stage


def test_failed_requests_count_as_infinite_ttfts_not_as_missing() -> None:
    """As the live harness: a policy that lets half its requests time out must not get a lower TTFT p90 than
    one that completes them all (the failures were left out, so its p90 was its fast half's)."""
    schedule = Schedule(NoSharing(), [Stage(1.0, 10.0)])
    complete = [RequestRecord(i, 0, float(i), ttft=2.0, output_tokens=10, finished=float(i) + 3) for i in range(10)]
    failing = [RequestRecord(i, 0, float(i), ttft=1.0, output_tokens=10, finished=float(i) + 2) for i in range(5)]
    failing += [RequestRecord(i, 0, float(i), error="timeout") for i in range(5, 10)]
    assert stage_metrics(complete, schedule)[0]["ttft_p90_s"] == 2.0
    row = stage_metrics(failing, schedule)[0]
    assert row["ttft_p90_s"] == row["ttft_p99_s"] == math.inf and row["completed"] == 5
    assert row["ttft_p50_s"] == math.inf  # halfway from the last success (rank 5) to the first failure
    assert percentile([1.0, math.inf, math.inf], 100) == math.inf and percentile([1.0, 2.0, math.inf], 50) == 2.0
