"""Config loading: the reference's schema, defaults, and errors that name plugin and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmepp.config.loader import build, load_config, parse_feature_gates
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.framework.plugin import ConfigError
from llmepp.framework.scheduling import Scorer
from llmepp.plugins.filters.load_balance import LoadBalanceFilter
from llmepp.plugins.pickers.max_score import MaxScorePicker
from llmepp.plugins.profile_handlers.single import SingleProfileHandler


def built(text: str):  # type: ignore[no-untyped-def]
    return build(load_config(text))


def test_default_config_is_the_escape_hatch_then_the_optimized_baseline_scorers_with_prefix_weight_6() -> None:
    c = built(DEFAULT_CONFIG)
    profile = c.pipeline.scheduler.profiles["default"]
    assert [f.type for f in profile.filters] == ["load-balance-filter"]
    (hatch,) = profile.filters
    assert isinstance(hatch, LoadBalanceFilter) and (hatch.abs, hatch.rel) == (32, 1.5)
    assert [(w.scorer.type, w.weight) for w in profile.scorers] == [
        ("queue-scorer", 2.0),
        ("kv-cache-utilization-scorer", 2.0),
        ("prefix-cache-scorer", 6.0),
        ("no-hit-lru-scorer", 2.0),
    ]
    assert isinstance(profile.picker, MaxScorePicker)
    assert isinstance(c.pipeline.scheduler.handler, SingleProfileHandler)
    # The producers the plugins read are auto-created, in dependency order (the filter, and no-hit-lru for its
    # last-holder backlog gate, read in-flight load).
    assert [p.type for p in c.pipeline.producers] == [
        "token-producer",
        "inflight-load-producer",
        "approx-prefix-cache-producer",
    ]


OPTIMIZED_BASELINE_PREFIX = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: approx-prefix-cache-producer
  parameters:
    maxPrefixTokensToMatch: 100000
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""


def test_reference_style_config_with_explicit_producer_parameters() -> None:
    c = built(OPTIMIZED_BASELINE_PREFIX)
    producer = c.plugins["approx-prefix-cache-producer"]
    assert producer.params.max_prefix_tokens_to_match == 100000
    assert producer.params.lru_capacity_per_server == 31250  # default kept


def test_old_api_version_still_loads() -> None:
    c = built(DEFAULT_CONFIG.replace("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1"))
    assert "queue-scorer" in c.plugins


def test_no_profiles_gives_default_profile_with_every_scorer() -> None:
    c = built("plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n")
    profile = c.pipeline.scheduler.profiles["default"]
    assert sorted(w.scorer.type for w in profile.scorers) == ["kv-cache-utilization-scorer", "queue-scorer"]
    assert all(w.weight == 1.0 for w in profile.scorers)


def test_named_instances_of_one_type() -> None:
    c = built(
        "plugins:\n- {type: queue-scorer, name: q1}\n- {type: queue-scorer, name: q2}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: q1, weight: 1}, {pluginRef: q2, weight: 4}]\n"
    )
    weights = {w.scorer.name: w.weight for w in c.pipeline.scheduler.profiles["p"].scorers}
    assert weights == {"q1": 1.0, "q2": 4.0}
    assert all(isinstance(w.scorer, Scorer) for w in c.pipeline.scheduler.profiles["p"].scorers)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "plugins:\n- type: no-such-plugin\n",
            "plugin 'no-such-plugin' (type no-such-plugin): unknown plugin type",
        ),
        (
            "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {lruCapacityPerServer: lots}\n",
            "plugin 'approx-prefix-cache-producer' (type approx-prefix-cache-producer): parameters: Expected `int`, "
            "got `str` - at `parameters.lruCapacityPerServer`",
        ),
        (
            "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {lruCapacity: 5}\n",
            "unknown field `lruCapacity`",
        ),
        (  # lruCapacityPerServer 0 / maxNumOfEndpoints 0 mean the default there, as in the reference
            "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 0, autoTune: false}\n",
            "(type approx-prefix-cache-producer): parameters: blockSizeTokens must be > 0 when autoTune is false",
        ),
        (
            "plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: two}\n",
            "Expected `int`, got `str` - at `parameters.maxNumOfEndpoints`",
        ),
        (
            "plugins:\n- type: queue-scorer\n- type: queue-scorer\n",
            "plugins[1]: duplicate plugin name 'queue-scorer'",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: d\n  plugins: [{pluginRef: nope}]\n",
            "schedulingProfiles['d']: pluginRef 'nope': no plugin with that name",
        ),
        (
            "plugins:\n- type: max-score-picker\n- type: random-picker\nschedulingProfiles:\n- name: d\n  plugins: "
            "[{pluginRef: max-score-picker}, {pluginRef: random-picker}]\n",
            "more than one picker",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- {name: a, plugins: [{pluginRef: queue-scorer}]}\n"
            "- {name: b, plugins: [{pluginRef: queue-scorer}]}\n",
            "2 profiles need a profile handler",
        ),
        (
            "plugins:\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: missing}\n",
            "plugin 'prefix-cache-scorer' (type prefix-cache-scorer): prefixMatchInfoProducerName: no plugin named "
            "'missing'",
        ),
        (
            "plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: "
            "{prefixMatchInfoProducerName: queue-scorer}\n",
            "does not produce PrefixCacheMatchInfo",
        ),
        ("apiVersion: v9\n", "apiVersion: unsupported 'v9'"),
        ("kind: Pod\n", "kind: expected 'EndpointPickerConfig'"),
        ("plugins: [\n", "config is not valid YAML"),
        ("- 1\n- 2\n", "config must be a mapping"),
        ("plugin: []\n", "unknown field `plugin`"),
        ("plugins:\n- name: x\n", "missing required field `type`"),
        ("featureGates: [flowControl=maybe]\n", "featureGates[0]: 'flowControl=maybe'"),
        ("featureGates: [flowControl=]\n", "featureGates[0]: 'flowControl=': value must be true or false"),
        # A misspelled gate is refused as the reference refuses it ("unknown or unregistered"), not run without
        # the feature the operator asked for.
        ("featureGates: [flowcontrol]\n", "featureGates[0]: 'flowcontrol': unknown feature gate; known: "),
        # Only comments, blank lines or `---`: not a config without plugins (random routing), an error. Zero
        # bytes is the default config (app.config_text).
        ("\n", "config: the document is empty"),
        ("# plugins:\n# - type: queue-scorer\n", "config: the document is empty"),
        ("---\n", "config: the document is empty"),
        # `---`, a comment block, `---`, the config: the config is the (ignored) second document.
        ("---\n# header\n---\nplugins: []\n", "config: the first YAML document is empty and only the first is read"),
        (
            "schedulingProfiles:\n- name: default\n- name: other\n- name: default\n",
            "schedulingProfiles: profile names must be unique; 'default' is given twice",
        ),
        (
            "plugins:\n- type: no-hit-lru-scorer\n  parameters: {lruSize: 99999999999999999999999}\n",
            "plugin 'no-hit-lru-scorer' (type no-hit-lru-scorer): parameters.lruSize: 99999999999999999999999 is "
            "out of range",  # the plugin named once
        ),
    ],
)
def test_config_errors_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        built(text)
    assert expected in str(err.value)


PROFILE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: %s
"""


