"""`make run`: Envoy + EPP + simulated vLLM pods on loopback, until Ctrl-C.

python -m llmepp.devstack [--pods 4] [--config my-epp-config.yaml] [--port 8081] [--metrics-port 9091] ...
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.testing.stack import Stack, StackOptions

# The ports besides Envoy's listener: the reference's defaults (EPP 9002/9003/9090, Envoy admin 9901), each
# movable, since 9090 is also Prometheus's and 9901 any other Envoy's.
_PORTS = (
    ("--admin-port", 9901, "Envoy admin port"),
    ("--epp-port", 9002, "EPP ext_proc (gRPC) port"),
    ("--health-port", 9003, "EPP health (gRPC) port"),
    ("--metrics-port", 9090, "EPP metrics port"),
    ("--pod-port", 8000, "the pods' port (on 127.0.0.2, 127.0.0.3, ...)"),
)


def parse_options() -> tuple[StackOptions, int]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=4, help="simulated vLLM pods (127.0.0.2, 127.0.0.3, ...)")
    ap.add_argument("--port", type=int, default=8081, help="Envoy listener port (default 8081)")
    for flag, default, what in _PORTS:
        ap.add_argument(flag, type=int, default=default, metavar="PORT", help=f"{what} (default {default})")
    ap.add_argument("--config", help="EndpointPickerConfig YAML (discovery is added); default profile if omitted")
    ap.add_argument("--latency-profile", default="llama-8b-h100", help="simulator latency profile")
    args = ap.parse_args()
    if not 1 <= args.pods <= 253:
        ap.error("--pods must be 1 to 253 (the pods are 127.0.0.2 and up)")
    on_127_0_0_1: dict[int, str] = {}  # the pods listen on 127.0.0.2 and up
    for flag in ("--port", *(flag for flag, _, _ in _PORTS)):
        port = getattr(args, flag[2:].replace("-", "_"))
        if not 1 <= port <= 65535:
            ap.error(f"{flag} must be 1 to 65535")
        if flag != "--pod-port":
            if port in on_127_0_0_1:
                ap.error(f"{on_127_0_0_1[port]} and {flag} are both {port}")
            on_127_0_0_1[port] = flag
    try:
        config = Path(args.config).read_text() if args.config else DEFAULT_CONFIG
    except (OSError, UnicodeDecodeError) as e:
        ap.error(f"--config: {e}")
    options = StackOptions(
        pods=args.pods,
        sim_args=["--latency-profile", args.latency_profile, "--max-num-seqs", "16", "--kv-cache-size", "4096"],
        epp_config=config,
        pod_port=args.pod_port,
        envoy_port=args.port,
        envoy_admin_port=args.admin_port,
        epp_port=args.epp_port,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        epp_args=["--watch-config-file"],
    )
    return options, args.pods


def ports_in_use(options: StackOptions) -> list[str]:
    """The stack's addresses something else holds (another `make run`, say), as "what host:port (--flag)"."""
    wanted = [
        ("Envoy", "127.0.0.1", options.envoy_port, "--port"),
        ("Envoy admin", "127.0.0.1", options.envoy_admin_port, "--admin-port"),
        ("EPP", "127.0.0.1", options.epp_port, "--epp-port"),
        ("EPP health", "127.0.0.1", options.health_port, "--health-port"),
        ("EPP metrics", "127.0.0.1", options.metrics_port, "--metrics-port"),
        *(
            (f"pod {i}", f"127.0.0.{options.first_host + i}", options.pod_port, "--pod-port")
            for i in range(options.pods)
        ),
    ]
    busy = []
    for what, host, port, flag in wanted:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{what} {host}:{port} ({flag})")
    return busy


async def main(options: StackOptions, pods: int) -> int:
    # Taken ports would otherwise show as one program failing to start, half-way through the start-up.
    if busy := ports_in_use(options):
        print(
            f"devstack: in use already (is another `make run` running? the flags move a port): {', '.join(busy)}",
            file=sys.stderr,
        )
        return 1
    print(f"starting {pods} simulated pods, the EPP and Envoy ...", flush=True)
    # Ctrl-C, `kill` or the terminal closing (SIGHUP) stop the stack's processes too (the EPP and the pods run
    # in sessions of their own: nothing else would stop them), during start-up as well. Later signals are
    # ignored, so a second Ctrl-C cannot cut the clean-up short and leave them running.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, lambda: None)
        print("stopping (Envoy, the EPP, the pods) ...", flush=True)
        task.cancel()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        async with Stack(options) as stack:
            url = stack.url.replace("127.0.0.1", "localhost")
            epp, addresses = f"127.0.0.1:{options.epp_port}", ", ".join(p.address for p in stack.pods)
            print(
                f"""
ready: Envoy {url}  ->  EPP {epp} (ext_proc over TLS)  ->  pods {addresses}

  curl -s {url}/v1/completions -H 'content-type: application/json' \\
       -d '{{"model": "sim-model", "prompt": "Tell me about endpoint pickers", "max_tokens": 20}}' -i

  streaming:  add "stream": true      EPP metrics: curl -s localhost:{options.metrics_port}/metrics | grep llm_d_epp
  the x-inference-pod response header names the pod that answered; EPP log: {stack.workdir}/epp.log
  EPP config: {stack.config_file} (edits of its scorers, weights and profiles apply within ~2 s)

Ctrl-C stops everything.""",
                flush=True,
            )
            await asyncio.Future()  # until a signal cancels this task
    except asyncio.CancelledError:
        pass
    except (RuntimeError, TimeoutError, OSError) as e:  # a program that did not start; its log tail is in `e`
        print(f"devstack: the stack did not start: {e}", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*parse_options())))
