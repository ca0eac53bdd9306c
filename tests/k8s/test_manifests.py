"""deploy/: every manifest passes `kubectl apply --dry-run=server` on the real API server, the
RBAC is enough (and no more) for a running EPP, and the configs inside the manifests agree with
the repository's own (EndpointPickerConfig loads, standalone Envoy config = deploy/envoy.yaml)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmepp.cli import build_parser, settings_from_args
from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.k8s.leader import lease_name
from llmepp.k8s.resources import INFERENCE_MODEL_REWRITES, INFERENCE_OBJECTIVES, LEASES, PODS, inference_pools
from llmepp.k8s.runtime import kubernetes_target
from llmepp.settings import Settings
from llmepp.testing.envoy import ROUTE_TIMEOUT
from llmepp.testing.ports import free_port
from llmepp.units import parse_duration

from .cluster import EPP_SERVICE_ACCOUNT, NOBODY_TOKEN, PROMETHEUS_TOKEN, RBAC_NAMESPACE, REPO, Cluster
from .harness import endpoints, kube_settings, running_app
from .kubeapi import TestKube, eventually

KUBE_DIR = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBE_DIR.rglob("*.yaml"))
CRDS = sorted((REPO / "deploy" / "crds").glob("*.yaml"))
HTTPROUTE_CRD = Path(__file__).parent / "fixtures" / "httproute-crd.yaml"
NAMESPACE = "llm-inference"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in docs(path):
            yield path, doc


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def uses_grpc_probes(path: Path) -> bool:
    return any(
        "grpc" in c.get(probe, {})
        for d in docs(path)
        if d["kind"] == "Deployment"
        for c in containers(d)
        for probe in ("livenessProbe", "readinessProbe")
    )


@pytest.fixture(scope="module")
def manifest_cluster(cluster: Cluster) -> Cluster:
    cluster.kubectl("apply", "-f", str(HTTPROUTE_CRD))
    cluster.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/httproutes.gateway.networking.k8s.io")
    cluster.kubectl("apply", "-f", str(KUBE_DIR / "namespace.yaml"))  # dry-run objects need a real namespace
    return cluster


def without_grpc_probes(path: Path) -> str:
    """The manifest with each gRPC probe handler replaced by an exec handler (everything else as is)."""
    out = []
    for d in docs(path):
        if d["kind"] == "Deployment":
            for c in containers(d):
                for probe in ("livenessProbe", "readinessProbe"):
                    if "grpc" in c.get(probe, {}):
                        service = c[probe].pop("grpc")["service"]
                        c[probe]["exec"] = {"command": ["true", service]}
        out.append(d)
    return yaml.safe_dump_all(out)


@pytest.mark.parametrize("path", MANIFESTS + CRDS, ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_passes_server_side_dry_run(manifest_cluster: Cluster, path: Path) -> None:
    c = manifest_cluster
    if uses_grpc_probes(path):
        # gRPC probes are Kubernetes >= 1.24 (GA 1.27); the test server is 1.20, which drops the
        # unknown `grpc` field and then finds a probe without a handler. Prove that this is the
        # only objection, then dry-run everything else with the probe handlers swapped for exec.
        plain = c.kubectl("apply", "--dry-run=server", "--validate=false", "-f", str(path), check=False)
        assert plain.returncode != 0, "the 1.20 server accepted gRPC probes: drop this special case"
        problems = [line for line in plain.stderr.splitlines() if line.startswith("* ")]
        assert problems and all(
            line.endswith("Probe: Required value: must specify a handler type") for line in problems
        ), plain.stderr
        out = c.kubectl("apply", "--dry-run=server", "-f", "-", "-o", "yaml", stdin=without_grpc_probes(path))
    else:
        out = c.kubectl("apply", "--dry-run=server", "-f", str(path), "-o", "yaml")
    admitted = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = [item["kind"] for d in admitted for item in (d.get("items") or [d])]
    assert sorted(kinds) == sorted(d["kind"] for d in docs(path))


@pytest.mark.parametrize("path", [KUBE_DIR / "deployment.yaml", KUBE_DIR / "standalone" / "deployment.yaml"])
def test_epp_deployment_probes_ports_and_hardening(path: Path) -> None:
    (deployment,) = [d for d in docs(path) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    epp = next(c for c in containers(deployment) if c["name"] == "epp")
    ports = {p["name"]: p["containerPort"] for p in epp["ports"]}
    assert ports == {"grpc": 9002, "grpc-health": 9003, "metrics": 9090}
    assert epp["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert epp["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    # One probe answer slower than the 1 s timeout (a GC pause, a CPU-starved node) must not take the EPP out of
    # the Service (with leader election: the only Ready replica): 3 misses in a row, the reference chart's
    # (period 2 s, Kubernetes' default threshold); still out within a lease duration (15 s) of failing for good.
    readiness = epp["readinessProbe"]
    threshold, period = readiness.get("failureThreshold", 3), readiness.get("periodSeconds", 10)
    assert threshold >= 3 and threshold * period <= 15, readiness
    if path == KUBE_DIR / "deployment.yaml":
        assert (period, threshold) == (2, 3), readiness
    for c in containers(deployment):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    drain = next(a for a in epp["args"] if a.startswith("--drain-timeout="))
    drain_seconds = int(drain.split("=")[1].rstrip("s"))
    assert pod["terminationGracePeriodSeconds"] > drain_seconds
    # Envoy exits on SIGTERM at once, cutting every stream it carries (no drain of its own): a sidecar Envoy
    # must get its SIGTERM only after the EPP's drain, by a preStop hook holding it back that long.
    for envoy in (c for c in containers(deployment) if c["name"] == "envoy"):
        hook = envoy.get("lifecycle", {}).get("preStop", {})
        command = hook.get("exec", {}).get("command", [])
        assert command[:1] == ["sleep"] and int(command[1]) >= drain_seconds, hook
        assert pod["terminationGracePeriodSeconds"] > int(command[1])


def test_configmaps_hold_a_valid_config_and_the_repository_envoy_config() -> None:
    configs = [d for _, d in all_docs() if d["kind"] == "ConfigMap"]
    assert len(configs) == 2
    for cm in configs:
        components = build(load_config(cm["data"]["config.yaml"]), datastore=Datastore())
        assert components.discovery is None  # Kubernetes mode: endpoints from the pool / selector
    (standalone,) = [cm for cm in configs if "envoy.yaml" in cm["data"]]
    assert standalone["data"]["envoy.yaml"] == (REPO / "deploy" / "envoy.yaml").read_text()


def test_examples_reference_each_other() -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, d in all_docs():
        by_kind.setdefault(d["kind"], []).append(d)
    (pool,) = by_kind["InferencePool"]
    pool_name = pool["metadata"]["name"]
    assert pool["spec"]["endpointPickerRef"]["name"] in {s["metadata"]["name"] for s in by_kind["Service"]}
    for kind in ("InferenceObjective", "InferenceModelRewrite"):
        assert all(o["spec"]["poolRef"]["name"] == pool_name for o in by_kind[kind])
    (route,) = by_kind["HTTPRoute"]
    assert route["spec"]["rules"][0]["backendRefs"][0] == {
        "group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool_name,
    }  # fmt: skip
    # Gateways map timeouts.request to a cap on the whole response: an SSE generation running longer is cut
    # mid-stream. As long as the standalone Envoy's route timeout (0s: none).
    request_timeout = parse_duration(route["spec"]["rules"][0]["timeouts"]["request"])
    assert request_timeout == 0 or request_timeout >= parse_duration(ROUTE_TIMEOUT), request_timeout
    main = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "llm-epp")
    args = containers(main)[0]["args"]
    assert f"--pool-name={pool_name}" in args
    lease_rule = next(
        r for d in by_kind["Role"] for r in d["rules"] if "leases" in r["resources"] and "resourceNames" in r
    )
    assert lease_rule["resourceNames"] == [f"epp-{NAMESPACE}-{pool_name}.llm-d.ai"]


def rbac_for(namespace: str) -> str:
    """deploy/kubernetes/rbac.yaml moved to another namespace (its lease name follows)."""
    return (KUBE_DIR / "rbac.yaml").read_text().replace(NAMESPACE, namespace)


async def test_rbac_is_enough_for_a_running_epp_and_no_more(manifest_cluster: Cluster, kube: TestKube) -> None:
    """The EPP runs with the ServiceAccount's token (no other rights) and the Roles of rbac.yaml."""
    c, ns = manifest_cluster, RBAC_NAMESPACE
    c.kubectl("apply", "-f", "-", stdin=rbac_for(ns))
    await kube.create_pool(ns, "llama", {"app": "vllm-llama"}, [8000])
    await kube.ready_pod(ns, "p", {"app": "vllm-llama"}, "10.9.0.1")
    await kube.apply_objective(ns, "premium", "llama", 10)
    await kube.apply_rewrite(ns, "r", "llama", [{"targets": [{"modelRewrite": "m2"}]}])
    settings = kube_settings(
        c.epp_kubeconfig, ns, ha_enable_leader_election=True, ha_lease_duration=3.0, ha_renew_deadline=2.0,
        ha_retry_period=0.5,
    )  # fmt: skip
    async with running_app(settings) as app:
        assert app.kube is not None
        await eventually(app.ready, within=15)  # pool + pods listed and watched, lease created
        assert endpoints(app.datastore) == {"p-rank-0": "10.9.0.1:8000"}
        assert app.kube.objectives.get("premium") == 10
        await eventually(lambda: len(app.kube.rewrites) == 1)  # type: ignore[union-attr]
        assert app.kube.elector is not None and app.kube.elector.transitions == 1
    lease = await kube.get_lease(ns, f"epp-{ns}-llama.llm-d.ai")
    assert not lease["spec"].get("holderIdentity")  # released on shutdown

    user = f"--as=system:serviceaccount:{ns}:{EPP_SERVICE_ACCOUNT}"
    allowed = [("watch", "pods"), ("list", "inferencepools.inference.networking.k8s.io"), ("create", "leases"),
               ("create", "tokenreviews.authentication.k8s.io")]  # fmt: skip
    denied = [
        ("list", "secrets"), ("create", "pods"), ("patch", "pods"), ("delete", "leases"),
        ("update", "leases/some-other-lease"), ("update", "inferencepools.inference.networking.k8s.io"),
        ("list", "configmaps"),
    ]  # fmt: skip
    for verb, resource in allowed:
        assert c.kubectl("auth", "can-i", verb, resource, "-n", ns, user, check=False).stdout.strip() == "yes"
    for verb, resource in denied:
        assert c.kubectl("auth", "can-i", verb, resource, "-n", ns, user, check=False).stdout.strip() == "no", (
            verb,
            resource,
        )
    other = "default"
    assert c.kubectl("auth", "can-i", "list", "pods", "-n", other, user, check=False).stdout.strip() == "no"


