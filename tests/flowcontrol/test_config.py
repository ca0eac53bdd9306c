"""flowControl / saturationDetector config → admission controller, through the real loader."""

from __future__ import annotations

import re
from typing import Any

import pytest

from llmepp.config.loader import build, load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.datastore import Datastore
from llmepp.flowcontrol.config import parse_flow_control
from llmepp.flowcontrol.controller import FlowController
from llmepp.flowcontrol.hooks import AdmissionHooks
from llmepp.flowcontrol.legacy import LegacyAdmission
from llmepp.framework.plugin import ConfigError
from llmepp.plugins.flowcontrol.concurrency_detector import ConcurrencyDetector
from llmepp.plugins.flowcontrol.eviction_policies import PriorityThenTimeEvictionOrder, SheddableEvictionFilter
from llmepp.plugins.flowcontrol.fairness import GlobalStrictFairnessPolicy, RoundRobinFairnessPolicy
from llmepp.plugins.flowcontrol.ordering import EdfOrderingPolicy, FcfsOrderingPolicy
from llmepp.plugins.flowcontrol.usage_limit import StaticUsageLimitPolicy
from llmepp.plugins.flowcontrol.utilization_detector import UtilizationDetector
from llmepp.settings import Settings
from llmepp.units import parse_bytes, parse_duration

ISSUE_EXAMPLE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: ["flowControl"]
saturationDetector:
  queueDepthThreshold: 5
  kvCacheUtilThreshold: 0.8
  metricsStalenessThreshold: 200ms
plugins:
- type: fcfs-ordering-policy
- type: round-robin-fairness-policy
flowControl:
  priorityBands:
  - priority: 1
    orderingPolicyRef: fcfs-ordering-policy
    fairnessPolicyRef: round-robin-fairness-policy
"""

HEAD = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
"""


def built(text: str, **kw: object):  # type: ignore[no-untyped-def]
    return build(load_config(text), **kw)  # type: ignore[arg-type]


def controller_of(text: str) -> FlowController:
    admission = built(text).pipeline.admission
    assert isinstance(admission, FlowController)
    return admission


def test_the_issue_example_loads_unchanged() -> None:
    c = built(ISSUE_EXAMPLE)
    fc = c.pipeline.admission
    assert isinstance(fc, FlowController)
    band = fc.config.bands[1]
    assert isinstance(band.ordering, FcfsOrderingPolicy) and band.ordering is c.plugins["fcfs-ordering-policy"]
    assert isinstance(band.fairness, RoundRobinFairnessPolicy)
    assert (band.max_requests, band.max_bytes) == (5000, 1_000_000_000)
    assert fc.bands[1].ordering is band.ordering
    # Defaults injected for everything not configured.
    assert isinstance(fc.config.default_band.fairness, GlobalStrictFairnessPolicy)
    assert isinstance(fc.config.usage_limit, StaticUsageLimitPolicy) and fc.config.usage_limit.threshold == 1.0
    assert (fc.config.default_ttl, fc.config.no_endpoint_ttl, fc.max_requests, fc.max_bytes) == (60.0, 60.0, 0, 0)
    # The deprecated inline saturationDetector configures the utilization detector.
    det = fc.detector
    assert isinstance(det, UtilizationDetector) and c.plugins["utilization-detector"] is det
    assert (det.queue_depth_threshold, det.kv_cache_util_threshold, det.staleness) == (5, 0.8, 0.2)
    # The completion hook is wired: a finished request frees capacity for the dispatcher.
    hooks = c.plugins["flow-control"]
    assert isinstance(hooks, AdmissionHooks) and hooks in c.pipeline.response_complete


def test_without_the_gate_admission_is_legacy_with_the_default_detector() -> None:
    c = built(DEFAULT_CONFIG)
    assert isinstance(c.pipeline.admission, LegacyAdmission)
    assert isinstance(c.pipeline.admission.detector, UtilizationDetector)
    assert not any(isinstance(p, AdmissionHooks) for p in c.pipeline.response_complete)


def test_gate_can_be_switched_off_explicitly() -> None:
    assert isinstance(built(ISSUE_EXAMPLE.replace('["flowControl"]', '["flowControl=false"]')).pipeline.admission,
                      LegacyAdmission)  # fmt: skip


