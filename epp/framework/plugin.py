"""Plugin base class, typed parameters and the type-string registry.

Every behaviour the config can name is a `Plugin` subclass with a unique `type` string
(the reference's), an optional nested `Params` msgspec Struct (camelCase keys in YAML,
snake_case attributes, defaults as field defaults), and a docstring giving its formula.

    class MyScorer(Scorer):
        \"\"\"Prefers ...  score = ...\"\"\"
        type = "my-scorer"

        class Params(PluginParams):
            threshold: int = 128

        def __init__(self, name: str, params: Params) -> None:
            super().__init__(name, params)
            self.threshold = params.threshold

Out-of-tree packages register through the `epp.plugins` entry-point group: the entry
point is either a Plugin subclass or a callable taking the `PluginRegistry`.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import logging
from abc import ABC
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

import msgspec
import msgspec.inspect

from llmepp.framework.datakeys import UNSCOPED, scoped

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epp.plugins"
DIST = "llm-epp"  # this project's distribution, whose entry point registers the built-ins


class PluginParams(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """Base for a plugin's parameters: YAML keys are the camelCase field names."""


class NoParams(PluginParams):
    pass


def reference_default(plugin_type: str, field: str, value: Any, default: Any, rule: str) -> Any:
    """`default`, with a warning naming the field: for a parameter value the reference does not reject but
    replaces with its default (so a config it loads loads here too). Call from `Params.__post_init__`."""
    log.warning("%s: parameter %s is %r (%s); using the default %r, as the reference does", plugin_type, field, value,
                rule, default)  # fmt: skip
    return default


class ConfigError(Exception):
    """A configuration problem found at start-up; the message names the plugin and field."""