METRICS_READER_BINDING = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: prometheus-reads-llm-epp-metrics}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: llm-epp-metrics-reader}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: prometheus}]
"""


async def scrape(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_metrics_need_a_token_the_rbac_lets_read_them(manifest_cluster: Cluster) -> None:
    """--metrics-endpoint-auth (default in Kubernetes mode): the EPP's ServiceAccount, with rbac.yaml only,
    reviews each scraper's token with the API server; llm-epp-metrics-reader is what a scraper needs."""
    c, ns = manifest_cluster, RBAC_NAMESPACE
    c.kubectl("apply", "-f", "-", stdin=rbac_for(ns))
    c.kubectl("apply", "-f", "-", stdin=METRICS_READER_BINDING)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    async with running_app(kube_settings(c.epp_kubeconfig, ns, metrics_port=port)) as app:
        assert app.metrics_auth is not None
        status, body = await scrape(url)
        assert status == 401 and "bearer token is required" in body
        assert (await scrape(url, "not-a-token"))[0] == 401
        status, body = await scrape(url, NOBODY_TOKEN)
        assert status == 403 and "'nobody' may not get /metrics" in body
        status, body = await scrape(url, PROMETHEUS_TOKEN)
        assert status == 200 and "llm_d_epp_request_total" in body
    # --metrics-endpoint-auth=false: open, as in file-discovery mode.
    async with running_app(kube_settings(c.epp_kubeconfig, ns, metrics_port=port, metrics_endpoint_auth=False)):
        status, body = await scrape(url)
        assert status == 200 and "llm_d_epp_request_total" in body


