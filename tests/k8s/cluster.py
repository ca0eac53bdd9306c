"""A real control plane on loopback for the tests: etcd + kube-apiserver (no kubelet, no controllers).

Binaries come from `~/.cache/llm-epp/k8s/bin` (tests/k8s/build-kube-apiserver.sh builds / unpacks them
once). The API server authenticates static tokens and authorizes with RBAC:

    admin      system:masters (the tests' own client and kubectl)
    epp        the ServiceAccount `llm-epp` of namespace RBAC_NAMESPACE, with no rights until
               the RBAC manifests of deploy/kubernetes grant them (the RBAC test proves they suffice)
    prometheus / nobody   plain users scraping /metrics (a test binds llm-epp-metrics-reader to the first)

Two settings differ from a production server, both for the 410 test: pods are served
without the watch cache (`--watch-cache-sizes=pods#0`, watches go to etcd) and etcd is
compacted every 2 s, so a watch that was away for a few seconds resumes from a
resourceVersion that no longer exists — the API server answers 410 Gone, as a real cluster
does after a longer outage.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from llmepp.testing.lifetime import die_with_parent
from llmepp.testing.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("K8S_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-epp" / "k8s"
)
BIN = CACHE / "bin"
BUILD_SCRIPT = Path(__file__).with_name("build-kube-apiserver.sh")
CRDS = REPO / "deploy" / "crds"

ADMIN_TOKEN = "admin-token"
EPP_TOKEN = "epp-token"
PROMETHEUS_TOKEN = "prometheus-token"  # user `prometheus`, no rights until a test binds some
NOBODY_TOKEN = "nobody-token"  # user `nobody`, never any rights
RBAC_NAMESPACE = "epp-rbac"
EPP_SERVICE_ACCOUNT = "llm-epp"
START_TIMEOUT = 90.0  # seconds; ~4 s on an idle machine, much more on a loaded 2-core one


def ensure_binaries() -> None:
    """Build / unpack the binaries unless cached (`make test` did it already via `k8s-binaries`)."""
    if all((BIN / b).exists() for b in ("kube-apiserver", "etcd", "kubectl")):
        return
    subprocess.run(["bash", str(BUILD_SCRIPT), str(CACHE)], check=True)


@dataclass
class Cluster:
    workdir: Path
    api_port: int = 0
    etcd_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def epp_kubeconfig(self) -> Path:
        return self.workdir / "epp.kubeconfig"

    def start(self) -> None:
        ensure_binaries()
        w = self.workdir
        self.etcd_port, peer_port, self.api_port = free_port(), free_port(), free_port()
        subprocess.run(["openssl", "genrsa", "-out", str(w / "sa.key"), "2048"], check=True, capture_output=True)
        sa_user = f"system:serviceaccount:{RBAC_NAMESPACE}:{EPP_SERVICE_ACCOUNT}"
        (w / "tokens.csv").write_text(
            f"{ADMIN_TOKEN},admin,admin,system:masters\n"
            f'{EPP_TOKEN},{sa_user},epp,"system:serviceaccounts,system:serviceaccounts:{RBAC_NAMESPACE}"\n'
            f"{PROMETHEUS_TOKEN},prometheus,prometheus\n"
            f"{NOBODY_TOKEN},nobody,nobody\n"
        )
        etcd = [
            str(BIN / "etcd"), "--name", "t", "--data-dir", str(w / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"t=http://127.0.0.1:{peer_port}", "--unsafe-no-fsync=true",
        ]  # fmt: skip
        apiserver = [
            str(BIN / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.api_port}",
            "--insecure-port=0", f"--cert-dir={w / 'certs'}", f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={w / 'sa.key'}", f"--service-account-signing-key-file={w / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            # No controller-manager creates the `default` ServiceAccount, so its admission would reject pods.
            "--disable-admission-plugins=ServiceAccount",
            "--watch-cache-sizes=pods#0", "--etcd-compaction-interval=2s",
        ]  # fmt: skip
        for name, cmd in (("etcd", etcd), ("kube-apiserver", apiserver)):
            log = (w / f"{name}.log").open("wb")
            self.procs.append(subprocess.Popen(die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT))
        self._wait_ready()
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN)
        self.write_kubeconfig(self.epp_kubeconfig, EPP_TOKEN, namespace=RBAC_NAMESPACE)
        self.kubectl("apply", "-f", str(CRDS))
        self.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd", "--all")
        self.kubectl("create", "namespace", RBAC_NAMESPACE)

    def _wait_ready(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cast(list[str], proc.args)[0]} exited with {proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(request, context=ctx, timeout=2) as reply:
                    if reply.read() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"kube-apiserver not ready after {START_TIMEOUT}s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("etcd", "kube-apiserver"):
            path = self.workdir / f"{name}.log"
            if path.exists():
                out.append(f"--- {name} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def write_kubeconfig(self, path: Path, token: str, namespace: str = "default", server: str = "") -> Path:
        path.write_text(
            f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{server or self.url}", insecure-skip-tls-verify: true}}
users:
- name: user
  user: {{token: {token}}}
contexts:
- name: test
  context: {{cluster: test, user: user, namespace: {namespace}}}
current-context: test
"""
        )
        return path

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def stop(self) -> None:
        # The API server first (it needs etcd to shut down cleanly), then etcd.
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
