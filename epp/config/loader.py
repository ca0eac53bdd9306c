"""EndpointPickerConfig YAML → built, wired, validated plugins.

    load_config(text)  → EndpointPickerConfig        (YAML + schema errors)
    build(config, ...) → Components                  (plugins, defaults, profiles, wiring)
    rebuild_scheduling(running, config, ...) → Components   (a reload while serving, below)

Defaults follow the reference loader: producers a plugin consumes are auto-created, a
profile without a picker gets `max-score-picker`, one profile without a handler gets
`single-profile-handler`, scorers default to weight 1, and a config with no profiles gets a
`default` profile holding every filter, scorer and picker. Every error is a ConfigError
whose message names the plugin / profile and field.

A reload (`--watch-config-file`) swaps the scheduler only. Filters, scorers, pickers and
profile handlers that keep no request state are rebuilt from the new config; every other
plugin (producers, pre-request and response plugins, admitters, discovery, data sources)
is taken over with its state (prefix index, in-flight counts, subscriptions), so it must be
unchanged, as must every section besides `plugins` and `schedulingProfiles`. Anything else
is refused with a ConfigError naming it, and the running config stays in force.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import yaml

from llmepp.config.schema import (
    API_VERSIONS,
    DEPRECATED_API_VERSIONS,
    KIND,
    EndpointPickerConfig,
    PluginSpec,
    SchedulingProfileSpec,
)
from llmepp.datalayer.multicluster import METRICS_SOURCE_TYPES, check_wiring, is_hub
from llmepp.director import Pipeline
from llmepp.flowcontrol.config import build_admission
from llmepp.framework.datakeys import (
    ENCODER_CACHE_MATCH_INFO,
    IN_FLIGHT_LOAD,
    LATENCY_PREDICTION_INFO,
    PREFIX_CACHE_MATCH_INFO,
    TOKENIZED_PROMPT,
)
from llmepp.framework.datalayer import EndpointDiscovery
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext, PluginRegistry, drop_nulls, registry
from llmepp.framework.requestcontrol import (
    Admitter,
    DataProducer,
    FirstResponseChunkProcessor,
    Parser,
    PreRequest,
    RequestHeaderProcessor,
    Responder,
    ResponseCompleteProcessor,
    ResponseHeaderProcessor,
    ResponseMetadataProcessor,
    Screener,
)
from llmepp.framework.scheduling import Filter, Picker, ProfileHandler, Scorer
from llmepp.request.parsers import RequestParsers, default_parsers
from llmepp.scheduling.profile import SchedulerProfile, WeightedScorer
from llmepp.scheduling.scheduler import Scheduler
from llmepp.units import parse_duration

log = logging.getLogger(__name__)

# Data key → the producer type auto-created when a consumer needs it and none is configured.
DEFAULT_PRODUCERS: dict[str, str] = {
    PREFIX_CACHE_MATCH_INFO: "approx-prefix-cache-producer",
    TOKENIZED_PROMPT: "token-producer",
    IN_FLIGHT_LOAD: "inflight-load-producer",
    "SessionID": "session-id-producer",
    ENCODER_CACHE_MATCH_INFO: "mm-embeddings-cache-producer",
    LATENCY_PREDICTION_INFO: "predicted-latency-producer",
}
DEFAULT_PICKER = "max-score-picker"
DEFAULT_HANDLER = "single-profile-handler"
KNOWN_FEATURE_GATES = {"flowControl": False, "haPopulateNonLeaderDatastore": True}


@dataclass(slots=True)
class DataSource:
    source: Plugin
    extractors: list[Plugin]


@dataclass(slots=True)
class Components:
    """Everything the app wires together, built from one config."""

    config: EndpointPickerConfig
    plugins: dict[str, Plugin]
    pipeline: Pipeline
    feature_gates: dict[str, bool]
    discovery: EndpointDiscovery | None = None
    data_sources: list[DataSource] = field(default_factory=list)
    # The spec of every plugin built from the config or auto-created for it (name filled in): what a
    # reload compares. Plugins flow control and the data layer add for themselves are not in it.
    specs: dict[str, PluginSpec] = field(default_factory=dict)
    # requestHandler.parsers: which parser reads a request, by path.
    parsers: RequestParsers = field(default_factory=default_parsers)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading what the reference's YAML parser (go-yaml, strict) reads differently:
    a key given twice in one mapping is an error, not the last one winning; `1e3` and `2.5E-1` are numbers
    (YAML 1.1, as PyYAML implements it, needs a dot and a signed exponent and reads them as strings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # merged keys may be overridden; a non-scalar key fails below
                key = self.construct_object(key_node)
                if key in seen:
                    mark = key_node.start_mark
                    raise yaml.constructor.ConstructorError(
                        None, None, f"line {mark.line + 1}, column {mark.column + 1}: duplicate key {key!r}"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _yaml_error(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.constructor.ConstructorError) and e.problem and e.problem.startswith("line "):
        return e.problem  # a duplicate key: the message has the position already
    return str(e)


def load_config(text: str) -> EndpointPickerConfig:
    try:
        raw, more = _first_document(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {_yaml_error(e)}") from None
    except RecursionError:
        raise ConfigError("config is not valid YAML: nested too deeply") from None
    if raw is None:
        # Only whitespace, comments or `---`: the reference's decoder refuses it (no kind). Read as a config it
        # has no plugins: one profile without scorers, i.e. random routing. Zero bytes is the default config
        # (app.config_text), as in the reference.
        if more:  # e.g. `---`, a comment block, `---`, the config: the config is the second document
            raise ConfigError(
                "config: the first YAML document is empty and only the first is read (as the reference); "
                "remove the first `---`"
            )
        raise ConfigError(
            "config: the document is empty (only whitespace or comments); give a config, or an empty file for "
            "the default one"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping, got {type(raw).__name__}")
    _check_plain_data(raw)
    try:
        config = msgspec.convert(drop_nulls(raw, _CONFIG_INFO), EndpointPickerConfig, str_keys=True)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config: {str(e).replace('`$.', '`').replace('`$`', 'the document')}") from None
    if config.api_version not in API_VERSIONS:
        raise ConfigError(f"apiVersion: unsupported {config.api_version!r}; expected one of {', '.join(API_VERSIONS)}")
    if config.api_version in DEPRECATED_API_VERSIONS:
        log.warning("apiVersion %s is deprecated; use %s", config.api_version, API_VERSIONS[0])
    if config.kind != KIND:
        raise ConfigError(f"kind: expected {KIND!r}, got {config.kind!r}")
    for i, profile in enumerate(config.scheduling_profiles):
        if not profile.name:  # as the reference's validateSchedulingProfiles
            raise ConfigError(f"schedulingProfiles[{i}].name: a profile needs a name")
    return config


def _first_document(text: str) -> tuple[Any, bool]:
    """The stream's first YAML document, as the reference's decoder (go-yaml Unmarshal) reads it, and whether
    a later one is not empty: a trailing `---` (generated, concatenated files) loads; later documents are
    ignored, with a warning."""
    loader = _YamlLoader(text)  # a SafeLoader subclass
    try:
        raw = loader.get_data() if loader.check_data() else None
        try:
            extra = any(loader.get_data() is not None for _ in iter(loader.check_data, False))
        except yaml.YAMLError:
            extra = True
        if extra and raw is not None:
            log.warning("config: only the first YAML document is read (as the reference); the others are ignored")
        return raw, extra
    finally:
        loader.dispose()


_CONFIG_INFO = msgspec.inspect.type_info(EndpointPickerConfig)


# Scores are in [0, 1]: with weights this large a profile's totals would overflow to inf (and inf - inf is NaN, so
# the pick turns random). 1e15 keeps every integer weight exact and is far above any useful one.
_MAX_WEIGHT = 1e15


def _check_plain_data(raw: dict[str, Any]) -> None:
    """What the reference's YAML -> JSON step refuses: .nan / .inf (JSON has no such numbers; a NaN passes
    every range check) and an alias inside the node it names (a cycle). Errors name the path."""
    stack: list[tuple[Any, str, bool]] = [(raw, "", False)]  # (node, path, leaving)
    open_: set[int] = set()  # containers on the current path
    done: set[int] = set()  # containers checked (aliases share nodes: each is walked once)
    while stack:
        node, path, leaving = stack.pop()
        if leaving:
            open_.discard(id(node))
            done.add(id(node))
            continue
        if isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{path}: {node}: numbers must be finite")
        if isinstance(node, str) and not _is_unicode(node):
            # A lone surrogate ("\ud800"): it cannot be encoded wherever the text goes out (metrics, logs).
            raise ConfigError(f"{path or 'config'}: not valid Unicode text (a lone surrogate escape)")
        if isinstance(node, dict) and not all(_is_unicode(k) for k in node if isinstance(k, str)):
            raise ConfigError(f"{path or 'config'}: a key is not valid Unicode text (a lone surrogate escape)")
        if not isinstance(node, (dict, list)) or id(node) in done:
            continue
        if id(node) in open_:
            raise ConfigError(f"{path}: a YAML alias refers to a node that contains it (a cycle)")
        open_.add(id(node))
        stack.append((node, path, True))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in reversed(list(items)):
            where = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}" if path else str(key)
            stack.append((value, where, False))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_GO_BOOLS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}  # strconv.ParseBool


def parse_feature_gates(gates: Iterable[str]) -> dict[str, bool]:
    """`name` or `name=value`, as the reference's loadFeatureConfig (the value read by strconv.ParseBool); a
    gate it does not register is an error there (validateFeatureGates: "unknown or unregistered")."""
    result = dict(KNOWN_FEATURE_GATES)
    for i, gate in enumerate(gates):
        name, sep, value = gate.partition("=")
        name = name.strip()
        if name not in KNOWN_FEATURE_GATES:
            raise ConfigError(
                f"featureGates[{i}]: {gate!r}: unknown feature gate; known: {', '.join(sorted(KNOWN_FEATURE_GATES))}"
            )
        parsed = _GO_BOOLS.get(value.strip().lower()) if sep else True
        if parsed is None:
            raise ConfigError(f"featureGates[{i}]: {gate!r}: value must be true or false")
        result[name] = parsed
    return result


def build(
    config: EndpointPickerConfig,
    *,
    datastore: Any = None,
    settings: Any = None,
    metrics: Any = None,
    plugin_registry: PluginRegistry = registry,
    built: list[Plugin] | None = None,
) -> Components:
    """The config's plugins built, set up and wired; raises ConfigError. `built` gets every plugin instance
    made (also those set up before a later step refused the config), so the caller can close them (`aclose`)."""
    chosen = _Plugins(plugin_registry, fresh=built)
    try:
        return _build(config, chosen, datastore=datastore, settings=settings, metrics=metrics,
                      plugin_registry=plugin_registry)  # fmt: skip
    finally:
        if built is not None:  # besides `fresh`: defaults the data layer and flow control added
            made = {id(p) for p in built}
            built.extend(p for p in chosen.plugins.values() if id(p) not in made)


def _build(
    config: EndpointPickerConfig,
    chosen: _Plugins,
    *,
    datastore: Any,
    settings: Any,
    metrics: Any,
    plugin_registry: PluginRegistry,
) -> Components:
    scheduler = _build_scheduling(config, chosen)
    plugins = chosen.plugins
    _setup(chosen.fresh, plugins, scheduler, datastore=datastore, settings=settings, metrics=metrics)

    values = list(plugins.values())
    pipeline = Pipeline(
        scheduler=scheduler,
        header_processors=[p for p in values if isinstance(p, RequestHeaderProcessor)],
        responders=[p for p in values if isinstance(p, Responder)],
        screeners=[p for p in values if isinstance(p, Screener)],
        producers=_ordered_producers([p for p in values if isinstance(p, DataProducer)]),
        admitters=[p for p in values if isinstance(p, Admitter)],
        pre_request=[p for p in values if isinstance(p, PreRequest)],
        response_header=[p for p in values if isinstance(p, ResponseHeaderProcessor)],
        first_response_chunk=[p for p in values if isinstance(p, FirstResponseChunkProcessor)],
        response_metadata=[p for p in values if isinstance(p, ResponseMetadataProcessor)],
        response_complete=[p for p in values if isinstance(p, ResponseCompleteProcessor)],
    )
    components = Components(
        config=config,
        plugins=plugins,
        pipeline=pipeline,
        feature_gates=parse_feature_gates(config.feature_gates),
        specs=dict(chosen.specs),
    )
    pipeline.admission = build_admission(
        config, plugins, components.feature_gates, pipeline=pipeline, datastore=datastore, metrics=metrics,
        settings=settings, plugin_registry=plugin_registry,
    )  # fmt: skip
    _build_data_layer(config, plugins, components, plugin_registry)
    components.parsers = _request_parsers(config, plugins)
    return components


# Config sections a reload must leave as they are (attribute, YAML key).
_RESTART_SECTIONS = (
    ("api_version", "apiVersion"),
    ("kind", "kind"),
    ("feature_gates", "featureGates"),
    ("request_handler", "requestHandler"),
    ("data_layer", "dataLayer"),
    ("flow_control", "flowControl"),
    ("saturation_detector", "saturationDetector"),
    ("parser", "parser"),
)
_RESTART = "only filters, scorers, pickers and profile handlers reload while serving; restart the EPP to apply this"


def rebuild_scheduling(
    running: Components,
    config: EndpointPickerConfig,
    *,
    datastore: Any = None,
    settings: Any = None,
    metrics: Any = None,
    plugin_registry: PluginRegistry = registry,
    built: list[Plugin] | None = None,
) -> Components:
    """`running` with `config`'s scheduler: the stateless scheduling plugins rebuilt, every other plugin
    the running instance (its spec must be unchanged). Returns new Components sharing everything else
    with `running` (whose pipeline stays as it was until the caller swaps); raises ConfigError.

    `built` gets each plugin instance made for `config` as it is made (never a running one taken over),
    so that when this raises, after some were built and set up, the caller closes them (`aclose`)."""
    for attr, key in _RESTART_SECTIONS:
        if getattr(config, attr) != getattr(running.config, attr):
            raise ConfigError(f"{key}: changed; {_RESTART}")
    # What flow control and the data layer added for themselves; their sections are unchanged.
    own = {name: p for name, p in running.plugins.items() if name not in running.specs}
    # A saturation detector is a filter too, but admission holds the instance it was built with: it keeps
    # its running instance (one detector for both), so changing it needs a restart.
    detector = getattr(running.pipeline.admission, "detector", None)
    pinned = {name for name, p in running.plugins.items() if p is detector}
    chosen = _Plugins(plugin_registry, running=running, reserved=own, pinned=pinned, fresh=built)
    scheduler = _build_scheduling(config, chosen)
    configured = {spec.name or spec.type for spec in running.config.plugins}
    for name in running.specs:
        if name not in chosen.specs:
            old = running.plugins[name]
            if name not in configured and not _swappable(type(old)):
                # Auto-created for a consumer the new file drops: it runs on (the pipeline's producers are the
                # running ones) with its state, and serves the consumer again if a later file brings it back.
                chosen.plugins[name] = old
                chosen.specs[name] = running.specs[name]
                continue
            chosen.check_swappable(name, type(old), "removed")
    plugins = {**own, **chosen.plugins}
    _setup(chosen.fresh, plugins, scheduler, datastore=datastore, settings=settings, metrics=metrics)
    check_wiring(running.discovery, [(ds.source, ds.extractors) for ds in running.data_sources], plugins)
    # A running instance taken over is not set up again: what it resolved from other plugins must hold.
    before = PluginContext(running.plugins, datastore=datastore, settings=settings, metrics=metrics)
    after = PluginContext(plugins, datastore=datastore, settings=settings, metrics=metrics)
    fresh = {id(p) for p in chosen.fresh}
    for name, plugin in plugins.items():
        if id(plugin) not in fresh and plugin.wiring(after) != plugin.wiring(before):
            raise ConfigError(f"plugin {name!r} (type {plugin.type}): the plugins it reads changed; {_RESTART}")
    return dataclasses.replace(
        running,
        config=config,
        plugins=plugins,
        pipeline=dataclasses.replace(running.pipeline, scheduler=scheduler),
        specs=dict(chosen.specs),
    )


# -- steps ---------------------------------------------------------------------------------
# Scheduling-only plugins: no request state between hooks, nothing fed to other plugins. A reload may
# add, change or drop them; it rebuilds all of them (they are cheap and hold nothing worth keeping).
_SCHEDULING = (Filter, Scorer, Picker, ProfileHandler)
_KEEPS_STATE = (
    RequestHeaderProcessor,
    Responder,
    Screener,
    DataProducer,
    Admitter,
    PreRequest,
    ResponseHeaderProcessor,
    FirstResponseChunkProcessor,
    ResponseMetadataProcessor,
    ResponseCompleteProcessor,
)


def _swappable(cls: type) -> bool:
    return issubclass(cls, _SCHEDULING) and not issubclass(cls, _KEEPS_STATE)


class _Plugins:
    """The config's plugins by name: built now, or, on a reload, the running instance taken over."""

    def __init__(
        self,
        plugin_registry: PluginRegistry,
        *,
        running: Components | None = None,
        reserved: Mapping[str, Plugin] | None = None,
        pinned: Iterable[str] = (),
        fresh: list[Plugin] | None = None,
    ) -> None:
        self.registry = plugin_registry
        self.running = running
        self.reserved = {n: p.type for n, p in (reserved or {}).items()}  # name -> type
        self.pinned = set(pinned)  # running plugins kept (or a restart asked for) even if swappable
        self.plugins: dict[str, Plugin] = {}
        self.specs: dict[str, PluginSpec] = {}
        self.fresh: list[Plugin] = [] if fresh is None else fresh  # built now: to set up (and close if refused)

    def add(self, spec: PluginSpec, where: str) -> Plugin:
        name = spec.name or spec.type
        if not spec.type:
            raise ConfigError(f"{where}: type is required")
        if name in self.plugins:
            raise ConfigError(f"{where}: duplicate plugin name {name!r}")
        if name in self.reserved:
            # On a reload only: the running EPP made a plugin of this name for itself (its config did not).
            raise ConfigError(
                f"{where}: plugin name {name!r} is taken by a plugin the running EPP created for itself "
                f"(type {self.reserved[name]}); use another name"
            )
        spec = msgspec.structs.replace(spec, name=name)
        running = self.running
        if running is not None:
            old = running.plugins.get(name) if name in running.specs else None
            if old is not None and (not _swappable(type(old)) or name in self.pinned):
                if running.specs[name] != spec:
                    raise ConfigError(f"plugin {name!r} (type {old.type}): changed; {_RESTART}")
                self.plugins[name] = old
                self.specs[name] = spec
                return old
            cls = self.registry.get(spec.type)
            if cls is not None:  # an unknown type fails just below, with the known types listed
                self.check_swappable(name, cls, "changed" if old is not None else "added")
        plugin = self.registry.build(spec.type, name, spec.parameters)
        self.plugins[name] = plugin
        self.specs[name] = spec
        self.fresh.append(plugin)
        return plugin

    def add_default(self, type_name: str) -> Plugin:
        return self.add(PluginSpec(type=type_name, name=type_name), f"auto-created plugin {type_name!r}")

    def check_swappable(self, name: str, cls: type, what: str) -> None:
        if not _swappable(cls) or name in self.pinned:
            raise ConfigError(f"plugin {name!r} (type {getattr(cls, 'type', '?')}): {what}; {_RESTART}")