# -- static checks: the manifests against the CLI, the code's API calls and the README --------------------


def epp_deployments() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in all_docs() if d["kind"] == "Deployment"]


def epp_settings(deployment: dict[str, Any]) -> Settings:
    """The epp container's args as the CLI parses them ($(VAR) expanded from the container's env)."""
    epp = next(c for c in containers(deployment) if c["name"] == "epp")
    env = {}
    for e in epp.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = e["value"] if "value" in e else {"metadata.namespace": NAMESPACE}.get(field, "x")
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in epp["args"]]
    options = build_parser()._option_string_actions
    for arg in args:
        if arg.startswith("-"):  # exact spellings: argparse would also take an unambiguous prefix
            assert arg.split("=", 1)[0] in options, f"{arg}: no such epp flag"
    try:
        return settings_from_args(args)
    except SystemExit:
        pytest.fail(f"epp rejects the args of {deployment['metadata']['name']}: {args}")


@pytest.mark.parametrize("path", [p for p, _ in epp_deployments()], ids=lambda p: str(p.relative_to(REPO)))
def test_epp_args_parse_and_match_ports_probes_and_mounts(path: Path) -> None:
    (deployment,) = [d for d in docs(path) if d["kind"] == "Deployment"]
    s = epp_settings(deployment)
    epp = next(c for c in containers(deployment) if c["name"] == "epp")
    ports = {p["name"]: p["containerPort"] for p in epp["ports"]}
    assert ports == {"grpc": s.grpc_port, "grpc-health": s.grpc_health_port, "metrics": s.metrics_port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert epp[probe]["grpc"]["port"] == s.grpc_health_port
    # --config-file lies in a mounted ConfigMap that has the key, and that key holds a config that loads.
    assert s.config_file is not None
    mount = next(m for m in epp["volumeMounts"] if s.config_file.startswith(m["mountPath"].rstrip("/") + "/"))
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (cm,) = [d for d in docs(path.parent / "configmap.yaml") if d["metadata"]["name"] == volume["configMap"]["name"]]
    text = cm["data"][s.config_file.removeprefix(mount["mountPath"].rstrip("/") + "/")]
    build(load_config(text), datastore=Datastore())
    # The self-signed serving certificate is written to the temp dir: it must be writable.
    assert s.cert_path is not None or any(m["mountPath"] == "/tmp" for m in epp["volumeMounts"])


def rules_for(service_account: str, namespace: str) -> list[dict[str, Any]]:
    """The rules of every Role / ClusterRole bound to the ServiceAccount (system:auth-delegator: Kubernetes' own)."""
    roles = {(d["kind"], d["metadata"]["name"]): d["rules"] for _, d in all_docs() if d["kind"].endswith("Role")}
    roles["ClusterRole", "system:auth-delegator"] = [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    ]
    out: list[dict[str, Any]] = []
    for _, d in all_docs():
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding") and any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account and s["namespace"] == namespace
            for s in d["subjects"]
        ):
            out += roles[d["roleRef"]["kind"], d["roleRef"]["name"]]
    return out