def test_a_block_the_gate_leaves_off_is_still_checked(caplog: pytest.LogCaptureFixture) -> None:
    """Ignored, as the reference ignores it, but a value the gate-on build refuses is said at start-up, not
    first when the gate is turned on; nothing the check resolves joins the build."""
    off = ISSUE_EXAMPLE.replace('["flowControl"]', "[]")
    c = built(off + "  maxRequests: -5\n")
    assert isinstance(c.pipeline.admission, LegacyAdmission)
    (warning,) = [r.getMessage() for r in caplog.records if "block ignored" in r.getMessage()]
    assert warning.endswith("with it on, the block would be refused: flowControl.maxRequests: must be >= 0, got -5")
    assert "global-strict-fairness-policy" not in c.plugins
    caplog.clear()
    built(off)
    (warning,) = [r.getMessage() for r in caplog.records if "block ignored" in r.getMessage()]
    assert warning.endswith("feature gate flowControl is off")
    assert not [r for r in caplog.records if "injected default plugin global-strict" in r.getMessage()]


def test_deprecated_saturation_detector_plugin_ref_shape() -> None:
    text = (
        HEAD
        + """
plugins:
- type: concurrency-detector
  name: conc
  parameters: {maxConcurrency: 8}
saturationDetector: {pluginRef: conc}
"""
    )
    c = built(text)
    assert isinstance(c.pipeline.admission, LegacyAdmission)
    assert c.pipeline.admission.detector is c.plugins["conc"]
    fc = controller_of(text.replace("plugins:", "featureGates: [flowControl]\nplugins:"))
    assert isinstance(fc.detector, ConcurrencyDetector) and fc.detector.max_requests == 8


def test_flow_control_saturation_detector_is_the_current_location() -> None:
    fc = controller_of(
        HEAD
        + """
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {concurrencyMode: hybrid}
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
"""
    )
    assert isinstance(fc.detector, ConcurrencyDetector) and fc.detector.mode == "hybrid"


def test_full_flow_control_block() -> None:
    fc = controller_of(
        HEAD
        + """
featureGates: [flowControl]
plugins:
- type: edf-ordering-policy
- type: round-robin-fairness-policy
  name: rr
- type: static-usage-limit-policy
  name: limit
  parameters: {threshold: 0.9}
flowControl:
  maxBytes: 2Gi
  maxRequests: 10000
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 1m30s
  defaultPriorityBand: {maxRequests: 100, maxBytes: 500M, fairnessPolicyRef: rr}
  defaultNegativePriorityBand: {maxRequests: 10}
  priorityBands:
  - {priority: 10, maxRequests: 50, orderingPolicyRef: edf-ordering-policy}
  - {priority: -1, maxBytes: 1048576}
  usageLimitPolicyPluginRef: limit
  enableEviction: false
"""
    )
    assert (fc.max_bytes, fc.max_requests) == (2 * 2**30, 10000)
    assert (fc.config.default_ttl, fc.config.no_endpoint_ttl) == (30.0, 90.0)
    assert (fc.config.default_band.max_requests, fc.config.default_band.max_bytes) == (100, 500_000_000)
    hi, neg = fc.config.bands[10], fc.config.bands[-1]
    assert isinstance(hi.ordering, EdfOrderingPolicy) and isinstance(hi.fairness, GlobalStrictFairnessPolicy)
    assert (hi.max_requests, hi.max_bytes) == (50, 1_000_000_000)  # unset fields: the reference defaults
    assert (neg.max_requests, neg.max_bytes) == (5000, 1_048_576)  # not a template's
    assert fc.config.default_negative_band is not None and fc.config.default_negative_band.max_requests == 10
    assert fc.config.usage_limit.threshold == 0.9  # type: ignore[attr-defined]


def test_no_endpoint_ttl_follows_default_ttl_and_zero_disables() -> None:
    fc = controller_of(HEAD + "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 0s}\n")
    assert (fc.config.default_ttl, fc.config.no_endpoint_ttl) == (0.0, 0.0)


