"""SGLang's KV geometry: from `sglang:cache_config_info` labels (the reference's mapping, older servers) or the
newer servers' `sglang:page_size` / `sglang:num_pages` gauges."""

from __future__ import annotations

from llmepp.datalayer.endpoint import NO_METRICS
from llmepp.datalayer.engines import EngineMapping
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor

# An SGLang page as the reference's built-in SGLang mapping reads it (llm-d-router factories.go, the
# shared reference §4.2: cache info = `sglang:cache_config_info`, labels page_size / num_pages): the
# servers before the `sglang:page_size` / `sglang:num_pages` gauges carry the KV geometry as labels of
# this info gauge.
SGLANG_CACHE_CONFIG_INFO = b"""# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen3-0.6B"} 2.0
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen3-0.6B"} 8.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen3-0.6B"} 0.125
# HELP sglang:cache_config_info Information of the cache config.
# TYPE sglang:cache_config_info gauge
sglang:cache_config_info{model_name="Qwen/Qwen3-0.6B",num_pages="1000",page_size="16"} 1.0
"""

SGLANG_GAUGES = b"""sglang:num_queue_reqs 2
sglang:num_running_reqs 8
sglang:token_usage 0.125
sglang:page_size 1
sglang:num_pages 200000
"""


def _sglang() -> EngineMapping:
    return CoreMetricsExtractor().mapping_for({"llm-d.ai/engine-type": "sglang"})


def test_sglang_cache_config_info_page_is_read_without_an_extraction_error() -> None:
    m, err = _sglang().extract(SGLANG_CACHE_CONFIG_INFO, NO_METRICS, 1.0)
    assert m is not None
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (2, 8, 0.125)
    # An error here would count every scrape of such a server in llm_d_epp_datalayer_extract_errors_total,
    # and the KV geometry (prefix-cache autoTune) would never be learned.
    assert err is None, err
    assert (m.cache_block_size, m.cache_num_blocks) == (16, 1000)


def test_sglang_gauge_page_still_read() -> None:
    m, err = _sglang().extract(SGLANG_GAUGES, NO_METRICS, 1.0)
    assert err is None and m is not None
    assert (m.cache_block_size, m.cache_num_blocks) == (1, 200000)
