"""`make run`: Envoy + EPP + simulated vLLM pods on loopback, until Ctrl-C.

python -m llmepp.devstack [--pods 4] [--config my-epp-config.yaml] [--port 8081]
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


def parse_options() -> tuple[StackOptions, int]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=4, help="simulated vLLM pods (127.0.0.2, 127.0.0.3, ...)")
    ap.add_argument("--port", type=int, default=8081, help="Envoy listener port")
    ap.add_argument("--config", help="EndpointPickerConfig YAML (discovery is added); default profile if omitted")
    ap.add_argument("--latency-profile", default="llama-8b-h100", help="simulator latency profile")
    args = ap.parse_args()
    if not 1 <= args.pods <= 253:
        ap.error("--pods must be 1 to 253 (the pods are 127.0.0.2 and up)")
    if not 1 <= args.port <= 65535:
        ap.error("--port must be 1 to 65535")
    try:
        config = Path(args.config).read_text() if args.config else DEFAULT_CONFIG
    except (OSError, UnicodeDecodeError) as e:
        ap.error(f"--config: {e}")
    options = StackOptions(
        pods=args.pods,
        sim_args=["--latency-profile", args.latency_profile, "--max-num-seqs", "16", "--kv-cache-size", "4096"],
        epp_config=config,
        pod_port=8000,
        envoy_port=args.port,
        envoy_admin_port=9901,
        epp_port=9002,
        health_port=9003,
        metrics_port=9090,
        epp_args=["--watch-config-file"],
    )
    return options, args.pods


def ports_in_use(options: StackOptions) -> list[str]:
    """The stack's fixed addresses something else holds (another `make run`, say), as "what host:port"."""
    wanted = [
        ("Envoy", "127.0.0.1", options.envoy_port),
        ("Envoy admin", "127.0.0.1", options.envoy_admin_port),
        ("EPP", "127.0.0.1", options.epp_port),
        ("EPP health", "127.0.0.1", options.health_port),
        ("EPP metrics", "127.0.0.1", options.metrics_port),
        *((f"pod {i}", f"127.0.0.{options.first_host + i}", options.pod_port) for i in range(options.pods)),
    ]
    busy = []
    for what, host, port in wanted:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{what} {host}:{port}")
    return busy


async def main(options: StackOptions, pods: int) -> int:
    # Taken ports would otherwise show as one program failing to start, half-way through the start-up.
    if busy := ports_in_use(options):
        print(f"devstack: in use already (is another `make run` running?): {', '.join(busy)}", file=sys.stderr)
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
            print(
                f"""
ready: Envoy {url}  ->  EPP 127.0.0.1:9002 (ext_proc over TLS)  ->  pods {", ".join(p.address for p in stack.pods)}

  curl -s {url}/v1/completions -H 'content-type: application/json' \\
       -d '{{"model": "sim-model", "prompt": "Tell me about endpoint pickers", "max_tokens": 20}}' -i

  streaming:  add "stream": true      EPP metrics: curl -s localhost:9090/metrics | grep llm_d_epp
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
