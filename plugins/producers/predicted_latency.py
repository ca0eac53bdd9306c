"""`predicted-latency-producer`: per-endpoint TTFT / TPOT predictions from the latency predictor service,
and the observed latencies it is trained on."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointMetrics
from llmepp.director import PRODUCER_TIMEOUT
from llmepp.framework.datakeys import (
    LATENCY_PREDICTION_INFO,
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
    LatencyPredictionInfo,
    PrefixMatchInfo,
    prompt_tokens,
    scoped,
)
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.requestcontrol import (
    DataProducer,
    FirstResponseChunkProcessor,
    PreRequest,
    ResponseCompleteProcessor,
)
from llmepp.framework.scheduling import SchedulingResult
from llmepp.latencypredictor.client import PredictorClient, PredictorUnavailable, urls_from_env
from llmepp.latencypredictor.schema import MAX_COUNT
from llmepp.observability.fast import Counter, Gauge, Histogram
from llmepp.observability.logging import LogLimiter
from llmepp.observability.metrics import (
    GENERAL_LATENCY_BUCKETS,
    MAX_MODEL_LABELS,
    OVERFLOW_LABEL,
    PREFIX,
    BoundedLabels,
    per_registry,
)
from llmepp.request.slo import request_slos
from llmepp.request.types import InferenceRequest, ResponseInfo, TerminationCause
from llmepp.units import parse_duration

log = logging.getLogger(__name__)

PREFILL_ROLE = "prefill"
SWEEP_EVERY = 10.0  # seconds between sweeps of dispatch records older than contextTTL


def decode_sample_positions(tokens: int, mean: float, cap: int, rng: random.Random) -> list[int]:
    """Output-token positions whose inter-token latency becomes a TPOT training sample: token 2 (the first
    gap) always, then a Poisson process with mean gap `mean` tokens, at most `cap` (0 = no cap)."""
    out: list[int] = []
    k = 2
    while k <= tokens and (cap <= 0 or len(out) < cap):
        out.append(k)
        gap = rng.expovariate(1.0 / mean)  # may overflow to inf for a mean near the float maximum
        if not gap < tokens:
            break
        k += max(1, round(gap))
    return out


# The reference's buckets (its predicted-latency producer's metrics).
TPOT_BUCKETS = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.5,
    2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60, 90, 120, 180, 270, 360,
)  # fmt: skip
PREDICTION_DURATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class LatencyMetrics:
    """The reference's latency-prediction series (`llm_d_epp_` prefix, labels plugin_name, plugin_type,
    model_name, target_model_name; at most MAX_MODEL_LABELS (model, target) pairs), one set per metrics registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("plugin_name", "plugin_type", "model_name", "target_model_name")
        latency = GENERAL_LATENCY_BUCKETS
        per_token = TPOT_BUCKETS
        duration = PREDICTION_DURATION_BUCKETS
        self.predicted_ttft = Histogram(
            PREFIX + "request_predicted_ttft_seconds", "Predicted TTFT of the chosen endpoint.", labels,
            buckets=latency, registry=registry,
        )  # fmt: skip
        self.ttft_prediction_duration = Histogram(
            PREFIX + "request_ttft_prediction_duration_seconds", "Time to get the TTFT predictions of a request.",
            labels, buckets=duration, registry=registry,
        )  # fmt: skip
        self.predicted_tpot = Histogram(
            PREFIX + "request_predicted_tpot_seconds", "Predicted TPOT of the chosen endpoint.", labels,
            buckets=per_token, registry=registry,
        )  # fmt: skip
        self.tpot_prediction_duration = Histogram(
            PREFIX + "request_tpot_prediction_duration_seconds", "Time to get the TPOT predictions of a request.",
            labels, buckets=duration, registry=registry,
        )  # fmt: skip
        self.slo_violations = Counter(
            PREFIX + "request_slo_violation_total", "Requests whose observed TTFT / TPOT exceeded their SLO header.",
            (*labels, "type"), registry=registry,
        )  # fmt: skip
        # The last value of each, by type: ttft, predicted_ttft, ttft_prediction_duration, ttft_slo_violation
        # (1 / 0), and the tpot ones (seconds; a violation is 1, its absence 0).
        self.last = Gauge(
            PREFIX + "inference_request_metric", "Last observed value of a request's latency metric, by type.",
            (*labels, "type"), registry=registry,
        )  # fmt: skip
        self.unavailable = Counter(
            PREFIX + "latency_prediction_unavailable_total",
            "Requests routed without predictions: the predictor timed out, failed, answered nonsense, or was "
            "skipped while backing off after a failure.",
            ("plugin_name", "reason"), registry=registry,
        )  # fmt: skip
        self.training_samples = Counter(
            PREFIX + "latency_training_samples_total",
            "Training samples that left the upload buffer: sent (accepted by the training server) or dropped "
            "(the buffer sampled down while the server was slow or down, or the upload failed).",
            ("plugin_name", "outcome"), registry=registry,
        )  # fmt: skip
        # model_name / target_model_name are client input: the first MAX_MODEL_LABELS (model, target) pairs get
        # series of their own, later ones share OVERFLOW_LABEL (as the EPP's other per-model series).
        self.pairs = BoundedLabels(MAX_MODEL_LABELS)

    @classmethod
    def of(cls, registry: CollectorRegistry) -> LatencyMetrics:
        return per_registry(registry, "latency_prediction", cls)


