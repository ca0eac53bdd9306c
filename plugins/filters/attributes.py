"""Per-endpoint scalar attributes read by `endpoint-attribute-filter` and `endpoint-attribute-scorer`.

The reference reads a `ScalarMetricValue` endpoint attribute (a custom metric of the core
metrics extractor, or another plugin's attribute). An attribute is one of:

* **Built-in** (no `producer`): read from the endpoint itself.

  | attribute (aliases)                                                   | value                           |
  |-----------------------------------------------------------------------|---------------------------------|
  | `waiting-queue` (`num_requests_waiting`, `vllm:num_requests_waiting`)  | scraped waiting queue length    |
  | `running-requests` (`num_requests_running`, `vllm:num_requests_running`)| scraped running requests      |
  | `kv-cache-utilization` (`kv_cache_usage_perc`, `vllm:kv_cache_usage_perc`)| scraped KV usage, 0..1        |
  | `active-requests`                                                      | requests this EPP has in flight |
  | `inflight-tokens`                                                      | prompt tokens this EPP has in flight |

  The scraped ones are *missing* on an endpoint that was never scraped (`onMissing` /
  the scorer's "missing → 0" apply); the in-flight ones are router-local and always present.

* **A custom metric** (no `producer`): the `attributeKey` of a `core-metrics-extractor`
  `engineConfigs[].customMetrics` entry, read from the endpoint's last scrape; missing on an
  endpoint whose engine does not report it (or that was never scraped).

* **A data-layer extractor's** (with or without `producer: <extractor name>`): a scalar a
  data-layer extractor attaches to endpoints (`AttributeExtractor.endpoint_attributes`, e.g.
  `GPUUtilization` from `dcgm-extractor`), read from `endpoint.attributes`, where no metrics
  scrape can erase it; missing on an endpoint it has not reached yet. Without `producer`, the one
  configured extractor that attaches it (several: name one).

* **Producer-supplied** (`producer: <plugin name>`): the named plugin declares the attribute
  name in its `produces` and writes `request.data[scoped(attribute, producer)]` as a mapping
  `Endpoint → float` for the current request; endpoints absent from it are missing.

The reference's scoped data-key form `<attribute>/<plugin name>` (e.g. `GPUUtilization/dcgm-extractor`),
when it is none of the above, reads as `attribute` with `producer: <plugin name>`.

An attribute that is none of these is a configuration error (it could never be found).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datalayer import AttributeExtractor
from llmepp.framework.plugin import ConfigError, Plugin, PluginContext
from llmepp.plugins.datasources.core_metrics import CoreMetricsExtractor
from llmepp.request.types import InferenceRequest

# request, endpoints → one value per endpoint, None where the attribute is missing.
AttributeReader = Callable[[InferenceRequest, Sequence[Endpoint]], list[float | None]]


def _waiting(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
    return [m.waiting_queue_size if (m := ep.metrics).update_time else None for ep in endpoints]


def _running(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
    return [m.running_requests_size if (m := ep.metrics).update_time else None for ep in endpoints]


def _kv(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
    return [m.kv_cache_usage_percent if (m := ep.metrics).update_time else None for ep in endpoints]


def _active(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
    return [ep.inflight.requests for ep in endpoints]


def _inflight_tokens(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
    return [ep.inflight.tokens for ep in endpoints]


BUILTIN_ATTRIBUTES: dict[str, AttributeReader] = {
    "waiting-queue": _waiting,
    "num_requests_waiting": _waiting,
    "vllm:num_requests_waiting": _waiting,
    "running-requests": _running,
    "num_requests_running": _running,
    "vllm:num_requests_running": _running,
    "kv-cache-utilization": _kv,
    "kv_cache_usage_perc": _kv,
    "vllm:kv_cache_usage_perc": _kv,
    "active-requests": _active,
    "inflight-tokens": _inflight_tokens,
}


def check_attribute(attribute: str, producer: str) -> None:
    """Parameter-time check (no other plugins needed): raise ValueError naming the field."""
    if not attribute:
        raise ValueError("attribute is required")


def _custom_metric(attribute: str) -> AttributeReader:
    def read(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
        return [ep.metrics.attributes.get(attribute) for ep in endpoints]

    return read


def _extractor_attribute(key: str) -> AttributeReader:
    def read(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
        out: list[float | None] = []
        for ep in endpoints:
            v = ep.attributes.get(key)  # a plugin author's extractor may write an int: a number too
            out.append(float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None)
        return out

    return read


def attribute_reader(plugin: Plugin, ctx: PluginContext, attribute: str, producer: str, field: str) -> AttributeReader:
    """Resolve at setup: the built-in reader, a custom metric, a data-layer extractor's endpoint
    attribute, or the named producer's per-request mapping."""
    label = f"plugin {plugin.name!r} (type {plugin.type})"
    if not producer:
        builtin = BUILTIN_ATTRIBUTES.get(attribute)
        if builtin is not None:
            return builtin
        if any(attribute in x.attribute_keys() for x in ctx.plugins_of(CoreMetricsExtractor)):
            return _custom_metric(attribute)
        extractors = [x for x in ctx.plugins_of(AttributeExtractor) if attribute in x.endpoint_attributes]
        if len(extractors) == 1:
            return _extractor_attribute(extractors[0].attribute_key(attribute))
        if extractors:
            names = ", ".join(x.name for x in extractors)
            raise ConfigError(f"{label}: attribute {attribute!r} is attached by {names}; name one with `producer`")
        # The reference's data-layer key form, `<attribute>/<producer name>` (its sample
        # deploy/config/sim-epp-gpu-config.yaml: `GPUUtilization/dcgm-extractor`): as `producer`.
        # The reference scopes some keys by the producer's type (dcgm-extractor's GPUUtilization key whatever
        # the instance's name): a scope naming the type of exactly one configured plugin names that plugin.
        base, _, scope = attribute.rpartition("/")
        if base and scope:
            everyone = ctx.plugins_of(Plugin)
            of_type = [p for p in everyone if p.type == scope]
            if any(p.name == scope for p in everyone):
                return attribute_reader(plugin, ctx, base, scope, field)
            if len(of_type) == 1:
                return attribute_reader(plugin, ctx, base, of_type[0].name, field)
        known = ", ".join(k for k in BUILTIN_ATTRIBUTES if ":" not in k and "_" not in k)
        raise ConfigError(
            f"{label}: attribute {attribute!r} is not a built-in ({known}), a core-metrics-extractor "
            "customMetrics attributeKey nor attached by a configured data-layer extractor (e.g. GPUUtilization "
            "by dcgm-extractor); set `producer` to read a value another plugin produces"
        )
    named = ctx.plugin(producer, Plugin, referrer=plugin, field=field)
    if isinstance(named, AttributeExtractor):
        if attribute not in named.endpoint_attributes:
            attached = ", ".join(sorted(named.endpoint_attributes)) or "none"
            raise ConfigError(
                f"{label}: {field}: plugin {producer!r} (type {named.type}) does not attach {attribute!r} "
                f"(it attaches: {attached})"
            )
        return _extractor_attribute(named.attribute_key(attribute))
    key = ctx.producer_key(plugin, attribute, producer, field)

    def read(request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float | None]:
        values: Mapping[Endpoint, float] | None = request.data.get(key)
        if not values:
            return [None] * len(endpoints)
        get = values.get
        return [get(ep) for ep in endpoints]

    return read