FC = "flowControl:\n"
CONFIG_ERRORS = [
    (
        FC + "  priorityBands:\n  - {priority: 1}\n  - {priority: 2, fairnessPolicyRef: x}\n",
        "flowControl.priorityBands[1].fairnessPolicyRef: no plugin named 'x'",
    ),
    (
        "plugins: [{type: queue-scorer}]\n"
        + FC
        + "  priorityBands: [{priority: 1, orderingPolicyRef: queue-scorer}]\n",
        "flowControl.priorityBands[0].orderingPolicyRef: plugin 'queue-scorer' (type queue-scorer) is not an "
        "ordering policy",
    ),
    (FC + "  priorityBands: [{priority: 1}, {priority: 1}]\n", "flowControl.priorityBands[1].priority: duplicate"),
    (FC + "  priorityBands: [{maxRequests: 1}]\n", "flowControl.priorityBands[0]: Object missing required field"),
    (FC + "  priorityBands: [{priority: high}]\n", "flowControl.priorityBands[0].priority: Expected `int`, got `str`"),
    ("flowControl: {maxBytes: 1Qi}\n", "flowControl.maxBytes: invalid byte size '1Qi'"),
    ("flowControl: {defaultPriorityBand: {maxBytes: x}}\n", "flowControl.defaultPriorityBand.maxBytes: invalid"),
    ("flowControl: {defaultRequestTTL: soon}\n", "flowControl.defaultRequestTTL: invalid duration 'soon'"),
    ("flowControl: {noEndpointRequestTTL: -5s}\n", "flowControl.noEndpointRequestTTL: invalid duration"),
    ("flowControl: {maxRequests: -1}\n", "flowControl.maxRequests: must be >= 0"),
    ("flowControl: {usageLimitPolicyPluginRef: nah}\n", "flowControl.usageLimitPolicyPluginRef: no plugin named 'nah'"),
    ("flowControl: {saturationDetector: {pluginRef: nah}}\n", "flowControl.saturationDetector.pluginRef: no plugin"),
    ("flowControl: {maxRequestz: 5}\n", "flowControl: Object contains unknown field `maxRequestz`"),
    ("saturationDetector: {pluginRef: nope}\n", "saturationDetector.pluginRef: no plugin named 'nope'"),
    (
        "saturationDetector: {queueDepthThreshold: 0}\n",
        "saturationDetector (inline utilization-detector): plugin 'utilization-detector' (type utilization-detector): "
        "parameters: queueDepthThreshold must be > 0",
    ),
    ("saturationDetector: {queueDepthTreshold: 5}\n", "unknown field `queueDepthTreshold`"),
    ("saturationDetector: {pluginRef: a, headroom: 1}\n", "saturationDetector: pluginRef cannot be combined"),
    (
        "plugins: [{type: static-usage-limit-policy, parameters: {threshold: 1.5}}]\n",
        "threshold must be in (0, 1], got 1.5",
    ),
]


