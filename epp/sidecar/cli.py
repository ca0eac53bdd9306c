"""`epp-pd-sidecar`: run the decode-side P/D routing sidecar in front of one decode model server.

    epp-pd-sidecar --port 8000 --vllm-port 8200                 # vLLM on 127.0.0.1:8200 (the reference layout)
    epp-pd-sidecar --host 10.0.0.5 --port 8000 --decoder-url http://10.0.0.5:8200 --prefill-max-retries 3
    POD_IP=10.0.0.5 epp-pd-sidecar --port 8000 --vllm-port 8200 --data-parallel-size 4
        # ports 8000-8003 front vLLM ranks 8200-8203; 8000 also forwards by x-data-parallel-host-port

Durations accept plain seconds (`0.2`) or Go's syntax (`200ms`, `5s`, `1m30s`, `250us`). Prints
`epp-pd-sidecar: listening <host:port> decoder=<url>` once it accepts connections (one line per
data-parallel rank, ending ` rank=<r>`, rank 0 first); SIGTERM / SIGINT stop it (exit 0).

`--data-parallel-size N` (the reference flag, default 1): the sidecar listens on `--port` .. `--port`+N-1
and rank r's port fronts the model server's port + r (`--vllm-port`, or `--decoder-url`'s port). On the
primary port, `x-data-parallel-host-port: <pod ip>:<port + r>` (set by the EPP's
`data-parallel-profile-handler`) sends the request - after the remote prefill, its decode - to rank r;
a value naming another address or port is a 400. The pod's IP is `--pod-ip`, default `$POD_IP` (as
the reference reads it), else `--host` when that is not a wildcard.

The reference sidecar's flags are accepted so its Deployment args start this one: `--kv-connector nixlv2`
(or `--connector`), `--enable-tls prefiller,decoder` (https upstreams; repeatable, as `--prefiller-use-tls` /
`--decoder-use-tls`), `--tls-insecure-skip-verify` (every stage, or a list of them), `--enable-ssrf-protection`
(with `--allowed-prefill-networks`), `--data-parallel-size`, `--zap-log-level` / `-v`; `--secure-proxy=false`,
`--cert-path`, `--inference-pool`, `--pool-group` and `--max-idle-conns-per-host` are accepted with nothing to
do here. What this sidecar does not do (other connectors, encoders, chunked decode, prefiller sampling,
metrics, serving TLS) is refused at start with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

from yarl import URL

from llmepp.cli import parse_bool
from llmepp.gctuning import tune_gc
from llmepp.sidecar.proxy import EVERY_ADDRESS, Sidecar, SidecarOptions

READY_PREFIX = "epp-pd-sidecar: listening "
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_GO_DURATION = re.compile(rf"(?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h))+")
_GO_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_STAGES = ("prefiller", "decoder", "encoder")
_SIZE = re.compile(r"^\s*(\d+)\s*(|k|ki|kib|m|mi|mib|g|gi|gib)\s*$", re.IGNORECASE)


def duration(text: str) -> float:
    """Seconds, or Go's time.ParseDuration syntax (`1m30s`, `250us`), as the reference parses its durations."""
    value = text.strip()
    if re.fullmatch(_NUMBER, value):
        return float(value)
    if _GO_DURATION.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 0.2, 200ms, 5s, 1m30s)")
    return sum(float(number) * _UNITS[unit] for number, unit in _GO_PART.findall(value))


def stages(text: str) -> set[str]:
    """--tls-insecure-skip-verify: a Go bool (every stage) or, as the newer reference, a list of stages."""
    try:
        return set(_STAGES) if parse_bool(text) else set()
    except argparse.ArgumentTypeError:
        pass
    named = {part.strip() for part in text.split(",") if part.strip()}
    if not named or named - set(_STAGES):
        raise argparse.ArgumentTypeError(f"invalid {text!r}: true, false or stages ({', '.join(_STAGES)})")
    return named


