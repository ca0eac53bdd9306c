"""The `flowControl` / `saturationDetector` config blocks → the admission controller.

    flowControl:                      # used with featureGates: [flowControl]; its
      maxBytes: 0 / maxRequests: 0    #   saturationDetector is used either way
      maxFlows: 1024                  # flows (fairness id x priority) held at once; a new fairness id
                                      #   beyond it replaces the idlest empty flow, or shares its band's
                                      #   overflow flow while every flow has requests waiting
      defaultRequestTTL: 60s          # 0s disables
      noEndpointRequestTTL: <defaultRequestTTL>   # while the pool is empty; each change between
                                      #   empty and not starts a fresh budget for waiting requests
      defaultPriorityBand: {maxRequests: 5000, maxBytes: 1G, fairnessPolicyRef, orderingPolicyRef}
      defaultNegativePriorityBand: {...}              # template for priority < 0
      priorityBands: [{priority, maxRequests, maxBytes, fairnessPolicyRef, orderingPolicyRef}]
      usageLimitPolicyPluginRef: static-usage-limit-policy
      saturationDetector: {pluginRef: utilization-detector}
      enableEviction: false           # true: revoke dispatched sheddable requests (flowcontrol.eviction);
                                      #   an eviction filter / ordering policy in `plugins` replaces the default
    saturationDetector: {pluginRef: ...}                       # deprecated location, or inline:
    saturationDetector: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8, metricsStalenessThreshold: 200ms}

`build_admission` returns the legacy controller (no gate) or the flow controller (gate on);
referenced plugins that are not configured get the reference defaults, injected under their
type name. Every error is a ConfigError naming the field, e.g.
`flowControl.priorityBands[1].fairnessPolicyRef: no plugin named 'x'`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from prometheus_client import CollectorRegistry

from llmepp.datalayer.datastore import Datastore
from llmepp.flowcontrol.controller import (
    DEFAULT_BAND_MAX_BYTES,
    DEFAULT_BAND_MAX_REQUESTS,
    DEFAULT_MAX_FLOWS,
    DEFAULT_REQUEST_TTL,
    BandConfig,
    FlowControlConfig,
    FlowController,
)
from llmepp.flowcontrol.eviction import INFLIGHT_GRACE, SCRAPED_GRACE_EXTRA
from llmepp.flowcontrol.hooks import AdmissionHooks
from llmepp.flowcontrol.interfaces import (
    AdmissionController,
    EvictionFilterPolicy,
    EvictionOrderingPolicy,
    FairnessPolicy,
    OrderingPolicy,
    SaturationDetector,
    UsageLimitPolicy,
)
from llmepp.flowcontrol.legacy import LegacyAdmission
from llmepp.flowcontrol.metrics import FlowControlMetrics
from llmepp.flowcontrol.objectives import ObjectivesFileWatcher, ObjectiveStore
from llmepp.framework.plugin import ConfigError, Plugin, PluginRegistry, drop_nulls, registry
from llmepp.units import parse_bytes, parse_duration

if TYPE_CHECKING:
    from llmepp.config.schema import EndpointPickerConfig
    from llmepp.director import Pipeline

log = logging.getLogger(__name__)

FEATURE_GATE = "flowControl"
DEFAULT_ORDERING = "fcfs-ordering-policy"
DEFAULT_FAIRNESS = "global-strict-fairness-policy"
DEFAULT_USAGE_LIMIT = "static-usage-limit-policy"
DEFAULT_DETECTOR = "utilization-detector"
DEFAULT_EVICTION_FILTER = "sheddable-eviction-filter"
DEFAULT_EVICTION_ORDERING = "priority-then-time-eviction-order-policy"
OBJECTIVES_POLL_INTERVAL = 1.0  # seconds between stat() calls on --objectives-file


# -- YAML schema ---------------------------------------------------------------------------------
class _Spec(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


# The reference decodes into Go's int64 (and refuses more); a Python int has no bound of its own.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class BandTemplateSpec(_Spec):
    # A Kubernetes quantity, like maxBytes ("100", "1k"): the reference's *resource.Quantity.
    max_requests: Int64 | str = 0  # 0 = default (5000)
    max_bytes: Int64 | str = 0  # 0 = default (1G)
    fairness_policy_ref: str = ""
    ordering_policy_ref: str = ""


class PriorityBandSpec(_Spec):
    priority: Int64
    max_requests: Int64 | str = 0
    max_bytes: Int64 | str = 0
    fairness_policy_ref: str = ""
    ordering_policy_ref: str = ""


class PluginRefSpec(_Spec):
    plugin_ref: str


class FlowControlSpec(_Spec):
    max_bytes: Int64 | str = 0  # global; 0 = unlimited
    max_requests: Int64 | str = 0
    max_flows: Int64 | None = None  # None = DEFAULT_MAX_FLOWS
    default_request_ttl: str | int | float | None = msgspec.field(default=None, name="defaultRequestTTL")
    no_endpoint_request_ttl: str | int | float | None = msgspec.field(default=None, name="noEndpointRequestTTL")
    default_priority_band: BandTemplateSpec | None = None
    default_negative_priority_band: BandTemplateSpec | None = None
    priority_bands: list[PriorityBandSpec] = []
    usage_limit_policy_plugin_ref: str = ""
    saturation_detector: PluginRefSpec | None = None
    enable_eviction: bool = False


def parse_flow_control(raw: Mapping[str, Any] | None) -> FlowControlSpec:
    # `priorityBands:` with nothing under it (a Helm template's empty section): absent, as Go leaves it.
    try:
        return msgspec.convert(drop_nulls(raw or {}, _SPEC_INFO), FlowControlSpec, str_keys=True)
    except msgspec.ValidationError as e:
        raise ConfigError(_describe(e, "flowControl")) from None


_SPEC_INFO = msgspec.inspect.type_info(FlowControlSpec)


def _describe(err: msgspec.ValidationError, root: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.a[1].b`" → "root.a[1].b: Expected `int`, got `str`"."""
    text = str(err)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return f"{root}: {text}"
    path = where.rstrip("`").replace("$", root, 1)
    return f"{path}: {message}"


