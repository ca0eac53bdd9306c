"""Plugin series under the reference's names and label names (llm-d-router docs/metrics.md): the deprecated
P/D handler's decision counter. The latency producer's are pinned in test_latency_plugins.py, the program-aware
policy's in tests/flowcontrol/test_program_fairness.py."""

from __future__ import annotations

from helpers import request

from .test_pd_plugins import PD_PODS, director, legacy_pd


async def test_the_deprecated_pd_handler_counts_pd_decision_total_too() -> None:
    params = "{threshold: 500, hashBlockSize: 64, prefixPluginName: prefix-cache-scorer}"
    d, _, metrics = director(legacy_pd(params), PD_PODS)
    await d.handle_request(request(b"s" * 400), None)  # 100 tokens < 500: decode only
    await d.handle_request(request(b"l" * 4000), None)  # disaggregated
    value = metrics.registry.get_sample_value
    for kind in ("decode-only", "prefill-decode"):
        assert value("llm_d_epp_pd_decision_total", {"model_name": "m", "decision_type": kind}) == 1
    assert [f.type for f in metrics.registry.collect() if f.name == "llm_d_epp_pd_decision"] == ["counter"]
