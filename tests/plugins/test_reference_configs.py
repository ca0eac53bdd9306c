"""The reference's own EndpointPickerConfig YAMLs load here unchanged, and parameters behave as the
reference's factories treat them.

`reference_configs/*.yaml` are real configs copied verbatim (each cites its source repository, path and
commit): llm-d-router's deploy/config samples and perf-test router configs, its Helm chart presets, the
llm-d guides' router values and the Gateway API Inference Extension chart default. Configs the
reference itself would reject at the audited snapshot (fields its strict decoder does not know, plugins
added after it) are not in the set.

Parameter handling follows the reference's factories: unknown fields are errors (the loader's strict
JSON decoder), but several numeric parameters the reference does not reject, it replaces with the
default (a warning here), so a config carrying e.g. `maxNumOfEndpoints: 0` loads in both.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import pytest
from helpers import endpoint, request

from llmepp.config.loader import build, load_config, rebuild_scheduling
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import ENCODER_CACHE_MATCH_INFO, EncoderCacheMatchInfo, scoped
from llmepp.framework.plugin import ConfigError, PluginContext, registry
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.producers.token import TokenProducer, VllmTokenProducer
from llmepp.plugins.scorers.prefix_cache import PrefixCacheScorer

CONFIGS = Path(__file__).parent / "reference_configs"
PATHS = sorted(CONFIGS.glob("*.yaml"))


def test_the_reference_config_set_is_there() -> None:
    assert len(PATHS) >= 25
    for path in PATHS:
        assert path.read_text().startswith("# Source: "), f"{path.name}: cite where it comes from"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_a_reference_config_loads_unchanged(path: Path) -> None:
    components = build(load_config(path.read_text()), datastore=Datastore())
    assert components.pipeline.scheduler.profiles


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_a_reference_config_reloads_against_the_same_metrics_registry(path: Path) -> None:
    # A config reload rebuilds the scheduling plugins on the running EPP's registry: a plugin that registers
    # its series on every build fails there ("Duplicated timeseries", as the P/D handlers did).
    metrics, datastore = EppMetrics(), Datastore()
    running = build(load_config(path.read_text()), datastore=datastore, metrics=metrics)
    reloaded = rebuild_scheduling(running, load_config(path.read_text()), datastore=datastore, metrics=metrics)
    assert reloaded.pipeline.scheduler.profiles.keys() == running.pipeline.scheduler.profiles.keys()


# -- unknown parameters -----------------------------------------------------------------------------
def test_unknown_parameters_fail_naming_the_field_as_the_reference_strict_decoder_does() -> None:
    with pytest.raises(ConfigError, match="unknown field `treshold`") as err:
        build(load_config("plugins:\n- {type: load-aware-scorer, parameters: {treshold: 64}}\n"))
    assert "plugin 'load-aware-scorer' (type load-aware-scorer)" in str(err.value)
    with pytest.raises(ConfigError, match="unknown field `schedulingProfile`"):
        load_config("plugins: []\nschedulingProfile: []\n")  # the document itself is strict too


def test_parameter_names_match_ignoring_case_as_go_json_does(caplog: pytest.LogCaptureFixture) -> None:
    """The reference decodes `parameters` with encoding/json: an exact name first, else one equal
    ignoring case. Mapping keys (label values here) are data, kept as written."""
    with caplog.at_level(logging.WARNING):
        picker = registry.build("max-score-picker", "m", {"MaxNumOfEndpoints": 3})
        selector = registry.build(
            "label-selector-filter",
            "l",
            {"MatchLabels": {"App": "vllm"}, "matchexpressions": [{"KEY": "role", "Operator": "In", "values": ["a"]}]},
        )
    assert picker.max_num_of_endpoints == 3  # type: ignore[attr-defined]
    assert selector.params.match_labels == {"App": "vllm"}
    assert selector.params.match_expressions[0].key == "role"
    assert "parameters.MaxNumOfEndpoints read as maxNumOfEndpoints" in caplog.text
    assert "parameters.matchExpressions[0].KEY read as key" in caplog.text
    with pytest.raises(ConfigError, match="unknown field `maxNumEndpoints`"):
        registry.build("max-score-picker", "m", {"maxNumEndpoints": 3})


def test_a_plugin_without_parameters_ignores_a_parameters_block(caplog: pytest.LogCaptureFixture) -> None:
    """The reference's factories for parameterless plugins never read their decoder (`_ *json.Decoder`):
    a block is accepted and ignored; here with a warning. soft-reflective-ceiling-policy rejects one."""
    with caplog.at_level(logging.WARNING):
        c = build(load_config("plugins:\n- {type: queue-scorer, parameters: {weight: 2}}\n"))
    assert c.plugins["queue-scorer"].type == "queue-scorer"
    assert "takes no parameters; ignoring ['weight']" in caplog.text
    with pytest.raises(ConfigError, match="unknown field `x`"):
        registry.build("soft-reflective-ceiling-policy", "s", {"x": 1})


# -- endpoint-attribute-*: a data key scoped by its producer ("GPUUtilization/dcgm-extractor") -----------
def test_the_gpu_sample_reads_the_dcgm_extractors_attribute_by_its_scoped_key() -> None:
    """deploy/config/sim-epp-gpu-config.yaml names the attribute as the reference's data-layer key,
    `<attribute>/<extractor name>`; it resolves to the named extractor's attribute."""
    components = build(load_config((CONFIGS / "sim-epp-gpu-config.yaml").read_text()), datastore=Datastore())
    extractor = components.plugins["dcgm-extractor"]
    key = extractor.attribute_key("GPUUtilization")  # type: ignore[attr-defined]
    eps = [endpoint(i) for i in range(3)]
    for ep, util in zip(eps, [0.2, 0.95, 0.5]):
        ep.attributes[key] = util
    req = request()
    assert [ep.name for ep in components.plugins["gpu-utilization-filter"].filter(req, eps)] == ["pod-0", "pod-2"]  # type: ignore[attr-defined]
    # fixedRange [0, 1], lower is better: 1 − value.
    assert components.plugins["gpu-utilization-scorer"].score(req, eps) == pytest.approx([0.8, 0.05, 0.5])  # type: ignore[attr-defined]
    # An extractor may write an int (a plugin author's): 1 is a number (filtered out, score 0); a bool or a
    # string is none (missing: passes the filter, as an endpoint without the attribute).
    for ep, value in zip(eps, [1, True, "0.1"]):
        ep.attributes[key] = value
    assert components.plugins["gpu-utilization-scorer"].score(req, eps)[0] == pytest.approx(0.0)  # type: ignore[attr-defined]
    assert [ep.name for ep in components.plugins["gpu-utilization-filter"].filter(req, eps)] == ["pod-1", "pod-2"]  # type: ignore[attr-defined]