@pytest.mark.parametrize(
    ("refs", "warning"),
    [
        ("[]", "schedulingProfiles['default']: lists no plugins: every endpoint ties and the pick is random"),
        (
            "[{pluginRef: queue-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 3}]",
            "schedulingProfiles['default']: pluginRef 'queue-scorer' is listed more than once",
        ),
        (
            "[{pluginRef: queue-scorer}, {pluginRef: max-score-picker, weight: 5}]",
            "schedulingProfiles['default']: pluginRef 'max-score-picker' (type max-score-picker) is not a scorer; "
            "its weight is ignored",
        ),
    ],
)
def test_likely_typos_in_a_profile_are_warned_of(refs: str, warning: str, caplog: pytest.LogCaptureFixture) -> None:
    built(PROFILE % refs)  # loads, as before
    assert warning in [r.getMessage() for r in caplog.records]


def test_a_plain_profile_warns_of_nothing(caplog: pytest.LogCaptureFixture) -> None:
    built(PROFILE % "[{pluginRef: queue-scorer, weight: 2}, {pluginRef: max-score-picker}]")
    assert not [r for r in caplog.records if r.name == "llmepp.config.loader"]


def test_feature_gates() -> None:
    gates = parse_feature_gates(["flowControl", "haPopulateNonLeaderDatastore=false"])
    assert gates["flowControl"] is True
    assert gates["haPopulateNonLeaderDatastore"] is False
    assert parse_feature_gates([])["flowControl"] is False
    # Values read as Go's strconv.ParseBool reads them, as the reference does.
    for value, on in [("1", True), ("t", True), ("T", True), ("TRUE", True), ("0", False), ("F", False)]:
        assert parse_feature_gates([f"flowControl={value}"])["flowControl"] is on


