"""Fixtures for the Kubernetes tests: one real etcd + kube-apiserver for all of them (cluster.py), a fresh
namespace per test, and the tests' own API client (kubeapi.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from .cluster import ADMIN_TOKEN, Cluster
from .kubeapi import TestKube


# Package scope: stopped once the Kubernetes tests are done, not left running beside the rest of the suite.
@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("k8s"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
async def kube(cluster: Cluster) -> AsyncIterator[TestKube]:
    async with TestKube(cluster.url, ADMIN_TOKEN) as k:
        yield k


@pytest.fixture
async def namespace(kube: TestKube) -> str:
    """A namespace of its own per test (namespaces are never deleted: no namespace controller runs)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    await kube.create_namespace(name)
    return name
