"""All runtime settings in one typed object (filled from the CLI, see cli.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Settings:
    # Servers (reference defaults).
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    bind_address: str = "0.0.0.0"
    # Configuration: at most one of the two.
    config_file: str | None = None
    config_text: str | None = None
    # Pool identity (file-discovery mode uses the name only for labels).
    pool_name: str = "epp"
    pool_namespace: str = "default"
    # Data layer.
    refresh_metrics_interval: float = 0.050  # seconds; minimum 50 ms like the reference
    metrics_staleness_threshold: float = 2.0  # seconds
    refresh_prometheus_metrics_interval: float = 5.0
    # Request limits: the gRPC message limits follow max_body_bytes.
    max_body_bytes: int = 16 * 1024 * 1024
    body_chunk_bytes: int = 62_000  # reference BodyByteLimit, under Envoy's 64 KiB
    # Behaviour switches.
    disable_endpoint_subset_filter: bool = False
    emit_endpoint_scores: bool = False
    # Opt-in response header x-epp-decision: chosen endpoint and top scores.
    decision_header: bool = False
    allow_experimental_plugins: bool = False
    # Shutdown: in-flight streams get this long after SIGTERM.
    drain_timeout: float = 30.0
    # Logging: 0 quiet ... 5 trace (reference: DEFAULT=2, VERBOSE=3, DEBUG=4, TRACE=5).
    verbosity: int = 2
    log_json: bool = True