def test_a_profile_without_a_picker_gets_the_configured_one() -> None:
    # As the reference's ensureSchedulingLayer: the configured picker, with its parameters; max-score-picker
    # is made only when the config has no picker.
    c = built(
        "plugins:\n- type: queue-scorer\n- {type: max-score-picker, name: top3, parameters: {maxNumOfEndpoints: 3}}\n"
        "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: queue-scorer}]\n"
    )
    assert c.pipeline.scheduler.profiles["default"].picker is c.plugins["top3"]
    assert "max-score-picker" not in c.plugins
    c = built("plugins:\n- type: queue-scorer\n- type: random-picker\n")
    assert c.pipeline.scheduler.profiles["default"].picker is c.plugins["random-picker"]


def test_a_negative_weight_is_used_as_given() -> None:
    # The reference's weighted scorer has no range check: a negative weight is a penalty.
    c = built(
        "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n"
        "schedulingProfiles:\n- name: default\n  plugins:\n  - {pluginRef: queue-scorer}\n"
        "  - {pluginRef: kv-cache-utilization-scorer, weight: -0.5}\n"
    )
    assert [w.weight for w in c.pipeline.scheduler.profiles["default"].scorers] == [1.0, -0.5]


@pytest.mark.parametrize("weight", ["1e308", "-1e16"])
def test_a_weight_so_large_the_totals_overflow_is_refused(weight: str) -> None:
    # Was accepted: two scorers at 1e308 made a profile's totals inf, and the pick random.
    with pytest.raises(ConfigError) as refused:
        built(
            "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n"
            "schedulingProfiles:\n- name: default\n  plugins:\n  - {pluginRef: queue-scorer}\n"
            f"  - {{pluginRef: kv-cache-utilization-scorer, weight: {weight}}}\n"
        )
    assert "pluginRef 'kv-cache-utilization-scorer': weight" in str(refused.value)
    assert "out of range (at most 1e+15 either way)" in str(refused.value)


PARSERS = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: openai-parser
- {type: passthrough-parser, name: raw}
requestHandler:
  parsers: [{pluginRef: openai-parser}, {pluginRef: raw}]
