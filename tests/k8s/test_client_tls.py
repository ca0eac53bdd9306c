"""The API server's certificate authority given as a file (the in-cluster service account's ca.crt, a
kubeconfig's `certificate-authority`) is read again when it changes, as client-go does since it fixed
kubernetes/kubernetes#119483: before, it was read once, and after a CA rotation every new connection
failed verification until the EPP restarted. Against the real API server over TLS, with its real CA."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes_asyncio.config import incluster_config

from llmepp.framework.plugin import ConfigError
from llmepp.k8s import client as kclient
from llmepp.k8s.client import KubeClient

from .cluster import ADMIN_TOKEN, Cluster

PODS = "/api/v1/namespaces/default/pods"


def cluster_ca(cluster: Cluster) -> bytes:
    """The API server's self-signed CA: the last certificate of the chain it wrote to --cert-dir."""
    chain = (cluster.workdir / "certs" / "apiserver.crt").read_bytes()
    marker = b"-----BEGIN CERTIFICATE-----"
    return marker + chain.split(marker)[-1]


def other_ca() -> bytes:
    """A CA that signed nothing the API server presents."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-the-cluster-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


def rotate(path: Path, content: bytes) -> None:
    """As the kubelet updates a projected volume: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(content)
    os.replace(tmp, path)


Connect = Callable[[Path], Awaitable[KubeClient]]


@pytest.fixture(params=["kubeconfig", "in-cluster"])
def connect(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Connect:
    """How the client learns of the CA file: a kubeconfig's certificate-authority, or the service account."""

    async def connect_with(ca: Path) -> KubeClient:
        if request.param == "in-cluster":
            token = tmp_path / "token"
            token.write_text(ADMIN_TOKEN)
            monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
            monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(cluster.api_port))
            client = await KubeClient.connect(None)
            assert client.info.source == "in-cluster"
            return client
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            f"""apiVersion: v1
kind: Config
clusters: [{{name: t, cluster: {{server: "{cluster.url}", certificate-authority: "{ca}"}}}}]
users: [{{name: u, user: {{token: {ADMIN_TOKEN}}}}}]
contexts: [{{name: t, context: {{cluster: t, user: u}}}}]
current-context: t
"""
        )
        return await KubeClient.connect(str(kubeconfig))

    return connect_with


async def test_a_rotated_ca_is_trusted_after_the_first_failed_handshake(
    cluster: Cluster, connect: Connect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The EPP started before the new CA reached its file: the failed verification makes the client read
    the file again at once (not only at the next periodic check), so the next attempt succeeds."""
    monkeypatch.setattr(kclient, "CA_FILE_PERIOD", 3600.0, raising=False)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(other_ca())
    client = await connect(ca)
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await client.get(PODS)
        rotate(ca, cluster_ca(cluster))
        await client.get(PODS)
    finally:
        await client.aclose()


async def test_the_ca_file_is_checked_periodically_and_replaces_the_old_trust(
    cluster: Cluster, connect: Connect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """New connections verify against the file as it is now: a CA taken out of it is no longer trusted (the
    new certificates replace the old, they are not added to them); a file caught half-written keeps the last
    good one."""
    monkeypatch.setattr(kclient, "CA_FILE_PERIOD", 0.2, raising=False)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(cluster_ca(cluster))
    client = await connect(ca)
    try:
        await client.get(PODS)
        rotate(ca, other_ca())
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await client.get(PODS)
        # A rotation's overlap: old and new CA in one bundle, with comments as CA bundles carry them.
        rotate(ca, "# Issuer: CN=Türk\n".encode() + other_ca() + b"# the cluster CA\n" + cluster_ca(cluster))
        await asyncio.sleep(0.3)
        await client.get(PODS)
        with caplog.at_level(logging.WARNING, logger="llmepp.k8s.client"):
            rotate(ca, b"-----BEGIN CERTIFICATE-----\nMIIB")  # truncated
            await asyncio.sleep(0.3)
            await client.get(PODS)
            await client.get(PODS)
        warnings = [r.getMessage() for r in caplog.records if r.name == "llmepp.k8s.client"]
        assert len(warnings) == 1 and str(ca) in warnings[0] and "keeping" in warnings[0], warnings
    finally:
        await client.aclose()


async def test_an_unreadable_ca_file_is_a_config_error(connect: Connect, tmp_path: Path) -> None:
    """Bad input at start-up gets an answer naming the file, not a traceback."""
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate\n")
    expected = r"Kubernetes client configuration \(.+\): certificate authority .+ca\.crt: .*no certificate"
    with pytest.raises(ConfigError, match=expected):
        await connect(ca)