# -- plugin references -----------------------------------------------------------------------------
class _Resolver:
    """Looks up referenced plugins, injecting reference defaults under their type name."""

    def __init__(self, plugins: dict[str, Plugin], plugin_registry: PluginRegistry, *, trial: bool = False) -> None:
        self.plugins = plugins
        self.registry = plugin_registry
        self.trial = trial  # a check only: what it injects is thrown away, so not logged

    # `kind` is an abstract extension point (mypy rejects abstract classes as type[T]): callers
    # annotate what they receive.
    def get(self, name: str, kind: Any, field: str, label: str) -> Any:
        plugin = self.plugins.get(name)
        if plugin is None:
            raise ConfigError(f"{field}: no plugin named {name!r}")
        if not isinstance(plugin, kind):
            raise ConfigError(f"{field}: plugin {name!r} (type {plugin.type}) is not {label}")
        return plugin

    def default(self, type_name: str, kind: Any, field: str, label: str) -> Any:
        if type_name not in self.plugins:
            if not self.trial:
                log.info("flow control: injected default plugin %s", type_name)
            self.plugins[type_name] = self.registry.build(type_name, type_name, None)
        return self.get(type_name, kind, field, label)

    def ref(self, name: str, default: str, kind: Any, field: str, label: str) -> Any:
        return self.get(name, kind, field, label) if name else self.default(default, kind, field, label)