def allows(rules: list[dict[str, Any]], verb: str, group: str, resource: str, name: str | None = None) -> bool:
    return any(
        group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r["verbs"]
        and (not r.get("resourceNames") or (name is not None and name in r["resourceNames"]))
        for r in rules
    )  # fmt: skip


@pytest.mark.parametrize("path", [p for p, _ in epp_deployments()], ids=lambda p: str(p.relative_to(REPO)))
def test_rbac_grants_every_call_the_code_makes(path: Path) -> None:
    """Static twin of the API-server test above, from the code's own resource table and the Deployment's
    flags: informers list + watch, leader election creates, gets and updates its lease, --metrics-endpoint-auth
    creates TokenReviews and SubjectAccessReviews. A missing verb is an EPP that never turns ready."""
    (deployment,) = [d for d in docs(path) if d["kind"] == "Deployment"]
    s = epp_settings(deployment)
    target = kubernetes_target(s)
    assert target is not None, "the Deployment runs the EPP in Kubernetes mode"
    ns = deployment["metadata"]["namespace"]
    assert target.namespace == ns
    rules = rules_for(deployment["spec"]["template"]["spec"]["serviceAccountName"], ns)
    watched = [PODS]
    if target.pool_mode:
        watched += [inference_pools(s.pool_group), INFERENCE_OBJECTIVES, INFERENCE_MODEL_REWRITES]
    for resource in watched:
        for verb in ("list", "watch"):
            assert allows(rules, verb, resource.group, resource.plural), (verb, resource)
    if s.ha_enable_leader_election:
        lease = lease_name(target.namespace, target.pool_name or s.pool_name)
        assert allows(rules, "create", LEASES.group, LEASES.plural)
        for verb in ("get", "update"):
            assert allows(rules, verb, LEASES.group, LEASES.plural, lease), (verb, lease)
    if s.metrics_endpoint_auth is not False:  # default: on in Kubernetes mode
        assert allows(rules, "create", "authentication.k8s.io", "tokenreviews")
        assert allows(rules, "create", "authorization.k8s.io", "subjectaccessreviews")


