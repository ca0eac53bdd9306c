"""Per-request records and per-stage metrics, shared by the DES and the live validation client.

Definitions (identical for both modes, all in simulated seconds):

* **TTFT**: request arrival (DES) / request start (live client) to the first output token.
* **ITL**: per request, ``(last token time - first token time) / (output tokens - 1)`` (= TPOT); the
  percentiles are over requests. Requests with one output token have no ITL.
* **output tok/s**: output tokens of the stage's completed requests / (last completion among them -
  stage start). Over-loaded stages therefore show the throughput the cluster delivered for them.
* **prefix hit rate**: ``sum(cached prompt tokens) / sum(prompt tokens)`` over the stage's completed
  requests, from the pod's ``usage.prompt_tokens_details.cached_tokens`` (live) or the same engine field
  (``SimRequest.num_cached_tokens``) in the DES.
* **mean waiting queue**: mean per-pod ``num_requests_waiting`` over the stage, sampled at every metrics
  refresh (DES only; ``None`` live).

A request belongs to the stage in which it arrived; failures (errors, timeouts) are counted, not averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.des.workload import Schedule


@dataclass(slots=True)
class RequestRecord:
    index: int
    stage: int
    arrival: float  # s since the run's start
    pod: int = -1  # index of the pod that served it (-1: not routed)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itl: float | None = None
    finished: float | None = None  # s since the run's start
    error: str | None = None


@dataclass(slots=True)
class QueueSample:
    time: float  # s since the run's start
    waiting: float  # mean per pod
    running: float  # mean per pod
    kv_usage: float  # mean per pod, 0..1


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0..100; None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    if math.isinf(xs[hi]):  # a failed request's TTFT: inf - inf would be nan
        return xs[lo] if pos == lo else math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stage_metrics(
    records: Sequence[RequestRecord],
    schedule: Schedule,
    samples: Sequence[QueueSample] | None = None,
    starts: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Per-stage metrics; `starts` = when each stage actually began (drained ladders), default as planned."""
    starts = starts or schedule.stage_starts
    rows: list[dict[str, Any]] = []
    for k, stage in enumerate(schedule.stages):
        recs = [r for r in records if r.stage == k]
        ok = [r for r in recs if r.error is None and r.ttft is not None]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        # A failed request's TTFT is infinite, as in the live harness: a policy cannot look fast by failing
        # requests (its percentiles reach inf once failures pass their rank).
        censored = ttfts + [math.inf] * (len(recs) - len(ok))
        itls = [r.itl for r in ok if r.itl is not None]
        prompt = sum(r.prompt_tokens for r in ok)
        cached = sum(r.cached_tokens for r in ok)
        out_tokens = sum(r.output_tokens for r in ok)
        last = max((r.finished for r in ok if r.finished is not None), default=None)
        span = (last - starts[k]) if last is not None else None
        queue = None
        if samples is not None:
            window = [s.waiting for s in samples if starts[k] <= s.time < starts[k] + stage.duration]
            queue = sum(window) / len(window) if window else None
        errors: dict[str, int] = {}
        for r in recs:
            if r.error is not None:
                errors[r.error] = errors.get(r.error, 0) + 1
        rows.append(
            {
                "stage": k,
                "qps": stage.qps,
                "duration_s": stage.duration,
                "warmup": stage.warmup,
                "requests": len(recs),
                "completed": len(ok),
                "errors": errors,
                "ttft_p50_s": percentile(censored, 50),
                "ttft_p90_s": percentile(censored, 90),
                "ttft_p99_s": percentile(censored, 99),
                "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
                "itl_p50_s": percentile(itls, 50),
                "itl_p90_s": percentile(itls, 90),
                "output_tokens_per_s": out_tokens / span if span else None,
                "prefix_hit_rate": cached / prompt if prompt else None,
                "mean_waiting_queue": queue,
            }
        )
    return rows


def _fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A fixed-width text table of stage metrics (latencies in ms)."""
    head = (
        f"{'qps':>7} {'req':>6} {'ok':>6} {'ttft p50':>9} {'ttft p90':>9} {'ttft p99':>9} {'itl p50':>8} "
        f"{'itl p90':>8} {'out tok/s':>10} {'hit rate':>8} {'queue':>7}"
    )
    lines = [title, head] if title else [head]
    lines.extend(
        f"{r['qps']:>7g} {r['requests']:>6d} {r['completed']:>6d} {_fmt(r['ttft_p50_s'], 1e3, 1):>9} "
        f"{_fmt(r['ttft_p90_s'], 1e3, 1):>9} {_fmt(r['ttft_p99_s'], 1e3, 1):>9} {_fmt(r['itl_p50_s'], 1e3, 2):>8} "
        f"{_fmt(r['itl_p90_s'], 1e3, 2):>8} {_fmt(r['output_tokens_per_s'], 1, 0):>10} "
        f"{_fmt(r['prefix_hit_rate'], 1, 3):>8} {_fmt(r['mean_waiting_queue'], 1, 2):>7}"
        + (" (warm-up)" if r.get("warmup") else "")
        for r in rows
    )
    return "\n".join(lines)
