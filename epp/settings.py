"""All runtime settings in one typed object (filled from the CLI, see cli.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Settings:
    # Servers (reference defaults).
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    bind_address: str = ""  # every address, IPv6 and IPv4 (server.listen)
    # Configuration: at most one of the two.
    config_file: str | None = None
    config_text: str | None = None
    # Re-read config_file when it changes and apply its scheduling part (llmepp.config.watch).
    watch_config_file: bool = False
    # Pool identity (file-discovery mode uses the name only for labels).
    pool_name: str = "epp"
    pool_namespace: str = "default"
    # Kubernetes mode (epp/k8s), used when the config has no dataLayer.discovery: watch the
    # InferencePool named by --pool-name (pool_name_set: the flag was given, pool_name above
    # has a default for file mode), or the pods matched by --endpoint-selector.
    pool_name_set: bool = False
    pool_group: str = "inference.networking.k8s.io"
    endpoint_selector: str | None = None
    endpoint_target_ports: tuple[int, ...] = ()
    kubeconfig: str | None = None  # None: in-cluster, else $KUBECONFIG, else ~/.kube/config
    # Leader election (active-passive readiness) on the Lease epp-<ns>-<pool>.llm-d.ai.
    ha_enable_leader_election: bool = False
    ha_lease_duration: float = 15.0  # seconds, client-go defaults
    ha_renew_deadline: float = 10.0
    ha_retry_period: float = 2.0
    # InferenceObjectives (name → priority) YAML for non-Kubernetes mode; reloaded on change.
    objectives_file: str | None = None
    # Data layer.
    refresh_metrics_interval: float = 0.050  # seconds; minimum 50 ms like the reference
    metrics_staleness_threshold: float = 2.0  # seconds
    refresh_prometheus_metrics_interval: float = 5.0
    # Request limits: the gRPC message limits follow max_body_bytes.
    max_body_bytes: int = 16 * 1024 * 1024
    body_chunk_bytes: int = 62_000  # reference BodyByteLimit, under Envoy's 64 KiB
    # ext_proc transport: "h2" (our HTTP/2 gRPC server on the event loop: ~4x the throughput,
    # ~4x cheaper per response chunk) or "grpc" (grpc.aio).
    extproc_transport: str = "h2"
    # TLS on the ext_proc port (reference defaults: on, self-signed unless cert_path holds tls.crt/tls.key).
    secure_serving: bool = True
    cert_path: str | None = None
    enable_cert_reload: bool = False
    tls_min_version: str = "VersionTLS12"
    tls_cipher_suites: tuple[str, ...] = ()
    # /metrics (llmepp.observability.metrics_server): bearer-token authn/authz against the Kubernetes API
    # (reference default: on). None = on in Kubernetes mode, off in file-discovery mode (no API to ask).
    metrics_endpoint_auth: bool | None = None
    metrics_cert_dir: str | None = None  # tls.crt + tls.key: HTTPS
    metrics_client_ca_file: str | None = None  # client certificates required (mTLS)
    # Send the whole ordered fallback list in x-gateway-destination-endpoint (for gateways that
    # implement it); Envoy's ORIGINAL_DST accepts exactly one ip:port, so the default is the primary.
    destination_fallback_list: bool = False
    # Behaviour switches.
    disable_endpoint_subset_filter: bool = False
    emit_endpoint_scores: bool = False
    # Opt-in response header x-epp-decision: chosen endpoint and top scores.
    decision_header: bool = False
    allow_experimental_plugins: bool = False
    # OpenTelemetry spans per request; exported only where OTEL_TRACES_EXPORTER says (observability.tracing).
    tracing: bool = True
    # ext_proc message size limits; None = follow max_body_bytes (a BUFFERED body is one message). The CLI
    # maps 0 to None (the reference's 0: not set); the servers also read 0 as None.
    grpc_max_recv_msg_size: int | None = None
    grpc_max_send_msg_size: int | None = None
    # extproc_stream_duration_seconds and extproc_streams_total{code} (the in-flight gauge is always on).
    grpc_stream_metrics: bool = False
    # Shutdown: in-flight streams get this long after SIGTERM.
    drain_timeout: float = 30.0
    # Logging: 0 quiet ... 5 trace (reference: DEFAULT=2, VERBOSE=3, DEBUG=4, TRACE=5).
    verbosity: int = 2
    log_json: bool = True