"""


def test_request_handler_parsers_are_the_configured_list() -> None:
    from llmepp.errors import BadRequest
    from llmepp.request.parsers import default_parsers

    assert built(DEFAULT_CONFIG).parsers is default_parsers()
    parsers = built(PARSERS).parsers
    assert [p.name for p in parsers.parsers] == ["openai-parser", "raw"]
    found, _ = parsers.match("/v1/messages")  # no anthropic-parser listed: the fallback reads it raw
    assert found is not None and found.name == "raw"
    only_openai = built(PARSERS.replace(", {pluginRef: raw}", "")).parsers
    with pytest.raises(BadRequest, match="no request parser claims the path '/v1/messages'"):
        only_openai.parse({":path": "/v1/messages"}, b"{}", request_id="r")
    deprecated = built(
        PARSERS.replace(
            "requestHandler:\n  parsers: [{pluginRef: openai-parser}, {pluginRef: raw}]", "parser: {pluginRef: raw}"
        )
    )
    assert [p.name for p in deprecated.parsers.parsers] == ["raw"]
    # Both set: the new field is used, as in the reference. Before, the deprecated parser went first (and a
    # passthrough one there claimed every path).
    both = built(PARSERS + "parser: {pluginRef: raw}\n")
    assert [p.name for p in both.parsers.parsers] == ["openai-parser", "raw"]
    only_new = built(PARSERS.replace(", {pluginRef: raw}", "") + "parser: {pluginRef: raw}\n")
    assert [p.name for p in only_new.parsers.parsers] == ["openai-parser"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("{pluginRef: raw}", "requestHandler.parsers[1].pluginRef: no plugin named 'nope'"),
        (
            "{pluginRef: openai-parser}",
            "requestHandler.parsers[0].pluginRef: plugin 'queue-scorer' (type queue-scorer) is not a parser",
        ),
    ],
)
def test_request_handler_errors_name_the_field(change: str, message: str) -> None:
    replacement = "{pluginRef: nope}" if "nope" in message else "{pluginRef: queue-scorer}"
    with pytest.raises(ConfigError) as err:
        built(PARSERS.replace(change, replacement))
    assert message in str(err.value)


METRICS_SOURCE = """
plugins:
- type: queue-scorer
- type: metrics-data-source
- type: core-metrics-extractor
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The default picker's name taken by a plugin that is no picker (was an AssertionError).
        (
            "plugins:\n- {type: queue-scorer, name: max-score-picker}\n",
            "plugin 'max-score-picker' (type queue-scorer): is not a picker; profile 'default' has no picker and "
            "the name is needed for the default one",
        ),
        # YAML's .nan / .inf: the reference's YAML -> JSON step refuses them; a NaN weight or threshold slips past
        # every range check (was accepted).
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: d\n  plugins: [{pluginRef: queue-scorer, "
            "weight: .nan}]\n",
            "schedulingProfiles[0].plugins[0].weight: nan: numbers must be finite",
        ),
        (
            "plugins:\n- type: concurrency-detector\n  parameters: {headroom: .inf}\n",
            "plugins[0].parameters.headroom: inf: numbers must be finite",
        ),
        (
            "plugins:\n- type: inflight-load-producer\n  parameters: {outputRatio: -.inf}\n",
            "plugins[0].parameters.outputRatio: -inf: numbers must be finite",
        ),
        # A YAML alias inside the node it names: a cycle (the reference's YAML parser refuses it; here it
        # loaded, and a reload comparing the parameters died of RecursionError).
        (
            "plugins:\n- type: precise-prefix-cache-producer\n  parameters:\n    indexerConfig: {prefixStoreConfig: "
            "&p {x: *p}}\n",
            "plugins[0].parameters.indexerConfig.prefixStoreConfig.x: a YAML alias refers to a node that contains it",
        ),
        # Nesting deeper than the YAML parser recurses (was a RecursionError).
        ("plugins: " + "[" * 5000 + "]" * 5000 + "\n", "config is not valid YAML: nested too deeply"),
        # An extractor the metrics collector cannot use (was an AttributeError once an endpoint appeared).
        (
            METRICS_SOURCE.replace("extractors: [{pluginRef: core-metrics-extractor}]", "extractors: [{pluginRef: "
            "queue-scorer}]"),
            "dataLayer.sources[0].extractors[0].pluginRef: plugin 'queue-scorer' (type queue-scorer) is not a metrics "
            "extractor; source 'metrics-data-source' (type metrics-data-source) cannot feed it",
        ),
    ],
)  # fmt: skip
def test_more_config_errors_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        built(text)
    assert expected in str(err.value)