class Plugin(ABC):
    """Base of every plugin. `name` is the instance name from the config (defaults to type)."""

    type: ClassVar[str] = ""
    # `builtins.type`: inside this class body, `type` is the type-string attribute above.
    Params: ClassVar[builtins.type[PluginParams]] = NoParams
    # Deprecated type strings that build this plugin too (a warning names `type` instead).
    aliases: ClassVar[tuple[str, ...]] = ()
    # Data keys this plugin writes into `request.data` / reads from it (producer wiring).
    produces: ClassVar[frozenset[str]] = frozenset()
    consumes: ClassVar[frozenset[str]] = frozenset()
    # Data-layer (source type, extractor type) pairs this plugin reads from endpoints: the loader adds
    # them when the config wires none of that source type (reference `datalayer.Registrant`).
    data_sources: ClassVar[tuple[tuple[str, str], ...]] = ()
    # A plugin without parameters: the reference's factory for it ignores its `parameters` block (the
    # decoder argument unused), so one is accepted and ignored with a warning; True where the reference
    # rejects a non-empty block (soft-reflective-ceiling-policy).
    rejects_parameters: ClassVar[bool] = False
    # Non-empty: the plugin reads per-pod model-server state a multicluster hub's endpoints (whole clusters,
    # reached through their gateways) never have, and this says what ("reads ..."): a hub refuses it.
    pod_only: ClassVar[str] = ""
    # Methods the EPP calls synchronously (each extension point names its own): an `async def` one would
    # never run (an async admitter would admit everything), so building such a plugin is a config error.
    sync_hooks: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: Any = None) -> None:
        self.name = name or self.type
        self.params: Any = params if params is not None else self.Params()

    def setup(self, ctx: PluginContext) -> None:
        """Called once after every plugin is built: resolve references, start background work."""

    def wiring(self, ctx: PluginContext) -> object:
        """What setup() resolves from *other* plugins' names or parameters, worked out again for `ctx`
        (no side effects). A config reload keeps a plugin that holds state, set up as it is: if its wiring
        under the new config differs, the reload is refused. Default: nothing resolved that way."""
        return None

    async def check(self) -> None:
        """Called once in the event loop before the EPP serves, after setup: what only I/O can tell (an external
        store's credentials). A ConfigError refuses the start-up with its message; anything that may still
        come right (a store not up yet) should be logged, not raised."""

    async def aclose(self) -> None:
        """Release background work on shutdown."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


P = TypeVar("P", bound=Plugin)


class PluginContext:
    """What plugins may reach at setup: the datastore, settings, and other plugins by name."""

    def __init__(self, plugins: Mapping[str, Plugin], datastore: Any, settings: Any, metrics: Any) -> None:
        self._plugins = plugins
        self.datastore = datastore
        self.settings = settings
        self.metrics = metrics

    def plugin(self, name: str, kind: type[P], *, referrer: Plugin, field: str) -> P:
        """The plugin instance `name`, checked to be a `kind`; errors name the referring field."""
        found = self._plugins.get(name)
        if found is None:
            raise ConfigError(f"plugin {referrer.name!r} (type {referrer.type}): {field}: no plugin named {name!r}")
        if not isinstance(found, kind):
            raise ConfigError(
                f"plugin {referrer.name!r} (type {referrer.type}): {field}: plugin {name!r} "
                f"(type {found.type}) is not a {kind.__name__}"
            )
        return found

    def plugins_of(self, kind: type[P]) -> list[P]:
        return [p for p in self._plugins.values() if isinstance(p, kind)]

    def producer_key(self, consumer: Plugin, data_key: str, producer_name: str, field: str) -> str:
        """The `request.data` key a consumer reads `data_key` from: the named producer's, else
        the only producer of that key (the loader auto-creates a default one when missing)."""
        label = f"plugin {consumer.name!r} (type {consumer.type}): {field}"
        if producer_name:
            producer = self.plugin(producer_name, Plugin, referrer=consumer, field=field)
            if data_key not in producer.produces:
                raise ConfigError(
                    f"{label}: plugin {producer_name!r} (type {producer.type}) does not produce {data_key}"
                )
        else:
            producers = [p for p in self._plugins.values() if data_key in p.produces]
            if len(producers) != 1:
                found = ", ".join(p.name for p in producers) or "none"
                raise ConfigError(f"{label}: exactly one producer of {data_key} is needed (found: {found}); name one")
            producer = producers[0]
        return data_key if data_key in UNSCOPED else scoped(data_key, producer.name)


class PluginRegistry:
    """Type string → plugin class. One global instance: `registry`."""

    def __init__(self) -> None:
        self._types: dict[str, type[Plugin]] = {}
        self._loaded_entry_points = False
        self._loading: str | None = None  # the entry point being loaded

    def register(self, cls: type[P], *aliases: str) -> type[P]:
        """Register a plugin class under `cls.type` (usable as a class decorator). A type string already
        taken by another class is an error; while entry points load, it is logged and that name skipped,
        so one package's clash neither stops start-up nor unregisters what other packages bring."""
        if not cls.type:
            raise ValueError(f"{cls.__name__} has no type string")
        # A class's own aliases only: a subclass under a type string of its own does not inherit them.
        for key in (cls.type, *vars(cls).get("aliases", ()), *aliases):
            existing = self._types.get(key)
            if existing is not None and existing is not cls:
                message = f"plugin type {key!r} already registered by {existing.__module__}.{existing.__qualname__}"
                if self._loading is None:
                    raise ValueError(message)
                log.error("plugin entry point %s: %s.%s not registered as %r: %s", self._loading, cls.__module__,
                          cls.__qualname__, key, message)  # fmt: skip
                continue
            self._types[key] = cls
        return cls

    def get(self, type_name: str) -> type[Plugin] | None:
        self.load_entry_points()
        return self._types.get(type_name)

    def types(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._types)

    def load_entry_points(self) -> None:
        """Import every `epp.plugins` entry point once (built-ins register the same way)."""
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        # The built-ins first: a package cannot take a built-in type string, whatever the install order.
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: getattr(ep.dist, "name", "") != DIST)
        for ep in eps:
            try:
                target = ep.load()
            except Exception:
                log.exception("failed to load plugin entry point %s", ep.value)
                continue
            self._loading = ep.value
            try:
                self._apply(target, ep.value)
            except Exception:  # a registration function's own failure: its package's plugins are missing
                log.exception("plugin entry point %s failed to register its plugins", ep.value)
            finally:
                self._loading = None

    def _apply(self, target: Any, origin: str) -> None:
        if isinstance(target, type) and issubclass(target, Plugin):
            self.register(target)
        elif callable(target):
            target(self)
        else:
            log.error("plugin entry point %s is neither a Plugin class nor a callable", origin)

    def build(self, type_name: str, name: str, raw_params: Any) -> Plugin:
        """Instantiate a plugin from config, validating its parameters."""
        cls = self.get(type_name)
        label = f"plugin {name!r} (type {type_name})"
        if cls is None:
            raise ConfigError(f"{label}: unknown plugin type; known types: {', '.join(self.types())}")
        async_hooks = _async_hooks(cls)
        if async_hooks:
            raise ConfigError(
                f"{label}: {', '.join(async_hooks)} is an async def, but the EPP calls it synchronously, so it "
                "would never run; make it a plain def (only a DataProducer's produce may be async)"
            )
        if raw_params and not cls.rejects_parameters and not msgspec.structs.fields(cls.Params):
            log.warning("%s: takes no parameters; ignoring %s, as the reference does", label, sorted(raw_params))
            raw_params = None
        folded = _fold_keys(raw_params or {}, _type_info(cls.Params), label)  # its errors name the plugin
        try:
            params = msgspec.convert(folded, cls.Params, str_keys=True)
        except msgspec.ValidationError as e:
            raise ConfigError(f"{label}: parameters: {_describe(e)}") from None
        except ConfigError as e:  # raised by a Params' __post_init__ (msgspec turns only ValueError / TypeError)
            raise ConfigError(f"{label}: parameters: {e}") from None
        if type_name != cls.type:
            log.warning("%s: type %s is deprecated; use %s", label, type_name, cls.type)
        try:
            return cls(name, params)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{label}: parameters: {e}") from None


