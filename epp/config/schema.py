"""The reference's `EndpointPickerConfig` YAML schema (apiVersion llm-d.ai/v1alpha1).

Field names are the YAML's camelCase; unknown fields are rejected so typos surface at
start-up. Blocks this build reads but does not interpret yet are kept as raw mappings.
"""

from __future__ import annotations

from typing import Any

import msgspec

# llm-d.ai/v1: the newer reference's configs (e.g. its multicluster example) carry it.
API_VERSIONS = ("llm-d.ai/v1alpha1", "llm-d.ai/v1", "inference.networking.x-k8s.io/v1alpha1")
DEPRECATED_API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1",)
KIND = "EndpointPickerConfig"


class _Schema(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class PluginSpec(_Schema):
    type: str
    name: str = ""
    parameters: dict[str, Any] | None = None


class ProfilePluginRef(_Schema):
    plugin_ref: str
    weight: float | None = None


class SchedulingProfileSpec(_Schema):
    name: str
    plugins: list[ProfilePluginRef] = []


class PluginRef(_Schema):
    plugin_ref: str


class RequestHandlerSpec(_Schema):
    parsers: list[PluginRef] = []


class DataSourceSpec(_Schema):
    plugin_ref: str
    extractors: list[PluginRef] = []


class DiscoverySpec(_Schema):
    """`discovery: {pluginRef: x}`, or the newer reference's `discovery: {endpoints: {pluginRef: x}}`."""

    plugin_ref: str = ""
    endpoints: PluginRef | None = None


class DataLayerSpec(_Schema):
    inject_defaults: bool = True
    sources: list[DataSourceSpec] = []
    discovery: DiscoverySpec | None = None
    peer_discovery: PluginRef | None = None
    cross_replica_syncer_plugin_ref: str = ""
    cross_replica_sync_interval: str = ""


class EndpointPickerConfig(_Schema):
    api_version: str = API_VERSIONS[0]
    kind: str = KIND
    feature_gates: list[str] = []
    plugins: list[PluginSpec] = []
    scheduling_profiles: list[SchedulingProfileSpec] = []
    request_handler: RequestHandlerSpec | None = None
    data_layer: DataLayerSpec | None = None
    # Flow control is its own subsystem; its block is validated where it is built.
    flow_control: dict[str, Any] | None = None
    saturation_detector: dict[str, Any] | None = None  # deprecated location
    parser: PluginRef | None = None  # deprecated: requestHandler.parsers


# The profile used when no config is given: the reference's optimized-baseline scorers (its
# benchmark profile), with the prefix weight doubled. Measured against the reference's older default
# (queue 2, kv-cache 2, prefix 3) on the canonical shared-prefix and no-sharing workloads
# (benchmarks/README.md), no-hit-lru is what keeps cold requests from herding onto the pod that looked
# least loaded at the last scrape, and spreadByBacklog (this build's addition) keeps its rotation from
# feeding a pod whose queue of long prompts has fallen behind (no-sharing workload, varied prompt lengths).
# Prefix 6, not the reference's 3: in multi-turn chat every pod holds the app's system prompt, so a
# conversation's own pod leads by only its history's share of the prompt, and at weight 3 a KV-utilisation
# gap of 0.23 was enough to move a returning turn and recompute its history elsewhere; weight 6 keeps turns
# home and changed shared-prefix and no-sharing by <= 0.03 s TTFT p90 (benchmarks/results/diagnostics).
# load-balance-filter at 32 / 1.5x is the escape hatch every cache-aware router has: without it, one prefix
# carrying all traffic (one app's system prompt) goes to one pod whatever its load, because no load score
# outweighs a large prefix match (TTFT p90 26 s vs 1.5 s at 9 req/s on 4 pods; benchmarks/README.md, "One hot
# prefix"). It changed no decision in the shared-prefix and no-sharing workloads in simulated time; in the live
# multi-turn workload at 36 QPS it moved 0-51 of 1,590-1,905 returning turns per seed, and paired against the
# profile without it (benchmarks/configs/default-no-hatch.yaml) over ten seeds its TTFT p90 effect was within
# 5% at every stage (benchmarks/results/diagnostics/README.md).
DEFAULT_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: load-balance-filter
  parameters:
    absThreshold: 32
    relThreshold: 1.5
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
  parameters:
    spreadByBacklog: true
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: load-balance-filter
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 6
  - pluginRef: no-hit-lru-scorer
    weight: 2
"""
