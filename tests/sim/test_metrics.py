"""/metrics: vLLM's names, types and labels, parsed by prometheus_client's own text parser."""

from __future__ import annotations

import asyncio

import aiohttp
from helpers import on_a_punctual_loop, until
from prometheus_client.parser import text_string_to_metric_families

from llmepp_sim.metrics import CacheInfo, EngineGauges, EngineStats, PodMetrics

from .simkit import complete, pod, running, sample, scrape, words

EXPECTED_TYPES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:lora_requests_info": "gauge",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:request_success": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
}


async def test_metric_names_types_and_labels(http: aiohttp.ClientSession) -> None:
    async with running([pod(served_model_name=["llama"], kv_cache_size=333, block_size=32)]) as cluster:
        url = cluster.urls[0]
        families = await scrape(http, url)
        for name, kind in EXPECTED_TYPES.items():
            assert families[name].type == kind, name
            for s in families[name].samples:
                assert s.labels["model_name"] == "llama", (name, s)
        # Counter samples carry the _total suffix, as vLLM's prometheus_client output does.
        assert {s.name for s in families["vllm:prompt_tokens"].samples} >= {"vllm:prompt_tokens_total"}
        info = families["vllm:cache_config_info"].samples[0]
        assert info.value == 1.0
        assert info.labels["block_size"] == "32" and info.labels["num_gpu_blocks"] == "333"
        lora = families["vllm:lora_requests_info"].samples[0]
        assert set(lora.labels) == {"model_name", "running_lora_adapters", "waiting_lora_adapters", "max_lora"}
        assert lora.value > 1.7e9  # a unix timestamp
        reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
        assert {"length", "stop", "abort"} <= reasons


async def test_counters_and_histograms_follow_traffic(http: aiohttp.ClientSession) -> None:
    async def measure() -> None:
        async with running([pod()]) as cluster:
            url = cluster.urls[0]
            prompt = words(100)
            first = await complete(http, url, prompt, 8, model="sim-model")
            second = await complete(http, url, prompt, 8)
            families = await scrape(http, url)
            prompt_tokens = first.body["usage"]["prompt_tokens"]
            assert sample(families, "vllm:prompt_tokens") == 2 * prompt_tokens
            assert sample(families, "vllm:generation_tokens") == 16
            assert sample(families, "vllm:prefix_cache_queries") == 2 * prompt_tokens
            assert sample(families, "vllm:prefix_cache_hits") == second.cached_tokens > 0
            assert sample(families, "vllm:request_success", finished_reason="length") == 2
            assert sample(families, "vllm:time_to_first_token_seconds", "_count") == 2
            assert sample(families, "vllm:inter_token_latency_seconds", "_count") == 14
            assert sample(families, "vllm:e2e_request_latency_seconds", "_count") == 2
            # Latencies are in simulated seconds: ~30 ms + ~20 ms of prefill, even at 10x speed.
            ttft_sum = sample(families, "vllm:time_to_first_token_seconds", "_sum")
            assert 0.06 < ttft_sum < 1.0
            buckets = [s for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
            assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 2

    await on_a_punctual_loop(measure)


async def test_gauges_are_current_at_scrape_time(http: aiohttp.ClientSession) -> None:
    async with running([pod(max_num_seqs=3, inter_token_latency=50.0)]) as cluster:
        url, engine = cluster.urls[0], cluster.pods[0].engine
        tasks = [asyncio.create_task(complete(http, url, words(10, salt=f"g{i} "), 40)) for i in range(5)]
        # Until all five have reached the pod (a fixed 30 ms sleep raced them on a loaded machine); the first
        # three run for ~2 s simulated (0.2 s wall).
        await until(lambda: len(engine.running) + len(engine.waiting) == 5, what="all five at the pod", interval=0.002)
        families = await scrape(http, url)
        assert sample(families, "vllm:num_requests_running") == 3
        assert sample(families, "vllm:num_requests_waiting") == 2
        assert sample(families, "vllm:kv_cache_usage_perc") > 0
        await asyncio.gather(*tasks)
        families = await scrape(http, url)
        assert sample(families, "vllm:num_requests_running") == 0
        assert sample(families, "vllm:num_requests_waiting") == 0


def test_page_escapes_label_values_and_formats_values_as_prometheus_client_does() -> None:
    # The page is rendered by hand (a scrape must not cost the engines' event loop ~1 ms); prometheus_client's
    # parser must read back exactly what was rendered, whatever the model and adapter names hold.
    stats = EngineStats(max_model_len=2_000_000)
    stats.prompt_tokens = 12_345_678
    stats.finished["stop"] = 1_234_567
    for value in (3, 900, 1_500_000):
        stats.request_prompt_tokens.observe(value)
    stats.ttft.observe(0.3)
    gauges = EngineGauges(3, 1, 0.123456789, ['a"b', "c\\d"], ["x\ny"], 4)
    page = PodMetrics('mo"d\\el', CacheInfo(16, 1000, True), lambda: stats, lambda: gauges).render()
    families = {f.name: f for f in text_string_to_metric_families(page.decode())}
    assert set(EXPECTED_TYPES) <= set(families)
    for name, kind in EXPECTED_TYPES.items():
        assert families[name].type == kind, name
    assert sample(families, "vllm:prompt_tokens") == 12_345_678
    assert sample(families, "vllm:request_success", finished_reason="stop") == 1_234_567
    assert sample(families, "vllm:kv_cache_usage_perc") == 0.123456789
    lora = families["vllm:lora_requests_info"].samples[0].labels
    assert lora == {
        "model_name": 'mo"d\\el', "running_lora_adapters": 'a"b,c\\d', "waiting_lora_adapters": "x\ny", "max_lora": "4"
    }  # fmt: skip
    buckets = {
        float(s.labels["le"]): s.value
        for s in families["vllm:request_prompt_tokens"].samples
        if s.name.endswith("_bucket")
    }
    # Cumulative counts; a bound of a million is written 1e+06, as vLLM's prometheus_client Histogram writes it.
    assert buckets[5.0] == 1 and buckets[1000.0] == 2 and buckets[1e6] == 2 and buckets[2e6] == 3
    assert buckets[float("inf")] == 3
    assert b'le="1e+06"' in page
    assert sample(families, "vllm:request_prompt_tokens", "_sum") == 1_500_903
    assert sample(families, "vllm:time_to_first_token_seconds", "_count") == 1
