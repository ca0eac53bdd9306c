"""`make run`: Envoy + EPP + simulated vLLM pods on loopback, until Ctrl-C.

python -m llmepp.devstack [--pods 4] [--config my-epp-config.yaml | --precise] [--port 8081] [--metrics-port 9091] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import signal
import socket
import sys
from pathlib import Path
from typing import TextIO

from llmepp.config.loader import load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.framework.plugin import ConfigError
from llmepp.testing.envoy import envoy_binary
from llmepp.testing.stack import Stack, StackOptions
from llmepp_sim.tokenizer import TOKENIZER_PATH

# (what listens, flag, StackOptions field, default, help): the reference's defaults (EPP 9002/9003/9090, Envoy
# admin 9901), each movable, since 9090 is also Prometheus's and 9901 any other Envoy's. All on 127.0.0.1 but
# the pods'.
_PORTS = (
    ("Envoy", "--port", "envoy_port", 8081, "Envoy listener port"),
    ("Envoy admin", "--admin-port", "envoy_admin_port", 9901, "Envoy admin port"),
    ("EPP", "--epp-port", "epp_port", 9002, "EPP ext_proc (gRPC) port"),
    ("EPP health", "--health-port", "health_port", 9003, "EPP health (gRPC) port"),
    ("EPP metrics", "--metrics-port", "metrics_port", 9090, "EPP metrics port"),
    ("pods", "--pod-port", "pod_port", 8000, "the pods' port (on 127.0.0.2, 127.0.0.3, ...)"),
)


# `--precise`: each pod publishes its KV events on its own address, on the ports vLLM's llm-d guides use
# (`--kv-events-config` endpoint and replay_endpoint), and the EPP routes on them with the reference's
# precise-prefix profile (README, "Precise prefix routing"), tokenizing with the simulator's tokenizer.
KV_EVENTS_PORT, KV_REPLAY_PORT = 5557, 5558
PRECISE_CONFIG = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: sim-model
    tokenizer: {{backend: hf, path: {json.dumps(str(TOKENIZER_PATH))}, chatTemplate: role-tags}}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    speculativeIndexing: true
    kvEventsConfig:
      topicFilter: "kv@"
      discoverPods: true
      podDiscoveryConfig: {{socketPort: {KV_EVENTS_PORT}, replaySocketPort: {KV_REPLAY_PORT}}}
- type: active-request-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: no-hit-lru-scorer
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors: [{{pluginRef: precise-prefix-cache-producer}}]
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: active-request-scorer, weight: 4}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 2}}
  - {{pluginRef: no-hit-lru-scorer, weight: 2}}
"""
_KV_EVENTS_SIM_ARGS = [
    "--zmq-endpoint", f"tcp://{{host}}:{KV_EVENTS_PORT}",
    "--kv-events-replay-endpoint", f"tcp://{{host}}:{KV_REPLAY_PORT}",
]  # fmt: skip


def parse_options() -> StackOptions:
    ap = argparse.ArgumentParser(
        prog="python -m llmepp.devstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pods", type=int, default=4, help="simulated vLLM pods (127.0.0.2, 127.0.0.3, ...)")
    for _, flag, field, default, what in _PORTS:
        ap.add_argument(flag, dest=field, type=int, default=default, metavar="PORT", help=f"{what} (default {default})")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--config", help="EndpointPickerConfig YAML (discovery is added); default profile if omitted")
    which.add_argument(
        "--precise",
        action="store_true",
        help=f"precise prefix routing: the pods publish KV events (ports {KV_EVENTS_PORT}, {KV_REPLAY_PORT}), "
        "the EPP routes on them",
    )
    ap.add_argument("--latency-profile", default="llama-8b-h100", help="simulator latency profile")
    args = ap.parse_args()
    if not 1 <= args.pods <= 253:
        ap.error("--pods must be 1 to 253 (the pods are 127.0.0.2 and up)")
    on_127_0_0_1: dict[int, str] = {}  # the pods listen on 127.0.0.2 and up
    for _, flag, field, _, _ in _PORTS:
        port = getattr(args, field)
        if not 1 <= port <= 65535:
            ap.error(f"{flag} must be 1 to 65535")
        if field != "pod_port":
            if port in on_127_0_0_1:
                ap.error(f"{on_127_0_0_1[port]} and {flag} are both {port}")
            on_127_0_0_1[port] = flag
    if args.precise and args.pod_port in (KV_EVENTS_PORT, KV_REPLAY_PORT):
        ap.error(f"--pod-port {args.pod_port} is a KV-event port of --precise")
    try:
        config = Path(args.config).read_text() if args.config else PRECISE_CONFIG if args.precise else DEFAULT_CONFIG
        # What `epp` refuses when it reads the file (YAML, the schema), refused before anything starts; a plugin
        # it cannot build (an unknown type, a bad parameter) shows as the EPP failing to start, with its log.
        load_config(config)
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        ap.error(f"--config: {e}")
    return StackOptions(
        pods=args.pods,
        sim_args=["--latency-profile", args.latency_profile, "--max-num-seqs", "16", "--kv-cache-size", "4096"]
        + (_KV_EVENTS_SIM_ARGS if args.precise else []),
        epp_config=config,
        epp_args=["--watch-config-file"],
        **{field: getattr(args, field) for _, _, field, _, _ in _PORTS},
    )