@dataclass(slots=True)
class _Context:
    """One request's latency bookkeeping, from Produce to response completion."""

    ttft_slo: float
    tpot_slo: float
    input_tokens: int
    prefix_scores: dict[Endpoint, float]
    predictions: dict[Endpoint, LatencyPredictionInfo] | None = None
    target: Endpoint | None = None
    prefill_endpoint: Endpoint | None = None  # charged the prompt's prefill tokens until the first token
    dispatched_at: float = 0.0
    dispatch_metrics: EndpointMetrics = NO_METRICS
    first_token_metrics: EndpointMetrics | None = None
    prefill_tokens_at_dispatch: int = 0
    # Each candidate's prefill tokens in flight when the predictions were asked for (the rows' feature); the
    # chosen endpoint's is its training samples' feature, so training and prediction rows agree.
    prefill_snapshot: dict[Endpoint, int] | None = None
    ttft_reported: bool = False
    # Whose prefill the TTFT measures (the P/D prefill pod, else the target), its metrics and its prediction row's
    # prefill tokens at dispatch: the TTFT sample's features, as the reference's prefill-target branch.
    ttft_endpoint: Endpoint | None = None
    ttft_dispatch_metrics: EndpointMetrics = NO_METRICS
    ttft_prefill_tokens_at_dispatch: int = 0
    labels: tuple[str, str, str, str] = ("", "", "", "")


class _Running:
    """The requests this producer dispatched to one endpoint and has not seen finish, key → (TPOT SLO, when), and
    how many hold each positive TPOT SLO: the least is known without a pass over every request in flight."""

    __slots__ = ("_least", "_slos", "requests")

    def __init__(self) -> None:
        self.requests: dict[int, tuple[float, float]] = {}
        self._slos: dict[float, int] = {}
        self._least: float | None = math.inf  # None: to find again (its last request finished)

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, key: int, tpot_slo: float, at: float) -> None:
        self.pop(key)  # dispatched again: counted once
        self.requests[key] = (tpot_slo, at)
        if tpot_slo > 0:
            self._slos[tpot_slo] = self._slos.get(tpot_slo, 0) + 1
            if self._least is not None and tpot_slo < self._least:
                self._least = tpot_slo

    def responding(self, key: int) -> None:
        """Its response has begun: the stream completes it (response_complete, exactly once), however long it
        generates, so the contextTTL sweep (meant for lost responses) must leave it."""
        entry = self.requests.get(key)
        if entry is not None:
            self.requests[key] = (entry[0], math.inf)

    def pop(self, key: int) -> None:
        entry = self.requests.pop(key, None)
        if entry is None or not entry[0] > 0:
            return
        slo = entry[0]
        left = self._slos[slo] - 1
        if left:
            self._slos[slo] = left
        else:
            del self._slos[slo]
            if slo == self._least:
                self._least = None

    def least_tpot_slo(self) -> float:
        """The least positive TPOT SLO among the requests; inf when none has one."""
        if self._least is None:
            self._least = min(self._slos, default=math.inf)
        return self._least


