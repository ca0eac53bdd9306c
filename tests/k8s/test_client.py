"""KubeClient credentials from a kubeconfig, against the real API server: a `tokenFile` (as kubectl
writes it, newline and all) is re-read as it rotates, and an `exec` plugin is run again once its
credential expires — as client-go does; kubernetes_asyncio alone reads either only once."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from llmepp.k8s import client as kclient
from llmepp.k8s.client import KubeClient, KubeError

from .cluster import ADMIN_TOKEN, NOBODY_TOKEN, Cluster

PODS = "/api/v1/namespaces/default/pods"


def kubeconfig(cluster: Cluster, path: Path, user: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: t, cluster: {{server: "{cluster.url}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {user}}}]
contexts: [{{name: t, context: {{cluster: t, user: u}}}}]
current-context: t
"""
    )
    return path


async def can_list_pods(client: KubeClient) -> bool:
    try:
        await client.get(PODS)
    except KubeError as e:
        assert e.status == 403, e
        return False
    return True


async def test_token_file_with_a_trailing_newline(cluster: Cluster, tmp_path: Path) -> None:
    """`kubectl create token sa > file` ends the file with a newline; client-go trims it. Before, the
    newline went into the Authorization header and every request raised ValueError."""
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN + "\n")
    client = await KubeClient.connect(str(kubeconfig(cluster, tmp_path / "kc", f"{{tokenFile: {token}}}")))
    try:
        assert await can_list_pods(client)
    finally:
        await client.aclose()


async def test_token_file_is_reread_when_it_rotates(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kclient, "TOKEN_FILE_PERIOD", 0.5, raising=False)
    token = tmp_path / "token"
    token.write_text(NOBODY_TOKEN)
    client = await KubeClient.connect(str(kubeconfig(cluster, tmp_path / "kc", f"{{tokenFile: {token}}}")))
    try:
        assert not await can_list_pods(client)
        token.write_text(ADMIN_TOKEN)
        await asyncio.sleep(0.7)
        assert await can_list_pods(client), "the rotated token file was not read again"
    finally:
        await client.aclose()


async def test_exec_credential_is_renewed_when_it_expires(cluster: Cluster, tmp_path: Path) -> None:
    """The plugin hands out whatever token its file holds, valid for 5 min + 3 s (2-3 s once truncated to
    the second): the client treats a credential as expired 5 min early, so this one must be renewed then."""
    token = tmp_path / "token"
    token.write_text(NOBODY_TOKEN)
    runs = tmp_path / "runs"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        f"""import datetime, json, pathlib
runs = pathlib.Path({str(runs)!r})
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5, seconds=3)
token = pathlib.Path({str(token)!r}).read_text()
status = {{"token": token, "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}}
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}}))
"""
    )
    user = (
        f'{{exec: {{apiVersion: client.authentication.k8s.io/v1beta1, command: "{sys.executable}", '
        f'args: ["{plugin}"]}}}}'
    )
    client = await KubeClient.connect(str(kubeconfig(cluster, tmp_path / "kc", user)))
    try:
        assert not await can_list_pods(client)
        token.write_text(ADMIN_TOKEN)
        assert not await can_list_pods(client)  # not expired yet: the same credential
        await asyncio.sleep(3.2)
        results = await asyncio.gather(*(can_list_pods(client) for _ in range(5)))
        assert all(results), "the expired exec credential was not renewed"
        assert runs.read_text() == "xx", "the plugin must run once per expiry, not once per request"
    finally:
        await client.aclose()
