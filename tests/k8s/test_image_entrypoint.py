"""IMAGE-ENTRYPOINT SMOKE TEST: what the Containerfile does, without a container runtime.

No container registry is reachable here, so `FROM python:3.11-slim` cannot be pulled and the image
cannot be built (see README, Kubernetes). This test performs the Containerfile's two stages on the
host instead: build the project wheel from a copy of the sources (stage 1), install it with its
dependencies into a brand-new virtualenv (stage 2), then run the image's entrypoint `epp` from it:
`--help`, a real start in file mode until gRPC readiness is SERVING and a clean SIGTERM exit, and a
Kubernetes-mode start that must fail on configuration (not on a missing module: the Kubernetes
client has to be among the package's dependencies).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmepp.settings import Settings
from llmepp.testing.ports import free_port

from .cluster import REPO

SOURCES = (
    "pyproject.toml",
    "setup.py",
    "README.md",
    "protos",
    "epp",
    "plugins",
    "simulator",
)  # the Containerfile's COPYs


# The clean venv must see only what it installed: a PYTHONPATH naming the checkout (where a build leaves
# llm_epp.egg-info) makes its pip think the project is installed already and skip the wheel.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(*cmd: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def readiness(port: int) -> int | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=1.0
            )
            return int(reply.status)
    except grpc.RpcError:
        return None


def test_image_entrypoint_from_a_clean_venv(tmp_path: Path) -> None:
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    src.mkdir()
    for name in SOURCES:
        item = REPO / name
        if item.is_dir():
            # Generated protobuf modules are left behind, as in a clean clone: the build must write them.
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*_pb2*")
            shutil.copytree(item, src / name, ignore=ignore)
        else:
            shutil.copy2(item, src / name)
    # Stage 1: the project wheel (the venv's setuptools; no build isolation, no network needed).
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src)
    (wheel,) = dist.glob("llm_epp-*.whl")
    # Stage 2: a clean interpreter with the wheel and its dependencies from the package index.
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", "--prefer-binary", wheel)
    # As the Containerfile: opentelemetry-proto's modules over xds-protos' older copy of them.
    run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", "--force-reinstall", "--no-deps",
        "--prefer-binary", "opentelemetry-proto==" + importlib.metadata.version("opentelemetry-proto"))  # fmt: skip
    epp = venv / "bin" / "epp"
    # The wheel carries the modules compiled from protos/ (vllmgrpc-parser, vertexai-parser).
    run(
        venv / "bin" / "python",
        "-c",
        "import llmepp.protocols.vllm_engine_pb2, llmepp.protocols.vertexai_prediction_pb2",
    )

    help_text = run(epp, "--help").stdout
    for flag in ("--pool-name", "--endpoint-selector", "--kubeconfig", "--ha-enable-leader-election"):
        assert flag in help_text

    # A real start in file mode: gRPC readiness SERVING, then SIGTERM drains and exits 0.
    (tmp_path / "endpoints.yaml").write_text("endpoints:\n- {name: pod-a, address: 127.0.0.1, port: 18000}\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        (REPO / "deploy" / "config" / "default-file-discovery.yaml")
        .read_text()
        .replace("/etc/epp/endpoints.yaml", str(tmp_path / "endpoints.yaml"))
    )
    health = free_port()
    args = ["--config-file", config, "--grpc-port", free_port(), "--grpc-health-port", health, "--metrics-port",
            free_port(), "--bind-address", "127.0.0.1", "--drain-timeout", "1s"]  # fmt: skip
    # With an OTLP trace exporter named, so the image's tracing dependencies must load.
    env = {
        **CLEAN_ENV,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    proc = subprocess.Popen(
        [str(epp), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 60
        while readiness(health) != health_pb2.HealthCheckResponse.SERVING:
            assert proc.poll() is None, f"epp exited with {proc.returncode}:\n{proc.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "epp not SERVING within 60 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Kubernetes mode loads the Kubernetes client: a bad kubeconfig is a configuration error (exit 2).
    k8s = subprocess.run(
        [str(epp), "--pool-name", "llama", "--kubeconfig", str(tmp_path / "missing"), "--grpc-port", "0",
         "--grpc-health-port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120, env=CLEAN_ENV,
    )  # fmt: skip
    assert k8s.returncode == 2, k8s.stderr[-3000:]
    assert "configuration error" in k8s.stderr and "--kubeconfig" in k8s.stderr


def test_containerfile_matches_the_cli_and_the_manifests() -> None:
    """Static: the entrypoint is the `epp` console script, EXPOSE lists the servers' default ports, the image
    user is the one deploy/kubernetes runs as, and the build lines name the file (docker only finds a
    `Dockerfile` by itself, and this repository has none)."""
    text = (REPO / "Containerfile").read_text()
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["epp"] == "llmepp.cli:main"
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert json.loads(entrypoint) == ["/opt/epp/bin/epp"] and "python3 -m venv /opt/epp" in text
    (expose,) = re.findall(r"^EXPOSE (.+)$", text, re.M)
    defaults = Settings()
    assert sorted(map(int, expose.split())) == sorted(
        [defaults.grpc_port, defaults.grpc_health_port, defaults.metrics_port]
    )
    (user,) = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    for path in sorted((REPO / "deploy" / "kubernetes").rglob("deployment.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = doc["spec"]["template"]["spec"]["securityContext"]
            assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user, path
    assert not (REPO / "Dockerfile").exists()
    readme = (REPO / "README.md").read_text()
    for line in [*text.splitlines(), *readme.splitlines()]:
        for build in re.findall(r"(?:docker build|buildah bud) -[^`()]*", line):
            assert "-f Containerfile" in build, line