def test_a_scoped_attribute_may_name_the_extractors_type() -> None:
    """The reference's dcgm-extractor keys GPUUtilization by its type whatever the instance is called."""
    text = (CONFIGS / "sim-epp-gpu-config.yaml").read_text().replace("name: dcgm-extractor", "name: gpu-metrics")
    text = text.replace("- pluginRef: dcgm-extractor", "- pluginRef: gpu-metrics")
    components = build(load_config(text), datastore=Datastore())
    key = components.plugins["gpu-metrics"].attribute_key("GPUUtilization")  # type: ignore[attr-defined]
    eps = [endpoint(0), endpoint(1)]
    eps[0].attributes[key], eps[1].attributes[key] = 0.95, 0.1
    assert components.plugins["gpu-utilization-filter"].filter(request(), eps) == [eps[1]]  # type: ignore[attr-defined]


def test_a_scoped_attribute_naming_no_plugin_is_still_an_error() -> None:
    text = (
        "plugins:\n- type: endpoint-attribute-filter\n  parameters: {attribute: GPUUtilization/nope, "
        "algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}\n"
    )
    with pytest.raises(ConfigError, match="GPUUtilization/nope"):
        build(load_config(text))


# -- token-producer: the reference's backend selection and parameters ---------------------------------
def test_model_name_alone_selects_the_vllm_render_backend() -> None:
    """The reference: `vllm := config.VLLM != nil || config.ModelName != ""`; its default URL."""
    plugin = registry.build("token-producer", "t", {"modelName": "Qwen/Qwen3-8B"})
    assert isinstance(plugin, VllmTokenProducer)
    assert plugin.base_url == "http://localhost:8000" and plugin.model == "Qwen/Qwen3-8B"
    assert type(registry.build("token-producer", "t", None)) is TokenProducer  # zero-config: estimate


