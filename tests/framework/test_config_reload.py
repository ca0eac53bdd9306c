"""Reloading the config while serving (`loader.rebuild_scheduling`): the scheduler is rebuilt, every
stateful plugin is the running instance, and anything that would need a restart is refused."""

from __future__ import annotations

import pytest

from llmepp.config.loader import Components, build, load_config, rebuild_scheduling
from llmepp.framework.plugin import ConfigError, Plugin
from llmepp.plugins.pickers.random_picker import RandomPicker

BASE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 64}
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: no-hit-lru-scorer, weight: 2}
"""


def running(text: str = BASE) -> Components:
    return build(load_config(text))


def reload(components: Components, text: str) -> Components:
    return rebuild_scheduling(components, load_config(text))


def weights(c: Components) -> list[tuple[str, float]]:
    return [(w.scorer.name, w.weight) for w in c.pipeline.scheduler.profiles["default"].scorers]


def test_new_weights_apply_and_every_stateful_plugin_is_the_running_instance() -> None:
    old = running()
    new = reload(
        old, BASE.replace("{pluginRef: prefix-cache-scorer, weight: 3}", "{pluginRef: prefix-cache-scorer, weight: 5}")
    )
    assert weights(new)[2] == ("prefix-cache-scorer", 5.0)
    assert weights(old)[2] == ("prefix-cache-scorer", 3.0)  # the running pipeline is untouched until swapped
    assert new.pipeline is not old.pipeline
    # Producers (the prefix index, in-flight counts) and pre-request / response plugins carry over as they are.
    for name in ("approx-prefix-cache-producer", "token-producer", "inflight-load-producer", "no-hit-lru-scorer"):
        assert new.plugins[name] is old.plugins[name], name
    assert new.pipeline.producers == old.pipeline.producers
    assert new.pipeline.pre_request == old.pipeline.pre_request
    assert new.pipeline.response_complete == old.pipeline.response_complete
    # Stateless scheduling plugins are rebuilt, wired to the same producers.
    assert new.plugins["prefix-cache-scorer"] is not old.plugins["prefix-cache-scorer"]
    assert new.plugins["prefix-cache-scorer"].data_key == old.plugins["prefix-cache-scorer"].data_key  # type: ignore[attr-defined]


def test_scorers_and_pickers_can_be_added_and_removed() -> None:
    text = BASE.replace("- type: queue-scorer\n", "- type: random-picker\n").replace(
        "  - {pluginRef: queue-scorer, weight: 2}\n", "  - {pluginRef: random-picker}\n"
    )
    new = reload(running(), text)
    assert "queue-scorer" not in new.plugins
    assert [name for name, _ in weights(new)] == [
        "kv-cache-utilization-scorer",
        "prefix-cache-scorer",
        "no-hit-lru-scorer",
    ]
    assert isinstance(new.pipeline.scheduler.profiles["default"].picker, RandomPicker)


def test_a_reload_can_follow_a_reload() -> None:
    first = running()
    second = reload(first, BASE.replace("weight: 3}", "weight: 4}"))
    third = reload(second, BASE)
    assert weights(third) == weights(first)
    assert third.plugins["approx-prefix-cache-producer"] is first.plugins["approx-prefix-cache-producer"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # A producer's parameters: its index is built for them.
        (lambda t: t.replace("blockSizeTokens: 64", "blockSizeTokens: 128"), "plugin 'approx-prefix-cache-producer'"),
        # A pre-request plugin (no-hit-lru keeps which pods got cold requests) removed or added.
        (
            lambda t: t.replace("- type: no-hit-lru-scorer\n", "").replace(
                "  - {pluginRef: no-hit-lru-scorer, weight: 2}\n", ""
            ),
            "plugin 'no-hit-lru-scorer' (type no-hit-lru-scorer): removed",
        ),
        (
            lambda t: t.replace("- type: queue-scorer\n", "- type: queue-scorer\n- type: session-affinity-scorer\n"),
            "plugin 'session-affinity-scorer'",
        ),
        (lambda t: t.replace("apiVersion", "featureGates: [flowControl]\napiVersion"), "featureGates: changed"),
        (lambda t: t + "flowControl: {maxBytes: 1000}\n", "flowControl: changed"),
        (lambda t: t + "dataLayer: {injectDefaults: false}\n", "dataLayer: changed"),
    ],
)
def test_changes_that_need_a_restart_are_refused_naming_what(change, message) -> None:  # type: ignore[no-untyped-def]
    old = running()
    with pytest.raises(ConfigError, match="restart the EPP") as err:
        reload(old, change(BASE))
    assert message in str(err.value)


def test_a_new_consumer_whose_producer_would_be_created_is_refused() -> None:
    without_lru = BASE.replace("- type: no-hit-lru-scorer\n", "").replace(
        "  - {pluginRef: no-hit-lru-scorer, weight: 2}\n", ""
    )
    old = running(without_lru)
    assert "inflight-load-producer" not in old.plugins
    # active-request-scorer reads in-flight counts: their producer would be auto-created, new state.
    text = without_lru.replace("- type: queue-scorer\n", "- type: queue-scorer\n- type: active-request-scorer\n")
    with pytest.raises(ConfigError, match=r"plugin 'inflight-load-producer' .*added; .*restart the EPP"):
        reload(old, text)


TWO_INDEXES = """
plugins:
- {type: approx-prefix-cache-producer, name: a1}
- {type: approx-prefix-cache-producer, name: a2, parameters: {blockSizeTokens: 128}}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: a1}
- type: no-hit-lru-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: no-hit-lru-scorer, weight: 2}
"""


def test_a_kept_plugin_that_follows_a_changed_one_is_refused() -> None:
    """no-hit-lru-scorer keeps its running instance, and with it the producer it found by following
    prefix-cache-scorer at start-up. Before, pointing the scorer at another producer was accepted, and the two
    then read different indexes (a start-up with the same file has both on a2)."""
    old = running(TWO_INDEXES)
    with pytest.raises(ConfigError, match=r"plugin 'no-hit-lru-scorer' .*plugins it reads changed.*restart the EPP"):
        reload(old, TWO_INDEXES.replace("prefixMatchInfoProducerName: a1", "prefixMatchInfoProducerName: a2"))
    reload(old, TWO_INDEXES.replace("weight: 3", "weight: 5"))  # what leaves its wiring alone still reloads


def test_config_errors_in_the_new_file_name_the_field_as_at_start_up() -> None:
    old = running()
    with pytest.raises(ConfigError, match=r"schedulingProfiles\['default'\]: pluginRef 'nope'"):
        reload(old, BASE.replace("{pluginRef: queue-scorer, weight: 2}", "{pluginRef: nope}"))
    with pytest.raises(ConfigError, match="unknown plugin type"):
        reload(old, BASE.replace("- type: queue-scorer\n", "- type: no-such-scorer\n"))


def test_plugins_flow_control_added_for_itself_are_kept_and_their_names_reserved() -> None:
    gated = BASE.replace("apiVersion", "featureGates: [flowControl]\napiVersion")
    old = running(gated)
    hooks = old.plugins["flow-control"]
    new = reload(old, gated.replace("weight: 3}", "weight: 4}"))
    assert new.plugins["flow-control"] is hooks
    assert new.pipeline.admission is old.pipeline.admission
    taken = r"plugin name 'flow-control' is taken by a plugin the running EPP created for itself \(type [\w-]+\)"
    with pytest.raises(ConfigError, match=taken):
        reload(old, gated.replace("- type: queue-scorer\n", "- type: queue-scorer\n  name: flow-control\n"))


def test_a_new_file_the_loader_used_to_crash_on_is_a_config_error() -> None:
    old = running()
    # The default picker's name on a scorer, the profile without a picker (was an AssertionError).
    with pytest.raises(ConfigError, match=r"plugin 'max-score-picker' \(type queue-scorer\): is not a picker"):
        reload(old, BASE.replace("- type: queue-scorer\n", "- {type: queue-scorer, name: max-score-picker}\n").replace(
            "{pluginRef: queue-scorer, weight: 2}", "{pluginRef: max-score-picker, weight: 2}"
        ))  # fmt: skip
    # A YAML alias cycle in a stateful plugin's free-form parameters (the spec comparison was a RecursionError).
    precise = (
        "plugins:\n- type: precise-prefix-cache-producer\n  parameters:\n    indexerConfig: {prefixStoreConfig: "
        "{x: 1}}\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: "
        "precise-prefix-cache-producer}\n"
    )
    old = running(precise)
    with pytest.raises(ConfigError, match="a YAML alias refers to a node that contains it"):
        reload(old, precise.replace("{x: 1}", "&p {x: *p}"))


@pytest.mark.parametrize("path", ["deploy/config/pd-epp-config.yaml", "deploy/config/pd-legacy-epp-config.yaml"])
def test_a_pd_config_reloads_against_the_same_metrics_registry(path: str) -> None:
    # The profile handlers' decision counters are registered once per registry: a reload (and an EPP
    # whose registry already has them) failed with "Duplicated timeseries".
    from pathlib import Path

    from llmepp.datalayer.datastore import Datastore
    from llmepp.observability.metrics import EppMetrics

    text = (Path(__file__).parents[2] / path).read_text()
    metrics, datastore = EppMetrics(), Datastore()
    old = build(load_config(text), datastore=datastore, metrics=metrics)
    new = rebuild_scheduling(old, load_config(text), datastore=datastore, metrics=metrics)
    assert new.pipeline.scheduler.profiles.keys() == old.pipeline.scheduler.profiles.keys()
    # A second pipeline on the registry (the other P/D config's handler shares the disagg counter).
    build(load_config(text), datastore=Datastore(), metrics=metrics)


def test_dropping_a_scorer_keeps_the_producer_created_for_it() -> None:
    # active-request-scorer's in-flight counts come from an auto-created producer (not in the file): dropping
    # the scorer was refused as "plugin 'inflight-load-producer' ... removed; restart the EPP".
    with_active = BASE.replace("- type: no-hit-lru-scorer\n", "- type: active-request-scorer\n").replace(
        "{pluginRef: no-hit-lru-scorer, weight: 2}", "{pluginRef: active-request-scorer, weight: 2}"
    )
    without = with_active.replace("- type: active-request-scorer\n", "").replace(
        "  - {pluginRef: active-request-scorer, weight: 2}\n", ""
    )
    old = running(with_active)
    producer = old.plugins["inflight-load-producer"]
    new = reload(old, without)
    assert "active-request-scorer" not in new.plugins
    assert new.plugins["inflight-load-producer"] is producer  # its counts go on (requests in flight release them)
    assert new.pipeline.producers == old.pipeline.producers
    # And the scorer comes back, reading the same producer.
    again = reload(new, with_active)
    assert again.plugins["inflight-load-producer"] is producer
    assert again.plugins["active-request-scorer"].key == old.plugins["active-request-scorer"].key  # type: ignore[attr-defined]


def test_a_refused_reload_hands_back_every_instance_it_built_and_none_running() -> None:
    # The caller closes them (App.reload_config): a refused file's plugins may own tasks or clients.
    old = running()
    built: list[Plugin] = []
    refused = BASE.replace("{pluginRef: no-hit-lru-scorer, weight: 2}", "{pluginRef: missing}")
    with pytest.raises(ConfigError, match="missing"):
        rebuild_scheduling(old, load_config(refused), built=built)
    assert sorted(p.name for p in built) == [
        "kv-cache-utilization-scorer",
        "max-score-picker",
        "prefix-cache-scorer",
        "queue-scorer",
    ]
    assert not any(p is q for p in built for q in old.plugins.values())