def _count(value: float) -> int:
    """A non-negative whole count (NaN, infinities and negatives read as 0), at most the predictor's MAX_COUNT:
    one endpoint's absurd scrape must not make the bulk call, every endpoint's prediction, a 422."""
    return min(MAX_COUNT, round(value)) if math.isfinite(value) and value > 0 else 0


class PredictedLatencyProducer(DataProducer, PreRequest, FirstResponseChunkProcessor, ResponseCompleteProcessor):
    """Asks the latency predictor (`epp-latency-predictor`, or the llm-d sidecars) for every candidate's
    p90 TTFT and TPOT in one bulk call and publishes them as LatencyPredictionInfo, then trains it on
    what the chosen endpoint actually did.

    Produce — one POST /predict/bulk/strict, a row per candidate e: its scraped KV utilisation, waiting and
    running requests, the prompt's tokens (TokenizedPrompt, else bytes/4), e's prefix-cache score
    (matched / total blocks, PrefixCacheMatchInfo), prefill tokens this EPP has in flight to e,
    num_tokens_generated = 1, pod_type = e's `endpointRoleLabel` label. Then, with the SLOs of the request
    headers `x-llm-d-slo-ttft-ms` / `x-llm-d-slo-tpot-ms` (aliases `x-slo-*`; absent = 0):

        ttftHeadroom = ttftSLO − TTFT                    ttftValid = TTFT < ttftSLO
        buffered     = tpotSLO · sloBufferFactor, lowered to minTPOTSLO(e) · sloBufferFactor when e runs
                       requests of this EPP with a (positive) TPOT SLO
        tpotHeadroom = buffered − TPOT                   tpotValid = TPOT < buffered
        (streamingMode false, or e's role is prefill: TPOT is not trained → tpotHeadroom 0, tpotValid)

    plus dispatched = e's requests from this producer not yet finished (with P/D, a prefill pod's count
    includes the requests whose prefill it runs, until their first byte). An endpoint never scraped (its
    metrics all read 0) is unknown load, not an idle pod: it has no row and no LatencyPredictionInfo. The call
    is bounded by `predictionTimeout` (below the director's 400 ms producer budget): a slow, failing or dead predictor
    leaves no LatencyPredictionInfo — the consumers then route as without predictions (latency-scorer's
    composite fallback, the tier filter and admitter pass everything) — and is counted
    (`llm_d_epp_latency_prediction_unavailable_total{reason}`), logged once per 30 s, and that prediction server
    is not called again for 0.5 s, doubling to 5 s while it keeps failing (the other replicas of
    predictionServerURL are; with every one backing off, requests are routed at once, reason `skipped`).

    Training (in the background, batched every LATENCY_FLUSH_INTERVAL_SEC to POST /add_training_data_bulk),
    only for responses that ended naturally with a status < 400; features are the chosen endpoint's at
    dispatch (PreRequest), except prefill_tokens_in_flight, which is the value its prediction row had (the
    other requests' tokens, not this one's: training and prediction rows mean the same thing):
      * TTFT sample: streamingMode true — first response byte − dispatch, sent at the first byte, for streamed
        responses only (as the reference: a `"stream": false` answer trains nothing in this mode);
        false — the whole response (end-to-end latency, as the reference), sent at completion.
      * TPOT samples (streamingMode true, ≥ 2 output tokens from the response's usage): the mean
        inter-token latency (last byte − first byte) / (completion tokens − 1), once per sampled token
        position (token 2, then a Poisson process of mean `samplingMean` tokens, at most
        `maxDecodeTokenSamplesForPrediction` when > 0, and never more than one upload's
        LATENCY_MAX_SAMPLE_SIZE) with num_tokens_generated = that position and the
        endpoint's features at the first byte. Streamed answers need `stream_options.include_usage`.

    Metrics (labels plugin_name, plugin_type, model_name, target_model_name, as the reference):
    `llm_d_epp_request_predicted_ttft_seconds`, `_request_predicted_tpot_seconds` (the chosen endpoint's
    predictions), `_request_ttft_prediction_duration_seconds`, `_request_tpot_prediction_duration_seconds` (the
    bulk call), `_request_slo_violation_total{type=ttft|tpot}`, and the last value of each (and of the observed
    TTFT / TPOT, and 1 / 0 for an SLO violation) in `llm_d_epp_inference_request_metric{type}`.

    Parameters: `samplingMean` (1000, > 0), `maxDecodeTokenSamplesForPrediction` (0, ≥ 0), `sloBufferFactor`
    (1.0, > 0), `contextTTL` (5m: dispatch records and prefill-token charges older than this are dropped, as
    a lost response would leave them), `streamingMode` (false), `endpointRoleLabel` (""), `predictInProduce`
    (true; false = training only), `prefixMatchInfoProducerName`; this build's: `predictionServerURL` (comma-separated;
    default env PREDICTION_SERVER_URL, else http://localhost:8001), `trainingServerURL` (env
    TRAINING_SERVER_URL, else http://localhost:8000), `predictionTimeout` (300ms).
    """

    type = "predicted-latency-producer"
    pod_only = "predicts one model server's latency from its own KV-cache use, queue and running requests"
    produces = frozenset({LATENCY_PREDICTION_INFO})
    consumes = frozenset({PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT})

    class Params(PluginParams):
        sampling_mean: float = 1000.0
        max_decode_token_samples_for_prediction: int = 0
        slo_buffer_factor: float = 1.0
        context_ttl: str | float = msgspec.field(default="5m", name="contextTTL")
        streaming_mode: bool = False
        endpoint_role_label: str = ""
        predict_in_produce: bool = True
        prefix_match_info_producer_name: str = ""
        prediction_server_url: str = msgspec.field(default="", name="predictionServerURL")
        training_server_url: str = msgspec.field(default="", name="trainingServerURL")
        prediction_timeout: str | float = "300ms"

        def __post_init__(self) -> None:
            if not 0 < self.sampling_mean < math.inf:
                raise ValueError(f"samplingMean must be > 0 and finite, got {self.sampling_mean}")
            if self.max_decode_token_samples_for_prediction < 0:
                raise ValueError("maxDecodeTokenSamplesForPrediction must be >= 0")
            if not 0 < self.slo_buffer_factor < math.inf:
                raise ValueError(f"sloBufferFactor must be > 0 and finite, got {self.slo_buffer_factor}")
            try:
                ttl = parse_duration(self.context_ttl)
            except ValueError as e:
                raise ValueError(f"contextTTL: {e}") from None
            if ttl <= 0:
                raise ValueError("contextTTL must be > 0")
            try:
                timeout = parse_duration(self.prediction_timeout)
            except ValueError as e:
                raise ValueError(f"predictionTimeout: {e}") from None
            if not 0 < timeout < PRODUCER_TIMEOUT:
                raise ValueError(
                    f"predictionTimeout must be > 0 and below the director's {PRODUCER_TIMEOUT * 1000:.0f}ms "
                    f"producer budget, got {self.prediction_timeout!r}"
                )
            for field_name, urls in (
                ("predictionServerURL", self.prediction_server_url),
                ("trainingServerURL", self.training_server_url),
            ):
                for url in filter(None, (u.strip() for u in urls.split(","))):
                    if not url.startswith(("http://", "https://")):
                        raise ValueError(f"{field_name}: {url!r} is not an http(s) URL")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        p = params
        env_predict, env_train = urls_from_env()
        predict = [u.strip() for u in p.prediction_server_url.split(",") if u.strip()] or env_predict
        self.client = PredictorClient(
            predict, p.training_server_url.strip() or env_train, timeout=parse_duration(p.prediction_timeout)
        )
        self.key = scoped(LATENCY_PREDICTION_INFO, self.name)
        self.streaming = p.streaming_mode
        self.buffer = p.slo_buffer_factor
        self.role_label = p.endpoint_role_label
        self.context_ttl = parse_duration(p.context_ttl)
        self._ctx_key = f"{self.name}/context"
        self._prefix_key = ""
        self._metrics: LatencyMetrics | None = None
        self._rng = random.Random()
        # Requests this producer dispatched and has not seen finish, per endpoint: id(context) → (TPOT SLO, when).
        self._dispatched: dict[Endpoint, _Running] = {}
        self._prefill_tokens: dict[Endpoint, int] = {}
        # P/D: per prefill pod, the requests whose prefill it runs for this EPP (charged to it, not their target).
        self._prefilling: dict[Endpoint, int] = {}
        # The contexts holding a prefill charge, by id, with when it was made: the sweep releases a lost one's.
        self._charges: dict[int, tuple[_Context, float]] = {}
        self._next_sweep = 0.0
        self._unavailable_log = LogLimiter(log, 30.0)

    def setup(self, ctx: PluginContext) -> None:
        self._prefix_key = ctx.producer_key(
            self, PREFIX_CACHE_MATCH_INFO, self.params.prefix_match_info_producer_name, "prefixMatchInfoProducerName"
        )
        registry = getattr(ctx.metrics, "registry", None)
        if registry is not None:
            self._metrics = metrics = LatencyMetrics.of(registry)
            samples = metrics.training_samples
            self.client.on_samples = lambda outcome, n: samples.labels(self.name, outcome).inc(n)
        if ctx.datastore is not None:
            ctx.datastore.add_listener(self)

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- DatastoreListener -----------------------------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        pass

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self._dispatched.pop(endpoint, None)
        self._prefill_tokens.pop(endpoint, None)
        self._prefilling.pop(endpoint, None)

    # -- DataProducer ----------------------------------------------------------------------------------
    async def produce(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        ttft_slo, tpot_slo = request_slos(request)
        info: PrefixMatchInfo | None = request.data.get(self._prefix_key)
        scores: dict[Endpoint, float] = {}
        if info is not None and info.total_blocks > 0:
            total = info.total_blocks
            scores = {ep: min(1.0, m / total) for ep, m in info.hits.items()}
        model, target = request.model, request.target_model or request.model
        if self._metrics is not None and not self._metrics.pairs.admits((model, target)):
            model = target = OVERFLOW_LABEL
        ctx = _Context(ttft_slo, tpot_slo, prompt_tokens(request), scores, labels=(self.name, self.type, model, target))
        request.data[self._ctx_key] = ctx
        # A never-scraped endpoint (its metrics read 0) is unknown load, not the idlest pod: no prediction.
        scraped = [ep for ep in endpoints if ep.metrics.update_time]
        if not self.params.predict_in_produce or not scraped:
            return
        if self.client.backing_off():  # no rows built for a call that will not be made
            self._count_unavailable("skipped")
            return
        ctx.prefill_snapshot = {ep: self._prefill_tokens.get(ep, 0) for ep in scraped}
        rows = [self._row(ep, ctx.input_tokens, scores.get(ep, 0.0), 1, ep.metrics) for ep in scraped]
        t0 = time.perf_counter()
        try:
            predicted = await self.client.predict_bulk(rows)
        except PredictorUnavailable as e:
            self._predictor_failed(e)
            return
        elapsed = time.perf_counter() - t0
        m = self._metrics
        if m is not None:
            m.ttft_prediction_duration.labels(*ctx.labels).observe(elapsed)
            m.tpot_prediction_duration.labels(*ctx.labels).observe(elapsed)
            m.last.labels(*ctx.labels, "ttft_prediction_duration").set(elapsed)
            m.last.labels(*ctx.labels, "tpot_prediction_duration").set(elapsed)
        infos = {ep: self._info(ep, ttft, tpot, ctx) for ep, (ttft, tpot) in zip(scraped, predicted)}
        ctx.predictions = infos
        request.data[self.key] = infos

    def _row(self, ep: Endpoint, tokens: int, prefix: float, generated: int, m: EndpointMetrics) -> dict[str, Any]:
        kv = m.kv_cache_usage_percent
        return {
            "kv_cache_percentage": min(1.0, kv) if kv > 0.0 else 0.0,  # also maps NaN to 0
            "input_token_length": tokens,
            # Integers, as the reference sidecars' schema types them (pydantic refuses 2.5 for an int);
            # scraped counts are whole, a multicluster hub's averages are not.
            "num_request_waiting": _count(m.waiting_queue_size),
            "num_request_running": _count(m.running_requests_size),
            "num_tokens_generated": generated,
            "prefix_cache_score": prefix,
            "pod_type": ep.labels.get(self.role_label, "") if self.role_label else "",
            "prefill_tokens_in_flight": self._prefill_tokens.get(ep, 0),
            "decode_tokens_in_flight": 0,
        }

    def _info(self, ep: Endpoint, ttft: float, tpot: float, ctx: _Context) -> LatencyPredictionInfo:
        ttft_headroom = ctx.ttft_slo - ttft
        tpot_ok, tpot_headroom = True, 0.0
        running = self._dispatched.get(ep)
        if self.streaming and not (self.role_label and ep.labels.get(self.role_label) == PREFILL_ROLE):
            buffered = ctx.tpot_slo * self.buffer
            if running:
                least = running.least_tpot_slo()
                if least < math.inf:
                    buffered = min(buffered, least * self.buffer)
            tpot_ok, tpot_headroom = tpot < buffered, buffered - tpot
        return LatencyPredictionInfo(
            ttft_ms=ttft, tpot_ms=tpot, ttft_headroom=ttft_headroom, tpot_headroom=tpot_headroom,
            ttft_valid=ttft < ctx.ttft_slo, tpot_valid=tpot_ok,
            dispatched_requests=(len(running) if running else 0) + self._prefilling.get(ep, 0),
        )  # fmt: skip

    def _predictor_failed(self, e: PredictorUnavailable) -> None:
        self._count_unavailable(e.reason)
        if e.reason == "skipped":  # backing off after a failure, which was logged
            return
        self._unavailable_log.warning(
            "unavailable", "%s: latency predictor unavailable, routing without predictions: %s", self.name, e
        )

    def _count_unavailable(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.unavailable.labels(self.name, reason).inc()

    # -- PreRequest ------------------------------------------------------------------------------------
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        ctx: _Context | None = request.data.get(self._ctx_key)
        targets = result.targets
        if ctx is None or not targets:
            return
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        ep = targets[0]
        ctx.target = ep
        ctx.dispatched_at = now
        ctx.dispatch_metrics = ep.metrics
        prefill = result.profiles.get(result.prefill_profile) if result.prefill_profile else None
        charged = prefill.targets[0] if prefill is not None and prefill.targets else ep
        before = self._prefill_tokens.get(charged, 0)
        # The training feature is what the prediction saw: the other requests' prefill tokens (as the reference's
        # in-flight snapshot from Produce), never this request's own, which only input_token_length carries.
        # TPOT rows describe the target, TTFT rows the pod that runs the prefill (with P/D the prefill pod).
        snapshot = ctx.prefill_snapshot or {}
        ctx.prefill_tokens_at_dispatch = snapshot.get(ep, self._prefill_tokens.get(ep, 0))
        ctx.ttft_endpoint = charged  # kept after the first byte, unlike prefill_endpoint
        ctx.ttft_dispatch_metrics = charged.metrics
        ctx.ttft_prefill_tokens_at_dispatch = snapshot.get(charged, before)
        self._prefill_tokens[charged] = before + ctx.input_tokens
        if charged is not ep:  # a P/D prefill pod: busy with this request until its first byte
            self._prefilling[charged] = self._prefilling.get(charged, 0) + 1
        ctx.prefill_endpoint = charged
        self._charges[id(ctx)] = (ctx, now)
        running = self._dispatched.get(ep)
        if running is None:
            running = self._dispatched[ep] = _Running()
        running.add(id(ctx), ctx.tpot_slo, now)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        oldest = now - self.context_ttl
        for ep, running in list(self._dispatched.items()):
            for key in [k for k, (_, at) in running.requests.items() if at < oldest]:
                running.pop(key)
            if not running:
                del self._dispatched[ep]
        for ctx, at in list(self._charges.values()):
            if at < oldest:
                self._release_prefill(ctx)

    # -- response ----------------------------------------------------------------------------------
    def first_response_chunk(self, request: InferenceRequest, response: ResponseInfo) -> None:
        ctx: _Context | None = request.data.get(self._ctx_key)
        if ctx is None or ctx.target is None:
            return
        ctx.first_token_metrics = ctx.target.metrics
        self._release_prefill(ctx)
        running = self._dispatched.get(ctx.target)
        if running is not None:
            running.responding(id(ctx))
        if (
            self.streaming
            and response.streaming
            and not response.whole_body  # one message: its arrival is the whole generation, not a first token
            and 0 < response.status < 400
            and response.first_byte_at > ctx.dispatched_at
        ):
            ctx.ttft_reported = True
            ttft_ms = (response.first_byte_at - ctx.dispatched_at) * 1000
            self.client.add_training([self._ttft_entry(ctx, ttft_ms)])

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, result: SchedulingResult) -> None:
        ctx: _Context | None = request.data.pop(self._ctx_key, None)
        if ctx is None or ctx.target is None:
            return
        self._release_prefill(ctx)
        running = self._dispatched.get(ctx.target)
        if running is not None:
            running.pop(id(ctx))
            if not running:
                del self._dispatched[ctx.target]
        if (
            response.cause is not TerminationCause.NATURAL
            or not 0 < response.status < 400
            or response.grpc_status  # a gRPC API's failure: HTTP 200, the error in grpc-status
            or not response.bytes
        ):
            return
        entries = []
        if self.streaming:
            ttft_ms = (response.first_byte_at - ctx.dispatched_at) * 1000
            # An answer not streamed comes whole: its first byte is no first token, its bytes no token gaps. So
            # does a streamed one that Envoy delivered in one message (BUFFERED response mode).
            timed = response.streaming and not response.whole_body
            if not ctx.ttft_reported and timed:
                entries.append(self._ttft_entry(ctx, ttft_ms))
            tokens = response.usage.completion_tokens if response.usage is not None else 0
            tpot_ms = 0.0
            if timed and tokens > 1 and response.finished_at > response.first_byte_at:
                tpot_ms = (response.finished_at - response.first_byte_at) * 1000 / (tokens - 1)
                features = ctx.first_token_metrics or ctx.dispatch_metrics
                p = self.params
                # At most one upload's worth (more would only be sampled away, and flood the buffer with one
                # response's samples), and no position past the predictor's count bound (a 422 for the batch):
                # a usage of 2**53 tokens was a loop of 2**53 / samplingMean samples.
                cap = min(p.max_decode_token_samples_for_prediction or MAX_COUNT, self.client.max_sample_size)
                positions = decode_sample_positions(min(tokens, MAX_COUNT), p.sampling_mean, cap, self._rng)
                target, in_flight = ctx.target, ctx.prefill_tokens_at_dispatch
                entries.extend(self._entry(ctx, target, features, in_flight, k, 0.0, tpot_ms) for k in positions)
        else:  # the reference's default: TTFT is the end-to-end latency, TPOT is not trained
            ttft_ms = (response.finished_at - ctx.dispatched_at) * 1000
            tpot_ms = 0.0
            entries.append(self._ttft_entry(ctx, ttft_ms))
        if entries:
            self.client.add_training(entries)
        self._observe(ctx, ttft_ms, tpot_ms)

    def _observe(self, ctx: _Context, ttft_ms: float, tpot_ms: float) -> None:
        m = self._metrics
        if m is None or ctx.target is None:
            return
        predicted = ctx.predictions.get(ctx.target) if ctx.predictions else None
        # The TTFT prediction of the pod that ran the prefill (reference: the prefill target's, with P/D).
        predicted_first = ctx.predictions.get(ctx.ttft_endpoint) if ctx.predictions and ctx.ttft_endpoint else None
        last = m.last
        if predicted_first is not None:
            m.predicted_ttft.labels(*ctx.labels).observe(predicted_first.ttft_ms / 1000)
            last.labels(*ctx.labels, "predicted_ttft").set(predicted_first.ttft_ms / 1000)
        if predicted is not None and self.streaming:
            m.predicted_tpot.labels(*ctx.labels).observe(predicted.tpot_ms / 1000)
            last.labels(*ctx.labels, "predicted_tpot").set(predicted.tpot_ms / 1000)
        last.labels(*ctx.labels, "ttft").set(ttft_ms / 1000)
        if tpot_ms > 0:
            last.labels(*ctx.labels, "tpot").set(tpot_ms / 1000)
        if ctx.ttft_slo > 0:
            violated = ttft_ms > ctx.ttft_slo
            if violated:
                m.slo_violations.labels(*ctx.labels, "ttft").inc()
            last.labels(*ctx.labels, "ttft_slo_violation").set(1.0 if violated else 0.0)
        if ctx.tpot_slo > 0 and tpot_ms > 0:  # a TPOT not measured (not streamed, one token) is no verdict
            violated = tpot_ms > ctx.tpot_slo
            if violated:
                m.slo_violations.labels(*ctx.labels, "tpot").inc()
            last.labels(*ctx.labels, "tpot_slo_violation").set(1.0 if violated else 0.0)

    def _release_prefill(self, ctx: _Context) -> None:
        ep = ctx.prefill_endpoint
        if ep is None:
            return
        ctx.prefill_endpoint = None
        self._charges.pop(id(ctx), None)
        left = self._prefill_tokens.get(ep, 0) - ctx.input_tokens
        if left > 0:
            self._prefill_tokens[ep] = left
        else:
            self._prefill_tokens.pop(ep, None)
        if ep is not ctx.target:
            count = self._prefilling.get(ep, 0) - 1
            if count > 0:
                self._prefilling[ep] = count
            else:
                self._prefilling.pop(ep, None)

    def _ttft_entry(self, ctx: _Context, ttft_ms: float) -> dict[str, Any]:
        """The TTFT sample: the features of the pod that ran the prefill (P/D: the prefill pod) at dispatch."""
        in_flight = ctx.ttft_prefill_tokens_at_dispatch
        return self._entry(ctx, ctx.ttft_endpoint, ctx.ttft_dispatch_metrics, in_flight, 0, ttft_ms, 0.0)

    def _entry(
        self, ctx: _Context, ep: Endpoint | None, m: EndpointMetrics, prefill_tokens: int, generated: int,
        ttft_ms: float, tpot_ms: float,
    ) -> dict[str, Any]:  # fmt: skip
        assert ep is not None  # set by pre_request, before any response
        row = self._row(ep, ctx.input_tokens, ctx.prefix_scores.get(ep, 0.0), generated, m)
        row["prefill_tokens_in_flight"] = prefill_tokens
        row["actual_ttft_ms"] = max(0.0, ttft_ms)
        row["actual_tpot_ms"] = max(0.0, tpot_ms)
        row["timestamp"] = time.time()
        return row

    # -- introspection (tests, debugging) --------------------------------------------------------------
    def dispatched(self, endpoint: Endpoint) -> int:
        return len(self._dispatched.get(endpoint, ()))

    def prefill_tokens(self, endpoint: Endpoint) -> int:
        return self._prefill_tokens.get(endpoint, 0)