def test_the_estimate_block_selects_the_estimate_backend() -> None:
    params = {
        "estimate": {
            "image": {"mode": "static", "defaultResolution": {"width": 1280, "height": 720},
                      "static": {"staticToken": 256}, "dynamic": {"factor": 1024}},
            "video": {"defaultResolution": {"width": 640, "height": 360}, "defaultDuration": 10,
                      "tokensPerFrame": {"mode": "dynamic", "dynamic": {"factor": 1024}},
                      "frames": {"mode": "sampled", "minFrames": 4, "maxFrames": 64,
                                 "sampled": {"sampleFPS": 2, "temporalPatchSize": 2},
                                 "strided": {"defaultSourceFPS": 24, "frameStride": 1}},
                      "maxVideoTokens": 16384},
        }
    }  # fmt: skip
    assert type(registry.build("token-producer", "t", params)) is TokenProducer


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"estimate": {"image": {"mode": "fixed"}}}, "estimate.image.mode must be"),
        ({"estimate": {"video": {"tokensPerFrame": {"mode": "x"}}}}, "estimate.video.tokensPerFrame.mode must be"),
        ({"estimate": {"video": {"frames": {"mode": "x"}}}}, "estimate.video.frames.mode must be"),
        ({"estimate": {"image": {"size": 3}}}, "unknown field `size`"),
        ({"estimate": {}, "modelName": "m"}, "only one of 'estimate', 'vllm', or 'udsTokenizerConfig'"),
        ({"estimate": {}, "vllm": {}}, "only one of 'estimate', 'vllm', or 'udsTokenizerConfig'"),
        (
            {"modelName": "m", "udsTokenizerConfig": {"socketFile": "/tmp/t.sock"}, "vllm": {}},
            "only one of 'estimate', 'vllm', or 'udsTokenizerConfig'",
        ),
        ({"modelName": "m", "udsTokenizerConfig": {"socketFile": "/tmp/t.sock"}}, "udsTokenizerConfig"),
    ],
)
def test_token_producer_parameter_errors_name_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        registry.build("token-producer", "tok", params)
    assert "plugin 'tok' (type token-producer)" in str(err.value)


# -- values the reference replaces with its default instead of rejecting -------------------------------
@pytest.mark.parametrize(
    ("type_", "params", "attr", "expected"),
    [
        ("load-aware-scorer", {"threshold": 0}, "threshold", 128),
        ("load-aware-scorer", {"threshold": -3}, "threshold", 128),
        ("token-load-scorer", {"queueThresholdTokens": 0}, "threshold", 4194304),
        ("active-request-scorer", {"idleThreshold": -1}, "idle", 0),
        ("active-request-scorer", {"maxBusyScore": 1.5}, "max_busy", 1.0),
        ("no-hit-lru-scorer", {"lruSize": 0}, "lru_size", 1024),
        ("max-score-picker", {"maxNumOfEndpoints": 0}, "max_num_of_endpoints", 1),
        ("random-picker", {"maxNumOfEndpoints": -2}, "max_num_of_endpoints", 1),
        ("weighted-random-picker", {"maxNumOfEndpoints": 0}, "max_num_of_endpoints", 1),
        ("mm-embeddings-cache-producer", {"cacheSizeInMBPerServer": 0}, "capacity", 2048),
        ("mm-embeddings-cache-producer", {"cacheSizeInMBPerServer": 1}, "capacity", 1),
        ("approx-prefix-cache-producer", {"lruCapacityPerServer": 0}, "lru_capacity", 31250),
    ],
)
def test_values_the_reference_defaults_load_with_a_warning(
    type_: str, params: dict[str, Any], attr: str, expected: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        plugin = registry.build(type_, "p", params)
    value = plugin.index.default_capacity if attr == "lru_capacity" else getattr(plugin, attr)  # type: ignore[attr-defined]
    assert value == expected
    if params != {"cacheSizeInMBPerServer": 1}:  # 1 MiB is a valid (one-entry) budget
        field = next(iter(params))
        assert any(field in r.getMessage() and type_ in r.getMessage() for r in caplog.records), caplog.text


def test_approx_prefix_block_size_rules_follow_the_reference(caplog: pytest.LogCaptureFixture) -> None:
    # blockSizeTokens <= 0 is an error only without autoTune (with it, the endpoint's size or the floor).
    plugin = registry.build("approx-prefix-cache-producer", "a", {"blockSizeTokens": 0})
    assert plugin.block_tokens([endpoint(0)]) == 64  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="blockSizeTokens must be > 0 when autoTune is false"):
        registry.build("approx-prefix-cache-producer", "a", {"blockSizeTokens": 0, "autoTune": False})
    # The deprecated `blockSize` maps onto blockSizeTokens when that is left at its default.
    with caplog.at_level(logging.WARNING):
        legacy = registry.build("approx-prefix-cache-producer", "a", {"blockSize": 128, "autoTune": False})
    assert legacy.params.block_size_tokens == 128
    assert "blockSize" in caplog.text and "deprecated" in caplog.text
    both = registry.build("approx-prefix-cache-producer", "a", {"blockSize": 128, "blockSizeTokens": 256})
    assert both.params.block_size_tokens == 256