def test_the_default_picker_name_may_be_a_picker_or_unused() -> None:
    # A picker named max-score-picker is the default picker; a non-picker by that name is fine while every
    # profile names its own picker.
    c = built("plugins:\n- {type: random-picker, name: max-score-picker}\n- type: queue-scorer\n")
    assert c.pipeline.scheduler.profiles["default"].picker is c.plugins["max-score-picker"]
    c = built(
        "plugins:\n- {type: queue-scorer, name: max-score-picker}\n- type: random-picker\nschedulingProfiles:\n"
        "- name: d\n  plugins: [{pluginRef: max-score-picker}, {pluginRef: random-picker}]\n"
    )
    assert c.pipeline.scheduler.profiles["d"].picker is c.plugins["random-picker"]
    assert built(METRICS_SOURCE).data_sources[0].extractors[0].type == "core-metrics-extractor"


def test_shared_yaml_aliases_still_load() -> None:
    # One node under two names is no cycle: both profiles get the same list of plugin references.
    c = built(
        "plugins:\n- type: queue-scorer\n- type: prefill-filter\n- type: decode-filter\n"
        "- type: disagg-profile-handler\n"
        "schedulingProfiles:\n- name: prefill\n  plugins: &refs [{pluginRef: queue-scorer, weight: 2.5}]\n"
        "- name: decode\n  plugins: *refs\n"
    )
    assert [w.weight for w in c.pipeline.scheduler.profiles["decode"].scorers] == [2.5]
    assert [w.weight for w in c.pipeline.scheduler.profiles["prefill"].scorers] == [2.5]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Duplicate keys: the reference decodes strictly ("mapping key already defined"); here the last one won
        # silently, so a second `plugins:` dropped the first list.
        (
            "plugins:\n- type: queue-scorer\nplugins:\n- type: random-picker\n",
            "config is not valid YAML: line 3, column 1: duplicate key 'plugins'",
        ),
        (
            "plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2, maxNumOfEndpoints: 3}\n",
            "config is not valid YAML: line 3, column 38: duplicate key 'maxNumOfEndpoints'",
        ),
        # A lone surrogate (a "\ud800" escape): the reference's YAML parser refuses it; here it loaded, and the
        # name could not be encoded wherever it went out (metrics labels, JSON logs, headers).
        ('plugins:\n- type: queue-scorer\n  name: "q\\ud800"\n', "plugins[0].name: not valid Unicode text"),
        (
            'plugins:\n- type: max-score-picker\n  parameters: {"\\udfff": 1}\n',
            "plugins[0].parameters: a key is not valid Unicode text",
        ),
        # Beyond a 64-bit integer: the reference's decoder refuses it (Go int); here it was accepted.
        (
            "plugins:\n- type: random-picker\n  parameters: {maxNumOfEndpoints: 9223372036854775808}\n",
            "plugin 'random-picker' (type random-picker): parameters.maxNumOfEndpoints: 9223372036854775808 is out of "
            "range (a 64-bit integer)",
        ),
        (
            "plugins:\n- type: token-producer\n  parameters: {estimate: {image: {defaultResolution: {width: "
            "-99999999999999999999}}}}\n",
            "parameters.estimate.image.defaultResolution.width: -99999999999999999999 is out of range",
        ),
        # A float too large for a float64 (YAML reads it as inf).
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: d\n  plugins: [{pluginRef: queue-scorer, "
            "weight: 1e400}]\n",
            "schedulingProfiles[0].plugins[0].weight: inf: numbers must be finite",
        ),
        # A duration longer than Go's time.Duration holds (~292 years): the reference refuses it.
        (
            "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 9999999999h}\n",
            "flowControl.defaultRequestTTL: duration '9999999999h' is out of range",
        ),
    ],
)  # fmt: skip
def test_yaml_edge_cases_are_config_errors_naming_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        built(text)
    assert expected in str(err.value)


