"""`epp` command line: flags (reference names and defaults) → Settings → App."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from llmepp import units
from llmepp.framework.plugin import ConfigError
from llmepp.settings import Settings


def parse_duration(text: str) -> float:
    """'50ms', '2s', '1m30s', '0' → seconds (Go duration syntax, like the reference: a unit is required)."""
    try:
        return units.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_positive_duration(text: str) -> float:
    """A duration > 0: an interval something repeats at (0 would repeat without a pause)."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return seconds


def parse_size(text: str) -> int:
    """'16Mi', '16MiB', '10M', '1048576' → bytes (Kubernetes quantities)."""
    try:
        return units.parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_positive_size(text: str) -> int:
    """A size > 0: a limit every request is held to (0 would refuse them all)."""
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return size


def parse_verbosity(text: str) -> int:
    """-v: 0 quiet ... 5 trace; above 5 is the most verbose (klog's -v has no upper bound)."""
    try:
        level = int(text)
    except ValueError:
        level = -1
    if level < 0:
        raise argparse.ArgumentTypeError(f"invalid verbosity {text!r} (0-5: 2 default, 3 verbose, 4 debug, 5 trace)")
    return level


# zap's level names as this EPP's verbosity (the reference logs at V(2) by default, V(4) debug).
_ZAP_LEVELS = {"debug": 4, "info": 2, "warn": 1, "error": 0, "dpanic": 0, "panic": 0, "fatal": 0}