@pytest.mark.parametrize(("block", "expected"), CONFIG_ERRORS)
def test_config_errors_name_the_field(block: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        built(HEAD + "featureGates: [flowControl]\n" + block)
    assert expected in str(err.value)


def test_eviction_waits_for_freed_capacity_to_show_on_either_transport() -> None:
    gated = HEAD + "featureGates: [flowControl]\n"
    off = built(gated).pipeline.admission
    assert isinstance(off, FlowController) and off.evictor is None
    settings = Settings(refresh_metrics_interval=0.1, metrics_staleness_threshold=1.5)
    scraped = built(gated + "flowControl: {enableEviction: true}\n", settings=settings).pipeline.admission
    assert isinstance(scraped, FlowController) and scraped.evictor is not None
    assert scraped.evictor.grace == pytest.approx(0.1 + 1.5 + 0.25)  # one refresh + staleness + 250 ms
    inflight = built(
        gated + "plugins: [{type: concurrency-detector}]\n"
        "flowControl: {enableEviction: true, saturationDetector: {pluginRef: concurrency-detector}}\n"
    ).pipeline.admission
    assert isinstance(inflight, FlowController) and inflight.evictor is not None
    assert inflight.evictor.grace == pytest.approx(0.010)
    grpc_aio = built(gated + "flowControl: {enableEviction: true}\n", settings=Settings(extproc_transport="grpc"))
    assert isinstance(grpc_aio.pipeline.admission, FlowController) and grpc_aio.pipeline.admission.evictor is not None


def test_eviction_policies_are_the_defaults_or_the_configured_ones() -> None:
    gated = HEAD + "featureGates: [flowControl]\n"
    default = controller_of(gated + "flowControl: {enableEviction: true}\n").config
    assert isinstance(default.eviction_filter, SheddableEvictionFilter)
    assert isinstance(default.eviction_ordering, PriorityThenTimeEvictionOrder)
    named = controller_of(
        gated + "plugins: [{type: priority-then-time-eviction-order-policy, name: mine}]\n"
        "flowControl: {enableEviction: true}\n"
    ).config
    assert named.eviction_ordering is not None and named.eviction_ordering.name == "mine"
    with pytest.raises(ConfigError, match=r"more than one EvictionFilterPolicy \('a', 'b'\)"):
        two = "plugins: [{type: sheddable-eviction-filter, name: a}, {type: sheddable-eviction-filter, name: b}]\n"
        built(gated + two + "flowControl: {enableEviction: true}\n")


def test_objectives_file_setting_is_loaded_and_bad_files_fail_start_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "objectives.yaml"
    path.write_text(
        "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: premium}\n"
        "spec: {priority: 10, poolRef: {name: epp}}\n"
    )
    c = built(DEFAULT_CONFIG, settings=Settings(objectives_file=str(path)))
    assert c.pipeline.admission.objectives.priority("premium") == 10
    path.write_text("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {}\n")
    with pytest.raises(ConfigError, match=r"document 0: metadata.name"):
        built(DEFAULT_CONFIG, settings=Settings(objectives_file=str(path)))
    with pytest.raises(ConfigError, match="cannot read"):
        built(DEFAULT_CONFIG, settings=Settings(objectives_file=str(tmp_path / "missing.yaml")))


def test_flow_controller_follows_datastore_changes() -> None:
    ds = Datastore(pool_name="my-pool")
    fc = built(ISSUE_EXAMPLE, datastore=ds).pipeline.admission
    assert isinstance(fc, FlowController) and fc.pool_name == "my-pool"
    assert fc._pool() == ()
    from helpers import endpoint

    ds.upsert(endpoint(3).spec)
    assert [ep.name for ep in fc._pool()] == ["pod-3"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("200ms", 0.2), ("1m30s", 90.0), ("1h", 3600.0), ("0", 0.0), ("0s", 0.0), ("1.5s", 1.5),
     ("500us", 0.0005), (2, 2.0), (0.25, 0.25)],
)  # fmt: skip
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1Gi", 2**30), ("1G", 10**9), ("500M", 500 * 10**6), ("64Ki", 65536), ("1k", 1000), ("1GB", 10**9),
     ("1GiB", 2**30), ("1048576", 1048576), (123, 123), ("1.5Gi", int(1.5 * 2**30)),
     # Kubernetes quantities also take a decimal exponent; a fraction of a byte rounds up, as Quantity.Value().
     ("1e9", 10**9), ("1E9", 10**9), ("1.5e3", 1500), ("2e+3", 2000), ("5e-1", 1), ("0.5", 1), (".5k", 500),
     ("9007199254740993", 9007199254740993)],
)  # fmt: skip
def test_byte_sizes(text: str | int, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["", "1 parsec", "-5", "1iB", "G", "1e", "1eG", "1e9Gi", "1..5", ".", True])
def test_bad_byte_sizes(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


RELOADED_DETECTOR = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: %d}
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
"""


def test_a_reload_keeps_the_flow_control_detector_and_refuses_to_change_it() -> None:
    """The detector is a filter too, but flow control holds the instance it was built with: a reload
    that changed it was applied to scheduling only (flow control kept gating at maxConcurrency 1)."""
    from llmepp.config.loader import rebuild_scheduling

    ds = Datastore()
    old = build(load_config(RELOADED_DETECTOR % 1), datastore=ds)
    fc = old.pipeline.admission
    assert isinstance(fc, FlowController) and fc.detector is old.plugins["concurrency-detector"]
    with pytest.raises(ConfigError, match=r"plugin 'concurrency-detector' .*changed; .*restart"):
        rebuild_scheduling(old, load_config(RELOADED_DETECTOR % 100), datastore=ds)
    removed = RELOADED_DETECTOR.replace("- type: concurrency-detector\n  parameters: {maxConcurrency: %d}\n", "")
    with pytest.raises(ConfigError):  # flowControl still names it: refused one way or another
        rebuild_scheduling(old, load_config(removed), datastore=ds)
    # Any other change reloads, and the detector stays the one instance flow control gates with.
    more = (RELOADED_DETECTOR % 1).replace(
        "- type: queue-scorer\n", "- type: queue-scorer\n- type: kv-cache-utilization-scorer\n"
    )
    new = rebuild_scheduling(old, load_config(more), datastore=ds)
    assert new.plugins["concurrency-detector"] is fc.detector
    assert "kv-cache-utilization-scorer" in new.plugins


# A metrics source polling every 1 s (its interval, rounded to whole --refresh-metrics-interval ticks).
SLOW_SOURCE = """\
- type: metrics-data-source
  parameters: {interval: 1s}