def test_exponent_numbers_are_numbers_as_in_the_reference() -> None:
    # The reference's YAML parser reads 1e3 and 2.5E-1 as numbers; PyYAML's YAML 1.1 rules read them as strings
    # (needing a dot and a signed exponent), so a weight or parameter written so was refused.
    c = built(
        "plugins:\n- type: queue-scorer\n- type: approx-prefix-cache-producer\n  parameters: {lruCapacityPerServer: "
        "31250}\n- type: concurrency-detector\n  parameters: {headroom: 2.5E-1}\nschedulingProfiles:\n- name: d\n"
        "  plugins: [{pluginRef: queue-scorer, weight: 1e3}, {pluginRef: concurrency-detector}]\n"
    )
    assert [w.weight for w in c.pipeline.scheduler.profiles["d"].scorers] == [1000.0]
    assert c.plugins["concurrency-detector"].params.headroom == 0.25
    # Plain integers, strings that only look numeric and YAML 1.1 words stay what they were.
    config = load_config("featureGates: ['1e3']\nplugins:\n- {type: queue-scorer, name: 1e3x}\n")
    assert config.feature_gates == ["1e3"] and config.plugins[0].name == "1e3x"


@pytest.mark.parametrize(
    "text",
    [
        "featureGates:\nplugins:\n- type: queue-scorer\n",
        "schedulingProfiles:\nplugins:\n- type: queue-scorer\n",
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n",
        "plugins:\n- type: queue-scorer\nrequestHandler: {parsers: }\n",
        "plugins:\n- type: queue-scorer\ndataLayer: {sources: }\n",
        "plugins:\n- type: queue-scorer\n  name:\n",
    ],
)
def test_an_empty_section_is_an_absent_one_as_in_the_reference(text: str) -> None:
    # `featureGates:` with nothing under it is null: the reference's decoder leaves the field unset (Go's JSON
    # null); here it was "Expected `array`, got `null`", so a Helm-rendered empty section failed.
    c = built(text)
    assert isinstance(c.plugins["queue-scorer"], Scorer)


def test_the_cross_replica_sync_interval_is_a_duration() -> None:
    """dataLayer.crossReplicaSyncInterval (the reference's, default 200ms) was kept as text and never read:
    `bogus` loaded. It is checked as the reference parses it."""
    base = DEFAULT_CONFIG + "dataLayer:\n  crossReplicaSyncInterval: {}\n"
    build(load_config(base.format("500ms")))
    for bad in ("bogus", "-1s"):
        with pytest.raises(ConfigError, match=r"dataLayer\.crossReplicaSyncInterval"):
            build(load_config(base.format(bad)))


def test_a_null_plugin_parameter_takes_its_default_as_in_the_reference() -> None:
    """`maxNumOfEndpoints:` left empty by a Helm value: Go's JSON leaves the field at its default. Before:
    "Expected `int`, got `null`", a start-up error (the top-level sections already took their defaults)."""
    text = (
        "plugins:\n- type: queue-scorer\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: null}\n"
        "- type: approx-prefix-cache-producer\n  parameters:\n    blockSizeTokens:\n    maxPrefixBlocksToMatch: 64\n"
    )
    c = built(text)
    assert c.plugins["max-score-picker"].params.max_num_of_endpoints == 1
    prefix = c.plugins["approx-prefix-cache-producer"].params
    assert prefix.max_prefix_blocks_to_match == 64 and prefix.block_size_tokens == type(prefix)().block_size_tokens


@pytest.mark.parametrize(
    ("path", "in_configmap"),
    [
        ("deploy/config/default-file-discovery.yaml", False),
        ("deploy/kubernetes/configmap.yaml", True),
        ("deploy/kubernetes/standalone/configmap.yaml", True),
    ],
)
def test_deploy_configs_carry_the_built_in_default_profile(path: str, in_configmap: bool) -> None:
    """The deploy configs copy DEFAULT_CONFIG (a manifest must stand alone); a change to the default must reach
    them. Only endpoint discovery may differ."""
    text = (Path(__file__).parents[2] / path).read_text()
    if in_configmap:
        (configmap,) = [d for d in yaml.safe_load_all(text) if d and d.get("kind") == "ConfigMap"]
        text = configmap["data"]["config.yaml"]
    theirs = yaml.safe_load(text)
    ours = yaml.safe_load(DEFAULT_CONFIG)
    discovery = theirs.pop("dataLayer", {}).get("discovery", {}).get("pluginRef")
    theirs["plugins"] = [p for p in theirs["plugins"] if p.get("name", p["type"]) != discovery]
    assert theirs == ours
