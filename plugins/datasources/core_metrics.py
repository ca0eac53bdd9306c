"""`core-metrics-extractor`: maps an endpoint's engine to the metric names on its page.

The engine comes from an endpoint label (`engineLabelKey`, falling back to the GIE key);
unlabelled endpoints use `defaultEngine`. Each engine's specs are compiled once into an
`EngineMapping` at construction, so a scrape does no per-page setup.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics
from llmepp.datalayer.engines import BUILTIN_ENGINES, CustomMetricSpec, EngineMapping, EngineSpecs, ExtractionFailed
from llmepp.datalayer.promtext import InvalidSpec, PromTextError
from llmepp.framework.plugin import ConfigError, Plugin, PluginParams

DEFAULT_ENGINE_LABEL = "llm-d.ai/engine-type"
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"


class UnknownEngine(PromTextError):
    """An endpoint names an engine no config describes (counted as an extraction error)."""


class CustomMetric(PluginParams):
    """A scalar metric (`metricSpec`, `name` or `name{label=value}`) stored as the endpoint attribute
    `attributeKey`, which `endpoint-attribute-filter` / `-scorer` read. Missing from a page: an
    extraction error, unless `optional` (then the attribute is absent for that scrape)."""

    attribute_key: str = ""
    metric_spec: str = ""
    optional: bool = False


class EngineConfig(PluginParams):
    """One engine's metric specs (`name` or `name{label=value}`); empty = not read."""

    name: str
    queued_requests_spec: str = ""
    running_requests_spec: str = ""
    kv_usage_spec: str = ""
    lora_spec: str = ""
    cache_info_spec: str = ""
    cache_block_size_label_name: str = ""
    cache_num_blocks_label_name: str = ""
    cache_block_size_spec: str = ""
    cache_num_blocks_spec: str = ""
    custom_metrics: list[CustomMetric] = msgspec.field(default_factory=list)

    def to_specs(self) -> EngineSpecs:
        return EngineSpecs(
            name=self.name,
            queued_requests=self.queued_requests_spec,
            running_requests=self.running_requests_spec,
            kv_usage=self.kv_usage_spec,
            lora=self.lora_spec,
            cache_info=self.cache_info_spec,
            cache_block_size_label=self.cache_block_size_label_name or "block_size",
            cache_num_blocks_label=self.cache_num_blocks_label_name or "num_gpu_blocks",
            cache_block_size=self.cache_block_size_spec,
            cache_num_blocks=self.cache_num_blocks_spec,
            custom=tuple(CustomMetricSpec(c.attribute_key, c.metric_spec, c.optional) for c in self.custom_metrics),
        )


class CoreMetricsExtractor(Plugin):
    """Turns a model server's /metrics page into `EndpointMetrics` (queue, running, KV usage,
    LoRA adapters, cache geometry) using the endpoint's engine mapping.

    Built-in engines: vllm, sglang, trtllm-serve, triton-tensorrt-llm, triton. An
    `engineConfigs` entry with a built-in name replaces that engine entirely. An entry's
    `customMetrics` ([{attributeKey, metricSpec, optional}]) become endpoint attributes.
    """

    type = "core-metrics-extractor"
    pod_only = "reads model-server metrics; use multicluster-metrics-extractor"

    class Params(PluginParams):
        engine_label_key: str = DEFAULT_ENGINE_LABEL
        default_engine: str = "vllm"
        engine_configs: list[EngineConfig] = msgspec.field(default_factory=list)

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        p = params if params is not None else self.Params()
        super().__init__(name, p)
        self.engine_label_key = p.engine_label_key or DEFAULT_ENGINE_LABEL
        specs: dict[str, EngineSpecs] = {e.name: e for e in BUILTIN_ENGINES}
        seen: set[str] = set()
        for i, cfg in enumerate(p.engine_configs):
            where = f"parameters.engineConfigs[{i}]"
            if not cfg.name:
                raise ConfigError(f"{where}.name: must not be empty")
            if cfg.name in seen:
                raise ConfigError(f"{where}.name: engine {cfg.name!r} configured twice")
            seen.add(cfg.name)
            keys: set[str] = set()
            for j, c in enumerate(cfg.custom_metrics):
                if not c.attribute_key or not c.metric_spec:
                    raise ConfigError(f"{where}.customMetrics[{j}]: attributeKey and metricSpec are required")
                if c.attribute_key in keys:
                    raise ConfigError(f"{where}.customMetrics[{j}].attributeKey: {c.attribute_key!r} used twice")
                keys.add(c.attribute_key)
            specs[cfg.name] = cfg.to_specs()
        self.mappings: dict[str, EngineMapping] = {}
        for engine, spec in specs.items():
            try:
                self.mappings[engine] = EngineMapping(spec)
            except InvalidSpec as e:
                raise ConfigError(f"parameters.engineConfigs: {e}") from None
        default = self.mappings.get(p.default_engine)
        if default is None:
            raise ConfigError(
                f"parameters.defaultEngine: {p.default_engine!r} is not a configured engine "
                f"(known: {', '.join(sorted(self.mappings))})"
            )
        self.default_mapping = default

    def engine_of(self, labels: Mapping[str, str]) -> str | None:
        """The engine an endpoint's labels name, or None for the default."""
        return labels.get(self.engine_label_key) or labels.get(LEGACY_ENGINE_LABEL) or None

    def mapping_for(self, labels: Mapping[str, str]) -> EngineMapping:
        """The compiled mapping for an endpoint; raises UnknownEngine for an unconfigured engine."""
        engine = self.engine_of(labels)
        if engine is None:
            return self.default_mapping
        mapping = self.mappings.get(engine)
        if mapping is None:
            raise UnknownEngine(f"no metrics mapping for engine {engine!r} (label {self.engine_label_key})")
        return mapping

    def attribute_keys(self) -> frozenset[str]:
        """Every custom metric's attribute key, over all engines."""
        return frozenset(c.attribute_key for m in self.mappings.values() for c in m.specs.custom)

    def extract(
        self, endpoint: Endpoint, page: bytes, now: float
    ) -> tuple[EndpointMetrics | None, PromTextError | None]:
        """One-off extraction (the collector caches `mapping_for` per endpoint instead)."""
        try:
            mapping = self.mapping_for(endpoint.labels)
        except UnknownEngine as e:
            return None, e
        metrics, err = mapping.extract(page, endpoint.metrics, now)
        return metrics, err


__all__ = ["CoreMetricsExtractor", "EngineConfig", "ExtractionFailed", "UnknownEngine"]
