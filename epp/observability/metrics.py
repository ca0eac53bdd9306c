"""The EPP's own Prometheus metrics (reference names, `llm_d_epp_` prefix).

One `EppMetrics` object per process, on its own CollectorRegistry so tests can build
several apps in one interpreter. The families are the lock-free ones from `fast` (the
request path records a dozen values per request); hot paths also hold label children
instead of calling `.labels()` per request.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmepp.observability.fast import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from llmepp.datalayer.endpoint import Endpoint, InFlight

PREFIX = "llm_d_epp_"

# Buckets in seconds; fine resolution below 1 ms where EPP overheads live.
_FAST_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
# Queue wait included (flow control holds a request up to its TTL, 60 s by default): up to a minute.
_PROCESSING_BUCKETS = (*_FAST_BUCKETS, 2.5, 5.0, 10.0, 30.0, 60.0)
# The top buckets reach the reference's (an hour; 1M tokens; 1 GiB): beyond them all is +Inf.
_REQUEST_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2, 3, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600,
)  # fmt: skip
_TOKEN_BUCKETS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576,
)  # fmt: skip
_SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864, 268435456, 1 << 30)

_REQ_LABELS = ("model_name", "target_model_name")


class EppMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = PREFIX
        # Requests.
        self.request_total = Counter(p + "request_total", "Requests received.", _REQ_LABELS, registry=r)
        self.request_error_total = Counter(
            p + "request_error_total",
            "Requests answered with an error.",
            (*_REQ_LABELS, "error_code"),
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds", "End-to-end request latency seen by the EPP.", _REQ_LABELS,
            buckets=_REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_ttft = Histogram(
            p + "request_ttft_seconds", "Time to first response byte.", (*_REQ_LABELS, "streaming"),
            buckets=_REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_size = Histogram(
            p + "request_size_bytes", "Request body size.", _REQ_LABELS, buckets=_SIZE_BUCKETS, registry=r
        )
        self.response_size = Histogram(
            p + "response_size_bytes", "Response body size.", _REQ_LABELS, buckets=_SIZE_BUCKETS, registry=r
        )
        self.input_tokens = Histogram(
            p + "request_input_tokens",
            "Prompt tokens (from usage).",
            _REQ_LABELS,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            p + "request_output_tokens", "Completion tokens.", _REQ_LABELS, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.cached_tokens = Histogram(
            p + "request_cached_tokens",
            "Cached prompt tokens.",
            _REQ_LABELS,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_running = Gauge(p + "request_running", "Requests in flight.", _REQ_LABELS, registry=r)
        # EPP overhead.
        self.scheduler_e2e = Histogram(
            p + "scheduler_e2e_duration_seconds",
            "Scheduling time (all profiles).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.scheduler_attempts = Counter(
            p + "scheduler_attempts_total", "Scheduling attempts.", ("status",), registry=r
        )
        self.request_processing = Histogram(
            p + "request_processing_duration_seconds",
            "EPP time from end of request body to routing decision (includes queue wait).",
            buckets=_PROCESSING_BUCKETS, registry=r,
        )  # fmt: skip
        self.response_processing = Histogram(
            p + "response_processing_duration_seconds", "EPP time spent on a response (all chunks).",
            buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        # Pool.
        pool = ("name",)
        self.pool_avg_kv = Gauge(p + "average_kv_cache_utilization", "Mean KV-cache utilisation.", pool, registry=r)
        self.pool_avg_queue = Gauge(p + "average_queue_size", "Mean waiting queue.", pool, registry=r)
        self.pool_avg_running = Gauge(p + "average_running_requests", "Mean running requests.", pool, registry=r)
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
            buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.prefix_indexer_size = Gauge(
            p + "prefix_indexer_size", "Blocks in the approximate prefix index.", registry=r
        )
        self.prefix_indexer_hit_ratio = Histogram(
            p + "prefix_indexer_hit_ratio", "Matched fraction of prompt blocks (best endpoint).",
            buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r,
        )  # fmt: skip
        self.prefix_indexer_hit_bytes = Histogram(
            p + "prefix_indexer_hit_bytes",
            "Matched prompt bytes (best endpoint).",
            buckets=_SIZE_BUCKETS,
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

    def stream_metrics(self) -> tuple[Histogram, Counter]:
        """`extproc_stream_duration_seconds` and `extproc_streams_total{code}` (--enable-grpc-stream-metrics),
        registered on first use."""
        if self._stream_metrics is None:
            duration = Histogram(
                PREFIX + "extproc_stream_duration_seconds", "ext_proc stream lifetime, request headers to end.",
                buckets=_REQUEST_BUCKETS, registry=self.registry,
            )  # fmt: skip
            total = Counter(
                PREFIX + "extproc_streams_total", "Ended ext_proc streams.", ("code",), registry=self.registry
            )
            self._stream_metrics = (duration, total)
        return self._stream_metrics


class InFlightCollector(Collector):
    """`inflight_requests` / `inflight_tokens` per endpoint for every `inflight-load-producer`
    (labels endpoint_name, namespace, producer_name; the reference also splits by fairness_id and
    priority, which these counters do not track). Endpoints with nothing in flight are omitted."""

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
