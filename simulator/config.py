"""Typed configuration: one ``PodConfig`` per simulated pod plus the process-wide ``SimConfig``.

Field names are llm-d-inference-sim's flag names with underscores (``--max-num-seqs`` -> ``max_num_seqs``);
YAML files may spell keys with dashes or underscores.

Units: engine latencies are **milliseconds of simulated time** (like llm-d-inference-sim's flags); they are
divided by ``SimConfig.time_scale`` on the wall clock. Operational fault timings (``startup_duration``,
``metrics_delay``, kill durations) are **wall-clock seconds** and are never scaled: they exist to exercise
the EPP's timeouts, which run on the wall clock.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from llmepp_sim.tokenizer import jinja_renderer

ROLES = ("prefill", "decode", "both")
FAILURE_TYPES = (
    "rate_limit",
    "invalid_api_key",
    "context_length",
    "server_error",
    "invalid_request",
    "model_not_found",
)


@dataclass
class LoraModule:
    """A LoRA adapter the pod can serve (``model`` = ``name`` in a request selects it)."""

    name: str
    path: str = ""
    base_model_name: str = ""

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any]) -> LoraModule:
        """vLLM's ``--lora-modules`` syntax: ``name=path`` or a JSON object."""
        if isinstance(spec, Mapping):
            return msgspec.convert(dict(spec), cls)
        spec = spec.strip()
        if spec.startswith("{"):
            return msgspec.convert(json.loads(spec), cls)
        name, sep, path = spec.partition("=")
        if not name:
            raise ValueError(f"invalid LoRA module {spec!r}: expected name=path or a JSON object")
        return cls(name=name, path=path if sep else name)


@dataclass
class PodConfig:
    # --- identity and network
    name: str = ""  # "" = "sim-<index in cluster>"; also the x-inference-pod header and KV-event topic id
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (tests)
    # gRPC face (vLLM's VllmEngine + Vertex AI's PredictionService over h2c) on `host`: None = none,
    # 0 = any free port, resolved at the first start (see grpc_server.py)
    grpc_port: int | None = None
    model: str = "sim-model"
    served_model_name: list[str] = field(default_factory=list)  # aliases; first one names metrics
    role: str = "both"  # prefill | decode | both (see server.py for what it enforces)
    labels: dict[str, str] = field(default_factory=dict)  # free-form, e.g. llm-d.ai/role; for discovery
    # --- engine
    max_num_seqs: int = 5
    max_model_len: int = 1024
    seed: int = 0
    # --- latency, ms of simulated time; defaults are the llama-8b-h100 profile
    time_to_first_token: float = 0.0  # constant part added to every prefill (llm-d-sim "constant" mode)
    prefill_overhead: float = 30.0
    prefill_time_per_token: float = 0.2
    inter_token_latency: float = 12.0
    time_factor_under_load: float = 1.0
    kv_cache_transfer_latency: float = 5.0
    kv_cache_transfer_time_per_token: float = 0.005
    lora_load_latency: float = 50.0
    # --- KV cache and KV events
    enable_kvcache: bool = True  # false = no prefix caching (blocks are still allocated and counted)
    kv_cache_size: int = 1024  # blocks
    block_size: int = 16
    hash_seed: str = ""
    zmq_endpoint: str = ""  # "" = no KV events; "tcp://127.0.0.2:*" binds any free port
    # Connect the PUB socket to zmq_endpoint (a central subscriber that binds, e.g. an EPP's
    # kvEventsConfig.zmqEndpoint) instead of binding it.
    kv_events_connect: bool = False
    event_batch_size: int = 16
    event_flush_interval: float = 5.0  # ms wall clock: a partial batch waits at most this long
    use_vllm_legacy_event_format: bool = False  # tagged arrays (vLLM <= 0.23) instead of maps
    kv_events_topic: str = "kv@{pod}@{model}"  # placeholders: pod host port model
    kv_events_replay_endpoint: str = ""  # "" = no replay socket
    kv_events_replay_queue_size: int = 1024
    data_parallel_rank: int = 0
    # --- chat: a Jinja template file (.jinja or tokenizer_config.json); "" = the built-in role-tags template
    chat_template: str = ""
    # --- LoRA
    lora_modules: list[LoraModule] = field(default_factory=list)
    max_loras: int = 1
    # --- faults (see faults.py)
    failure_injection_rate: float = 0.0  # percent
    failure_types: list[str] = field(default_factory=lambda: list(FAILURE_TYPES))
    startup_duration: float = 0.0  # s wall clock
    metrics_delay: float = 0.0  # s wall clock
    metrics_hang: bool = False

    @property
    def model_name(self) -> str:
        """The name metrics and responses use for the base model (vLLM: first served name)."""
        return self.served_model_name[0] if self.served_model_name else self.model

    @property
    def base_model_names(self) -> list[str]:
        return self.served_model_name or [self.model]

    def validate(self) -> None:
        # NaN passes every range check below, and a NaN or infinite delay stalls the engine loop.
        problems = [
            f"{f.name} must be a finite number"
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), float) and not math.isfinite(value)
        ]
        if self.role not in ROLES:
            problems.append(f"role must be one of {ROLES}, got {self.role!r}")
        positive = ("max_num_seqs", "max_model_len", "kv_cache_size", "block_size", "event_batch_size")
        problems += [f"{name} must be >= 1" for name in positive if getattr(self, name) < 1]
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                problems.append(f"{name} must be within 0..65535")
        if self.grpc_port and self.grpc_port == self.port:
            problems.append(f"grpc_port and port must differ, both are {self.port}")
        if self.max_loras < 1:
            problems.append("max_loras must be >= 1")
        if self.time_factor_under_load < 1.0:
            problems.append("time_factor_under_load must be >= 1.0")
        if not 0.0 <= self.failure_injection_rate <= 100.0:
            problems.append("failure_injection_rate must be within 0..100")
        unknown = sorted(set(self.failure_types) - set(FAILURE_TYPES))
        if unknown:
            problems.append(f"unknown failure types {unknown}; known: {list(FAILURE_TYPES)}")
        problems += [f"{name} must be >= 0" for name in LATENCY_FIELDS if getattr(self, name) < 0]
        if self.chat_template:
            try:
                jinja_renderer(self.chat_template)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))


