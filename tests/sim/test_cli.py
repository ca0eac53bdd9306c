"""epp-sim: config merging (flags, YAML, profiles, per-pod entries) and the real console script."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from llmepp_sim import PodConfig, SimProcess, list_profiles, load_profile
from llmepp_sim.cli import build_sim_config, config_from_args, main
from llmepp_sim.config import LoraModule

from .simkit import complete

EPP_SIM = Path(sys.executable).with_name("epp-sim")


def test_flags_map_to_pod_config_fields() -> None:
    config = config_from_args(
        [
            "--port", "9000", "--model", "m", "--max-num-seqs", "7", "--inter-token-latency", "20",
            "--no-enable-kvcache", "--failure-types", "rate_limit,server_error", "invalid_request",
            "--lora-modules", "a=/p/a", '{"name": "b", "path": "/p/b"}', "--labels", "llm-d.ai/role=decode",
            "--time-scale", "4",
        ]
    )  # fmt: skip
    assert config is not None
    assert config.time_scale == 4.0
    (single,) = config.pods
    assert (single.port, single.model, single.max_num_seqs, single.inter_token_latency) == (9000, "m", 7, 20.0)
    assert single.enable_kvcache is False
    assert single.failure_types == ["rate_limit", "server_error", "invalid_request"]
    assert single.lora_modules == [LoraModule("a", "/p/a"), LoraModule("b", "/p/b")]
    assert single.labels == {"llm-d.ai/role": "decode"}
    assert single.name == "sim-0" and single.host == "127.0.0.1"


def test_connecting_publishers_all_target_the_one_subscriber() -> None:
    config = build_sim_config(
        {}, {"pods": 3, "port": 8000, "zmq_endpoint": "tcp://127.0.0.1:5557", "kv_events_connect": True}
    )
    assert [p.zmq_endpoint for p in config.pods] == ["tcp://127.0.0.1:5557"] * 3
    assert all(p.kv_events_connect for p in config.pods)


def test_many_pods_get_loopback_hosts_and_retargeted_zmq_endpoints() -> None:
    config = build_sim_config({}, {"pods": 3, "port": 8000, "zmq_endpoint": "tcp://127.0.0.1:5557"})
    assert [p.host for p in config.pods] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert [p.name for p in config.pods] == ["sim-0", "sim-1", "sim-2"]
    assert [p.zmq_endpoint for p in config.pods] == [f"tcp://127.0.0.{i}:5557" for i in (2, 3, 4)]
    hosts = build_sim_config({}, {"hosts": ["127.0.0.9", "127.0.0.7"], "name": "pod-{index}"})
    assert [(p.host, p.name) for p in hosts.pods] == [("127.0.0.9", "pod-0"), ("127.0.0.7", "pod-1")]
    with pytest.raises(ValueError, match="does not match"):
        build_sim_config({}, {"pods": 3, "hosts": ["127.0.0.2"]})


def test_ipv6_hosts_get_bracketed_zmq_endpoints() -> None:
    endpoints = {"zmq_endpoint": "tcp://[::1]:*", "kv_events_replay_endpoint": "tcp://127.0.0.1:5558"}
    config = build_sim_config({}, {"hosts": ["::1", "fd00::2"], "port": 0, **endpoints})
    assert [p.zmq_endpoint for p in config.pods] == ["tcp://[::1]:*", "tcp://[fd00::2]:*"]
    assert [p.kv_events_replay_endpoint for p in config.pods] == ["tcp://[::1]:5558", "tcp://[fd00::2]:5558"]


def test_yaml_profile_flags_and_per_pod_precedence(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(
        """
time-scale: 2
latency-profile: llama-8b-h100
inter-token-latency: 15
max_num_seqs: 8
zmq-endpoint: "tcp://{host}:5557"
pods:
  - {host: 127.0.0.2, role: prefill, labels: {llm-d.ai/role: prefill}}
  - {host: 127.0.0.3, role: decode, max-num-seqs: 32, kv-cache-size: 500}
