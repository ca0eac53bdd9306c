"""`epp` flags: a bad value or a contradictory pair is a usage error (exit code 2) naming the flag,
never a traceback once the servers start."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmepp.cli import build_parser, settings_from_args
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.testing.ports import free_port
from llmepp.testing.stack import loopback_epp_args, with_file_discovery


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        settings_from_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Out of range: 70000 was accepted and bound port 4464 (70000 mod 65536); -5 died in getaddrinfo.
        (["--grpc-port", "70000"], "argument --grpc-port: invalid port 70000 (0-65535)"),
        (["--grpc-port=-5"], "argument --grpc-port: invalid port -5 (0-65535)"),
        (["--grpc-health-port", "99999"], "argument --grpc-health-port: invalid port 99999 (0-65535)"),
        (["--metrics-port", "65536"], "argument --metrics-port: invalid port 65536 (0-65535)"),
        (["--grpc-port", "x"], "argument --grpc-port: invalid port 'x' (0-65535)"),
        # Two servers on one port: the second bind failed with a traceback.
        (["--grpc-port", "9003"], "--grpc-port and --grpc-health-port: both 9003"),
        (["--metrics-port", "9002"], "--grpc-port and --metrics-port: both 9002"),
        (["--grpc-health-port", "7000", "--metrics-port", "7000"], "--grpc-health-port and --metrics-port: both 7000"),
        # grpc.aio takes a C int: above 2 GiB - 1 the server died with OverflowError building its options.
        (
            ["--extproc-transport", "grpc", "--grpc-max-recv-msg-size", "4Gi"],
            "--grpc-max-recv-msg-size: 4294967296 bytes is above grpc.aio's limit of 2147483647 (--extproc-transport "
            "grpc)",
        ),
        (
            ["--extproc-transport", "grpc", "--grpc-max-send-msg-size", "2Gi"],
            "--grpc-max-send-msg-size: 2147483648 bytes is above grpc.aio's limit",
        ),
        (
            ["--extproc-transport", "grpc", "--max-body-size", "2Gi"],
            "--max-body-size: the ext_proc message limits follow it (+ 1 MiB): 2148532224 bytes is above grpc.aio's "
            "limit of 2147483647 (--extproc-transport grpc); lower it or set --grpc-max-recv-msg-size",
        ),
        # Accepted silently: a negative verbosity logged as 0; a zero body limit answered every request 413.
        (["-v", "-1"], "argument -v/--v: invalid verbosity '-1' (0-5"),
        (["--v=-3"], "argument -v/--v: invalid verbosity '-3' (0-5"),
        (["--max-body-size", "0"], "argument --max-body-size: must be > 0, got '0'"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(argv, capsys)


def test_good_edge_values_are_kept() -> None:
    s = settings_from_args(["--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0"])
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (0, 0, 0)  # 0: any free port / metrics off
    s = settings_from_args(["--grpc-port", "65535", "--grpc-health-port", "1"])
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (65535, 1, 9090)
    # The h2 transport has no C-int limit; with grpc, explicit limits within it override a large body size.
    assert settings_from_args(["--max-body-size", "4Gi"]).max_body_bytes == 4 * 2**30
    s = settings_from_args(
        ["--extproc-transport", "grpc", "--max-body-size", "4Gi", "--grpc-max-recv-msg-size", "1Gi",
         "--grpc-max-send-msg-size", "2147483647"]
    )  # fmt: skip
    assert (s.grpc_max_recv_msg_size, s.grpc_max_send_msg_size) == (2**30, 2**31 - 1)
    assert (
        settings_from_args(["--extproc-transport", "grpc", "--max-body-size", "2046Mi"]).max_body_bytes == 2046 * 2**20
    )
    # Above 5 is the most verbose (klog's -v has no upper bound).
    assert settings_from_args(["-v", "0"]).verbosity == 0 and settings_from_args(["--v", "9"]).verbosity == 9
    assert settings_from_args(["--max-body-size", "1"]).max_body_bytes == 1


def _run_epp(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text(with_file_discovery(DEFAULT_CONFIG, endpoints))
    argv = loopback_epp_args(config, free_port(), free_port(), free_port(), *args)
    return subprocess.run([sys.executable, "-m", "llmepp", *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("flag", "transport"),  # the transport only changes how the ext_proc port binds
    [("--grpc-port", "h2"), ("--grpc-port", "grpc"), ("--grpc-health-port", "h2"), ("--metrics-port", "h2")],
)
@pytest.mark.parametrize("shared", [False, True], ids=["plain", "reuseport"])
def test_a_port_in_use_is_a_start_up_error_naming_the_flag(
    tmp_path: Path, flag: str, transport: str, shared: bool
) -> None:
    """`shared`: the holder allows SO_REUSEPORT, as a gRPC server (another EPP) does; the EPP must not share the
    port with it (probes or requests would reach either process at random)."""
    with socket.socket() as busy:
        if shared:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run_epp(tmp_path, flag, str(port), "--extproc-transport", transport)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{flag} / --bind-address: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bind_address_that_is_not_local_is_a_start_up_error(tmp_path: Path) -> None:
    done = _run_epp(tmp_path, "--bind-address", "192.0.2.1")  # TEST-NET-1: never this machine's
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--bind-address: cannot listen on 192.0.2.1:" in done.stderr and "Traceback" not in done.stderr


def test_a_config_file_that_is_not_utf8_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_bytes(b"plugins:\n- type: queue-scorer\n  name: \xff\xfe\n")
    done = _run_epp(tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--config-file:" in done.stderr and "is not UTF-8 text" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Longer than Go's time.Duration (~292 years), which the reference's flag parsing refuses; here it was
        # accepted (3.6e23 s).
        (["--drain-timeout", "99999999999999999999h"], "argument --drain-timeout: duration '99999999999999999999h' is "
         "out of range"),
        (["--ha-lease-duration", "3000000h"], "argument --ha-lease-duration: duration '3000000h' is out of range"),
        # The pool gauges refresh every interval: 0 spun the refresh loop without a pause (the reference's ticker
        # panics on a non-positive interval).
        (["--refresh-prometheus-metrics-interval", "0"], "argument --refresh-prometheus-metrics-interval: must be > 0"),
        (["--drain-timeout=-5s"], "argument --drain-timeout: invalid duration '-5s'"),
    ],
)  # fmt: skip
def test_bad_durations_are_usage_errors_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(argv, capsys)


@pytest.mark.parametrize("flag", ["--grpc-max-recv-msg-size", "--grpc-max-send-msg-size"])
def test_a_zero_grpc_message_size_is_the_flag_unset(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The reference's flags default to 0, "not set": gRPC's own limit applies. Here 0 already meant the default
    # where the servers read it (`size or default`) but not in the flag checks, so with grpc.aio a body limit
    # above its C-int limit passed them and the server died with OverflowError building its options.
    field = flag.removeprefix("--").replace("-", "_")
    assert getattr(settings_from_args([flag, "0"]), field) is None
    both_zero = ["--grpc-max-recv-msg-size", "0", "--grpc-max-send-msg-size", "0"]
    err = usage_error(["--extproc-transport", "grpc", "--max-body-size", "2Gi", *both_zero], capsys)
    assert "--max-body-size: the ext_proc message limits follow it" in err
    # Documented where an operator looks.
    helps = {a.option_strings[0]: a.help or "" for a in build_parser()._actions}
    assert "0 or unset" in helps[flag]


def test_the_exit_codes_are_documented_in_the_help() -> None:
    # Who reads a pod's "exit code 1" needs to know it means "stopped, but a part failed to close".
    help_text = " ".join(build_parser().format_help().split())
    assert "exit codes: 0 stopped after SIGTERM or SIGINT" in help_text
    assert (
        "1 stopped, but a part failed to close (logged), endpoint discovery failed while serving, or a second "
        "signal while stopping" in help_text
    )
    assert "2 usage or configuration error" in help_text


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--ha-enable-leader-election", "ha_enable_leader_election"),
        ("--allow-experimental-plugins", "allow_experimental_plugins"),
        ("--disable-endpoint-subset-filter", "disable_endpoint_subset_filter"),
        ("--emit-endpoint-scores", "emit_endpoint_scores"),
        ("--enable-cert-reload", "enable_cert_reload"),
        ("--watch-config-file", "watch_config_file"),
        ("--destination-fallback-list", "destination_fallback_list"),
        ("--decision-header", "decision_header"),
    ],
)
def test_on_off_flags_take_gos_explicit_values(flag: str, field: str) -> None:
    """The reference's are Go bool flags: `--x`, `--x=true` and `--x=false` all parse (a Helm template writes
    `--x={{ .Values.x }}`); before, `=true` was a usage error."""
    assert getattr(settings_from_args([]), field) is False
    assert getattr(settings_from_args([flag]), field) is True
    assert getattr(settings_from_args([f"{flag}=true"]), field) is True
    assert getattr(settings_from_args([f"{flag}=false"]), field) is False


def test_controller_runtimes_zap_flags_run_as_the_reference_registers_them() -> None:
    """Deployments pass --zap-encoder json, --zap-log-level debug...: they were unrecognized arguments."""
    assert (settings_from_args([]).verbosity, settings_from_args([]).log_json) == (2, True)
    s = settings_from_args(["--zap-encoder", "console", "--zap-log-level", "debug", "--zap-devel",
                            "--zap-stacktrace-level=error", "--zap-time-encoding", "iso8601"])  # fmt: skip
    assert (s.verbosity, s.log_json) == (4, False)
    assert settings_from_args(["--zap-log-level=3"]).verbosity == 3
    assert settings_from_args(["--zap-log-level=error"]).verbosity == 0
    # -v and --log-format, when given, win.
    s = settings_from_args(["--zap-log-level=debug", "-v", "1", "--zap-encoder=console", "--log-format=json"])
    assert (s.verbosity, s.log_json) == (1, True)


def test_empty_pool_flags_are_unset_as_the_reference_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A template's `--pool-name=` / `--pool-namespace=` with an empty value: unset (before, the empty name
    counted as given, clashing with --endpoint-selector, and the empty namespace was used as "")."""
    monkeypatch.delenv("NAMESPACE", raising=False)
    s = settings_from_args(["--pool-name=", "--pool-namespace=", "--endpoint-selector=app=vllm"])
    assert not s.pool_name_set and s.pool_namespace == "default"
    monkeypatch.setenv("NAMESPACE", "serving")
    assert settings_from_args(["--pool-namespace="]).pool_namespace == "serving"
    assert settings_from_args(["--pool-namespace=other"]).pool_namespace == "other"


