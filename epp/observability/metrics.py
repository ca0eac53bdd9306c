"""The EPP's own Prometheus metrics (reference names, `llm_d_epp_` prefix).

One `EppMetrics` object per process, on its own CollectorRegistry so tests can build
several apps in one interpreter. The families are the lock-free ones from `fast` (the
request path records a dozen values per request); hot paths also hold label children
instead of calling `.labels()` per request.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmepp.observability.fast import Counter, Gauge, Histogram, Tally

if TYPE_CHECKING:
    from llmepp.datalayer.endpoint import Endpoint, InFlight

PREFIX = "llm_d_epp_"

_T = TypeVar("_T")
_PER_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()


def per_registry(registry: CollectorRegistry, key: str, make: Callable[[CollectorRegistry], _T]) -> _T:
    """The series a plugin or subsystem registers, made once per registry and shared after that: a config
    reload builds new plugin instances against the same registry, where registering a name twice fails."""
    found = _PER_REGISTRY.setdefault(registry, {})
    value = found.get(key)
    if value is None:
        value = found[key] = make(registry)
    return value


# Buckets: the reference's (pkg/common/observability/metrics, pkg/epp/metrics), so dashboards and alerts
# written against its `le` boundaries work unchanged. Where EPP overhead lives below the reference's
# first bucket (tens of microseconds here), finer boundaries are added under it (REFERENCE ∪ FINE): every
# reference boundary is still there.
GENERAL_LATENCY_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120,
    180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
REQUEST_SIZE_BUCKETS = tuple(float(1 << i) for i in range(6, 31))  # 64 B .. 1 GiB, powers of two
# The reference's stop at 64 KiB (sized for streamed chunks); larger ones kept so a non-streaming
# answer's size is not all +Inf.
# 32778, not 32768: the reference's literal boundary (a typo upstream, but what its dashboards name).
RESPONSE_SIZE_BUCKETS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 262144, 1048576, 4194304,
    16777216, 67108864, 268435456, 1 << 30,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144, 524288, 1048576,
)  # fmt: skip
OUTPUT_TOKEN_BUCKETS = (1, 8, *(float(1 << i) for i in range(4, 14)))  # 1, 8, 16 .. 8192
NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TTFT_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120,
)  # fmt: skip
STREAMING_TPOT_BUCKETS = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 2,
)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
STREAM_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)
PREFIX_HIT_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PREFIX_HIT_BYTES_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_FINE = (0.00001, 0.000025, 0.00005)  # below the reference's 100 µs


def with_fine(reference: tuple[float, ...], fine: tuple[float, ...] = _FINE) -> tuple[float, ...]:
    """The reference's buckets plus finer ones below its first."""
    return tuple(sorted({*reference, *(b for b in fine if b < reference[0])}))