def resolve_detector(
    spec: FlowControlSpec, deprecated: Mapping[str, Any] | None, resolver: _Resolver
) -> SaturationDetector:
    """flowControl.saturationDetector, else the deprecated top-level block (either shape), else the default."""
    label = "a saturation detector"
    if spec.saturation_detector is not None:
        if deprecated:
            log.warning("saturationDetector is deprecated and ignored: flowControl.saturationDetector is set")
        return resolver.get(
            spec.saturation_detector.plugin_ref, SaturationDetector, "flowControl.saturationDetector.pluginRef", label
        )
    if not deprecated:
        return resolver.default(DEFAULT_DETECTOR, SaturationDetector, "saturationDetector", label)
    log.warning("saturationDetector is deprecated; use flowControl.saturationDetector")
    if "pluginRef" in deprecated:
        extra = sorted(set(deprecated) - {"pluginRef"})
        if extra:
            raise ConfigError(f"saturationDetector: pluginRef cannot be combined with {', '.join(extra)}")
        ref = deprecated["pluginRef"]
        if not isinstance(ref, str):
            raise ConfigError(f"saturationDetector.pluginRef: expected a plugin name, got {ref!r}")
        return resolver.get(ref, SaturationDetector, "saturationDetector.pluginRef", label)
    # Inline thresholds: they configure the utilization detector.
    if DEFAULT_DETECTOR in resolver.plugins:
        raise ConfigError(
            f"saturationDetector: inline thresholds conflict with the configured plugin {DEFAULT_DETECTOR!r}; "
            "use flowControl.saturationDetector.pluginRef instead"
        )
    try:
        detector = resolver.registry.build(DEFAULT_DETECTOR, DEFAULT_DETECTOR, dict(deprecated))
    except ConfigError as e:
        raise ConfigError(f"saturationDetector (inline {DEFAULT_DETECTOR}): {e}") from None
    resolver.plugins[DEFAULT_DETECTOR] = detector
    assert isinstance(detector, SaturationDetector)
    return detector


def _count(value: int | str, field: str) -> int:
    """maxRequests: an integer or a Kubernetes quantity ("100", "1k"), as the reference's resource.Quantity."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field}: must be >= 0, got {value}")
        return value
    try:
        return parse_bytes(value)
    except ValueError:
        raise ConfigError(f"{field}: invalid count {value!r} (examples: 100, 1k)") from None


def _band(
    spec: BandTemplateSpec | PriorityBandSpec, field: str, resolver: _Resolver, fallback: BandConfig | None = None
) -> BandConfig:
    max_requests = _count(spec.max_requests, f"{field}.maxRequests")
    try:
        max_bytes = parse_bytes(spec.max_bytes)
    except ValueError as e:
        raise ConfigError(f"{field}.maxBytes: {e}") from None
    # Unset fields of a band fall back to the default band template, then to the reference defaults.
    ordering: OrderingPolicy
    fairness: FairnessPolicy
    if spec.ordering_policy_ref or fallback is None:
        ordering = resolver.ref(
            spec.ordering_policy_ref, DEFAULT_ORDERING, OrderingPolicy, f"{field}.orderingPolicyRef",
            "an ordering policy",
        )  # fmt: skip
    else:
        ordering = fallback.ordering
    if spec.fairness_policy_ref or fallback is None:
        fairness = resolver.ref(
            spec.fairness_policy_ref, DEFAULT_FAIRNESS, FairnessPolicy, f"{field}.fairnessPolicyRef",
            "a fairness policy",
        )  # fmt: skip
    else:
        fairness = fallback.fairness
    return BandConfig(
        ordering=ordering,
        fairness=fairness,
        max_requests=max_requests or (fallback.max_requests if fallback else DEFAULT_BAND_MAX_REQUESTS),
        max_bytes=max_bytes or (fallback.max_bytes if fallback else DEFAULT_BAND_MAX_BYTES),
    )


def resolve_flow_control(spec: FlowControlSpec, detector: SaturationDetector, resolver: _Resolver) -> FlowControlConfig:
    """Validate the parsed block and build the controller's config (injecting default policies)."""
    max_requests = _count(spec.max_requests, "flowControl.maxRequests")
    try:
        max_bytes = parse_bytes(spec.max_bytes)
    except ValueError as e:
        raise ConfigError(f"flowControl.maxBytes: {e}") from None
    max_flows = DEFAULT_MAX_FLOWS if spec.max_flows is None else spec.max_flows
    if max_flows < 1:
        raise ConfigError(f"flowControl.maxFlows: must be >= 1, got {max_flows}")
    try:
        default_ttl = (
            DEFAULT_REQUEST_TTL if spec.default_request_ttl is None else parse_duration(spec.default_request_ttl)
        )
    except ValueError as e:
        raise ConfigError(f"flowControl.defaultRequestTTL: {e}") from None
    try:
        no_endpoint_ttl = (
            default_ttl if spec.no_endpoint_request_ttl is None else parse_duration(spec.no_endpoint_request_ttl)
        )
    except ValueError as e:
        raise ConfigError(f"flowControl.noEndpointRequestTTL: {e}") from None

    default_band = _band(spec.default_priority_band or BandTemplateSpec(), "flowControl.defaultPriorityBand", resolver)
    negative = None
    if spec.default_negative_priority_band is not None:
        # As the reference (loader/flowcontrol.go::buildPriorityBand): unset fields take the system defaults,
        # not defaultPriorityBand's (that is only the template for dynamically provisioned priorities).
        negative = _band(spec.default_negative_priority_band, "flowControl.defaultNegativePriorityBand", resolver)
    bands: dict[int, BandConfig] = {}
    for i, band in enumerate(spec.priority_bands):
        field = f"flowControl.priorityBands[{i}]"
        if band.priority in bands:
            raise ConfigError(f"{field}.priority: duplicate priority {band.priority}")
        bands[band.priority] = _band(band, field, resolver)
    usage: UsageLimitPolicy = resolver.ref(
        spec.usage_limit_policy_plugin_ref, DEFAULT_USAGE_LIMIT, UsageLimitPolicy,
        "flowControl.usageLimitPolicyPluginRef", "a usage-limit policy",
    )  # fmt: skip
    return FlowControlConfig(
        detector=detector,
        usage_limit=usage,
        default_band=default_band,
        bands=bands,
        default_negative_band=negative,
        max_requests=max_requests,
        max_bytes=max_bytes,
        max_flows=max_flows,
        default_ttl=default_ttl,
        no_endpoint_ttl=no_endpoint_ttl,
    )


