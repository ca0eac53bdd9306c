"""The tests' own API client (plain aiohttp + the admin token): creates and changes the objects
the EPP watches. Deliberately independent of llmepp.k8s, the code under test."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aiohttp

POOL_API = "/apis/inference.networking.k8s.io/v1"
LLMD_API = "/apis/llm-d.ai/v1alpha2"


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:500]}")
        self.status = status


class TestKube:
    __test__ = False  # not a test class for pytest

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TestKube:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=False), headers={"Authorization": f"Bearer {self.token}"}
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        assert self._session is not None
        data = None if body is None else json.dumps(body)
        async with self._session.request(
            method, self.url + path, data=data, headers={"Content-Type": content_type}
        ) as reply:
            text = await reply.text()
            if reply.status >= 300:
                raise ApiError(reply.status, text)
            result: dict[str, Any] = json.loads(text) if text else {}
            return result

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, "application/merge-patch+json")

    # -- namespaces and pods -------------------------------------------------------------
    async def create_namespace(self, name: str) -> None:
        await self.request(
            "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )

    async def create_pod(
        self,
        ns: str,
        name: str,
        labels: Mapping[str, str],
        *,
        annotations: Mapping[str, str] | None = None,
        node_name: str | None = None,
    ) -> dict[str, Any]:
        """A Pending pod. Without a node name the API server deletes it at once (no kubelet to wait for)."""
        spec: dict[str, Any] = {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}
        if node_name:
            spec["nodeName"] = node_name
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels), "annotations": dict(annotations or {})},
            "spec": spec,
        }
        return await self.request("POST", f"/api/v1/namespaces/{ns}/pods", body)

    async def set_pod_status(self, ns: str, name: str, *, ready: bool, ip: str | None) -> dict[str, Any]:
        """What a kubelet would report: phase, pod IP and the Ready condition."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status: dict[str, Any] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}],
        }
        if ip is not None:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        return await self.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status})

    async def ready_pod(
        self, ns: str, name: str, labels: Mapping[str, str], ip: str, annotations: Mapping[str, str] | None = None
    ) -> None:
        await self.create_pod(ns, name, labels, annotations=annotations)
        await self.set_pod_status(ns, name, ready=True, ip=ip)

    async def label_pod(self, ns: str, name: str, labels: Mapping[str, str | None]) -> None:
        await self.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}", {"metadata": {"labels": dict(labels)}})

    async def delete_pod(self, ns: str, name: str, grace_seconds: int | None = None) -> None:
        body = None if grace_seconds is None else {"gracePeriodSeconds": grace_seconds}
        await self.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body)

    # -- CRDs ------------------------------------------------------------------------------
    async def create_pool(self, ns: str, name: str, selector: Mapping[str, str], ports: list[int]) -> None:
        body = {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": dict(selector)},
                "targetPorts": [{"number": p} for p in ports],
                "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}},
            },
        }
        await self.request("POST", f"{POOL_API}/namespaces/{ns}/inferencepools", body)

    async def patch_pool(self, ns: str, name: str, spec: Mapping[str, Any]) -> None:
        await self.merge_patch(f"{POOL_API}/namespaces/{ns}/inferencepools/{name}", {"spec": dict(spec)})

    async def delete_pool(self, ns: str, name: str) -> None:
        await self.request("DELETE", f"{POOL_API}/namespaces/{ns}/inferencepools/{name}")

    async def apply_objective(self, ns: str, name: str, pool: str, priority: int | None) -> None:
        spec: dict[str, Any] = {"poolRef": {"name": pool}}
        if priority is not None:
            spec["priority"] = priority
        await self._create_or_patch(ns, "inferenceobjectives", "InferenceObjective", name, spec)

    async def apply_rewrite(self, ns: str, name: str, pool: str, rules: list[dict[str, Any]]) -> None:
        await self._create_or_patch(
            ns, "inferencemodelrewrites", "InferenceModelRewrite", name, {"poolRef": {"name": pool}, "rules": rules}
        )

    async def delete_llmd(self, ns: str, plural: str, name: str) -> None:
        await self.request("DELETE", f"{LLMD_API}/namespaces/{ns}/{plural}/{name}")

    async def _create_or_patch(self, ns: str, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        path = f"{LLMD_API}/namespaces/{ns}/{plural}"
        body = {"apiVersion": "llm-d.ai/v1alpha2", "kind": kind, "metadata": {"name": name}, "spec": spec}
        try:
            await self.request("POST", path, body)
        except ApiError as e:
            if e.status != 409:
                raise
            # Replace the spec (a merge patch would merge the old poolRef / rules into the new ones).
            current = await self.request("GET", f"{path}/{name}")
            current["spec"] = spec
            await self.request("PUT", f"{path}/{name}", current)

    async def get_lease(self, ns: str, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}")


async def eventually(check: Callable[[], bool], within: float = 5.0, interval: float = 0.01) -> float:
    """Wait until `check()` holds; returns the seconds it took. AssertionError on timeout."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start