def ports_in_use(options: StackOptions) -> tuple[list[str], list[str]]:
    """The stack's addresses something else holds (another `make run`, say), as "what host:port (--flag)"; and
    those it cannot listen on for another reason (a port below 1024 without root, an address the machine
    lacks), as "what host:port (--flag): reason"."""
    busy, unusable = [], []
    for what, flag, field, _, _ in _PORTS:
        port = getattr(options, field)
        if field == "pod_port":
            pods = [f"127.0.0.{options.first_host + i}" for i in range(options.pods)]
            wanted = [(f"pod {i}", host, port, flag) for i, host in enumerate(pods)]
            if _publishes_kv_events(options):
                wanted += [(f"pod {i} KV events", host, p, "--precise") for i, host in enumerate(pods)
                           for p in (KV_EVENTS_PORT, KV_REPLAY_PORT)]  # fmt: skip
        else:
            wanted = [(what, "127.0.0.1", port, flag)]
        for name, host, at, by in wanted:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
                try:
                    s.bind((host, at))
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        busy.append(f"{name} {host}:{at} ({by})")
                    else:
                        unusable.append(f"{name} {host}:{at} ({by}): {e.strerror}")
    return busy, unusable


def _publishes_kv_events(options: StackOptions) -> bool:
    return _KV_EVENTS_SIM_ARGS[0] in options.sim_args


async def main(options: StackOptions) -> int:
    # A missing Envoy or a taken port would otherwise show as one program failing to start, half-way through
    # the start-up.
    try:
        envoy_binary()
    except FileNotFoundError as e:
        print(f"devstack: {e}", file=sys.stderr)
        return 1
    busy, unusable = ports_in_use(options)
    if busy:
        print(
            f"devstack: in use already (is another `make run` running? the flags move a port): {', '.join(busy)}",
            file=sys.stderr,
        )
    if unusable:
        print(f"devstack: cannot listen on: {', '.join(unusable)}", file=sys.stderr)
    if busy or unusable:
        return 1
    print(f"starting {options.pods} simulated pods, the EPP and Envoy ...", flush=True)
    # Ctrl-C, `kill` or the terminal closing (SIGHUP) stop the stack's processes too (the EPP and the pods run
    # in sessions of their own: nothing else would stop them), during start-up as well. Later signals are
    # ignored, so a second Ctrl-C cannot cut the clean-up short and leave them running.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, lambda: None)
        task.cancel()  # first: the terminal may be gone (SIGHUP), and then printing fails
        _say("stopping (Envoy, the EPP, the pods) ...")

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        async with Stack(options) as stack:
            url = stack.url.replace("127.0.0.1", "localhost")
            epp, addresses = f"127.0.0.1:{options.epp_port}", ", ".join(p.address for p in stack.pods)
            precise = (
                f"\n  precise prefix routing: the pods' KV events (tcp://<pod>:{KV_EVENTS_PORT}) feed the EPP's index; "
                f"curl -s localhost:{options.metrics_port}/metrics | grep llm_d_epp_kv_events_block"
                if _publishes_kv_events(options)
                else ""
            )
            _say(
                f"""
ready: Envoy {url}  ->  EPP {epp} (ext_proc over TLS)  ->  pods {addresses}

  curl -s {url}/v1/completions -H 'content-type: application/json' \\
       -d '{{"model": "sim-model", "prompt": "Tell me about endpoint pickers", "max_tokens": 20}}' -i

  streaming:  add "stream": true      EPP metrics: curl -s localhost:{options.metrics_port}/metrics | grep llm_d_epp
  the x-inference-pod response header names the pod that answered
  logs: {stack.workdir}/epp.log, {stack.workdir}/envoy.log
  EPP config: {stack.config_file} (edits of its scorers, weights and profiles apply within ~2 s){precise}

Ctrl-C stops everything."""
            )
            await asyncio.Future()  # until a signal cancels this task
    except asyncio.CancelledError:
        pass
    except (RuntimeError, TimeoutError, OSError) as e:  # a program that did not start; its log tail is in `e`
        _say(f"devstack: the stack did not start: {e}", sys.stderr)
        return 1
    _say("stopped")
    return 0


def _say(text: str, file: TextIO | None = None) -> None:
    """Print, unless the terminal has gone (closed window: EIO) or the pipe's reader has (EPIPE): the stack must
    still stop, or start, without anyone to read it."""
    with contextlib.suppress(OSError):
        print(text, file=file or sys.stdout, flush=True)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_options())))
