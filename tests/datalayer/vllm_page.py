"""A realistic vLLM (V1 engine) /metrics page for tests and the scrape benchmark.

Shape follows what `vllm serve` exposes through prometheus_client: process/python
collectors, the scheduler gauges the EPP reads, counters with `_created` twins,
~15 histograms with 15-30 buckets each, the FastAPI instrumentator's http_* families
and the `cache_config_info` / `lora_requests_info` info gauges. Default size ~45 KB.
"""

from __future__ import annotations

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

_LAT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_HTTP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5,
                 5.0, 7.5, 10.0, 30.0, 60.0)  # fmt: skip

_LAT_HISTS = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds."),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request."),
    ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request."),
)
_TOKEN_HISTS = (
    ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step."),
    ("vllm:request_prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:request_generation_tokens", "Number of generation tokens processed."),
    ("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens."),
    ("vllm:request_params_n", "Histogram of the n request parameter."),
    ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter."),
)
_HANDLERS = ("/v1/completions", "/v1/chat/completions", "/metrics", "/health")


def _fmt(v: float) -> str:
    return repr(float(v))


def _histogram(out: list[str], name: str, help_: str, labels: str, buckets: tuple[float, ...], seed: int) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} histogram")
    total = 0
    for i, le in enumerate(buckets):
        total += (seed * 7 + i * 13) % 97
        out.append(f'{name}_bucket{{{labels},le="{_fmt(le)}"}} {_fmt(total)}')
    out.append(f'{name}_bucket{{{labels},le="+Inf"}} {_fmt(total)}')
    out.append(f"{name}_count{{{labels}}} {_fmt(total)}")
    out.append(f"{name}_sum{{{labels}}} {_fmt(total * 0.731)}")
    out.append(f"# HELP {name.replace(':', '_')}_created {help_}")
    out.append(f"{name}_created{{{labels}}} 1.7326543219876e+09")


def vllm_page(
    *,
    waiting: int = 3,
    running: int = 12,
    kv_usage: float = 0.4375,
    running_adapters: str | None = None,
    waiting_adapters: str = "",
    max_lora: int = 4,
    block_size: int = 16,
    num_gpu_blocks: int = 74272,
    model: str = MODEL,
    http_repeat: int = 1,
) -> bytes:
    """One page; `running_adapters=None` leaves out `vllm:lora_requests_info` (LoRA off)."""
    lab = f'engine="0",model_name="{model}"'
    out: list[str] = []
    for gen in range(3):
        out.append("# HELP python_gc_objects_collected_total Objects collected during gc")
        out.append("# TYPE python_gc_objects_collected_total counter")
        out.append(f'python_gc_objects_collected_total{{generation="{gen}"}} {_fmt(1234 * (gen + 1))}')
    out += [
        "# HELP python_info Python platform information",
        "# TYPE python_info gauge",
        'python_info{implementation="CPython",major="3",minor="12",patchlevel="9",version="3.12.9"} 1.0',
        "# HELP process_virtual_memory_bytes Virtual memory size in bytes.",
        "# TYPE process_virtual_memory_bytes gauge",
        "process_virtual_memory_bytes 5.4321e+10",
        "# HELP process_resident_memory_bytes Resident memory size in bytes.",
        "# TYPE process_resident_memory_bytes gauge",
        "process_resident_memory_bytes 3.2101e+09",
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
        "# TYPE process_cpu_seconds_total counter",
        "process_cpu_seconds_total 1234.56",
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{lab}}} {_fmt(running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{lab}}} {_fmt(waiting)}",
        "# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.",
        "# TYPE vllm:num_requests_waiting_by_reason gauge",
        f'vllm:num_requests_waiting_by_reason{{{lab},reason="capacity"}} {_fmt(waiting)}',
        f'vllm:num_requests_waiting_by_reason{{{lab},reason="deferred"}} 0.0',
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{lab}}} {_fmt(kv_usage)}",
    ]
    for counter in ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens",
                    "generation_tokens", "external_prefix_cache_queries", "external_prefix_cache_hits"):  # fmt: skip
        out.append(f"# HELP vllm:{counter}_total Counter of {counter.replace('_', ' ')}.")
        out.append(f"# TYPE vllm:{counter}_total counter")
        out.append(f"vllm:{counter}_total{{{lab}}} 987654.0")
        out.append(f"# HELP vllm:{counter}_created Counter of {counter.replace('_', ' ')}.")
        out.append(f"# TYPE vllm:{counter}_created gauge")
        out.append(f"vllm:{counter}_created{{{lab}}} 1.7326543219876e+09")
    out.append("# HELP vllm:request_success_total Count of successfully processed requests.")
    out.append("# TYPE vllm:request_success_total counter")
    for reason in ("stop", "length", "abort", "error"):
        out.append(f'vllm:request_success_total{{{lab},finished_reason="{reason}"}} 4321.0')
        out.append(f'vllm:request_success_created{{{lab},finished_reason="{reason}"}} 1.7326543219876e+09')
    if running_adapters is not None:
        out.append("# HELP vllm:lora_requests_info Running stats on lora requests.")
        out.append("# TYPE vllm:lora_requests_info gauge")
        out.append(
            f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{running_adapters}",'
            f'waiting_lora_adapters="{waiting_adapters}"}} 1.7326549e+09'
        )
    for i, (name, help_) in enumerate(_LAT_HISTS):
        _histogram(out, name, help_, lab, _LAT_BUCKETS, i)
    for i, (name, help_) in enumerate(_TOKEN_HISTS):
        _histogram(out, name, help_, lab, tuple(float(b) for b in _TOKEN_BUCKETS), i + 20)
    for rep in range(http_repeat):
        for h, handler in enumerate(_HANDLERS):
            hl = f'handler="{handler}",method="{"GET" if h >= 2 else "POST"}"'
            _histogram(
                out, "http_request_duration_seconds" if rep == 0 else f"http_request_duration_{rep}_seconds",
                "Latency with only few buckets by handler.", hl, _HTTP_BUCKETS, h + 40,
            )  # fmt: skip
    out += [
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{block_size}",cache_dtype="auto",calculate_kv_scales="False",'
        f'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",is_attention_free="False",'
        f'num_cpu_blocks="None",num_gpu_blocks="{num_gpu_blocks}",num_gpu_blocks_override="None",'
        f'prefix_caching_hash_algo="sha256",sliding_window="None",swap_space="4"}} 1.0',
    ]
    return ("\n".join(out) + "\n").encode()