# Scheduler, plugins, flow control's dispatch cycle and enqueue.
FAST_BUCKETS = with_fine((0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))
# Queue wait included (flow control holds a request up to its TTL, 60 s by default): 30 and 60 s added.
REQUEST_PROCESSING_BUCKETS = (
    *with_fine((0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
               (0.00001, 0.000025, 0.00005, 0.0001, 0.00025)),
    30.0, 60.0,
)  # fmt: skip
RESPONSE_PROCESSING_BUCKETS = with_fine(
    (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
)

# Label values from client input are bounded as in the reference: model names share MAX_MODEL_LABELS
# values, fairness ids MAX_FAIRNESS_LABELS; later ones are reported as OVERFLOW_LABEL.
MAX_MODEL_LABELS = 1000
MAX_FAIRNESS_LABELS = 1000
OVERFLOW_LABEL = "other"


# Client-supplied label values (model names, fairness ids) longer than this are reported as OVERFLOW_LABEL: one
# request's 1 MB model name otherwise added ~500 MB to every scrape, for the life of the process.
MAX_LABEL_VALUE_CHARS = 256


def _too_long(value: Hashable) -> bool:
    if isinstance(value, str):
        return len(value) > MAX_LABEL_VALUE_CHARS
    if isinstance(value, tuple):
        return any(isinstance(v, str) and len(v) > MAX_LABEL_VALUE_CHARS for v in value)
    return False


class BoundedLabels:
    """Label values from client input: the first `limit` distinct values keep series of their own, later
    ones are reported as OVERFLOW_LABEL (`labels(value)`); `admits(value)` for values that are not one
    label (a (model, target) pair)."""

    __slots__ = ("_seen", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[Hashable] = set()

    def admits(self, value: Hashable) -> bool:
        """Whether `value` has, or now gets, series of its own (a string, or each string of a tuple, longer than
        MAX_LABEL_VALUE_CHARS never does: a label value is repeated on every line of its series)."""
        seen = self._seen
        if value in seen:
            return True
        if len(seen) >= self.limit or _too_long(value):
            return False
        seen.add(value)
        return True

    def __call__(self, value: str) -> str:
        return value if self.admits(value) else OVERFLOW_LABEL


_REQ_LABELS = ("model_name", "target_model_name", "fairness_id", "priority")
_MAX_CACHED_ATTEMPTS = 10_000


def sample_std_dev(values: list[float]) -> float:
    """The pool gauges' spread as the reference computes it: the sample standard deviation (n - 1, at
    least 1) rounded to two decimals."""
    n = len(values)
    if not n:
        return 0.0
    mean = sum(v / n for v in values)
    try:
        return round(math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1)), 2)
    except OverflowError:
        # `d ** 2` of a huge (finite) value raises, which would stop every pool gauge's refresh (a hub's
        # peers publish whatever they publish): scaled by the largest deviation instead.
        deviations = [v - mean for v in values]
        scale = max(abs(d) for d in deviations)
        return round(scale * math.sqrt(sum((d / scale) ** 2 for d in deviations) / max(1, n - 1)), 2)


def _build_info() -> tuple[str, str]:
    """`llm_d_epp_info{commit, build_ref}`: from COMMIT_SHA / BUILD_REF when the image sets them (the
    reference bakes them in at build time), else "unknown" and the package version."""
    try:
        version = importlib.metadata.version("llm-epp")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return os.environ.get("COMMIT_SHA") or "unknown", os.environ.get("BUILD_REF") or version


class EppMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = PREFIX
        # Requests, labelled (model_name, target_model_name, fairness_id, priority) as the reference's.
        self.request_total = Counter(
            p + "request_total", "Requests routed (refused ones are only in request_error_total).", _REQ_LABELS,
            registry=r,
        )  # fmt: skip
        self.request_error_total = Counter(
            p + "request_error_total",
            "Requests answered with an error.",
            (*_REQ_LABELS, "error_code"),
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds", "End-to-end request latency seen by the EPP.", _REQ_LABELS,
            buckets=GENERAL_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_ttft = Histogram(
            p + "request_ttft_seconds", "Time from the request to the first response byte.",
            (*_REQ_LABELS, "streaming"), buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_ntpot = Histogram(
            p + "request_ntpot_seconds", "Normalized time per output token: end-to-end latency / output tokens.",
            _REQ_LABELS, buckets=NTPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_streaming_tpot = Histogram(
            p + "request_streaming_tpot_seconds",
            "Time per output token of a streamed answer: (end-to-end latency - TTFT) / (output tokens - 1).",
            _REQ_LABELS, buckets=STREAMING_TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_streaming_itl = Histogram(
            p + "request_streaming_itl_seconds",
            "Inter-token latency of a streamed answer: the time between consecutive response body chunks.",
            _REQ_LABELS, buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_size = Histogram(
            p + "request_size_bytes", "Request body size.", _REQ_LABELS, buckets=REQUEST_SIZE_BUCKETS, registry=r
        )
        self.response_size = Histogram(
            p + "response_size_bytes", "Response body size.", _REQ_LABELS, buckets=RESPONSE_SIZE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.input_tokens = Histogram(
            p + "request_input_tokens",
            "Prompt tokens (from usage).",
            _REQ_LABELS,
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            p + "request_output_tokens", "Completion tokens.", _REQ_LABELS, buckets=OUTPUT_TOKEN_BUCKETS, registry=r
        )
        self.cached_tokens = Histogram(
            p + "request_cached_tokens",
            "Cached prompt tokens.",
            _REQ_LABELS,
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.request_running = Gauge(p + "request_running", "Requests in flight.", _REQ_LABELS, registry=r)
        # EPP overhead.
        self.scheduler_e2e = Histogram(
            p + "scheduler_e2e_duration_seconds",
            "Scheduling time (all profiles).",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.scheduler_attempts = Counter(
            p + "scheduler_attempts_total", "Scheduling attempts, with the endpoint picked.",
            ("status", "target_model_name", "endpoint_name", "namespace", "port"), registry=r,
        )  # fmt: skip
        self._attempts: dict[tuple[str, str, Endpoint | None], Tally] = {}  # per (status, target, endpoint)
        # A model name as a label value (scheduler attempts): the first MAX_MODEL_LABELS as they are.
        self.bound_model = BoundedLabels(MAX_MODEL_LABELS)
        self.request_processing = Histogram(
            p + "request_processing_duration_seconds",
            "EPP time from the request headers to the routing decision (includes the body's arrival and queue "
            "wait), refused requests included.",
            buckets=REQUEST_PROCESSING_BUCKETS, registry=r,
        )  # fmt: skip
        self.response_processing = Histogram(
            p + "response_processing_duration_seconds", "EPP time spent on a response (all chunks).",
            buckets=RESPONSE_PROCESSING_BUCKETS, registry=r,
        )  # fmt: skip
        commit, build_ref = _build_info()
        self.info = Gauge(p + "info", "Build of this EPP.", ("commit", "build_ref"), registry=r)
        self.info.labels(commit, build_ref).set(1)
        # Pool.
        pool = ("name",)
        self.pool_avg_kv = Gauge(p + "average_kv_cache_utilization", "Mean KV-cache utilisation.", pool, registry=r)
        self.pool_avg_queue = Gauge(p + "average_queue_size", "Mean waiting queue.", pool, registry=r)
        self.pool_avg_running = Gauge(p + "average_running_requests", "Mean running requests.", pool, registry=r)
        self.pool_std_kv = Gauge(
            p + "std_dev_kv_cache_utilization", "Sample standard deviation of KV-cache utilisation.", pool,
            registry=r,
        )  # fmt: skip
        self.pool_std_queue = Gauge(
            p + "std_dev_queue_size", "Sample standard deviation of the waiting queues.", pool, registry=r
        )
        self.pool_std_running = Gauge(
            p + "std_dev_running_requests", "Sample standard deviation of running requests.", pool, registry=r
        )
        self.pool_ready = Gauge(
            p + "ready_endpoints",
            "Endpoints in the pool, less those whose metrics page has failed every scrape for a grace period "
            "(a hub: the sum of its clusters' ready endpoints).",
            pool, registry=r,
        )  # fmt: skip
        # A hub (multicluster): its clusters going unavailable (their EPPs report no ready endpoints).
        self.cluster_unavailable = Counter(
            p + "multicluster_cluster_unavailable_total",
            "Times a cluster became unavailable to this hub: its EPP reported no ready endpoints.",
            ("cluster",),
            registry=r,
        )
        self.pool_endpoint_queue = Gauge(
            p + "per_endpoint_queue_size",
            "Waiting queue per endpoint.",
            ("name", "model_server_endpoint"),
            registry=r,
        )
        # Data layer.
        self.poll_errors = Counter(
            p + "datalayer_poll_errors_total", "Failed metric scrapes.", ("source_type",), registry=r
        )
        self.extract_errors = Counter(
            p + "datalayer_extract_errors_total", "Unparsable metric pages / values.",
            ("source_type", "extractor_type"), registry=r,
        )  # fmt: skip
        # Plugins.
        self.plugin_duration = Histogram(
            p + "plugin_duration_seconds", "Time per plugin call.", ("extension_point", "plugin_type", "plugin_name"),
            buckets=FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.prefix_indexer_size = Gauge(
            p + "prefix_indexer_size", "Blocks in the approximate prefix index.", registry=r
        )
        self.prefix_indexer_hit_ratio = Histogram(
            p + "prefix_indexer_hit_ratio", "Matched fraction of prompt blocks (best endpoint).",
            buckets=PREFIX_HIT_RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.prefix_indexer_hit_bytes = Histogram(
            p + "prefix_indexer_hit_bytes",
            "Matched prompt bytes (best endpoint).",
            buckets=PREFIX_HIT_BYTES_BUCKETS,
            registry=r,
        )
        # In-flight load (read from the producers' live counters at scrape time: nothing per request).
        self.inflight = InFlightCollector()
        r.register(self.inflight)
        # Config reloads (--watch-config-file, llmepp.config.watch), named as Prometheus names its own.
        self.config_reloads = Counter(
            p + "config_reloads_total", "Changed config files, by result (applied, rejected).", ("result",), registry=r
        )
        self.config_last_reload_successful = Gauge(
            p + "config_last_reload_successful", "1 if the last changed config file was applied, else 0.", registry=r
        )
        self.config_last_reload_success_timestamp = Gauge(
            p + "config_last_reload_success_timestamp_seconds", "When the running config was loaded.", registry=r
        )
        # Protocol.
        self.extproc_streams_inflight = Gauge(p + "extproc_streams_inflight", "Open ext_proc streams.", registry=r)
        self._stream_metrics: tuple[Histogram, Counter] | None = None
        self.extproc_protocol_errors = Counter(
            p + "extproc_protocol_errors_total", "Unexpected ext_proc messages (answered, not fatal).", ("kind",),
            registry=r,
        )  # fmt: skip

    def scheduler_attempt(self, status: str, target_model: str, endpoint: Endpoint | None) -> Tally:
        """`scheduler_attempts_total` child of one attempt: its status, target model and the primary
        endpoint picked (empty names when none, as the reference's failures)."""
        if len(target_model) > MAX_LABEL_VALUE_CHARS:
            # Reported as "other" anyway; a cache key would keep the client's whole name (up to the body limit).
            target_model = OVERFLOW_LABEL
        key = (status, target_model, endpoint)
        child = self._attempts.get(key)
        if child is None:
            if endpoint is not None and endpoint.removed:
                # Removed while this request was scheduled: its series went with it (endpoint_removed);
                # one made now would never be dropped.
                return Tally()
            target = self.bound_model(target_model)
            if endpoint is None:
                child = self.scheduler_attempts.labels(status, target, "", "", "")
            else:
                child = self.scheduler_attempts.labels(
                    status, target, endpoint.name, endpoint.namespace, str(endpoint.port)
                )
            if len(self._attempts) < _MAX_CACHED_ATTEMPTS:  # target models are client input
                self._attempts[key] = child
        return child

    # -- DatastoreListener (App registers it) ------------------------------------------------------
    def endpoint_added(self, endpoint: Endpoint) -> None:
        pass

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        """Drop the removed endpoint's `scheduler_attempts_total` series and cached children: pods churn
        (every rollout brings new names), so kept they would grow without bound, and the cache would hold
        dead endpoints until full (after which no attempt is cached)."""
        for key in [k for k in self._attempts if k[2] is endpoint]:
            del self._attempts[key]
        labels = (endpoint.name, endpoint.namespace, str(endpoint.port))
        family = self.scheduler_attempts
        for values in [v for v in family._children if v[2:] == labels]:
            family.remove(*values)

    def stream_metrics(self) -> tuple[Histogram, Counter]:
        """`extproc_stream_duration_seconds` and `extproc_streams_total{code}` (--enable-grpc-stream-metrics),
        registered on first use."""
        if self._stream_metrics is None:
            duration = Histogram(
                PREFIX + "extproc_stream_duration_seconds", "ext_proc stream lifetime, request headers to end.",
                buckets=STREAM_DURATION_BUCKETS, registry=self.registry,
            )  # fmt: skip
            total = Counter(
                PREFIX + "extproc_streams_total", "Ended ext_proc streams.", ("code",), registry=self.registry
            )
            self._stream_metrics = (duration, total)
        return self._stream_metrics


class InFlightCollector(Collector):
    """`inflight_requests` / `inflight_tokens` per endpoint for every `inflight-load-producer`
    (labels endpoint_name, namespace, producer_name; the reference also splits by fairness_id and
    priority, which these counters do not track). An endpoint is listed while the producer tracks it, at 0
    once idle (a series that vanished when idle would read as missing data, not as no load)."""

    def __init__(self) -> None:
        # producer name -> its live Endpoint -> InFlight mapping
        self._producers: dict[str, Mapping[Endpoint, InFlight]] = {}

    def add(self, producer: str, loads: Mapping[Endpoint, InFlight]) -> None:
        self._producers[producer] = loads

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["endpoint_name", "namespace", "producer_name"]
        requests = GaugeMetricFamily(PREFIX + "inflight_requests", "Requests this EPP has in flight.", labels=labels)
        tokens = GaugeMetricFamily(
            PREFIX + "inflight_tokens",
            "Uncached prompt tokens (until the first response bytes) plus estimated output tokens in flight.",
            labels=labels,
        )
        for producer, loads in list(self._producers.items()):  # a config reload may add one meanwhile
            for endpoint, load in list(loads.items()):  # a copy: the event loop may change it meanwhile
                values = [endpoint.name, endpoint.namespace, producer]
                requests.add_metric(values, load.requests)
                tokens.add_metric(values, load.tokens)
        yield requests
        yield tokens