- type: core-metrics-extractor
dataLayer:
  discovery: {pluginRef: file-discovery}
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
"""
LONG_STALENESS = "- type: utilization-detector\n  parameters: {metricsStalenessThreshold: 3s}\n"


@pytest.mark.parametrize(
    ("extra", "settings", "warned"),
    [
        ("", {"refresh_metrics_interval": 1.0}, True),  # every pod stale 80 % of the time
        ("", {}, False),  # 50 ms scrapes, 200 ms threshold
        (SLOW_SOURCE, {}, True),
        (LONG_STALENESS, {"refresh_metrics_interval": 1.0}, False),
    ],
)
def test_a_scrape_period_beyond_the_staleness_threshold_is_a_startup_warning(
    extra: str, settings: dict[str, Any], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # llm-d-router#2514: with scrapes rarer than metricsStalenessThreshold, the utilization detector reads
    # every pod stale (saturated) most of the time and dispatch stalls for seconds, with nothing said.
    from helpers import FILE_CONFIG

    from llmepp.app import App

    config = FILE_CONFIG.replace("dataLayer:\n  discovery: {pluginRef: file-discovery}\n", "") + extra
    if "dataLayer" not in config:
        config += "dataLayer:\n  discovery: {pluginRef: file-discovery}\n"
    with caplog.at_level("WARNING"):
        App(Settings(config_text=config, **settings))
    hits = [r.getMessage() for r in caplog.records if "metricsStalenessThreshold" in r.getMessage()]
    assert bool(hits) is warned, hits
    if warned:
        assert "utilization-detector" in hits[0] and "1s" in hits[0] and "200ms" in hits[0]


def test_flow_control_numbers_are_int64_and_an_empty_band_list_is_absent() -> None:
    """As the reference decodes flowControl (Go int64 fields; an empty YAML section leaves a field unset):
    a priority or limit past int64 was accepted, and `priorityBands:` with nothing under it was an error."""
    assert parse_flow_control({"priorityBands": None}).priority_bands == []
    for raw, where in (
        ({"priorityBands": [{"priority": 2**64}]}, "flowControl.priorityBands[0].priority"),
        ({"maxBytes": 2**63}, "flowControl.maxBytes"),
        ({"defaultPriorityBand": {"maxRequests": -(2**64)}}, "flowControl.defaultPriorityBand.maxRequests"),
    ):
        with pytest.raises(ConfigError, match=re.escape(where)):
            parse_flow_control(raw)


def test_a_null_inside_a_priority_band_takes_its_default_as_at_the_top_level() -> None:
    """Before: only flowControl's own fields dropped a null; `maxBytes:` left empty inside a band was
    "Expected `int | str`, got `null`"."""
    spec = parse_flow_control({"maxRequests": None, "priorityBands": [{"priority": 1, "maxBytes": None}]})
    assert spec.max_requests == 0 and spec.priority_bands[0].max_bytes == 0
    with pytest.raises(ConfigError, match=r"priority"):
        parse_flow_control({"priorityBands": [{"priority": None}]})  # required: a null is no value


_QUANTITY_FLOW = """\
featureGates: [flowControl]
plugins:
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
flowControl:
"""


@pytest.mark.parametrize(
    ("block", "band", "glob"),
    [
        ("  maxRequests: 1k\n", None, 1000),
        ("  maxRequests: '100'\n", None, 100),
        ("  defaultPriorityBand: {maxRequests: 2k}\n", 2000, 0),
        ("  priorityBands:\n  - {priority: 1, maxRequests: '300'}\n", 300, 0),
    ],
)
def test_max_requests_takes_a_kubernetes_quantity_as_in_the_reference(block: str, band: int | None, glob: int) -> None:
    """The reference's maxRequests (global and per band) is a resource.Quantity ("100", "1k"), like maxBytes."""
    fc = build(load_config(_QUANTITY_FLOW + block)).pipeline.admission
    assert isinstance(fc, FlowController)
    assert fc.config.max_requests == glob
    if band is not None:
        bands = fc.config.bands
        assert (bands[1].max_requests if bands else fc.config.default_band.max_requests) == band


def test_a_max_requests_that_is_no_quantity_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"flowControl\.maxRequests: invalid count 'lots'"):
        build(load_config(_QUANTITY_FLOW + "  maxRequests: lots\n"))