def _build_scheduling(config: EndpointPickerConfig, chosen: _Plugins) -> Scheduler:
    for i, plugin_spec in enumerate(config.plugins):
        chosen.add(plugin_spec, f"plugins[{i}]")
    plugins = chosen.plugins
    _add_default_producers(chosen)
    specs = config.scheduling_profiles or [_default_profile_spec(plugins)]
    default_picker: Picker | None = None
    if any(not _profile_has(spec, plugins, Picker) for spec in specs):
        default_picker = _default_picker(chosen, specs)
    profiles: dict[str, SchedulerProfile] = {}
    for spec in specs:
        if spec.name in profiles:
            raise ConfigError(f"schedulingProfiles: profile names must be unique; {spec.name!r} is given twice")
        profiles[spec.name] = _build_profile(spec, plugins, default_picker)
    return Scheduler(_profile_handler(chosen, profiles), profiles)


def _setup(
    fresh: list[Plugin],
    plugins: dict[str, Plugin],
    scheduler: Scheduler,
    *,
    datastore: Any,
    settings: Any,
    metrics: Any,
) -> None:
    """`setup()` of the plugins built now (taken-over ones are set up already), then the profile check."""
    ctx = PluginContext(plugins, datastore=datastore, settings=settings, metrics=metrics)
    for plugin in fresh:
        label = f"plugin {plugin.name!r} (type {plugin.type})"
        try:
            plugin.setup(ctx)
        except ConfigError as e:
            raise (e if str(e).startswith(label) else ConfigError(f"{label}: {e}")) from None
        except (ValueError, TypeError, OSError) as e:  # OSError: a file or socket its parameters name
            raise ConfigError(f"{label}: {e}") from None
    handler = scheduler.handler
    try:
        handler.validate_profiles(scheduler.profiles)
    except ConfigError as e:
        raise ConfigError(f"plugin {handler.name!r} (type {handler.type}): {e}") from None