# -- the builder ---------------------------------------------------------------------------------
def build_admission(
    config: EndpointPickerConfig,
    plugins: dict[str, Plugin],
    feature_gates: Mapping[str, bool],
    *,
    pipeline: Pipeline | None = None,
    datastore: Datastore | None = None,
    metrics: Any = None,
    settings: Any = None,
    objectives: ObjectiveStore | None = None,
    plugin_registry: PluginRegistry = registry,
    clock: Callable[[], float] = time.monotonic,
) -> AdmissionController:
    """The admission controller for `Pipeline.admission`: legacy shedding, or flow control with the gate.

    Side effects on the build: injected default plugins and an internal `flow-control` hooks
    plugin are added to `plugins` (so the app's shutdown closes them); with flow control the
    hooks plugin is appended to `pipeline.response_complete` (completions free capacity).
    `settings.objectives_file`, when set, is loaded now (errors are ConfigErrors) and
    watched for changes once the controller starts.
    """
    resolver = _Resolver(plugins, plugin_registry)
    spec = parse_flow_control(config.flow_control)
    detector = resolve_detector(spec, config.saturation_detector, resolver)
    enabled = bool(feature_gates.get(FEATURE_GATE, False))
    fc_config = resolve_flow_control(spec, detector, resolver) if enabled else None
    if not enabled and config.flow_control and set(config.flow_control) - {"saturationDetector"}:
        problem = ""
        try:  # on a copy: the plugins a resolution injects are not this build's
            resolve_flow_control(spec, detector, _Resolver(dict(plugins), plugin_registry, trial=True))
        except ConfigError as e:  # said now, not first when the gate is turned on
            problem = f"; with it on, the block would be refused: {e}"
        log.warning("flowControl block ignored (except saturationDetector): feature gate %s is off%s", FEATURE_GATE,
                    problem)  # fmt: skip
    if fc_config is not None and spec.enable_eviction:
        fc_config.eviction_grace = eviction_grace(detector, settings)
        fc_config.eviction_filter = _configured_or_default(
            resolver, EvictionFilterPolicy, DEFAULT_EVICTION_FILTER, "an eviction filter policy"
        )
        fc_config.eviction_ordering = _configured_or_default(
            resolver, EvictionOrderingPolicy, DEFAULT_EVICTION_ORDERING, "an eviction ordering policy"
        )

    store = objectives if objectives is not None else ObjectiveStore()
    pool_name = datastore.pool_name if datastore is not None else str(getattr(settings, "pool_name", "epp"))
    watcher = None
    path = getattr(settings, "objectives_file", None)
    if path:
        watcher = ObjectivesFileWatcher(path, store, pool_name=pool_name, interval=OBJECTIVES_POLL_INTERVAL)
        watcher.load()

    controller: AdmissionController
    if fc_config is None:
        controller = LegacyAdmission(detector, store, watcher=watcher, clock=clock)
    else:
        ds = datastore if datastore is not None else Datastore()
        flow = FlowController(
            fc_config,
            pool=lambda: ds.endpoints,
            objectives=store,
            metrics=FlowControlMetrics.for_registry(_registry_of(metrics)),
            pool_name=pool_name,
            clock=clock,
            watcher=watcher,
        )
        ds.on_change(flow.pool_changed)
        controller = flow

    hooks = AdmissionHooks(controller)
    existing = plugins.get(hooks.name)
    if existing is not None and not isinstance(existing, AdmissionHooks):
        raise ConfigError(f"plugins: the name {hooks.name!r} is reserved for the flow controller")
    plugins[hooks.name] = hooks
    if fc_config is not None and pipeline is not None:
        pipeline.response_complete.append(hooks)
    log.info(
        "admission: %s",
        controller.mode,
        extra={"detector": detector.name, "objectives_file": path or "", "objectives": len(store)},
    )
    return controller