def readme_block_after(marker: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(re.escape(marker) + r".*?```sh\n(.*?)```", text, re.S)
    assert block, f"README: no sh block after {marker!r}"
    return block.group(1).splitlines()


def test_readme_deploy_commands_create_namespaces_and_crds_before_their_objects() -> None:
    """README, Kubernetes: each command sequence works on a fresh cluster (Gateway API aside). `kubectl apply
    -f <dir>` applies the files in name order (not recursively), a namespaced object needs its Namespace
    applied before it, and an object of one of deploy/crds' kinds needs that CRD applied and established."""
    crd_kinds = {(d["spec"]["group"], d["spec"]["names"]["kind"]): p for p in CRDS for d in docs(p)}
    lines = readme_block_after("Deploying (`deploy/`):")
    main = [line for line in lines if line.startswith("kubectl ")]
    alternatives = [line.split(": ", 1)[1] for line in lines if line.startswith("# or") and "kubectl " in line]
    assert main and alternatives
    for sequence in (main, *[[a] for a in alternatives]):
        namespaces: set[str] = set()
        applied: set[Path] = set()
        established: set[Path] = set()
        for line in sequence:
            words = shlex.split(line, comments=True)
            files = [REPO / words[i + 1] for i, w in enumerate(words) if w == "-f"]
            paths = [f for p in files for f in (sorted(p.glob("*.yaml")) if p.is_dir() else [p])]
            assert paths, line
            if words[:2] == ["kubectl", "wait"]:
                assert "--for=condition=established" in words, line
                established |= applied & set(paths)
                continue
            assert words[:2] == ["kubectl", "apply"], line
            for path in paths:
                for d in docs(path):
                    kind = (d["apiVersion"].rpartition("/")[0], d["kind"])
                    if ns := d["metadata"].get("namespace"):
                        assert ns in namespaces, f"{line}: {path.name}: {d['kind']} before its Namespace {ns}"
                    if kind in crd_kinds:
                        assert crd_kinds[kind] in established, f"{line}: {d['kind']} before its CRD is established"
                    if d["kind"] == "Namespace":
                        namespaces.add(d["metadata"]["name"])
                    elif d["kind"] == "CustomResourceDefinition":
                        applied.add(path)