def _add_default_producers(chosen: _Plugins) -> None:
    """Create the default producer of every consumed data key nobody produces (to a fixed point)."""
    plugins = chosen.plugins
    changed = True
    while changed:
        changed = False
        produced = {key for p in plugins.values() for key in p.produces}
        for plugin in list(plugins.values()):
            for key in sorted(plugin.consumes - produced):
                default = DEFAULT_PRODUCERS.get(key)
                if default is None:
                    raise ConfigError(
                        f"plugin {plugin.name!r} (type {plugin.type}): consumes {key} but no configured "
                        "plugin produces it"
                    )
                if default in plugins:
                    raise ConfigError(f"plugin {default!r} exists but does not produce {key}")
                log.info("auto-created producer %s for %s (needed by %s)", default, key, plugin.name)
                produced |= chosen.add_default(default).produces
                changed = True


def _default_profile_spec(plugins: dict[str, Plugin]) -> SchedulingProfileSpec:
    from llmepp.config.schema import ProfilePluginRef

    refs = [ProfilePluginRef(plugin_ref=name) for name, p in plugins.items() if isinstance(p, (Filter, Scorer, Picker))]
    return SchedulingProfileSpec(name="default", plugins=refs)


def _default_picker(chosen: _Plugins, specs: list[SchedulingProfileSpec]) -> Picker:
    """The picker of a profile that names none, as the reference's ensureSchedulingLayer: a configured picker
    (the one named max-score-picker first, else the first in the config; the reference takes any one), else a
    `max-score-picker` made with defaults."""
    plugins = chosen.plugins
    named = plugins.get(DEFAULT_PICKER)
    if isinstance(named, Picker):
        return named
    configured = next((p for p in plugins.values() if isinstance(p, Picker)), None)
    if configured is not None:
        return configured
    if named is not None:
        lacking = next(spec.name for spec in specs if not _profile_has(spec, plugins, Picker))
        raise ConfigError(
            f"plugin {DEFAULT_PICKER!r} (type {named.type}): is not a picker; profile {lacking!r} has no "
            "picker and the name is needed for the default one"
        )
    picker = chosen.add_default(DEFAULT_PICKER)
    assert isinstance(picker, Picker)
    return picker


