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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString as _value

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
    """One engine's /metrics page: ``render()`` is the body, in prometheus_client's text format.

    Rendered by hand rather than through prometheus_client's generic collector: every pod's engine steps
    on the same event loop as the scrapes, and the generic path cost 1-2 ms a page (an EPP scraping 4 pods
    every 50 ms took ~15% of a core from the engines). vLLM serves /metrics from its API-server process,
    off the engine's loop, so a scrape must not slow the simulated engines. The page is what vLLM's
    prometheus_client prints (label names sorted, values and bucket bounds formatted as Go formats floats);
    tests read it with prometheus_client's parser.
    """

    def __init__(
        self,
        model_name: str,
        cache_info: CacheInfo,
        stats: Callable[[], EngineStats],
        gauges: Callable[[], EngineGauges],
    ) -> None:
        self._model = model_name
        self._stats = stats
        self._gauges = gauges
        self._lora_series: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._labels = _labels(model_name=model_name)
        c = cache_info
        self._cache_config = _header("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", "gauge") + (
            "vllm:cache_config_info"
            + _labels(
                model_name=model_name,
                block_size=str(c.block_size),
                num_gpu_blocks=str(c.num_gpu_blocks),
                enable_prefix_caching=str(c.enable_prefix_caching),
                cache_dtype="auto",
            )
            + " 1.0\n"
        )
        self._bucket_prefixes: dict[str, list[str]] = {}

    def render(self) -> bytes:
        stats, gauges = self._stats(), self._gauges()
        out: list[str] = []
        self._gauge(out, "vllm:num_requests_running", "Number of requests in model execution batches.", gauges.running)
        self._gauge(out, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", gauges.waiting)
        self._gauge(
            out, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", gauges.kv_cache_usage
        )
        out.append(self._cache_config)
        self._lora_info(out, gauges)

        self._counter(
            out, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        )  # fmt: skip
        self._counter(
            out, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        )  # fmt: skip
        self._counter(out, "vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens)
        self._counter(out, "vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens)
        self._counter(
            out, "vllm:num_preemptions", "Cumulative number of preemption from the engine.", stats.preemptions
        )
        out.append(_header("vllm:request_success_total", "Count of successfully processed requests.", "counter"))
        for reason in sorted({"length", "stop", "abort", *stats.finished}):
            labels = _labels(model_name=self._model, finished_reason=reason)
            out.append(f"vllm:request_success_total{labels} {_value(stats.finished.get(reason, 0))}\n")

        self._histogram(
            out, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", stats.ttft
        )
        self._histogram(
            out, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", stats.itl
        )
        self._histogram(
            out, "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (deprecated alias).", stats.itl,
        )  # fmt: skip
        self._histogram(
            out, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", stats.e2e
        )
        self._histogram(
            out, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
            stats.queue_time,
        )  # fmt: skip
        self._histogram(
            out, "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
            stats.prefill_time,
        )  # fmt: skip
        self._histogram(
            out, "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
            stats.decode_time,
        )  # fmt: skip
        self._histogram(
            out, "vllm:request_prompt_tokens", "Number of prefill tokens processed.", stats.request_prompt_tokens
        )
        self._histogram(
            out, "vllm:request_generation_tokens", "Number of generation tokens processed.",
            stats.request_generation_tokens,
        )  # fmt: skip
        return "".join(out).encode()

    def _gauge(self, out: list[str], name: str, doc: str, value: float) -> None:
        out.append(f"{_header(name, doc, 'gauge')}{name}{self._labels} {_value(value)}\n")

    def _counter(self, out: list[str], name: str, doc: str, value: float) -> None:
        # prometheus_client names a counter family and its sample with the _total suffix, as vLLM's page has.
        name += "_total"
        out.append(f"{_header(name, doc, 'counter')}{name}{self._labels} {_value(value)}\n")

    def _histogram(self, out: list[str], name: str, doc: str, h: Histogram) -> None:
        prefixes = self._bucket_prefixes.get(name)
        if prefixes is None:
            les = [_value(b) for b in h.bounds] + ["+Inf"]
            prefixes = [f"{name}_bucket{_labels(model_name=self._model, le=le)} " for le in les]
            self._bucket_prefixes[name] = prefixes
        out.append(_header(name, doc, "histogram"))
        running = 0
        for prefix, n in zip(prefixes, h.counts):
            running += n
            out.append(f"{prefix}{_value(running)}\n")
        out.append(f"{name}_count{self._labels} {_value(h.count)}\n{name}_sum{self._labels} {_value(h.sum)}\n")

    def _lora_info(self, out: list[str], gauges: EngineGauges) -> None:
        # vLLM sets the gauge for the current label combination to the wall-clock time and never removes
        # older combinations; consumers pick the series with the largest value.
        key = (",".join(gauges.running_lora_adapters), ",".join(gauges.waiting_lora_adapters), str(gauges.max_loras))
        self._lora_series.pop(key, None)
        self._lora_series[key] = time.time()
        while len(self._lora_series) > LORA_INFO_SERIES_KEPT:
            self._lora_series.popitem(last=False)
        out.append(_header("vllm:lora_requests_info", "Running stats on lora requests.", "gauge"))
        for (running, waiting, max_lora), ts in self._lora_series.items():
            labels = _labels(
                model_name=self._model, running_lora_adapters=running, waiting_lora_adapters=waiting, max_lora=max_lora
            )
            out.append(f"vllm:lora_requests_info{labels} {_value(ts)}\n")


def _header(name: str, doc: str, kind: str) -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _labels(**labels: str) -> str:
    # prometheus_client sorts label names and escapes backslash, newline and double quote in values.
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