@functools.cache
def _async_hooks(cls: builtins.type[Plugin]) -> list[str]:
    """The class's sync hooks (every extension point it implements, and the set-up methods every plugin has)
    written as `async def`."""
    hooks = {hook for klass in cls.__mro__ for hook in vars(klass).get("sync_hooks", ())}
    hooks |= {"setup", "wiring", "validate_profiles"}
    return sorted(hook for hook in hooks if inspect.iscoroutinefunction(getattr(cls, hook, None)))


@functools.cache
def _type_info(params: builtins.type[PluginParams]) -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(params)


def _fold_keys(value: Any, info: msgspec.inspect.Type, label: str, path: str = "parameters") -> Any:
    """`value` with each struct key that matches a field only ignoring case renamed to the field: the
    reference decodes `parameters` with Go's encoding/json, which matches names case-insensitively (an
    exact match first), so `MaxNumOfEndpoints` is `maxNumOfEndpoints` there. Keys of mappings stay as
    they are; keys matching no field are left for the strict conversion to reject."""
    mi = msgspec.inspect
    if isinstance(info, mi.Metadata):
        return _fold_keys(value, info.type, label, path)
    if type(value) is float and value.is_integer() and _takes(info, mi.IntType) and not _takes(info, _FLOATISH):
        # The reference turns the YAML into JSON before Go decodes the parameters: a whole-number float
        # (`1e5`, `2.0`) is written as the JSON number 100000 / 2, which an int field takes.
        value = int(value)
    if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX and _takes(info, mi.IntType):
        # The reference decodes into Go ints (64 bits) and refuses more; msgspec takes any Python int.
        raise ConfigError(f"{label}: {path}: {value} is out of range (a 64-bit integer)")
    if isinstance(info, mi.UnionType):
        wanted: tuple[type, ...] = (
            (mi.StructType, mi.DictType) if isinstance(value, dict)
            else (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType) if isinstance(value, list)
            else ()
        )  # fmt: skip
        member = next((t for t in info.types if isinstance(t, wanted)), None) if wanted else None
        return value if member is None else _fold_keys(value, member, label, path)
    if isinstance(info, mi.StructType) and isinstance(value, dict):
        exact = {f.encode_name: f for f in info.fields}
        folded: dict[str, msgspec.inspect.Field] = {}
        for f in info.fields:
            folded.setdefault(f.encode_name.casefold(), f)
        out: dict[Any, Any] = {}
        for key, item in value.items():
            field = exact.get(key) if isinstance(key, str) else None
            if field is None and isinstance(key, str) and (field := folded.get(key.casefold())) is not None:
                log.warning("%s: %s.%s read as %s (the reference matches parameter names ignoring case)",
                            label, path, key, field.encode_name)  # fmt: skip
            if field is None:
                out[key] = item
                continue
            if item is None and not _nullable(field.type):
                continue  # as drop_nulls: Go's JSON leaves the field at its default
            out[field.encode_name] = _fold_keys(item, field.type, label, f"{path}.{field.encode_name}")
        return out
    if isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)) and isinstance(value, list):
        return [_fold_keys(item, info.item_type, label, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(info, mi.DictType) and isinstance(value, dict):
        return {k: _fold_keys(v, info.value_type, label, f"{path}.{k}") for k, v in value.items()}
    return value


def drop_nulls(value: Any, info: msgspec.inspect.Type) -> Any:
    """`value` without the schema fields given as null (`featureGates:` with nothing under it, a Helm value
    left empty) that cannot be null: the reference's decoder (Go's JSON) leaves such a field unset, so it
    takes its default. Blocks kept raw (`parameters`, `flowControl`) are left as they are: they are decoded
    where they are used, the same way."""
    mi = msgspec.inspect
    if isinstance(info, mi.UnionType):
        member = next((t for t in info.types if isinstance(t, (mi.StructType, mi.ListType))), None)
        return value if member is None else drop_nulls(value, member)
    if isinstance(info, mi.StructType) and isinstance(value, dict):
        fields = {f.encode_name: f.type for f in info.fields}
        out = {}
        for key, item in value.items():
            ftype = fields.get(key)
            if ftype is None:
                out[key] = item  # an unknown field: the conversion names it
            elif item is not None:
                out[key] = drop_nulls(item, ftype)
            elif _nullable(ftype):
                out[key] = None
        return out
    if isinstance(info, mi.ListType) and isinstance(value, list):
        return [drop_nulls(item, info.item_type) for item in value]
    return value


def _nullable(info: msgspec.inspect.Type) -> bool:
    mi = msgspec.inspect
    if isinstance(info, mi.Metadata):
        return _nullable(info.type)
    return isinstance(info, mi.NoneType) or (
        isinstance(info, mi.UnionType) and any(isinstance(t, mi.NoneType) for t in info.types)
    )


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOATISH = (msgspec.inspect.FloatType, msgspec.inspect.AnyType)  # fields a float may fill as it is


def _takes(info: msgspec.inspect.Type, kinds: type | tuple[type, ...]) -> bool:
    """Whether a field of type `info` (through metadata and unions) accepts one of the msgspec `kinds`."""
    mi = msgspec.inspect
    if isinstance(info, mi.Metadata):
        return _takes(info.type, kinds)
    if isinstance(info, mi.UnionType):
        return any(_takes(t, kinds) for t in info.types)
    return isinstance(info, kinds)


def _describe(err: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.fieldName`"; make the path read like the YAML.
    return str(err).replace("`$.", "`parameters.").replace("`$`", "`parameters`")


registry = PluginRegistry()

__all__ = [
    "ConfigError",
    "NoParams",
    "Plugin",
    "PluginContext",
    "PluginParams",
    "PluginRegistry",
    "drop_nulls",
    "reference_default",
    "registry",
]
