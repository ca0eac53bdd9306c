"""``epp-sim``: run one or many simulated vLLM pods in one process.

Examples::

    epp-sim --model meta-llama/Llama-3.1-8B-Instruct --port 8000                  # one pod on 127.0.0.1
    epp-sim --pods 8 --port 8000 --latency-profile llama-8b-h100 \\
            --zmq-endpoint tcp://127.0.0.1:5557 --time-scale 10                   # 127.0.0.2 ... 127.0.0.9
    epp-sim --hosts 127.0.0.2,127.0.0.3 --port 8000 --max-num-seqs 16
    epp-sim --config sim.yaml --time-scale 5                                      # flags override the file

Flags are llm-d-inference-sim's names where they overlap; every ``PodConfig`` field is a flag
(``max_num_seqs`` -> ``--max-num-seqs``). Latency flags are milliseconds of simulated time.

Several pods: ``--pods N`` binds pod i to 127.0.0.(2+i), ``--hosts`` lists the addresses; all share
``--port`` (and ``--grpc-port``). A global ``--zmq-endpoint`` / ``--kv-events-replay-endpoint`` is
re-targeted to each pod's host (same port), unless it contains ``{host}`` / ``{index}`` placeholders,
which are filled in; ``--name`` may use them too (default ``sim-{index}``).

YAML (``--config``): the same keys with dashes or underscores at top level, plus ``time-scale``,
``latency-profile``, ``hosts`` and ``pods`` (a count, or a list of per-pod mappings that override the
globals: ``{host: 127.0.0.2, role: prefill, labels: {llm-d.ai/role: prefill}, kv-cache-size: 512}``).
Precedence: defaults < latency profile < YAML globals < CLI flags < per-pod YAML entries.

Output: one ``epp-sim: pod <name> http=<host:port> role=... kv-events=... replay=... topic=...`` line per
pod (ending `` grpc=<host:port>`` for a pod with a gRPC face, ``--grpc-port``), then ``epp-sim: ready
<host:port>,<host:port>,...`` (the HTTP addresses) once every pod listens. SIGTERM/SIGINT stop the pods
and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import typing
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import yaml
import zmq

from llmepp_sim.cluster import SimCluster
from llmepp_sim.config import PodConfig, SimConfig, normalize_keys, pod_config_from_dict
from llmepp_sim.profiles import list_profiles, load_profile

MAX_LOOPBACK_PODS = 253  # 127.0.0.2 ... 127.0.0.254
PROCESS_KEYS = ("time_scale", "pods", "hosts", "latency_profile")

FLAG_HELP = {
    "name": "pod name (x-inference-pod header, KV-event topic); placeholders {index} {host}",
    "host": "bind address of a single pod",
    "port": "HTTP port (0 = any free port)",
    "grpc_port": "gRPC port: vLLM's VllmEngine and Vertex AI's PredictionService over h2c (0 = any free port; "
    "unset = no gRPC face)",
    "model": "base model name",
    "served_model_name": "names the base model answers to (first one names metrics)",
    "role": "P/D role: prefill, decode or both",
    "labels": "free-form pod labels, key=value ...",
    "max_num_seqs": "max running requests (batch seats)",
    "max_model_len": "context length (prompt + output tokens)",
    "seed": "seed for the filler text and fault injection",
    "time_to_first_token": "ms, constant part of every prefill",
    "prefill_overhead": "ms, fixed prefill cost per request",
    "prefill_time_per_token": "ms per uncached prompt token (GPU time, shared by concurrent prefills)",
    "inter_token_latency": "ms per decode step at one running request",
    "time_factor_under_load": "ITL multiplier reached at max-num-seqs running requests (>= 1)",
    "kv_cache_transfer_latency": "ms, fixed cost of pulling KV for a do_remote_prefill request",
    "kv_cache_transfer_time_per_token": "ms per transferred (uncached) prompt token",
    "lora_load_latency": "ms to load a LoRA adapter onto the GPU",
    "enable_kvcache": "automatic prefix caching",
    "kv_cache_size": "KV cache size in blocks",
    "block_size": "tokens per KV block",
    "hash_seed": "seed of the block-hash chain (see llmepp_sim.blockhash)",
    "zmq_endpoint": "ZMQ PUB endpoint for KV events, e.g. tcp://127.0.0.2:5557 ('' = off)",
    "event_batch_size": "max KV events per published batch",
    "event_flush_interval": "ms (wall clock) a partial KV-event batch may wait",
    "use_vllm_legacy_event_format": "tagged-array KV events (vLLM <= 0.23) instead of maps",
    "kv_events_topic": "topic template; placeholders {pod} {host} {port} {model}",
    "kv_events_connect": "connect the PUB socket to --zmq-endpoint (a central subscriber binds it) instead of binding",
    "kv_events_replay_endpoint": "ZMQ ROUTER endpoint for KV-event replay ('' = off)",
    "kv_events_replay_queue_size": "batches kept for replay",
    "data_parallel_rank": "data_parallel_rank reported in KV-event batches",
    "lora_modules": "LoRA adapters: name=path or JSON objects",
    "max_loras": "max distinct LoRA adapters in a batch",
    "failure_injection_rate": "percent of inference requests that fail",
    "failure_types": "failure kinds to inject (space or comma separated)",
    "startup_duration": "s (wall clock) during which /health and requests answer 503",
    "metrics_delay": "s (wall clock) added to every /metrics response",
    "metrics_hang": "/metrics never answers",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epp-sim",
        allow_abbrev=False,  # Go flags (the tool this mirrors) take no prefixes
        description="vLLM-compatible model-server simulator (many pods per process).",
        argument_default=argparse.SUPPRESS,  # only explicitly given flags reach the config merge
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--pods", type=int, help="number of pods, bound to 127.0.0.2, 127.0.0.3, ...")
    parser.add_argument("--hosts", type=_csv, help="comma-separated pod bind addresses")
    parser.add_argument("--time-scale", type=float, help="simulated seconds per wall-clock second (default 1)")
    parser.add_argument("--latency-profile", help=f"shipped profile ({', '.join(list_profiles())}) or a YAML path")
    parser.add_argument("--list-profiles", action="store_true", help="print the shipped profiles and exit")
    hints = typing.get_type_hints(PodConfig)
    for field in dataclasses.fields(PodConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = FLAG_HELP.get(field.name, "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, help=help_text)
        elif kind == int | None:
            parser.add_argument(flag, type=int, help=help_text)
        else:  # lists and the labels mapping
            parser.add_argument(flag, nargs="+", help=help_text)
    return parser


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _labels(values: Any) -> dict[str, str]:
    if isinstance(values, dict):
        return {str(k): str(v) for k, v in values.items()}
    labels = {}
    for item in values:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise ValueError(f"label {item!r} must be key=value")
        labels[key] = value
    return labels


def _per_pod(template: str, host: str, index: int, retarget: bool) -> str:
    if "{" in template:
        return template.format(host=host, index=index)
    if retarget and "://" in template:
        scheme, rest = template.split("://", 1)
        _, _, port = rest.rpartition(":")
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    return template


def build_sim_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> SimConfig:
    file_values, cli_values = normalize_keys(file_values), normalize_keys(cli_values)
    merged_process = {**file_values, **cli_values}
    time_scale = float(merged_process.get("time_scale", 1.0))
    profile = merged_process.get("latency_profile")
    pod_globals = {
        **{k: v for k, v in file_values.items() if k not in PROCESS_KEYS},
        **{k: v for k, v in cli_values.items() if k not in PROCESS_KEYS},
    }
    entries = _pod_entries(file_values, cli_values)
    multi = len(entries) > 1
    pods = []
    for index, entry in enumerate(entries):
        entry = normalize_keys(entry)
        pod_profile = entry.pop("latency_profile", profile)
        values = {**(load_profile(pod_profile) if pod_profile else {}), **pod_globals, **entry}
        host = str(values.get("host", PodConfig.host))
        values["name"] = str(values.get("name") or "sim-{index}").format(index=index, host=host)
        for key in ("zmq_endpoint", "kv_events_replay_endpoint"):
            if values.get(key):
                # A connecting PUB targets the subscriber's one address: never re-targeted per pod.
                connects = key == "zmq_endpoint" and bool(values.get("kv_events_connect"))
                retarget = multi and key not in entry and not connects
                values[key] = _per_pod(str(values[key]), host, index, retarget=retarget)
        if "labels" in values:
            values["labels"] = _labels(values["labels"])
        if "failure_types" in values and isinstance(values["failure_types"], list):
            values["failure_types"] = [t for item in values["failure_types"] for t in _csv(str(item))]
        pods.append(pod_config_from_dict(values))
    config = SimConfig(pods=pods, time_scale=time_scale)
    config.validate()
    return config


def _pod_entries(file_values: dict[str, Any], cli_values: dict[str, Any]) -> list[dict[str, Any]]:
    """One mapping per pod: CLI --hosts/--pods replace the file's pod list."""
    source = cli_values if ("hosts" in cli_values or "pods" in cli_values) else file_values
    hosts = source.get("hosts")
    count = source.get("pods")
    if isinstance(hosts, str):
        hosts = _csv(hosts)
    if hosts:
        if isinstance(count, int) and count != len(hosts):
            raise ValueError(f"--pods {count} does not match {len(hosts)} --hosts")
        return [{"host": h} for h in hosts]
    if isinstance(count, list):
        if not all(isinstance(e, dict) for e in count):
            raise ValueError("`pods` must be a count or a list of mappings")
        return [dict(e) for e in count]
    if count is not None:
        n = int(count)
        if not 1 <= n <= MAX_LOOPBACK_PODS:
            raise ValueError(f"--pods must be within 1..{MAX_LOOPBACK_PODS}")
        return [{"host": f"127.0.0.{2 + i}"} for i in range(n)]
    return [{}]


def config_from_args(argv: Sequence[str] | None = None) -> SimConfig | None:
    """Parse the command line (and the YAML file it names); ``None`` when nothing should run."""
    args = vars(build_parser().parse_args(argv))
    if args.pop("list_profiles", False):
        for name in list_profiles():
            print(name)
        return None
    file_values: dict[str, Any] = {}
    path = args.pop("config", None)
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config file must be a mapping")
        file_values = loaded
    return build_sim_config(file_values, args)


async def serve(config: SimConfig) -> None:
    cluster = SimCluster(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await cluster.start()
    try:
        for line in cluster.pod_lines():
            print(line)
        print(cluster.ready_line(), flush=True)
        await stop.wait()
    finally:
        await cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"epp-sim: error: {exc}", file=sys.stderr)
        return 2
    if config is None:
        return 0
    try:
        _run(serve(config))
    except (OSError, zmq.ZMQError) as exc:
        print(f"epp-sim: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # the faster loop carries more pods per core; optional
    except ImportError:
        asyncio.run(main_coroutine)
        return
    uvloop.run(main_coroutine)


if __name__ == "__main__":
    sys.exit(main())