def size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 64MiB)")
    unit = match[2].lower()[:1]
    return int(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def build_parser() -> argparse.ArgumentParser:
    d = SidecarOptions()
    p = argparse.ArgumentParser(
        prog="epp-pd-sidecar",
        allow_abbrev=False,  # Go flags (the tool this mirrors) take no prefixes
        description="Decode-side P/D routing sidecar: runs the remote prefill named by x-prefiller-host-port, "
        "then streams the local decoder's answer.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=d.host, help="listen address (default: every address, IPv6 and IPv4)")
    p.add_argument("--port", type=int, default=d.port, help="listen port, the pod's serving port (default %(default)s)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--decoder-url", help=f"URL of the local decode server (default {d.decoder_url})")
    target.add_argument(
        "--vllm-port", "--model-server-port", dest="vllm_port", type=int, help="local decoder port on 127.0.0.1"
    )
    p.add_argument("--prefill-scheme", choices=("http", "https"), default=d.prefill_scheme)
    p.add_argument("--prefill-max-retries", type=int, default=d.prefill_max_retries,
                   help="retries of a prefill answered 502/503/504 or unreachable (default %(default)s)")  # fmt: skip
    p.add_argument("--prefill-retry-backoff", type=duration, default=d.prefill_retry_backoff,
                   help="wait before the first retry, doubled per retry up to 10s (default %(default)ss)")  # fmt: skip
    p.add_argument("--connect-timeout", type=duration, default=d.connect_timeout)
    p.add_argument("--prefill-timeout", type=duration, default=d.prefill_timeout, help="one prefill attempt")
    p.add_argument("--decode-idle-timeout", type=duration, default=d.decode_idle_timeout,
                   help="longest silence of a decoder answer once started (the wait for it: unbounded)")  # fmt: skip
    p.add_argument("--max-body-size", type=size, default=d.max_body_bytes)
    p.add_argument("--allowed-prefill-networks", default="",
                   help="comma-separated CIDRs x-prefiller-host-port may name (SSRF guard; default any)")  # fmt: skip
    p.add_argument("--pod-ip", default=os.environ.get("POD_IP", ""),
                   help="this pod's IP as the EPP names it in x-data-parallel-host-port (default $POD_IP, "
                   "else --host); only with --data-parallel-size > 1")  # fmt: skip
    p.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"), help="default info")
    # The reference sidecar's flags (cmd/pd-sidecar), so its Deployment args start this one: honoured where
    # this sidecar does what they ask, refused with the reason where it does not.
    ref = p.add_argument_group("reference flags")
    ref.add_argument("--kv-connector", "--connector", dest="kv_connector", default="nixlv2",
                     help="nixlv2 (vLLM's NixlConnector), the only one here")  # fmt: skip
    ref.add_argument("--ec-connector", default="", help="encoder connectors: none here (encoders are not run)")
    ref.add_argument("--enable-tls", action="append", default=[],
                     help="comma-separated, repeatable: prefiller, decoder (https upstreams)")  # fmt: skip
    go_bool: dict[str, Any] = {"type": parse_bool, "nargs": "?", "const": True, "default": False, "metavar": "BOOL"}
    ref.add_argument("--prefiller-use-tls", **go_bool, help="as --enable-tls prefiller")
    ref.add_argument("--decoder-use-tls", **go_bool, help="as --enable-tls decoder")
    # Repeatable, as the reference's StringSliceVar: the stages of every occurrence add up.
    ref.add_argument("--tls-insecure-skip-verify", type=stages, nargs="?", const=set(_STAGES), default=[],
                     action="append", metavar="BOOL|STAGES",
                     help="skip certificate checks: every stage, or named ones (repeatable)")  # fmt: skip
    ref.add_argument("--prefiller-tls-insecure-skip-verify", **go_bool, help="as --tls-insecure-skip-verify prefiller")
    ref.add_argument("--decoder-tls-insecure-skip-verify", **go_bool, help="as --tls-insecure-skip-verify decoder")
    # Default None: the reference's default is true (TLS), so "not given" differs from an explicit =false.
    ref.add_argument("--secure-proxy", "--secure-serving", dest="secure_proxy", **{**go_bool, "default": None},
                     help="TLS on the sidecar's own port: not served here (=false is accepted)")  # fmt: skip
    ref.add_argument("--cert-path", default="", help="with --secure-proxy, which is not served here")
    ref.add_argument("--inference-pool", default="", help="accepted: SSRF protection reads --allowed-prefill-networks")
    ref.add_argument("--pool-group", default="", help="accepted (see --inference-pool)")
    ref.add_argument("--inference-pool-namespace", default="", help="deprecated in the reference: as --inference-pool")
    ref.add_argument("--inference-pool-name", default="", help="deprecated in the reference: as --inference-pool")
    ref.add_argument("--max-idle-conns-per-host", type=int, default=0, help="accepted: idle connections are unbounded")
    ref.add_argument("--zap-log-level", default=None, help="debug, info, error (as --log-level)")
    # controller-runtime's other zap flags (zap.Options.BindFlags): accepted, the log format is this one's own.
    ref.add_argument("--zap-devel", **go_bool, help="accepted")
    ref.add_argument("--zap-encoder", default="", help="accepted (json | console)")
    ref.add_argument("--zap-stacktrace-level", default="", help="accepted")
    ref.add_argument("--zap-time-encoding", default="", help="accepted")
    ref.add_argument("-v", "--v", dest="verbosity", type=int, default=None, help="4 or more: debug logs")
    ref.add_argument("--enable-ssrf-protection", **go_bool,
                     help="needs --allowed-prefill-networks here (the reference reads the InferencePool)")  # fmt: skip
    ref.add_argument("--enable-prefiller-sampling", **go_bool)
    ref.add_argument("--data-parallel-size", type=int, default=d.data_parallel_size,
                     help="model server data-parallel ranks: rank r on --port + r, fronting its port + r")  # fmt: skip
    ref.add_argument("--decode-chunk-size", type=int, default=0)
    ref.add_argument("--metrics-port", type=int, default=0)
    ref.add_argument("--mooncake-bootstrap-port", type=int, default=8998, help="with --kv-connector mooncake")
    ref.add_argument("--p2p-connector-port", type=int, default=7777, help="with --kv-connector offloading")
    return p


def _unsupported(a: argparse.Namespace) -> list[str]:
    """What the reference flags ask that this sidecar does not do."""
    problems = []
    if a.kv_connector != "nixlv2":
        problems.append(f"--kv-connector {a.kv_connector}: only nixlv2 (vLLM's NixlConnector) is implemented")
    if a.ec_connector:
        problems.append("--ec-connector: this sidecar runs no encoders")
    unknown = _tls_stages(a) - {"prefiller", "decoder"}
    if unknown:
        problems.append(f"--enable-tls {','.join(sorted(unknown))}: only prefiller and decoder")
    if a.enable_ssrf_protection and not a.allowed_prefill_networks:
        problems.append("--enable-ssrf-protection: name the prefill pods' networks with --allowed-prefill-networks")
    if a.enable_prefiller_sampling:
        problems.append("--enable-prefiller-sampling is not implemented")
    if a.decode_chunk_size:
        problems.append("--decode-chunk-size: chunked decode is not implemented")
    if a.metrics_port:
        problems.append("--metrics-port: this sidecar serves no metrics")
    if a.secure_proxy:
        problems.append("--secure-proxy: this sidecar serves plain HTTP (TLS ends at the gateway or a mesh)")
    elif a.cert_path and a.secure_proxy is None:
        problems.append("--cert-path: the reference serves TLS with it (its --secure-proxy defaults to true); "
                        "this sidecar serves plain HTTP: pass --secure-proxy=false")  # fmt: skip
    if a.zap_log_level is not None and _zap_level(a.zap_log_level) is None:
        problems.append(f"--zap-log-level {a.zap_log_level}: debug, info, warn, error or a number")
    return problems


def _tls_stages(a: argparse.Namespace) -> set[str]:
    named = {t.strip() for value in a.enable_tls for t in value.split(",") if t.strip()}
    flags = {"prefiller": a.prefiller_use_tls, "decoder": a.decoder_use_tls}
    return named | {stage for stage, on in flags.items() if on}


def _zap_level(text: str) -> str | None:
    """A zap level as a --log-level (an integer N > 0 is V(N): debug)."""
    level = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}.get(text.strip().lower())
    if level is None and text.strip().isdigit():
        level = "debug" if int(text) > 0 else "info"
    return level


def _log_level(a: argparse.Namespace) -> str:
    """--log-level, else --zap-log-level, else -v (4 or more: debug), else info."""
    if a.log_level is not None:
        return str(a.log_level)
    if a.zap_log_level is not None:
        return _zap_level(a.zap_log_level) or "info"
    return "debug" if a.verbosity is not None and a.verbosity >= 4 else "info"


def options_from_args(argv: Sequence[str] | None = None) -> tuple[SidecarOptions, str]:
    """The options and the log level."""
    parser = build_parser()
    a = parser.parse_args(argv)
    problems = _unsupported(a)
    if problems:
        parser.error("; ".join(problems))
    tls = _tls_stages(a)
    scheme = "https" if "decoder" in tls else "http"
    vllm_port = URL(SidecarOptions.decoder_url).port if a.vllm_port is None else a.vllm_port
    decoder = a.decoder_url or f"{scheme}://127.0.0.1:{vllm_port}"
    # The default decoder is 127.0.0.1: only a sidecar listening there (or on every address) would call itself.
    loopback = a.host in (*EVERY_ADDRESS, "127.0.0.1", "localhost")
    if not a.decoder_url and loopback and abs(vllm_port - a.port) < max(1, a.data_parallel_size):  # rank r: +r
        parser.error(f"--vllm-port {vllm_port}: the sidecar listens there (--port {a.port}); it would call itself")
    skip: set[str] = set().union(*a.tls_insecure_skip_verify)
    skip |= {stage for stage, on in (("prefiller", a.prefiller_tls_insecure_skip_verify),
                                     ("decoder", a.decoder_tls_insecure_skip_verify)) if on}  # fmt: skip
    try:
        options = SidecarOptions(
            host=a.host,
            port=a.port,
            decoder_url=decoder,
            prefill_scheme="https" if "prefiller" in tls else a.prefill_scheme,
            prefill_max_retries=a.prefill_max_retries,
            prefill_retry_backoff=a.prefill_retry_backoff,
            connect_timeout=a.connect_timeout,
            prefill_timeout=a.prefill_timeout,
            decode_idle_timeout=a.decode_idle_timeout,
            max_body_bytes=a.max_body_size,
            allowed_prefill_networks=[n.strip() for n in a.allowed_prefill_networks.split(",") if n.strip()],
            tls_verify_prefill="prefiller" not in skip,
            tls_verify_decoder="decoder" not in skip,
            data_parallel_size=a.data_parallel_size,
            pod_ip=a.pod_ip,
        )
    except ValueError as e:
        parser.error(str(e))
    return options, _log_level(a)


async def serve(options: SidecarOptions) -> None:
    sidecar = Sidecar(options)
    await sidecar.start()
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if len(sidecar.ports) == 1:
        print(f"{READY_PREFIX}{options.host or '*'}:{sidecar.port} decoder={options.decoder_url}", flush=True)
    else:
        for rank, (port, decoder) in enumerate(zip(sidecar.ports, sidecar.decoders)):
            print(f"{READY_PREFIX}{options.host or '*'}:{port} decoder={decoder} rank={rank}", flush=True)
    try:
        await stop.wait()
    finally:
        await sidecar.stop()


def main(argv: Sequence[str] | None = None) -> int:
    options, level = options_from_args(argv)
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # asyncio's own loop works, slower
        pass
    try:
        asyncio.run(serve(options))
    except OSError as e:  # its port in use, an address it cannot bind
        print(f"epp-pd-sidecar: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