def _profile_has(spec: SchedulingProfileSpec, plugins: dict[str, Plugin], kind: type[Plugin]) -> bool:
    return any(isinstance(plugins.get(ref.plugin_ref), kind) for ref in spec.plugins)


def _build_profile(
    spec: SchedulingProfileSpec, plugins: dict[str, Plugin], default_picker: Picker | None
) -> SchedulerProfile:
    where = f"schedulingProfiles[{spec.name!r}]"
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    picker: Picker | None = None
    if not spec.plugins:
        log.warning("%s: lists no plugins: every endpoint ties and the pick is random", where)
    seen: set[str] = set()
    for ref in spec.plugins:
        plugin = plugins.get(ref.plugin_ref)
        if plugin is None:
            raise ConfigError(f"{where}: pluginRef {ref.plugin_ref!r}: no plugin with that name")
        if ref.plugin_ref in seen:  # kept: a scorer listed twice counts twice
            log.warning("%s: pluginRef %r is listed more than once", where, ref.plugin_ref)
        seen.add(ref.plugin_ref)
        if ref.weight is not None and not isinstance(plugin, Scorer):
            log.warning("%s: pluginRef %r (type %s) is not a scorer; its weight is ignored", where, ref.plugin_ref,
                        plugin.type)  # fmt: skip
        used = False
        if isinstance(plugin, Filter):
            filters.append(plugin)
            used = True
        if isinstance(plugin, Scorer):
            weight = 1.0 if ref.weight is None else ref.weight  # as given: a negative weight is a penalty
            if abs(weight) > _MAX_WEIGHT:
                raise ConfigError(f"{where}: pluginRef {ref.plugin_ref!r}: weight {weight:g} is out of range "
                                  f"(at most {_MAX_WEIGHT:g} either way)")  # fmt: skip
            scorers.append(WeightedScorer(plugin, weight))
            used = True
        if isinstance(plugin, Picker):
            if picker is not None:
                raise ConfigError(f"{where}: more than one picker ({picker.name!r}, {plugin.name!r})")
            picker = plugin
            used = True
        if not used and isinstance(plugin, DataProducer):
            # The reference's presets list their producer in the profile (the latency predictor's Helm
            # preset): it runs with the other producers, before any profile; the entry changes nothing.
            used = True
        if not used:
            raise ConfigError(
                f"{where}: pluginRef {ref.plugin_ref!r} (type {plugin.type}) is not a filter, scorer or picker"
            )
    if picker is None:
        assert default_picker is not None  # _build_scheduling made one for the profiles that name none
        picker = default_picker
    return SchedulerProfile(name=spec.name, picker=picker, filters=filters, scorers=scorers)


