"""`prefix-cache-affinity-filter`: narrow to endpoints that already cache most of the prompt."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import (
    IN_FLIGHT_LOAD,
    LATENCY_PREDICTION_INFO,
    PREFIX_CACHE_MATCH_INFO,
    LatencyPredictionInfo,
    PrefixMatchInfo,
)
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams
from llmepp.framework.scheduling import Filter
from llmepp.plugins.filters.common import set_consumes
from llmepp.plugins.producers.inflight_load import token_counts
from llmepp.request.types import InferenceRequest

log = logging.getLogger(__name__)

PREFILL_THROUGHPUT = "prefillThroughput"
# The name this project's design notes used for the same source; accepted as an alias.
INFLIGHT_ALIAS = "inflight"
LATENCY_PREDICTOR = "latencyPredictor"
# Qwen-32B TP2 on H100, vLLM 0.19: one unloaded 8192-token chunk (the reference's default).
DEFAULT_PEAK_PREFILL_THROUGHPUT = 15928.0
MIN_CALIBRATION_SAMPLES = 10


class PrefixCacheAffinityFilter(Filter):
    """Keeps only "sticky" endpoints — prefix score ≥ `affinityThreshold` — unless that would
    cost too much time to first token.

        score(e)  = matchedBlocks(e) / totalBlocks        (PrefixCacheMatchInfo, as prefix-cache-scorer with w = 0)
        sticky    = {e : score(e) ≥ affinityThreshold}
        TTFT(e)   = inFlightTokens(e) / peakPrefillThroughput · 1000   [ms]   (ttftSource prefillThroughput)
                    predicted TTFT of e (LatencyPredictionInfo)            (ttftSource latencyPredictor)
        keep      = all    if |candidates| ≤ 1, threshold ≤ 0, sticky = ∅,
                           with probability explorationProbability, or when
                           min TTFT(sticky) − min TTFT(non-sticky) > maxTTFTPenaltyMs (> 0),
                           or (latencyPredictor) when either side has no prediction (missing signal)
                    sticky otherwise

    Why: a weighted prefix scorer trades cache hits against hot-spotting; as a pre-filter the
    request stays on warm endpoints (spread among them by the scorers / picker) until they are
    so loaded that a cold prefill elsewhere would be faster ("sticky until saturated").

    In-flight tokens come from the inflight-load-producer (uncached prompt tokens; auto-created
    when the load gate is on), else the director's counters. Predicted TTFT comes from the
    predicted-latency-producer (auto-created for `latencyPredictor`); when the predictor is down the
    gate has no signal and keeps every endpoint, as the reference. Prefix data comes from the
    PrefixCacheMatchInfo producer (`prefixMatchInfoProducerName`, default: the only one,
    approx-prefix-cache-producer auto-created). No match data → no sticky endpoint → keep all.

    Parameters: `affinityThreshold` 0.80 ∈ [0,1], `explorationProbability` 0 ∈ [0,1],
    `maxTTFTPenaltyMs` 18000 (0 = always stick), `ttftSource` `prefillThroughput` (alias
    `inflight`) or `latencyPredictor`, `peakPrefillThroughput` 15928 tok/s (≥ 0; > 0 when the gate
    estimates from it), `prefillCalibrationFile` / `prefillCalibrationFingerprint` /
    `prefillCalibrationRequired` (a fingerprint-matched calibration record replaces the default when
    `peakPrefillThroughput` is not given),
    `prefixMatchInfoProducerName`, `inFlightLoadProducerName`, `latencyPredictionInfoProducerName`.
    """

    type = "prefix-cache-affinity-filter"

    class Params(PluginParams):
        affinity_threshold: float = 0.80
        exploration_probability: float = 0.0
        max_ttft_penalty_ms: float = msgspec.field(default=18000.0, name="maxTTFTPenaltyMs")
        ttft_source: str = PREFILL_THROUGHPUT
        peak_prefill_throughput: float | None = None
        prefill_calibration_file: str = ""
        prefill_calibration_fingerprint: str = ""
        prefill_calibration_required: bool = False
        prefix_match_info_producer_name: str = ""
        in_flight_load_producer_name: str = ""
        latency_prediction_info_producer_name: str = ""

        def __post_init__(self) -> None:
            if not 0.0 <= self.affinity_threshold <= 1.0:
                raise ValueError("affinityThreshold must be within [0, 1]")
            if not 0.0 <= self.exploration_probability <= 1.0:
                raise ValueError("explorationProbability must be within [0, 1]")
            if self.max_ttft_penalty_ms < 0:
                raise ValueError("maxTTFTPenaltyMs must be >= 0")
            if self.ttft_source not in (PREFILL_THROUGHPUT, INFLIGHT_ALIAS, LATENCY_PREDICTOR):
                raise ValueError(
                    f"ttftSource must be {PREFILL_THROUGHPUT!r} or {LATENCY_PREDICTOR!r}, got {self.ttft_source!r}"
                )
            peak = self.peak_prefill_throughput
            if peak is not None and peak < 0:
                raise ValueError("peakPrefillThroughput must be >= 0")
            # As the reference: 0 is an error only where the TTFT gate estimates from it.
            if peak == 0 and self.max_ttft_penalty_ms > 0 and self.ttft_source != LATENCY_PREDICTOR:
                raise ValueError("peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.threshold = params.affinity_threshold
        self.explore = params.exploration_probability
        self.max_penalty_ms = params.max_ttft_penalty_ms
        self.peak = self._peak_throughput(params)
        self.ms_per_token = 1000.0 / self.peak if self.peak else 0.0  # 0: the gate does not read it
        self.gate = self.max_penalty_ms > 0
        self.predicted = params.ttft_source == LATENCY_PREDICTOR
        load_key = LATENCY_PREDICTION_INFO if self.predicted else IN_FLIGHT_LOAD
        set_consumes(self, {PREFIX_CACHE_MATCH_INFO, load_key} if self.gate else {PREFIX_CACHE_MATCH_INFO})
        self.prefix_key = ""
        self.inflight_key = ""
        self.latency_key = ""
        self._rng = random.Random()

    def _peak_throughput(self, p: Params) -> float:
        """explicit peakPrefillThroughput > fingerprint-matched calibration record > default."""
        if p.peak_prefill_throughput is not None:
            return p.peak_prefill_throughput
        if not p.prefill_calibration_file:
            if p.prefill_calibration_required:
                raise ConfigError("prefillCalibrationRequired is set but prefillCalibrationFile is empty")
            return DEFAULT_PEAK_PREFILL_THROUGHPUT
        try:
            return _calibrated(p.prefill_calibration_file, p.prefill_calibration_fingerprint)
        except (OSError, ValueError) as e:
            if p.prefill_calibration_required:
                raise ConfigError(f"prefillCalibrationFile: calibration not applied: {e}") from None
            log.warning(
                "plugin %s: calibration not applied (%s); peakPrefillThroughput stays %.0f",
                self.name, e, DEFAULT_PEAK_PREFILL_THROUGHPUT,
            )  # fmt: skip
            return DEFAULT_PEAK_PREFILL_THROUGHPUT

    def setup(self, ctx: PluginContext) -> None:
        p = self.params
        self.prefix_key = ctx.producer_key(
            self, PREFIX_CACHE_MATCH_INFO, p.prefix_match_info_producer_name, "prefixMatchInfoProducerName"
        )
        if self.gate and self.predicted:
            self.latency_key = ctx.producer_key(
                self,
                LATENCY_PREDICTION_INFO,
                p.latency_prediction_info_producer_name,
                "latencyPredictionInfoProducerName",
            )
        elif self.gate:
            self.inflight_key = ctx.producer_key(
                self, IN_FLIGHT_LOAD, p.in_flight_load_producer_name, "inFlightLoadProducerName"
            )

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        threshold = self.threshold
        if len(endpoints) <= 1 or threshold <= 0:
            return endpoints
        if self.explore and self._rng.random() < self.explore:
            return endpoints
        info: PrefixMatchInfo | None = request.data.get(self.prefix_key)
        if info is None or not info.total_blocks or not info.hits:
            return endpoints
        need = _min_sticky_blocks(threshold, info.total_blocks)
        get = info.hits.get
        flags = [get(ep, 0) >= need for ep in endpoints]
        n_sticky = flags.count(True)
        if not n_sticky:
            return endpoints
        sticky = [ep for ep, f in zip(endpoints, flags) if f]
        if self.gate and n_sticky < len(endpoints) and self.predicted:
            infos: dict[Endpoint, LatencyPredictionInfo] | None = request.data.get(self.latency_key)
            if not infos:
                return endpoints  # the predictor had nothing to say: no signal, keep all (reference)
            inf = math.inf
            best_sticky = best_other = inf
            for ep, f in zip(endpoints, flags):
                predicted = infos.get(ep)
                if predicted is None:
                    continue
                if f:
                    best_sticky = min(best_sticky, predicted.ttft_ms)
                else:
                    best_other = min(best_other, predicted.ttft_ms)
            if best_sticky == inf or best_other == inf or best_sticky - best_other > self.max_penalty_ms:
                return endpoints
        elif self.gate and n_sticky < len(endpoints):
            tokens = token_counts(request, self.inflight_key, endpoints)
            best_sticky = min(t for t, f in zip(tokens, flags) if f)
            best_other = min(t for t, f in zip(tokens, flags) if not f)
            if (best_sticky - best_other) * self.ms_per_token > self.max_penalty_ms:
                return endpoints  # stickiness broken: the sticky endpoints are too far behind
        return sticky


def _min_sticky_blocks(threshold: float, total: int) -> int:
    """The fewest matched blocks m with m / total ≥ threshold (the float comparison itself, so
    the boundary is exactly the reference's), letting the per-endpoint test be an int compare."""
    m = math.ceil(threshold * total)
    while m > 0 and (m - 1) / total >= threshold:
        m -= 1
    while m / total < threshold:
        m += 1
    return m


def _calibrated(path: str, fingerprint: str) -> float:
    """The reference's calibration record (schema_version 1): applied only when complete and
    measured on this deployment (equal, non-empty fingerprint)."""
    with open(path, encoding="utf-8") as f:
        try:
            rec: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed calibration record {path}: {e}") from None
    if not isinstance(rec, dict) or rec.get("schema_version") != 1:
        raise ValueError("schema_version must be 1")
    if rec.get("status") != "OK":
        raise ValueError(f"status is {rec.get('status')!r}, want 'OK'")
    peak = rec.get("peak_prefill_tokens_per_second")
    if not _positive(peak):
        raise ValueError("peak_prefill_tokens_per_second is missing or not a positive finite number")
    chunk = rec.get("chunk_tokens")
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError("chunk_tokens is missing or not positive")
    samples = rec.get("valid_samples", 0)
    if not isinstance(samples, int) or samples < MIN_CALIBRATION_SAMPLES:
        raise ValueError(f"valid_samples is {samples}, want at least {MIN_CALIBRATION_SAMPLES}")
    if not _positive(rec.get("median_ttft_seconds")):
        raise ValueError("median_ttft_seconds is missing or not a positive finite number")
    if not rec.get("fingerprint"):
        raise ValueError("record carries no fingerprint")
    if not fingerprint:
        raise ValueError("no prefillCalibrationFingerprint is configured for this deployment")
    if rec["fingerprint"] != fingerprint:
        raise ValueError(f"record was measured on a different deployment (fingerprint {rec['fingerprint']!r})")
    return float(peak)  # type: ignore[arg-type]


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
