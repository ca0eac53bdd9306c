"""Per-pod Prometheus metrics with vLLM's names, types, labels and histogram buckets.

The engine updates plain counters and bucket arrays (``EngineStats``: cheap enough to touch per token);
gauges are read from the engine at scrape time, so a scrape always sees the current queue and KV state.
Every series carries ``model_name`` (the pod's first served model name), as vLLM's do. Latency histograms
are in simulated seconds (see ``llmepp_sim.clock``).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# vLLM v1 buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
LORA_INFO_SERIES_KEPT = 32  # vLLM never drops old label sets; bound them so a long run stays small


def token_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(float(value))
        exponent += 1


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", self.count))
        return out


@dataclass
class EngineStats:
    """Cumulative counters of one engine lifetime (a killed pod restarts from zero, like a new vLLM)."""

    max_model_len: int = 1024
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prefill_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    decode_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    request_prompt_tokens: Histogram = field(init=False)
    request_generation_tokens: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.request_prompt_tokens = Histogram(token_buckets(self.max_model_len))
        self.request_generation_tokens = Histogram(token_buckets(self.max_model_len))


@dataclass(frozen=True)
class EngineGauges:
    running: int
    waiting: int
    kv_cache_usage: float
    running_lora_adapters: list[str]
    waiting_lora_adapters: list[str]
    max_loras: int


@dataclass(frozen=True)
class CacheInfo:
    block_size: int
    num_gpu_blocks: int
    enable_prefix_caching: bool


class PodMetrics:
    """A prometheus_client collector bound to one engine; ``render()`` is the /metrics body."""

    def __init__(
        self,
        model_name: str,
        cache_info: CacheInfo,
        stats: Callable[[], EngineStats],
        gauges: Callable[[], EngineGauges],
    ) -> None:
        self._model = model_name
        self._cache_info = cache_info
        self._stats = stats
        self._gauges = gauges
        self._lora_series: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def collect(self) -> Iterator[Metric]:
        model = [self._model]
        stats, gauges = self._stats(), self._gauges()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        def histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
            family = HistogramMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, h.cumulative(), sum_value=h.sum)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", gauges.running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", gauges.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", gauges.kv_cache_usage)

        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"],
        )
        c = self._cache_info
        info.add_metric(
            [self._model, str(c.block_size), str(c.num_gpu_blocks), str(c.enable_prefix_caching), "auto"], 1.0
        )
        yield info
        yield self._lora_info(gauges)

        yield counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        )  # fmt: skip
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        )  # fmt: skip
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", stats.preemptions)
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for reason in sorted({"length", "stop", "abort", *stats.finished}):
            success.add_metric([self._model, reason], stats.finished.get(reason, 0))
        yield success

        yield histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", stats.ttft)
        yield histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", stats.itl)
        yield histogram(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds (deprecated alias).",
            stats.itl,
        )  # fmt: skip
        yield histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", stats.e2e)
        yield histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
            stats.queue_time,
        )  # fmt: skip
        yield histogram(
            "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
            stats.prefill_time,
        )  # fmt: skip
        yield histogram(
            "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
            stats.decode_time,
        )  # fmt: skip
        yield histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", stats.request_prompt_tokens
        )
        yield histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.",
            stats.request_generation_tokens,
        )  # fmt: skip

    def _lora_info(self, gauges: EngineGauges) -> GaugeMetricFamily:
        # vLLM sets the gauge for the current label combination to the wall-clock time and never removes
        # older combinations; consumers pick the series with the largest value.
        key = (",".join(gauges.running_lora_adapters), ",".join(gauges.waiting_lora_adapters), str(gauges.max_loras))
        self._lora_series.pop(key, None)
        self._lora_series[key] = time.time()
        while len(self._lora_series) > LORA_INFO_SERIES_KEPT:
            self._lora_series.popitem(last=False)
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["model_name", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        for (running, waiting, max_lora), ts in self._lora_series.items():
            family.add_metric([self._model, running, waiting, max_lora], ts)
        return family