"""
    )
    config = config_from_args(["--config", str(path), "--max-num-seqs", "16", "--time-scale", "3"])
    assert config is not None
    prefill, decode = config.pods
    assert config.time_scale == 3.0  # flag beats file
    profile = load_profile("llama-8b-h100")
    assert prefill.prefill_time_per_token == profile["prefill_time_per_token"]  # from the profile
    assert prefill.inter_token_latency == 15.0  # file beats profile
    assert prefill.max_num_seqs == 16  # flag beats file
    assert decode.max_num_seqs == 32  # per-pod entry beats everything
    assert (prefill.role, decode.role) == ("prefill", "decode")
    assert prefill.labels == {"llm-d.ai/role": "prefill"}
    assert decode.kv_cache_size == 500 and prefill.kv_cache_size == profile["kv_cache_size"]
    assert [p.zmq_endpoint for p in config.pods] == ["tcp://127.0.0.2:5557", "tcp://127.0.0.3:5557"]


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown pod config keys"):
        build_sim_config({"max-num-seq": 3}, {})
    with pytest.raises(ValueError, match="role"):
        build_sim_config({}, {"role": "middle"})
    with pytest.raises(ValueError, match="unknown latency profile"):
        build_sim_config({}, {"latency_profile": "gpt-9-tpu"})
    with pytest.raises(ValueError, match="unknown failure types"):
        build_sim_config({}, {"failure_types": ["meteor"]})


def test_shipped_profiles_match_their_reference_targets() -> None:
    assert set(list_profiles()) >= {"llama-8b-h100", "llama-70b-h100-tp8", "qwen3-32b-h100-tp2"}
    from llmepp_sim.profiles import profile_targets

    for name in list_profiles():
        values, targets = load_profile(name), profile_targets(name)
        config = build_sim_config({}, {"latency_profile": name}).pods[0]
        assert isinstance(config, PodConfig)
        ttft_256 = values["prefill_overhead"] + 256 * values["prefill_time_per_token"]
        low, high = targets["ttft_ms_at_256_tokens"]
        assert low <= ttft_256 <= high, name
        low, high = targets["itl_ms"]
        assert low <= values["inter_token_latency"] <= high, name


async def test_console_script_serves_two_pods_and_exits_cleanly_on_sigterm() -> None:
    assert EPP_SIM.exists()
    process = await asyncio.create_subprocess_exec(
        str(EPP_SIM), "--hosts", "127.0.0.2,127.0.0.3", "--port", "0", "--time-scale", "10",
        "--zmq-endpoint", "tcp://127.0.0.1:*",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines = []
        while True:
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
            assert line, "epp-sim exited before its ready line"
            lines.append(line)
            if line.startswith("epp-sim: ready "):
                break
        addresses = lines[-1].removeprefix("epp-sim: ready ").split(",")
        assert [a.rsplit(":", 1)[0] for a in addresses] == ["127.0.0.2", "127.0.0.3"]
        assert any("kv-events=tcp://127.0.0.3:" in line for line in lines)
        async with aiohttp.ClientSession() as http:
            for index, address in enumerate(addresses):
                result = await complete(http, f"http://{address}", "hello", 3, stream=True)
                assert result.status == 200
                assert result.headers["x-inference-pod"] == f"sim-{index}"
                assert result.lines[-2] == "data: [DONE]"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_sim_process_wrapper_and_sigint(tmp_path: Path) -> None:
    with SimProcess(["--pods", "2", "--port", "0", "--kv-events-replay-endpoint", "tcp://{host}:*",
                     "--zmq-endpoint", "tcp://{host}:*"]) as proc:  # fmt: skip
        assert [p.name for p in proc.pods] == ["sim-0", "sim-1"]
        assert proc.pods[1].kv_events_endpoint.startswith("tcp://127.0.0.3:")
        assert proc.pods[1].kv_events_replay_endpoint.startswith("tcp://127.0.0.3:")
        assert proc.pods[0].kv_events_topic == "kv@sim-0@sim-model"
        assert proc.process is not None
        proc.process.send_signal(signal.SIGINT)
        assert proc.process.wait(10) == 0


def test_cli_errors_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--role", "middle"]) == 2
    assert "epp-sim: error:" in capsys.readouterr().err
    assert main(["--list-profiles"]) == 0
    assert "llama-8b-h100" in capsys.readouterr().out.split()


def test_a_taken_port_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["--hosts", "127.0.0.1", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}: " in capsys.readouterr().err