LATENCY_FIELDS = (
    "time_to_first_token",
    "prefill_overhead",
    "prefill_time_per_token",
    "inter_token_latency",
    "kv_cache_transfer_latency",
    "kv_cache_transfer_time_per_token",
    "lora_load_latency",
)
POD_FIELDS = frozenset(f.name for f in dataclasses.fields(PodConfig))
# What POST /admin/config may change on a running pod: behaviour, not identity or memory layout.
RUNTIME_FIELDS = frozenset(
    {
        *LATENCY_FIELDS,
        "time_factor_under_load",
        "max_num_seqs",
        "failure_injection_rate",
        "failure_types",
        "metrics_delay",
        "metrics_hang",
        "labels",
    }
)


@dataclass
class SimConfig:
    """Everything one ``epp-sim`` process runs."""

    pods: list[PodConfig] = field(default_factory=lambda: [PodConfig()])
    time_scale: float = 1.0  # 10 = every simulated latency passes 10x faster on the wall clock

    def validate(self) -> None:
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError("time_scale must be a finite number > 0")
        if not self.pods:
            raise ValueError("at least one pod is required")
        for pod in self.pods:
            pod.validate()
        names = [p.name for p in self.pods]
        if len(set(names)) != len(names):
            raise ValueError(f"pod names must be unique, got {names}")


def normalize_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``max-num-seqs`` and ``max_num_seqs`` are the same key."""
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def pod_config_from_dict(raw: Mapping[str, Any]) -> PodConfig:
    """Type-checked conversion; unknown keys are an error so typos do not silently fall back."""
    values = normalize_keys(raw)
    unknown = sorted(set(values) - POD_FIELDS)
    if unknown:
        raise ValueError(f"unknown pod config keys: {unknown}")
    if "lora_modules" in values:
        values["lora_modules"] = [dataclasses.asdict(LoraModule.parse(m)) for m in values["lora_modules"] or []]
    if isinstance(values.get("served_model_name"), str):
        values["served_model_name"] = [values["served_model_name"]]
    if isinstance(values.get("failure_types"), str):
        values["failure_types"] = [t for t in values["failure_types"].split(",") if t]
    try:
        config = msgspec.convert(values, PodConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid pod config: {exc}") from exc
    return config


def pod_config_to_dict(config: PodConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_runtime_patch(config: PodConfig, patch: Mapping[str, Any]) -> PodConfig:
    """A copy of ``config`` with ``patch`` applied; only ``RUNTIME_FIELDS`` may change."""
    values = normalize_keys(patch)
    refused = sorted(set(values) - RUNTIME_FIELDS)
    if refused:
        raise ValueError(f"not changeable at runtime: {refused}; allowed: {sorted(RUNTIME_FIELDS)}")
    merged = pod_config_from_dict({**pod_config_to_dict(config), **values})
    merged.validate()
    return merged
