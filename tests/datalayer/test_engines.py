"""Engine mappings and the core-metrics-extractor plugin: one page in, EndpointMetrics out."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmepp.datalayer.endpoint import NO_METRICS, Endpoint, EndpointMetrics, EndpointSpec
from llmepp.datalayer.engines import ABSENT_RECHECK, EngineMapping, EngineSpecs
from llmepp.framework.plugin import ConfigError, PluginRegistry
from llmepp.plugins.datasources import PLUGINS
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor, UnknownEngine

from .vllm_page import vllm_page

EXTRACTOR = CoreMetricsExtractor()


def mapping(engine: str) -> EngineMapping:
    return EXTRACTOR.mappings[engine]


def test_vllm_page() -> None:
    page = vllm_page(waiting=4, running=9, kv_usage=0.625, block_size=32, num_gpu_blocks=5000)
    m, err = mapping("vllm").extract(page, NO_METRICS, 12.5)
    assert err is None
    assert m == EndpointMetrics(
        waiting_queue_size=4,
        running_requests_size=9,
        kv_cache_usage_percent=0.625,
        cache_block_size=32,
        cache_num_blocks=5000,
        update_time=12.5,
    )


def test_vllm_lora_info() -> None:
    page = vllm_page(running_adapters="sql-lora, tweet ", waiting_adapters="chat", max_lora=3)
    m, err = mapping("vllm").extract(page, NO_METRICS, 1.0)
    assert err is None and m is not None
    assert m.active_models == {"sql-lora", "tweet"}
    assert m.waiting_models == {"chat"}
    assert m.max_active_models == 3


def test_vllm_lora_newest_series_wins() -> None:
    page = (
        b"# TYPE vllm:lora_requests_info gauge\n"
        b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 100\n'
        b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="new",waiting_lora_adapters="w"} 200\n'
        b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="mid",waiting_lora_adapters=""} 150\n'
    ) + vllm_page()
    m, err = mapping("vllm").extract(page, NO_METRICS, 1.0)
    assert err is None and m is not None
    assert m.active_models == {"new"}
    assert m.waiting_models == {"w"}


@pytest.mark.parametrize("memo", [False, True])
def test_a_malformed_lora_line_is_a_problem_and_the_rest_still_applied(memo: bool) -> None:
    """extract never raises: a LoRA-info line whose value is not a number is a reported problem, and the
    page's queue, running and KV values are applied (an exception escaped into the scrape connection and
    the whole page was lost, leaving the pod stale)."""
    bad = b'# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{max_lora="1",running_lora_adapters="a"} x\n'
    m, err = mapping("vllm").extract(vllm_page(waiting=3, running=2, kv_usage=0.5) + bad, NO_METRICS, 1.0,
                                     mapping("vllm").new_memo() if memo else None)  # fmt: skip
    assert m is not None and (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (3, 2, 0.5)
    assert err is not None and any(p.startswith("lora info:") for p in err.problems)


def test_a_malformed_custom_metric_line_is_a_problem_and_the_rest_still_applied() -> None:
    custom = [{"attributeKey": "custom.preempt", "metricSpec": "vllm:num_preemptions_total"}]
    ext = build(
        {
            "engineConfigs": [
                {"name": "vllm", "queuedRequestsSpec": "vllm:num_requests_waiting", "customMetrics": custom}
            ]
        }
    )
    mapping = ext.mapping_for({})
    page = b"vllm:num_requests_waiting 3\nvllm:num_preemptions_total 1 2 3\n"
    m, err = mapping.extract(page, NO_METRICS, 1.0, mapping.new_memo())
    assert m is not None and m.waiting_queue_size == 3
    assert err is not None and "custom metric custom.preempt" in str(err)


def test_missing_metric_is_reported_and_the_rest_still_applied() -> None:
    page = vllm_page(waiting=5, running=6).replace(b"vllm:kv_cache_usage_perc{", b"vllm:kv_cache_renamed{")
    previous = EndpointMetrics(kv_cache_usage_percent=0.9, update_time=1.0)
    m, err = mapping("vllm").extract(page, previous, 2.0)
    assert err is not None
    assert err.problems == ["kv usage: vllm:kv_cache_usage_perc: not found"]
    assert m is not None
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (5, 6, 0.9)
    assert m.update_time == 2.0


def test_garbage_page_gives_no_metrics_and_names_every_problem() -> None:
    m, err = mapping("vllm").extract(b"<html><body>502 Bad Gateway</body></html>", NO_METRICS, 1.0)
    assert m is None
    assert err is not None
    assert [p.split(":")[0] for p in err.problems] == ["queued requests", "running requests", "kv usage", "cache info"]


def test_bad_values_are_errors_not_crashes() -> None:
    page = (
        vllm_page()
        .replace(b"vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 3.0",
                 b"vllm:num_requests_waiting{engine=\"0\"} NaN")
        .replace(b'num_gpu_blocks="74272"', b'num_gpu_blocks="None"')
    )  # fmt: skip
    m, err = mapping("vllm").extract(page, NO_METRICS, 1.0)
    assert err is not None
    assert len(err.problems) == 2
    assert "non-finite" in err.problems[0]
    assert "num_gpu_blocks='None' is not an integer" in err.problems[1]
    assert m is not None and m.running_requests_size == 12


PREVIOUS = EndpointMetrics(
    waiting_queue_size=7, running_requests_size=8, kv_cache_usage_percent=0.5, max_active_models=2,
    cache_block_size=16, cache_num_blocks=1000, update_time=1.0,
)  # fmt: skip


@pytest.mark.parametrize(
    ("page", "field", "problem"),
    [
        (vllm_page(waiting=-1), "waiting_queue_size", "queued requests: vllm:num_requests_waiting: value -1.0 is not"),
        (vllm_page(running=-3), "running_requests_size", "running requests: vllm:num_requests_running: value -3.0"),
        (vllm_page(kv_usage=-0.5), "kv_cache_usage_percent", "kv usage: vllm:kv_cache_usage_perc: value -0.5 is not"),
        (vllm_page(waiting=10**19), "waiting_queue_size", "queued requests: vllm:num_requests_waiting: value 1e+19"),
        (vllm_page(num_gpu_blocks=-1), "cache_num_blocks", "cache info: label num_gpu_blocks='-1' is not"),
        (vllm_page(block_size=-16), "cache_block_size", "cache info: label block_size='-16' is not"),
        (vllm_page(max_lora=-1, running_adapters="a"), "max_active_models", "lora info: label max_lora='-1' is not"),
        (vllm_page(block_size=10**310), "cache_block_size", "cache info: label block_size='1000"),
    ],
)
def test_negative_and_oversized_counts_are_errors_and_keep_the_previous_value(
    page: bytes, field: str, problem: str
) -> None:
    # A negative count or utilisation (or one past int64, the reference's type) is a broken exporter: it
    # must not reach the scorers and producers (a negative num_gpu_blocks made the approx prefix index's
    # LRU capacity negative, a KeyError on every request; a negative queue pushed load-aware-scorer past its
    # 0.5 cap and p2p-source-producer into 1 / (1 + q) = 1 / 0).
    m, err = mapping("vllm").extract(page, PREVIOUS, 2.0)
    assert err is not None and len(err.problems) == 1, err
    assert err.problems[0].startswith(problem), err.problems
    assert m is not None and m.update_time == 2.0  # the other fields were read
    assert getattr(m, field) == getattr(PREVIOUS, field)


@pytest.mark.parametrize(
    ("engine", "page", "field"),
    [
        ("sglang", b"sglang:num_queue_reqs 2\nsglang:page_size 1e308\n", "cache_block_size"),
        ("sglang", b"sglang:num_queue_reqs 2\nsglang:num_pages -1\n", "cache_num_blocks"),
        ("trtllm-serve", b"trtllm_num_requests_waiting 1\ntrtllm_kv_cache_tokens_per_block -64\n", "cache_block_size"),
    ],
)
def test_gauge_cache_geometry_must_be_a_count(engine: str, page: bytes, field: str) -> None:
    m, err = mapping(engine).extract(page, PREVIOUS, 2.0)
    assert err is not None and any("is not a count" in p for p in err.problems), err
    assert m is not None and getattr(m, field) == getattr(PREVIOUS, field)


VALUE_SPELLINGS = [b"NaN", b"Nan", b"+Inf", b"-Inf", b"+inf", b"-1", b"-0", b"0", b"3", b"1e308", b"-1e308", b"1e309",
                   b"1.5E2", b"0.25", b"4.9e-324", b"-5e-324", b"9223372036854775807", b"9.3e18"]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from(VALUE_SPELLINGS), st.floats().map(lambda v: repr(v).encode())), min_size=6, max_size=6
    ),
    st.lists(st.one_of(st.integers(), st.sampled_from(["-1", "1e3", " 7", "", "x"])).map(str), min_size=3, max_size=3),
)
def test_extracted_metrics_are_always_finite_counts_and_fractions(values: list[bytes], labels: list[str]) -> None:
    """Whatever numbers a page spells, EndpointMetrics only ever holds finite, non-negative values
    (counts within int64); anything else is an extraction error and the previous value stays."""
    q, r, kv, lora, size, blocks = values
    block_size, num_blocks, max_lora = (x.encode() for x in labels)
    vllm = (
        b"vllm:num_requests_waiting " + q + b"\nvllm:num_requests_running " + r + b"\nvllm:kv_cache_usage_perc " + kv
        + b'\nvllm:cache_config_info{block_size="' + block_size + b'",num_gpu_blocks="' + num_blocks + b'"} 1\n'
        + b'vllm:lora_requests_info{max_lora="' + max_lora + b'",running_lora_adapters="a"} ' + lora + b"\n"
    )  # fmt: skip
    sglang = b"sglang:num_queue_reqs " + q + b"\nsglang:page_size " + size + b"\nsglang:num_pages " + blocks + b"\n"
    for engine, page in (("vllm", vllm), ("sglang", sglang)):
        m, _err = mapping(engine).extract(page, PREVIOUS, 2.0)
        m = PREVIOUS if m is None else m  # nothing read: the endpoint keeps its metrics
        for count in (m.waiting_queue_size, m.running_requests_size, m.max_active_models, m.cache_block_size,
                      m.cache_num_blocks):  # fmt: skip
            assert isinstance(count, int) and 0 <= count <= 2**63 - 1, m
        assert 0.0 <= m.kv_cache_usage_percent < float("inf"), m


SGLANG = b"""# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen3-0.6B",tp_rank="0"} 2.0
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen3-0.6B",tp_rank="0"} 8.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen3-0.6B",tp_rank="0"} 0.125
# TYPE sglang:page_size gauge
sglang:page_size{model_name="Qwen/Qwen3-0.6B",tp_rank="0"} 1.0
# TYPE sglang:num_pages gauge
sglang:num_pages{model_name="Qwen/Qwen3-0.6B",tp_rank="0"} 200000.0
"""

TRTLLM_SERVE = b"""trtllm_num_requests_waiting 1
trtllm_num_requests_running 3
trtllm_kv_cache_utilization 0.5
trtllm_kv_cache_tokens_per_block 64
trtllm_kv_cache_max_blocks 1000
"""

TRITON_TRT = b"""# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="ensemble",request_type="context",version="1"} 9
nv_trt_llm_request_metrics{model="ensemble",request_type="scheduled",version="1"} 7
nv_trt_llm_request_metrics{model="ensemble",request_type="waiting",version="1"} 5
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble",version="1"} 4096
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="ensemble",version="1"} 0.75
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="ensemble",version="1"} 128
"""

TRITON = b"""nv_inference_pending_request_count{model="resnet",version="1"} 6
nv_inference_exec_count{model="resnet",version="1"} 11
"""


@pytest.mark.parametrize(
    ("engine", "page", "expected"),
    [
        ("sglang", SGLANG, (2, 8, 0.125, 1, 200000)),
        ("trtllm-serve", TRTLLM_SERVE, (1, 3, 0.5, 64, 1000)),
        ("triton-tensorrt-llm", TRITON_TRT, (5, 7, 0.75, 128, 4096)),
        ("triton", TRITON, (6, 11, 0.0, 0, 0)),
    ],
)
def test_other_engines(engine: str, page: bytes, expected: tuple[int, int, float, int, int]) -> None:
    m, err = mapping(engine).extract(page, NO_METRICS, 3.0)
    assert err is None
    assert m is not None
    got = (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent)
    assert (*got, m.cache_block_size, m.cache_num_blocks) == expected


# -- engine selection ---------------------------------------------------------------------
def endpoint(labels: dict[str, str]) -> Endpoint:
    return Endpoint(EndpointSpec(name="e", address="10.0.0.1", port=8000, labels=labels))


def test_engine_from_labels() -> None:
    assert EXTRACTOR.mapping_for({}).name == "vllm"
    assert EXTRACTOR.mapping_for({"llm-d.ai/engine-type": "sglang"}).name == "sglang"
    assert EXTRACTOR.mapping_for({"inference.networking.k8s.io/engine-type": "triton"}).name == "triton"
    # The primary key wins over the legacy one.
    both = {"llm-d.ai/engine-type": "sglang", "inference.networking.k8s.io/engine-type": "triton"}
    assert EXTRACTOR.mapping_for(both).name == "sglang"
    with pytest.raises(UnknownEngine, match="'mystery'"):
        EXTRACTOR.mapping_for({"llm-d.ai/engine-type": "mystery"})
    m, err = EXTRACTOR.extract(endpoint({"llm-d.ai/engine-type": "mystery"}), vllm_page(), 1.0)
    assert m is None and isinstance(err, UnknownEngine)
    m, err = EXTRACTOR.extract(endpoint({"llm-d.ai/engine-type": "sglang"}), SGLANG, 1.0)
    assert err is None and m is not None and m.waiting_queue_size == 2


def build(params: dict[str, object]) -> CoreMetricsExtractor:
    reg = PluginRegistry()
    reg._loaded_entry_points = True  # only the classes under test
    for cls in PLUGINS:
        reg.register(cls)
    plugin = reg.build("core-metrics-extractor", "ext", params)
    assert isinstance(plugin, CoreMetricsExtractor)
    return plugin


def test_engine_configs_add_and_replace() -> None:
    ext = build(
        {
            "engineLabelKey": "engine",
            "defaultEngine": "custom",
            "engineConfigs": [
                {
                    "name": "custom",
                    "queuedRequestsSpec": "custom_queue_size{status=waiting}",
                    "runningRequestsSpec": "custom_running",
                    "kvUsageSpec": "custom_kv",
                },
                {"name": "vllm", "queuedRequestsSpec": "vllm:num_requests_waiting"},
            ],
        }
    )
    page = (
        b'custom_queue_size{status="waiting"} 4\ncustom_queue_size{status="done"} 99\ncustom_running 2\ncustom_kv 0.5\n'
    )
    m, err = ext.extract(endpoint({}), page, 1.0)
    assert err is None and m is not None
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (4, 2, 0.5)
    # "vllm" was replaced entirely: only the queue is read now, nothing else is required.
    m, err = ext.extract(endpoint({"engine": "vllm"}), b"vllm:num_requests_waiting 8\n", 1.0)
    assert err is None and m is not None and m.waiting_queue_size == 8
    # Built-ins that were not overridden are still there.
    assert ext.mapping_for({"engine": "sglang"}).name == "sglang"


def test_custom_metrics_become_endpoint_attributes() -> None:
    """The reference's engineConfigs[].customMetrics: a missing required one is an extraction error (the
    last value stays, as for every other metric); a missing optional one is absent from that scrape."""
    ext = build({"engineConfigs": [{
        "name": "vllm", "queuedRequestsSpec": "vllm:num_requests_waiting",
        "customMetrics": [
            {"attributeKey": "custom.gold_queue", "metricSpec": "custom_queue_depth{tier=gold}"},
            {"attributeKey": "custom.spec_rate", "metricSpec": "spec_decode_rate", "optional": True},
        ]}]})  # fmt: skip
    assert ext.attribute_keys() == {"custom.gold_queue", "custom.spec_rate"}
    mapping = ext.mapping_for({})
    memo = mapping.new_memo()
    page = b'vllm:num_requests_waiting 1\ncustom_queue_depth{tier="gold"} 7\ncustom_queue_depth{tier="free"} 70\n'
    m, err = mapping.extract(page + b"spec_decode_rate 0.75\n", NO_METRICS, 1.0, memo)
    assert err is None and m is not None and m.attributes == {"custom.gold_queue": 7.0, "custom.spec_rate": 0.75}
    m2, err = mapping.extract(page.replace(b"} 7", b"} 9"), m, 2.0, memo)
    assert err is None and m2 is not None and m2.attributes == {"custom.gold_queue": 9.0}
    assert m.attributes == {"custom.gold_queue": 7.0, "custom.spec_rate": 0.75}  # the old scrape is unchanged
    m3, err = mapping.extract(b"vllm:num_requests_waiting 3\n", m2, 3.0, memo)
    assert err is not None and "custom metric custom.gold_queue" in str(err)
    assert m3 is not None and m3.waiting_queue_size == 3 and m3.attributes == {"custom.gold_queue": 9.0}
    _, err = mapping.extract(b'custom_queue_depth{tier="gold"} NaN\nvllm:num_requests_waiting 3\n', m3, 4.0, memo)
    assert err is not None and "custom metric custom.gold_queue" in str(err)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"defaultEngine": "nope"}, "defaultEngine: 'nope' is not a configured engine"),
        ({"engineConfigs": [{"name": ""}]}, r"engineConfigs\[0\].name: must not be empty"),
        ({"engineConfigs": [{"name": "a"}, {"name": "a"}]}, r"engineConfigs\[1\].name: engine 'a' configured twice"),
        ({"engineConfigs": [{"name": "a", "kvUsageSpec": "x{y!=z}"}]}, "engine 'a': kv_usage: .*only `=`"),
        ({"engineConfigs": [{"name": "a", "bogus": 1}]}, "bogus"),
        (
            {"engineConfigs": [{"name": "a", "customMetrics": [{"attributeKey": "k"}]}]},
            r"engineConfigs\[0\].customMetrics\[0\]: attributeKey and metricSpec are required",
        ),
        (
            {"engineConfigs": [{"name": "a", "customMetrics": [{"attributeKey": "k", "metricSpec": "m"}] * 2}]},
            r"customMetrics\[1\].attributeKey: 'k' used twice",
        ),
        (
            {"engineConfigs": [{"name": "a", "customMetrics": [{"attributeKey": "k", "metricSpec": "m{x!=1}"}]}]},
            r"engine 'a': customMetrics\[0\].metricSpec: .*only `=`",
        ),
        ({"unknownField": 1}, "unknownField"),
    ],
)
def test_config_errors(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(params)


# -- memo (per-endpoint lookup state) ------------------------------------------------------
def test_memo_follows_layout_changes_and_metrics_coming_back() -> None:
    m = mapping("vllm")
    memo = m.new_memo()
    pages = [
        vllm_page(waiting=1, running_adapters="a"),
        vllm_page(waiting=22, model="x" * 500, running_adapters="a,b"),  # every offset moves
        vllm_page(waiting=333, model="y", running_adapters="c", http_repeat=3),
        vllm_page(waiting=4444, running_adapters="d"),
    ]
    for page in pages:
        assert m.extract(page, NO_METRICS, 1.0, memo) == m.extract(page, NO_METRICS, 1.0)
    # A family that went missing is looked for again after ABSENT_RECHECK pages.
    gone = vllm_page(running_adapters=None)
    back = vllm_page(running_adapters="z")
    m.extract(gone, NO_METRICS, 1.0, memo)
    seen = []
    for _ in range(ABSENT_RECHECK + 1):
        got, _err = m.extract(back, NO_METRICS, 1.0, memo)
        assert got is not None
        seen.append(got.active_models)
    assert seen[0] == frozenset()
    assert seen[-1] == {"z"}


def test_memo_recovers_at_once_after_a_garbage_page() -> None:
    m = mapping("vllm")
    memo = m.new_memo()
    assert m.extract(vllm_page(waiting=1), NO_METRICS, 1.0, memo)[1] is None
    got, err = m.extract(b"<html>502</html>", NO_METRICS, 1.0, memo)
    assert got is None and err is not None
    got, err = m.extract(vllm_page(waiting=5), NO_METRICS, 2.0, memo)
    assert err is None and got is not None
    assert (got.waiting_queue_size, got.cache_num_blocks, got.update_time) == (5, 74272, 2.0)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.integers(0, 10**6),
            st.floats(0, 1),
            st.sampled_from([None, "", "a", "a,b"]),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_memo_never_changes_results(seq: list[tuple[int, int, float, str | None, int]]) -> None:
    m = mapping("vllm")
    memo = m.new_memo()
    lora_went_missing = False
    for waiting, running, kv, lora, rep in seq:
        page = vllm_page(waiting=waiting, running=running, kv_usage=kv, running_adapters=lora, http_repeat=rep)
        with_memo, err1 = m.extract(page, NO_METRICS, 1.0, memo)
        without, err2 = m.extract(page, NO_METRICS, 1.0)
        assert err1 is None and err2 is None
        assert with_memo is not None and without is not None
        if lora_went_missing:  # a vanished family is re-searched only every ABSENT_RECHECK pages
            with_memo = replace(
                with_memo,
                active_models=without.active_models,
                waiting_models=without.waiting_models,
                max_active_models=without.max_active_models,
            )
        assert with_memo == without
        lora_went_missing |= lora is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(list(EXTRACTOR.mappings)))
def test_extract_never_raises(data: bytes, engine: str) -> None:
    m = mapping(engine)
    memo = m.new_memo()
    names = [s.name.encode() for s in m.selectors if s is not None]
    for page in (data, b"\n".join(n + data for n in names), vllm_page()[:200] + data):
        metrics, err = m.extract(page, NO_METRICS, 1.0, memo)
        assert metrics is None or isinstance(metrics, EndpointMetrics)
        assert metrics is not None or err is not None


def test_specs_dataclass_defaults() -> None:
    spec = EngineSpecs(name="x", queued_requests="q")
    m = EngineMapping(spec)
    got, err = m.extract(b"q 3\n", NO_METRICS, 1.0)
    assert err is None and got is not None and got.waiting_queue_size == 3
