"""The predictor's model: one online Bayesian linear regression per target (TTFT, TPOT), predicting p90.

Per target, with x the feature row scaled by fixed constants (so a weight's prior means the same
thing whatever the traffic) and w₀ the prior weights:

    w      = (XᵀX + λ·I)⁻¹ (Xᵀy + λ·w₀)              posterior mean, Gaussian prior N(w₀, σ²/λ)
    b(x)   = min(B, ⌊log₂ max(n, 1)⌋)                 size bucket of the prompt, n = input_token_length:
                                                      [0, 2), [2, 4), … [2^B, ∞) tokens; B = 20
    r_q    = q-quantile of the residuals y − w·x      (q = LATENCY_QUANTILE_ALPHA, 0.9; 0 for "mean")
    r_q(b) = q-quantile of the residuals of the samples in size bucket b, when there are
             ≥ `MIN_BUCKET_RESIDUALS` of them (100: ≥ 10 residuals above a p90); r_q (global) otherwise
    pred   = max(0, w·x + r_q(b(x)))                  milliseconds

The residual quantile is conditional on the request's size because latency noise is not: a 45 ms
interactive TTFT is off by a few ms, a 2 s batch prefill by hundreds, and one global quantile (set by
the large errors) added to every prediction makes small predictions mostly that constant. Within a
bucket (prompts within a factor 2 in length) the residuals are treated as exchangeable, so the p90
prediction covers ~90% of the samples of that size, not only ~90% of all samples pooled. The bucket is
the request's, not the pod's (unlike a bucket of w·x, which a pod's load moves): every pod scored for
one request gets the same r_q(b), so the pods' ranking is still that of w·x, with no inversion at a
bucket edge. The residuals are in-sample (those of the fit itself), as the global one always was.

Before any sample the prediction is the prior's (`w = w₀`, `r_q = 0`): a hand-set physical guess that
latency grows with uncached prompt tokens, queued and running requests and KV pressure, so routing
on predictions is sane from the first request; with n samples the data outweighs the prior about n/λ
to 1. XᵀX and Xᵀy are kept as running sums per bucket of the window (below); a refit adds up the buckets'
sums (d ≤ 9, so it is O(buckets · d² + d³) however many samples there are) and first recomputes the sums
of buckets exactly, against rounding drift, a few at a time (at most `RECOMPUTE_BUDGET` samples per refit,
round robin): the predictor shares its event loop with the prediction server, and recomputing a full
window at once (~200k samples) stalled predictions for ~0.9 s. The residual quantiles are taken over at
most `QUANTILE_SAMPLE` stored samples. A sample with a scaled feature
beyond `MAX_FEATURE` (10⁵) is skipped and counted, not stored: it would make XᵀX numerically singular.

The window is stratified as the reference's: samples land in buckets keyed by queue depth
{0, 1-2, 3-5, 6-10, 11+}, KV utilisation (5% steps) and, for TTFT, prefix-cache score (quartiles);
each bucket keeps at most `max_per_bucket` samples, a new one replacing a random old one when full,
so a rare regime (deep queue, cold cache) is not crowded out by the common one.

Features (the raw fields of schema.PredictionRequest, scale in brackets):
  TTFT: 1, kv_cache_percentage, input_token_length [1000], num_request_waiting, num_request_running [10],
        prefix_cache_score, effective_input_tokens = (1 − prefix_cache_score)·input_token_length [1000],
        prefill_tokens_in_flight [10000], is_queued = [num_request_waiting > 0]
  TPOT: 1, kv_cache_percentage, input_token_length [1000], num_request_waiting, num_request_running [10],
        num_tokens_generated [1000], prefill_tokens_in_flight [10000], decode_tokens_in_flight [10000], is_queued
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import add
from typing import Any, Protocol

log = logging.getLogger(__name__)

RECOMPUTE_BUDGET = 4000  # samples whose bucket sums a refit recomputes exactly (whole buckets, at least one)
QUANTILE_SAMPLE = 2000
MIN_BUCKET_RESIDUALS = 100  # fewer residuals at a size: that size uses the global quantile
MAX_SIZE_BUCKET = 20  # the last bucket is [2^20, ∞) prompt tokens
SIZE_FEATURE = "input_token_length/1000"  # where a feature row holds the prompt's size (both targets)
# A training sample with a scaled feature beyond this (a prompt of over 10⁸ tokens, 10⁵ queued requests, ...) is
# skipped and counted: squared in XᵀX it would swamp the prior's λ in rounding and make every refit fail.
MAX_FEATURE = 1e5


def size_bucket(tokens: float) -> int:
    """b: the log₂ bucket of a prompt length in tokens (0 and 1 token are bucket 0)."""
    if not tokens >= 2.0:  # also NaN
        return 0
    return min(MAX_SIZE_BUCKET, int(math.log2(tokens)))


class Row(Protocol):
    """What a feature row offers (schema.PredictionRequest / TrainingEntry)."""

    kv_cache_percentage: float
    input_token_length: int
    num_request_waiting: int
    num_request_running: int
    num_tokens_generated: int
    prefix_cache_score: float
    prefill_tokens_in_flight: int
    decode_tokens_in_flight: int


@dataclass(frozen=True)
class TargetSpec:
    name: str
    features: tuple[str, ...]
    prior: tuple[float, ...]  # ms per scaled unit, in `features` order
    featurize: Callable[[Row], list[float]]
    bucket: Callable[[Row], tuple[int, int, int]]


def _queue_bucket(waiting: int) -> int:
    return 0 if waiting <= 0 else 1 if waiting <= 2 else 2 if waiting <= 5 else 3 if waiting <= 10 else 4


def _kv_bucket(kv: float) -> int:
    return min(19, max(0, int(kv * 20)))


def _ttft_x(r: Row) -> list[float]:
    tokens = r.input_token_length
    return [
        1.0, r.kv_cache_percentage, tokens / 1000, float(r.num_request_waiting), r.num_request_running / 10,
        r.prefix_cache_score, (1.0 - r.prefix_cache_score) * tokens / 1000, r.prefill_tokens_in_flight / 10000,
        1.0 if r.num_request_waiting > 0 else 0.0,
    ]  # fmt: skip


def _tpot_x(r: Row) -> list[float]:
    return [
        1.0, r.kv_cache_percentage, r.input_token_length / 1000, float(r.num_request_waiting),
        r.num_request_running / 10, r.num_tokens_generated / 1000, r.prefill_tokens_in_flight / 10000,
        r.decode_tokens_in_flight / 10000, 1.0 if r.num_request_waiting > 0 else 0.0,
    ]  # fmt: skip


TTFT = TargetSpec(
    name="ttft",
    features=(
        "intercept",
        "kv_cache_percentage",
        "input_token_length/1000",
        "num_request_waiting",
        "num_request_running/10",
        "prefix_cache_score",
        "effective_input_tokens/1000",
        "prefill_tokens_in_flight/10000",
        "is_queued",
    ),
    # 40 ms fixed, 0.1 ms per uncached prompt token (+0.02 per token), 150 ms per queued request, ...
    prior=(40.0, 50.0, 20.0, 150.0, 20.0, 0.0, 80.0, 500.0, 100.0),
    featurize=_ttft_x,
    bucket=lambda r: (
        _queue_bucket(r.num_request_waiting),
        _kv_bucket(r.kv_cache_percentage),
        min(3, max(0, int(r.prefix_cache_score * 4))),
    ),
)
TPOT = TargetSpec(
    name="tpot",
    features=(
        "intercept",
        "kv_cache_percentage",
        "input_token_length/1000",
        "num_request_waiting",
        "num_request_running/10",
        "num_tokens_generated/1000",
        "prefill_tokens_in_flight/10000",
        "decode_tokens_in_flight/10000",
        "is_queued",
    ),
    # 15 ms per token at rest, +10 ms per 10 running requests, +20 ms at a full KV cache, ...
    prior=(15.0, 20.0, 1.0, 2.0, 10.0, 1.0, 5.0, 5.0, 5.0),
    featurize=_tpot_x,
    bucket=lambda r: (_queue_bucket(r.num_request_waiting), _kv_bucket(r.kv_cache_percentage), 0),
)


@dataclass(frozen=True)
class Coefficients:
    """A fitted (or prior) model: what predictions use, swapped atomically on refit."""

    weights: tuple[float, ...]
    residual_quantile: float = 0.0  # global r_q, the fallback
    samples: int = 0
    source: str = "prior"  # "prior", "trained" or "synced"
    trained_at: float = field(default_factory=time.time)
    bucket_quantiles: Mapping[int, float] = field(default_factory=dict)  # b → r_q(b), well-populated buckets

    def residual_for(self, tokens: float | None) -> float:
        """r_q(b): the residual quantile added for a prompt of `tokens` (None: the global one)."""
        if tokens is None or not self.bucket_quantiles:
            return self.residual_quantile
        return self.bucket_quantiles.get(size_bucket(tokens), self.residual_quantile)

    def predict(self, x: Sequence[float], tokens: float | None = None) -> float:
        value = math.fsum(w * v for w, v in zip(self.weights, x)) + self.residual_for(tokens)
        return value if value > 0.0 else 0.0


class _Bucket:
    """One stratum of the window: its samples and their running sums XᵀX, Xᵀy."""

    __slots__ = ("samples", "xtx", "xty")

    def __init__(self, d: int) -> None:
        self.samples: list[tuple[list[float], float]] = []
        self.xtx = [[0.0] * d for _ in range(d)]
        self.xty = [0.0] * d

    def accumulate(self, x: list[float], y: float, sign: float) -> None:
        xtx, xty = self.xtx, self.xty
        for i, xi in enumerate(x):
            if xi == 0.0:
                continue
            s = sign * xi
            row = xtx[i]
            for j, xj in enumerate(x):
                row[j] += s * xj
            xty[i] += s * y

    def recompute(self) -> None:
        d = len(self.xty)
        self.xtx = [[0.0] * d for _ in range(d)]
        self.xty = [0.0] * d
        for x, y in self.samples:
            self.accumulate(x, y, sign=1.0)


class TargetModel:
    """One target's sample window, running sums and current coefficients."""

    def __init__(
        self,
        spec: TargetSpec,
        *,
        max_per_bucket: int = 500,
        quantile: float = 0.9,
        objective: str = "quantile",
        prior_strength: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_per_bucket < 1:
            raise ValueError("max_per_bucket must be >= 1")
        if not 0.0 < quantile < 1.0:
            raise ValueError("quantile must be in (0, 1)")
        if objective not in ("quantile", "mean"):
            raise ValueError("objective must be 'quantile' or 'mean'")
        if not 0.0 < prior_strength < math.inf:
            raise ValueError("prior strength must be a finite number > 0")
        self.spec = spec
        self.d = len(spec.features)
        self._size = spec.features.index(SIZE_FEATURE)
        self.max_per_bucket = max_per_bucket
        self.quantile = quantile
        self.objective = objective
        self.prior_strength = prior_strength
        self._rng = rng or random.Random()
        self.coefficients = Coefficients(spec.prior)
        self.received = 0  # samples ever accepted
        self.skipped = 0  # samples refused: a feature beyond MAX_FEATURE
        self.since_fit = 0  # accepted since the last fit
        self.fits = 0
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self._n = 0
        self._xtx = [[0.0] * self.d for _ in range(self.d)]  # the window's sums as of the last fit
        self._xty = [0.0] * self.d
        self._next_exact = 0  # where the round robin of exact recomputations goes on

    @property
    def stored(self) -> int:
        return self._n

    def add(self, row: Row, y: float) -> None:
        x = self.spec.featurize(row)
        if max(map(abs, x)) > MAX_FEATURE:
            self.skipped += 1
            return
        key = self.spec.bucket(row)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.d)
        stored = bucket.samples
        if len(stored) < self.max_per_bucket:
            stored.append((x, y))
            self._n += 1
        else:
            i = self._rng.randrange(len(stored))
            bucket.accumulate(*stored[i], sign=-1.0)
            stored[i] = (x, y)
        bucket.accumulate(x, y, sign=1.0)
        self.received += 1
        self.since_fit += 1

    def samples(self) -> Iterable[tuple[list[float], float]]:
        for bucket in self._buckets.values():
            yield from bucket.samples

    def fit(self) -> Coefficients:
        """Refit from the stored window (the prior alone when it is empty) and swap it in."""
        self.fits += 1
        self._recompute_some()
        self._sum_buckets()
        lam, w0, d = self.prior_strength, self.spec.prior, self.d
        a = [[self._xtx[i][j] + (lam if i == j else 0.0) for j in range(d)] for i in range(d)]
        c = [self._xty[i] + lam * w0[i] for i in range(d)]
        weights = tuple(solve_spd(a, c))
        rq = 0.0
        by_bucket: dict[int, float] = {}
        if self._n and self.objective == "quantile":
            pool = list(self.samples())
            if len(pool) > QUANTILE_SAMPLE:
                pool = self._rng.sample(pool, QUANTILE_SAMPLE)
            by_size: dict[int, list[float]] = {}
            residuals = []
            for x, y in pool:
                r = y - math.fsum(w * v for w, v in zip(weights, x))
                residuals.append(r)
                by_size.setdefault(size_bucket(round(x[self._size] * 1000)), []).append(r)
            rq = quantile_of_sorted(sorted(residuals), self.quantile)
            by_bucket = {
                b: quantile_of_sorted(sorted(rs), self.quantile)
                for b, rs in sorted(by_size.items())
                if len(rs) >= MIN_BUCKET_RESIDUALS
            }
        source = "trained" if self._n else "prior"
        self.coefficients = Coefficients(weights, rq, self._n, source, bucket_quantiles=by_bucket)
        self.since_fit = 0
        return self.coefficients

    def _recompute_some(self) -> None:
        """Recompute exactly the sums of the next buckets of the round robin, up to RECOMPUTE_BUDGET samples."""
        buckets = list(self._buckets.values())
        if not buckets:
            return
        budget = RECOMPUTE_BUDGET
        for _ in range(len(buckets)):
            bucket = buckets[self._next_exact % len(buckets)]
            if budget < len(bucket.samples) and budget < RECOMPUTE_BUDGET:
                break
            bucket.recompute()
            budget -= len(bucket.samples)
            self._next_exact = (self._next_exact + 1) % len(buckets)
            if budget <= 0:
                break

    def _sum_buckets(self) -> None:
        d = self.d
        xtx = [[0.0] * d for _ in range(d)]
        xty = [0.0] * d
        for bucket in self._buckets.values():
            for i, row in enumerate(bucket.xtx):
                xtx[i] = list(map(add, xtx[i], row))
            xty = list(map(add, xty, bucket.xty))
        self._xtx, self._xty = xtx, xty

    def predict(self, row: Row) -> float:
        return self.coefficients.predict(self.spec.featurize(row), row.input_token_length)

    def clear(self) -> None:
        self._buckets.clear()
        self._n = 0
        self._xtx = [[0.0] * self.d for _ in range(self.d)]
        self._xty = [0.0] * self.d
        self._next_exact = 0
        self.since_fit = 0
        self.coefficients = Coefficients(self.spec.prior)

    def to_json(self) -> dict[str, Any]:
        c = self.coefficients
        return {
            "name": self.spec.name,
            "features": list(self.spec.features),
            "weights": list(c.weights),
            "residual_quantile": c.residual_quantile,
            # r_q(b) for the buckets with enough residuals: prompts of [from_tokens, to_tokens) add it instead
            "residual_quantiles_by_size": [
                {
                    "bucket": b,
                    "from_tokens": 0 if b == 0 else 2**b,
                    "to_tokens": None if b == MAX_SIZE_BUCKET else 2 ** (b + 1),
                    "residual_quantile": v,
                }
                for b, v in sorted(c.bucket_quantiles.items())
            ],
            "quantile": self.quantile,
            "objective_type": self.objective,
            "samples": c.samples,
            "source": c.source,
            "trained_at": iso(c.trained_at),
        }

    def load_json(self, doc: dict[str, Any]) -> None:
        """Coefficients fitted elsewhere (a prediction-only server syncing from a training server)."""
        if doc.get("features") != list(self.spec.features):
            raise ValueError(f"{self.spec.name}: model features {doc.get('features')} are not this build's")
        weights = tuple(float(w) for w in doc["weights"])
        if len(weights) != self.d or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"{self.spec.name}: bad weights")
        rq = float(doc.get("residual_quantile", 0.0))
        if not math.isfinite(rq):
            raise ValueError(f"{self.spec.name}: bad residual_quantile")
        by_bucket: dict[int, float] = {}
        items = doc.get("residual_quantiles_by_size") or []  # absent from older servers: global only
        if not isinstance(items, list):
            raise ValueError(f"{self.spec.name}: bad residual_quantiles_by_size")
        for item in items:
            try:
                b, v = int(item["bucket"]), float(item["residual_quantile"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.spec.name}: bad residual_quantiles_by_size: {e}") from None
            if not (0 <= b <= MAX_SIZE_BUCKET and math.isfinite(v)):
                raise ValueError(f"{self.spec.name}: bad residual_quantiles_by_size")
            by_bucket[b] = v
        self.coefficients = Coefficients(weights, rq, int(doc.get("samples", 0)), "synced", bucket_quantiles=by_bucket)


class LatencyModel:
    """Both targets. A training entry with `actual_ttft_ms > 0` is a TTFT sample, with
    `actual_tpot_ms > 0` a TPOT sample (the EPP sends them as separate entries; one may be both)."""

    def __init__(
        self,
        *,
        max_per_bucket: int = 500,
        quantile: float = 0.9,
        objective: str = "quantile",
        prior_strength: float = 1.0,
        seed: int | None = None,
    ) -> None:
        rng = random.Random(seed)
        kw: dict[str, Any] = dict(
            max_per_bucket=max_per_bucket, quantile=quantile, objective=objective, prior_strength=prior_strength
        )
        self.ttft = TargetModel(TTFT, rng=rng, **kw)
        self.tpot = TargetModel(TPOT, rng=rng, **kw)
        self.quantile = quantile
        self.objective = objective

    @property
    def targets(self) -> tuple[TargetModel, TargetModel]:
        return (self.ttft, self.tpot)

    def target(self, name: str) -> TargetModel | None:
        return {"ttft": self.ttft, "tpot": self.tpot}.get(name)

    def add(self, entries: Iterable[Any]) -> int:
        n = 0
        for e in entries:
            if e.actual_ttft_ms > 0:
                self.ttft.add(e, e.actual_ttft_ms)
            if e.actual_tpot_ms > 0:
                self.tpot.add(e, e.actual_tpot_ms)
            n += 1
        return n

    def predict(self, rows: Sequence[Row]) -> list[tuple[float, float]]:
        ttft = self.ttft.coefficients  # one snapshot per call: a refit mid-batch cannot mix models
        tpot = self.tpot.coefficients
        fx, gx = self.ttft.spec.featurize, self.tpot.spec.featurize
        return [(ttft.predict(fx(r), r.input_token_length), tpot.predict(gx(r), r.input_token_length)) for r in rows]

    def retrain(self, min_samples: int) -> list[str]:
        """Refit every target with new samples and at least `min_samples` stored; the names refitted. A target
        whose fit fails keeps its previous model (logged) and does not hold up the others."""
        done = []
        for t in self.targets:
            if t.since_fit and t.stored >= min_samples:
                try:
                    t.fit()
                except ValueError as e:  # solve_spd: not positive definite
                    log.warning("%s model refit failed (%s); the previous model keeps predicting", t.spec.name, e)
                    continue
                done.append(t.spec.name)
        return done

    def clear(self) -> None:
        for t in self.targets:
            t.clear()


def solve_spd(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a·x = b for a symmetric positive-definite `a` (Cholesky; `a` and `b` are not modified)."""
    n = len(b)
    low = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = a[i][j] - math.fsum(low[i][k] * low[j][k] for k in range(j))
            if i == j:
                if s <= 0.0:
                    raise ValueError("matrix is not positive definite")
                low[i][i] = math.sqrt(s)
            else:
                low[i][j] = s / low[j][j]
    y = [0.0] * n
    for i in range(n):
        y[i] = (b[i] - math.fsum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - math.fsum(low[k][i] * x[k] for k in range(i + 1, n))) / low[i][i]
    return x


def quantile_of_sorted(values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, linear between order statistics (numpy's default)."""
    if not values:
        return 0.0
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