def _configured_or_default(resolver: _Resolver, kind: Any, default: str, label: str) -> Any:
    """The one configured plugin of `kind` (the config declares it in `plugins`; there is no reference
    field naming it), else the reference default, injected."""
    found = [p for p in resolver.plugins.values() if isinstance(p, kind)]
    if len(found) > 1:
        names = ", ".join(repr(p.name) for p in found)
        raise ConfigError(f"flowControl.enableEviction: the config has more than one {kind.__name__} ({names})")
    if found:
        return found[0]
    return resolver.default(default, kind, "flowControl.enableEviction", label)


def eviction_grace(detector: SaturationDetector, settings: Any) -> float:
    """Seconds between in-flight eviction decisions (flowcontrol.eviction), as the reference derives them."""
    if detector.counts_inflight:
        return INFLIGHT_GRACE
    refresh = float(getattr(settings, "refresh_metrics_interval", 0.05))
    staleness = float(getattr(settings, "metrics_staleness_threshold", 2.0))
    return refresh + staleness + SCRAPED_GRACE_EXTRA


def warn_if_scrapes_outlast_staleness(plugins: Iterable[object], scrape_period: float) -> None:
    """A start-up warning (llm-d-router#2514) for each saturation detector with a staleness threshold
    (utilization-detector: metricsStalenessThreshold) not above `scrape_period`, the seconds between two
    scrapes of a pod: such a detector reads every pod stale, i.e. saturated, for most of each period, so
    flow control stalls (head-of-line) and legacy admission sheds, though nothing is overloaded."""
    for plugin in plugins:
        staleness = getattr(plugin, "staleness", None)
        if isinstance(plugin, SaturationDetector) and isinstance(staleness, float) and scrape_period >= staleness:
            log.warning(
                "plugin %r (type %s): metricsStalenessThreshold %s is not above the metrics scrape period %s "
                "(--refresh-metrics-interval, or the metrics source's interval): pods read stale, i.e. "
                "saturated, between scrapes and dispatch stalls; set metricsStalenessThreshold above it",
                plugin.name, plugin.type, _duration(staleness), _duration(scrape_period),
            )  # fmt: skip


def _duration(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def _registry_of(metrics: Any) -> CollectorRegistry:
    if isinstance(metrics, CollectorRegistry):
        return metrics
    found = getattr(metrics, "registry", None)
    return found if isinstance(found, CollectorRegistry) else CollectorRegistry()