def parse_zap_level(text: str) -> int:
    """--zap-log-level: a zap level name, or an integer N > 0 for V(N) as controller-runtime reads it."""
    level = _ZAP_LEVELS.get(text.strip().lower())
    if level is not None:
        return level
    try:
        return parse_verbosity(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid level {text!r} (debug, info, error or an integer)") from None


def _digits(text: str) -> int:
    """A decimal integer of ASCII digits, '-' allowed; the callers' range checks then name a negative one.
    int() would also take '+80', '8_000' and other scripts' digits, and the reference's Go flags read any Go
    integer literal ('+80', '8_000', '0x50', '010' = 8): plain decimal is the one spelling here."""
    text = text.strip()
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(text)
    return int(text)


def parse_ports(text: str) -> tuple[int, ...]:
    """'8000,8001' → (8000, 8001)."""
    try:
        ports = tuple(_digits(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port list {text!r} (example: 8000,8001)") from None
    if any(not 1 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"invalid port list {text!r}: ports are 1-65535")
    return tuple(dict.fromkeys(ports))  # a port listed twice once, as the reference's removeDuplicatePorts


def parse_port(text: str) -> int:
    """A TCP port, 0-65535 (0: any free port, or off where the flag says so)."""
    try:
        port = _digits(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port} (0-65535)")
    return port


def parse_bool(text: str) -> bool:
    """Go's flag syntax: true/false, 1/0, t/f (any case)."""
    value = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (true or false)")
    return value


def _switch(p: argparse.ArgumentParser, flag: str, help: str | None = None) -> None:
    """An on/off flag as Go's flag package reads one: `--x` is true, and `--x=true` / `--x=false` work too (a
    Helm template writes `--x={{ .Values.x }}`)."""
    p.add_argument(flag, type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL", help=help)


def parse_list(text: str) -> tuple[str, ...]:
    """'a,b' → ('a', 'b')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="epp",
        allow_abbrev=False,  # Go's flag package takes no prefixes: `--pool` must not mean --pool-name
        description="Endpoint Picker: Envoy ext_proc server for LLM pools.",
        epilog="exit codes: 0 stopped after SIGTERM or SIGINT (drained, or the start-up stopped by it); "
        "1 stopped, but a part failed to close (logged), endpoint discovery failed while serving, or a second "
        "signal while stopping; 2 usage or configuration error (also an endpoints file found bad after the start)",
    )
    p.add_argument("--grpc-port", type=parse_port, default=d.grpc_port, help="ext_proc gRPC port")
    p.add_argument("--grpc-health-port", type=parse_port, default=d.grpc_health_port, help="gRPC health port")
    p.add_argument("--metrics-port", type=parse_port, default=d.metrics_port, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--bind-address", default=d.bind_address,
                   help="address the servers listen on (default: every address, IPv6 and IPv4)")  # fmt: skip
    # At most one of the two (checked in _check_flags): an empty value is unset, as the reference reads them.
    p.add_argument("--config-file", help="EndpointPickerConfig YAML file")
    p.add_argument("--config-text", help="EndpointPickerConfig YAML as a string")
    _switch(p, "--watch-config-file", "apply --config-file's scorers, filters, pickers and profiles when it changes")
    p.add_argument("--pool-name", default=None,
                   help=f"InferencePool to watch (Kubernetes mode); a label in file mode ({d.pool_name})")  # fmt: skip
    p.add_argument("--pool-namespace", default=None,
                   help="namespace of the pool, its pods and CRDs (default $NAMESPACE, else default)")  # fmt: skip
    p.add_argument("--pool-group", default=d.pool_group, help="API group of the InferencePool")
    p.add_argument("--endpoint-selector", default=None,
                   help="Kubernetes mode without InferencePool: label selector of the model-server pods")  # fmt: skip
    p.add_argument("--endpoint-target-ports", type=parse_ports, default=d.endpoint_target_ports,
                   help="with --endpoint-selector: comma-separated pod ports, 1 to 8 (ranks)")  # fmt: skip
    p.add_argument("--kubeconfig", default=d.kubeconfig,
                   help="kubeconfig (default: in-cluster account, else $KUBECONFIG, else ~/.kube/config)")  # fmt: skip
    _switch(p, "--ha-enable-leader-election", "only the Lease holder reports ready (active-passive)")
    p.add_argument("--ha-lease-duration", type=parse_duration, default=d.ha_lease_duration)
    p.add_argument("--ha-renew-deadline", type=parse_duration, default=d.ha_renew_deadline)
    p.add_argument("--ha-retry-period", type=parse_duration, default=d.ha_retry_period)
    p.add_argument("--objectives-file",
                   help="InferenceObjective YAML (objective name -> priority); reloaded once a change holds still "
                   "for a 1 s poll (a bad or empty file keeps the last good one)")  # fmt: skip
    p.add_argument("--refresh-metrics-interval", type=parse_duration, default=d.refresh_metrics_interval,
                   help="model-server metrics scrape interval (min 50ms)")  # fmt: skip
    p.add_argument("--metrics-staleness-threshold", type=parse_duration, default=d.metrics_staleness_threshold,
                   help="age after which scraped metrics count as stale")  # fmt: skip
    p.add_argument("--refresh-prometheus-metrics-interval", type=parse_positive_duration,
                   default=d.refresh_prometheus_metrics_interval, help="pool gauge refresh interval")  # fmt: skip
    p.add_argument("--max-body-size", type=parse_positive_size, default=d.max_body_bytes,
                   help="largest request body accepted (413 above); gRPC message limits follow it")  # fmt: skip
    p.add_argument("--drain-timeout", type=parse_duration, default=d.drain_timeout,
                   help="time in-flight requests get after SIGTERM")  # fmt: skip
    p.add_argument("--extproc-transport", choices=("h2", "grpc"), default=d.extproc_transport,
                   help="h2: our HTTP/2 gRPC server on the event loop (fast); grpc: grpc.aio")  # fmt: skip
    p.add_argument("--secure-serving", type=parse_bool, nargs="?", const=True, default=d.secure_serving,
                   metavar="BOOL", help="TLS on the ext_proc port (default true; =false: plaintext)")  # fmt: skip
    p.add_argument("--cert-path", default=d.cert_path,
                   help="directory with tls.crt and tls.key (default: a self-signed certificate)")  # fmt: skip
    _switch(p, "--enable-cert-reload", "re-read --cert-path's files when they change")
    p.add_argument("--tls-min-version", default=d.tls_min_version, choices=("VersionTLS12", "VersionTLS13"))
    p.add_argument("--tls-cipher-suites", type=parse_list, default=d.tls_cipher_suites,
                   help="comma-separated TLS 1.2 cipher suites, Go's names (default: OpenSSL's)")  # fmt: skip
    p.add_argument("--metrics-endpoint-auth", type=parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="/metrics needs a Kubernetes bearer token allowed to get /metrics "
                        "(default: true in Kubernetes mode, false with file discovery)")  # fmt: skip
    p.add_argument("--metrics-cert-dir", default=None, help="directory with tls.crt and tls.key: /metrics over HTTPS")
    p.add_argument("--metrics-client-ca-file", default=None,
                   help="CA bundle; /metrics then requires client certificates signed by it (mTLS)")  # fmt: skip
    _switch(p, "--destination-fallback-list", "send every picked endpoint (comma-separated) for gateways with fallback")
    _switch(p, "--disable-endpoint-subset-filter")
    _switch(p, "--emit-endpoint-scores", "every candidate's score in envoy.lb/x-gateway-destination-endpoint-scores")
    _switch(p, "--decision-header", "add x-epp-decision (chosen endpoint and top scores) to responses")
    _switch(p, "--allow-experimental-plugins")
    # 0 is the flag unset, as in the reference (its default 0 leaves gRPC's own limit).
    p.add_argument("--grpc-max-recv-msg-size", type=parse_size, default=None,
                   help="largest ext_proc message accepted (0 or unset: --max-body-size + 1 MiB)")  # fmt: skip
    p.add_argument("--grpc-max-send-msg-size", type=parse_size, default=None,
                   help="largest ext_proc message sent (grpc.aio; 0 or unset: --max-body-size + 1 MiB)")  # fmt: skip
    p.add_argument("--enable-grpc-stream-metrics", type=parse_bool, nargs="?", const=True, default=False,
                   metavar="BOOL", help="extproc_stream_duration_seconds and extproc_streams_total{code}")  # fmt: skip
    # The reference's; accepted so its command lines run unchanged (what they switch does not apply here).
    p.add_argument("--enable-pprof", type=parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="accepted for compatibility: Go's pprof has no counterpart in this EPP")  # fmt: skip
    p.add_argument("--health-checking", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="accepted for compatibility: the gRPC health services are always served")  # fmt: skip
    p.add_argument("--tracing", type=parse_bool, nargs="?", const=True, default=d.tracing, metavar="BOOL",
                   help="OpenTelemetry spans per request, exported as OTEL_TRACES_EXPORTER says")  # fmt: skip
    p.add_argument("-v", "--v", dest="verbosity", type=parse_verbosity, default=None,
                   help=f"log verbosity 0-5 (default {d.verbosity})")  # fmt: skip
    p.add_argument("--log-format", choices=("json", "text"), default=None, help="default json")
    # controller-runtime's zap flags, which the reference registers beside -v: deployments pass them. The
    # encoder and level map onto --log-format and -v (which win when given); the rest are accepted.
    p.add_argument("--zap-encoder", choices=("json", "console"), default=None, help="json or console (text) logs")
    p.add_argument("--zap-log-level", type=parse_zap_level, default=None,
                   help="debug (-v 4), info (-v 2), error (-v 0) or a verbosity")  # fmt: skip
    p.add_argument("--zap-devel", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="accepted for compatibility (development logging defaults)")  # fmt: skip
    p.add_argument("--zap-stacktrace-level", default=None, help="accepted for compatibility")
    p.add_argument("--zap-time-encoding", default=None, help="accepted for compatibility")
    return p


# grpc.aio's message-size options are C ints.
GRPC_AIO_MAX_MESSAGE = 2**31 - 1


def _check_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Flags that contradict each other: a usage error (exit code 2) instead of a failure at bind."""
    if a.config_file and a.config_text:
        p.error("argument --config-text: not allowed with argument --config-file")
    ports = [
        ("--grpc-port", a.grpc_port),
        ("--grpc-health-port", a.grpc_health_port),
        ("--metrics-port", a.metrics_port),
    ]
    for i, (flag, port) in enumerate(ports):
        for other, other_port in ports[i + 1 :]:
            if port and port == other_port:
                p.error(f"{flag} and {other}: both {port}; each server needs its own port")
    if a.extproc_transport == "grpc":
        limit = a.max_body_size + 1024 * 1024
        for flag, size in (("--grpc-max-recv-msg-size", a.grpc_max_recv_msg_size),
                           ("--grpc-max-send-msg-size", a.grpc_max_send_msg_size)):  # fmt: skip
            if size is not None and size > GRPC_AIO_MAX_MESSAGE:
                p.error(f"{flag}: {size} bytes is above grpc.aio's limit of {GRPC_AIO_MAX_MESSAGE} "
                        "(--extproc-transport grpc)")  # fmt: skip
            if size is None and limit > GRPC_AIO_MAX_MESSAGE:
                p.error(f"--max-body-size: the ext_proc message limits follow it (+ 1 MiB): {limit} bytes is above "
                        f"grpc.aio's limit of {GRPC_AIO_MAX_MESSAGE} (--extproc-transport grpc); lower it or set "
                        f"{flag}")  # fmt: skip


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    p = build_parser()
    a = p.parse_args(argv)
    a.grpc_max_recv_msg_size = a.grpc_max_recv_msg_size or None  # 0: unset (the help says so)
    a.grpc_max_send_msg_size = a.grpc_max_send_msg_size or None
    _check_flags(p, a)
    return Settings(
        grpc_port=a.grpc_port,
        grpc_health_port=a.grpc_health_port,
        metrics_port=a.metrics_port,
        bind_address=a.bind_address,
        config_file=a.config_file or None,  # empty: unset, as the reference reads it
        config_text=a.config_text or None,  # empty: unset, as the reference reads it
        watch_config_file=a.watch_config_file,
        # Empty is unset, as the reference reads them (a template's `--pool-name={{ .Values.pool }}`).
        pool_name=a.pool_name or Settings().pool_name,
        pool_namespace=a.pool_namespace or os.environ.get("NAMESPACE") or Settings().pool_namespace,
        pool_name_set=bool(a.pool_name),
        pool_group=a.pool_group,
        endpoint_selector=a.endpoint_selector,
        endpoint_target_ports=a.endpoint_target_ports,
        kubeconfig=a.kubeconfig,
        ha_enable_leader_election=a.ha_enable_leader_election,
        ha_lease_duration=a.ha_lease_duration,
        ha_renew_deadline=a.ha_renew_deadline,
        ha_retry_period=a.ha_retry_period,
        objectives_file=a.objectives_file,
        refresh_metrics_interval=max(0.05, a.refresh_metrics_interval),
        metrics_staleness_threshold=a.metrics_staleness_threshold,
        refresh_prometheus_metrics_interval=a.refresh_prometheus_metrics_interval,
        max_body_bytes=a.max_body_size,
        drain_timeout=a.drain_timeout,
        extproc_transport=a.extproc_transport,
        secure_serving=a.secure_serving,
        cert_path=a.cert_path,
        enable_cert_reload=a.enable_cert_reload,
        tls_min_version=a.tls_min_version,
        tls_cipher_suites=a.tls_cipher_suites,
        metrics_endpoint_auth=a.metrics_endpoint_auth,
        metrics_cert_dir=a.metrics_cert_dir,
        metrics_client_ca_file=a.metrics_client_ca_file,
        destination_fallback_list=a.destination_fallback_list,
        disable_endpoint_subset_filter=a.disable_endpoint_subset_filter,
        emit_endpoint_scores=a.emit_endpoint_scores,
        decision_header=a.decision_header,
        allow_experimental_plugins=a.allow_experimental_plugins,
        tracing=a.tracing,
        grpc_max_recv_msg_size=a.grpc_max_recv_msg_size,
        grpc_max_send_msg_size=a.grpc_max_send_msg_size,
        grpc_stream_metrics=a.enable_grpc_stream_metrics,
        verbosity=_first(a.verbosity, a.zap_log_level, Settings().verbosity),
        log_json=_first(a.log_format, {"console": "text"}.get(a.zap_encoder, a.zap_encoder), "json") == "json",
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Measured ~20-30% less CPU per message for grpc.aio (the health server, --extproc-transport
    # grpc); must be set before grpc initialises, i.e. before the app module is imported.
    os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_listener")
    from llmepp.app import CloseFailed, PartFailed, run
    from llmepp.observability.logging import configure_logging

    settings = settings_from_args(argv)
    configure_logging(settings.verbosity, settings.log_json)
    run_loop: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop

        run_loop = uvloop.run
    except ImportError:  # non-Linux dev machines; asyncio's loop works, slower
        pass
    try:
        run_loop(run(settings))
    except ConfigError as e:
        print(f"epp: configuration error: {e}", file=sys.stderr)
        return 2
    except CloseFailed as e:
        print(f"epp: stopped, but {e}", file=sys.stderr)
        return 1
    except PartFailed as e:
        print(f"epp: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