def test_approx_prefix_floor_is_a_parameter() -> None:
    # minBlockSizeTokens (ours) replaces the reference's fixed floor of 64; it bounds autoTune's size too.
    fine = registry.build("approx-prefix-cache-producer", "a",
                          {"autoTune": False, "blockSizeTokens": 6, "minBlockSizeTokens": 6})  # fmt: skip
    assert fine.block_tokens([endpoint(0)]) == 6  # type: ignore[attr-defined]
    floored = registry.build("approx-prefix-cache-producer", "a", {"autoTune": False, "blockSizeTokens": 6})
    assert floored.block_tokens([endpoint(0)]) == 64  # type: ignore[attr-defined]
    tuned = registry.build("approx-prefix-cache-producer", "a", {"blockSizeTokens": 0, "minBlockSizeTokens": 8})
    assert tuned.block_tokens([endpoint(0)]) == 8  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="minBlockSizeTokens must be >= 1, got 0"):
        registry.build("approx-prefix-cache-producer", "a", {"minBlockSizeTokens": 0})


def test_prefix_scale_tokens_is_checked_only_when_match_length_counts() -> None:
    registry.build("prefix-cache-scorer", "p", {"matchLengthScaleTokens": 0})  # weight 0: unused, accepted
    with pytest.raises(ConfigError, match="matchLengthScaleTokens must be > 0"):
        registry.build("prefix-cache-scorer", "p", {"matchLengthWeight": 0.5, "matchLengthScaleTokens": 0})
    with pytest.raises(ConfigError, match="matchLengthWeight must be within"):
        registry.build("prefix-cache-scorer", "p", {"matchLengthWeight": 1.5})


# -- formulas, hand-computed (where no other test pins them) -----------------------------------------
def _mm_scorer(*eps: Endpoint) -> tuple[Any, str]:
    producer = registry.build("mm-embeddings-cache-producer", "mm", None)
    scorer = registry.build("mm-embeddings-cache-scorer", "mms", None)
    scorer.setup(PluginContext({"mm": producer, "mms": scorer}, None, None, None))
    return scorer, scoped(ENCODER_CACHE_MATCH_INFO, "mm")


def test_mm_embeddings_score_is_the_matched_share_of_the_requests_items() -> None:
    """Reference: Σ size(matched items) / Σ size(request items), every item of size 1."""
    eps = [endpoint(i) for i in range(3)]
    scorer, key = _mm_scorer(*eps)
    req = request()
    req.data[key] = EncoderCacheMatchInfo(total=4, matched={eps[0]: 3, eps[1]: 1})
    assert scorer.score(req, eps) == pytest.approx([0.75, 0.25, 0.0])
    text_only = request()
    assert scorer.score(text_only, eps) == [0.0, 0.0, 0.0]


def test_prefix_score_with_the_default_scale() -> None:
    """score = w·min(1, matchBlocks·blockSize/8192)² + (1−w)·matchBlocks/totalBlocks, w = 0.25:
    64 of 200 blocks of 64 tokens = 4096 tokens → 0.25·0.25 + 0.75·0.32 = 0.3025;
    150 of 200 → 0.25·1 + 0.75·0.75 = 0.8125."""
    from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo

    approx = registry.build("approx-prefix-cache-producer", "approx", None)
    scorer = registry.build("prefix-cache-scorer", "prefix", {"matchLengthWeight": 0.25})
    assert isinstance(scorer, PrefixCacheScorer)
    scorer.setup(PluginContext({"approx": approx, "prefix": scorer}, None, None, None))
    eps = [endpoint(0), endpoint(1)]
    req = request()
    req.data[scoped(PREFIX_CACHE_MATCH_INFO, "approx")] = PrefixMatchInfo(
        block_size=64, total_blocks=200, hits={eps[0]: 64, eps[1]: 150}, hashes=list(range(200))
    )
    assert scorer.score(req, eps) == pytest.approx([0.3025, 0.8125])


async def test_the_optimized_baseline_total_is_the_weighted_sum() -> None:
    """Σ weight·score with the facts' optimized-baseline weights (queue 2, kv 2, prefix 3, no-hit-lru 2)
    on a cold request over 3 endpoints:
        queue [0, 5, 10] → [1, .5, 0]; kv [.2, .5, .9] → [.8, .5, .1]; prefix 0;
        no-hit-lru (cold, none used yet) → 1 − rank/(N−1) = [1, .5, 0]
        totals = [2+1.6+0+2, 1+1+0+1, 0+.2+0+0] = [5.6, 3.0, 0.2]"""
    components = build(load_config((CONFIGS / "optimized-baseline-facts.yaml").read_text()))
    eps = [endpoint(0, queue=0, kv=0.2), endpoint(1, queue=5, kv=0.5), endpoint(2, queue=10, kv=0.9)]
    req = request(b"a cold prompt " * 40)
    for producer in components.pipeline.producers:
        result = producer.produce(req, eps)
        if inspect.isawaitable(result):
            await result
    profile = components.pipeline.scheduler.profiles["default"]
    outcome = profile.run(req, eps)
    assert list(outcome.totals) == pytest.approx([5.6, 3.0, 0.2])
    assert outcome.targets == [eps[0]]