def test_a_target_port_listed_twice_counts_once() -> None:
    """The reference de-duplicates --endpoint-target-ports (removeDuplicatePorts); here it was refused."""
    assert settings_from_args(["--endpoint-target-ports=8000,8001,8000"]).endpoint_target_ports == (8000, 8001)


def test_an_empty_config_file_flag_is_unset_as_in_the_reference(tmp_path: Path) -> None:
    """The reference refuses only both config flags non-empty; an empty one (a template's `--config-file=`)
    is unset, and with neither the built-in default config is used."""
    from llmepp.app import config_text

    assert config_text(settings_from_args(["--config-file="])) == DEFAULT_CONFIG
    path = tmp_path / "epp.yaml"
    path.write_text("plugins:\n- type: queue-scorer\n")
    assert config_text(settings_from_args(["--config-file", str(path), "--config-text="])) == path.read_text()
    text = "plugins:\n- type: kv-cache-utilization-scorer\n"
    assert config_text(settings_from_args(["--config-file=", "--config-text", text])) == text


def test_both_config_flags_given_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        settings_from_args(["--config-file", str(tmp_path / "x.yaml"), "--config-text", "plugins: []"])
    assert exit_.value.code == 2
    assert "argument --config-text: not allowed with argument --config-file" in capsys.readouterr().err