def _profile_handler(chosen: _Plugins, profiles: dict[str, SchedulerProfile]) -> ProfileHandler:
    handlers = [p for p in chosen.plugins.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise ConfigError(f"plugins: at most one profile handler, found {', '.join(h.name for h in handlers)}")
    if handlers:
        return handlers[0]
    if len(profiles) != 1:
        raise ConfigError(
            f"schedulingProfiles: {len(profiles)} profiles need a profile handler plugin (e.g. disagg-profile-handler)"
        )
    handler = chosen.add_default(DEFAULT_HANDLER)
    assert isinstance(handler, ProfileHandler)
    return handler


def _ordered_producers(producers: list[DataProducer]) -> list[DataProducer]:
    """Topological order: a producer runs after the producers of the keys it consumes."""
    ordered: list[DataProducer] = []
    pending = list(producers)
    while pending:
        ready = [p for p in pending if not any(p.consumes & q.produces for q in pending if q is not p)]
        if not ready:
            raise ConfigError(f"data producers form a dependency cycle: {', '.join(p.name for p in pending)}")
        ordered += ready
        pending = [p for p in pending if p not in ready]
    return ordered


def _add_required_sources(plugins: dict[str, Plugin], components: Components, plugin_registry: PluginRegistry) -> None:
    """Data sources plugins read (`Plugin.data_sources`) that `dataLayer.sources` does not wire: the
    configured plugin of that type if there is one, else one made with defaults; likewise its extractor."""
    wired = {ds.source.type for ds in components.data_sources}
    for plugin in list(plugins.values()):
        for source_type, extractor_type in plugin.data_sources:
            if source_type in wired:
                continue
            wired.add(source_type)
            source = _plugin_of_type(source_type, plugins, plugin_registry)
            extractor = _plugin_of_type(extractor_type, plugins, plugin_registry)
            log.info("data layer: %s feeds %s for plugin %r", source.name, extractor.name, plugin.name)
            components.data_sources.append(DataSource(source, [extractor]))


def _plugin_of_type(type_name: str, plugins: dict[str, Plugin], plugin_registry: PluginRegistry) -> Plugin:
    """The configured plugin of `type_name`, else a new one with defaults named after its type."""
    for plugin in plugins.values():
        if plugin.type == type_name:
            return plugin
    taken = plugins.get(type_name)
    if taken is not None:
        raise ConfigError(f"plugin {type_name!r} (type {taken.type}): the name is needed for an auto-created one")
    plugins[type_name] = plugin = plugin_registry.build(type_name, type_name, None)
    return plugin


def _request_parsers(config: EndpointPickerConfig, plugins: dict[str, Plugin]) -> RequestParsers:
    """requestHandler.parsers, else the deprecated top-level `parser` (as the reference: when both are set,
    the new field is used); the default list when neither names one."""
    refs: list[tuple[str, str]] = []  # (field, plugin name)
    if config.request_handler is not None:
        refs += [
            (f"requestHandler.parsers[{i}].pluginRef", r.plugin_ref)
            for i, r in enumerate(config.request_handler.parsers)
        ]
    if config.parser is not None:
        used = "requestHandler.parsers is used" if refs else "using it"
        log.warning("parser is deprecated; use requestHandler.parsers (%s)", used)
        if not refs:
            refs.append(("parser.pluginRef", config.parser.plugin_ref))
    if not refs:
        return default_parsers()
    parsers: list[Parser] = []
    for where, name in refs:
        plugin = plugins.get(name)
        if plugin is None:
            raise ConfigError(f"{where}: no plugin named {name!r}")
        if not isinstance(plugin, Parser):
            raise ConfigError(f"{where}: plugin {name!r} (type {plugin.type}) is not a parser")
        parsers.append(plugin)
    return RequestParsers(parsers)


def _build_data_layer(
    config: EndpointPickerConfig,
    plugins: dict[str, Plugin],
    components: Components,
    plugin_registry: PluginRegistry,
) -> None:
    layer = config.data_layer
    if layer is not None and layer.cross_replica_sync_interval:
        # Read by no plugin here (the router-local load is shared through redis-inflight-load-producer's
        # Redis); checked so a typo is not silently carried along.
        try:
            parse_duration(layer.cross_replica_sync_interval)
        except ValueError as e:
            raise ConfigError(f"dataLayer.crossReplicaSyncInterval: {e}") from None
    if layer is not None and layer.discovery is not None:
        spec = layer.discovery
        where = (
            "dataLayer.discovery.endpoints.pluginRef" if spec.endpoints is not None else "dataLayer.discovery.pluginRef"
        )
        if spec.endpoints is not None and spec.plugin_ref:
            raise ConfigError("dataLayer.discovery: give pluginRef or endpoints.pluginRef, not both")
        ref = spec.endpoints.plugin_ref if spec.endpoints is not None else spec.plugin_ref
        plugin = plugins.get(ref)
        if plugin is None:
            raise ConfigError(f"{where}: no plugin named {ref!r}")
        if not isinstance(plugin, EndpointDiscovery):
            raise ConfigError(f"{where}: plugin {ref!r} (type {plugin.type}) is not a discovery")
        components.discovery = plugin
    for i, src in enumerate(layer.sources if layer is not None else []):
        source = plugins.get(src.plugin_ref)
        if source is None:
            raise ConfigError(f"dataLayer.sources[{i}].pluginRef: no plugin named {src.plugin_ref!r}")
        extractors = []
        for j, ext in enumerate(src.extractors):
            extractor = plugins.get(ext.plugin_ref)
            if extractor is None:
                raise ConfigError(
                    f"dataLayer.sources[{i}].extractors[{j}].pluginRef: no plugin named {ext.plugin_ref!r}"
                )
            if source.type in METRICS_SOURCE_TYPES and not callable(getattr(extractor, "mapping_for", None)):
                # The metrics collector reads pages through the extractor's engine mapping.
                raise ConfigError(
                    f"dataLayer.sources[{i}].extractors[{j}].pluginRef: plugin {extractor.name!r} (type "
                    f"{extractor.type}) is not a metrics extractor; source {source.name!r} (type {source.type}) "
                    "cannot feed it"
                )
            extractors.append(extractor)
        components.data_sources.append(DataSource(source, extractors))
    _add_required_sources(plugins, components, plugin_registry)
    inject = layer.inject_defaults if layer is not None else True
    has_metrics_source = any(ds.source.type in METRICS_SOURCE_TYPES for ds in components.data_sources)
    # A hub's endpoints are clusters: there are no model-server pages to scrape.
    hub = is_hub(components.discovery)
    if inject and not has_metrics_source and not hub and plugin_registry.get("metrics-data-source") is not None:
        source = plugins.setdefault(
            "metrics-data-source", plugin_registry.build("metrics-data-source", "metrics-data-source", None)
        )
        extractor = plugins.setdefault(
            "core-metrics-extractor",
            plugin_registry.build("core-metrics-extractor", "core-metrics-extractor", None),
        )
        components.data_sources.append(DataSource(source, [extractor]))
    check_wiring(components.discovery, [(ds.source, ds.extractors) for ds in components.data_sources], plugins)
