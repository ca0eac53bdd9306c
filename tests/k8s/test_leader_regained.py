"""featureGates haPopulateNonLeaderDatastore=false: a replica that loses the lease forgets its endpoints and
stops watching; when it leads again it starts new informers. Its readiness waits for their initial lists, as
at start-up. (It was SERVING as soon as the small pool list was in, with an empty datastore while the pod list
was still coming or failing: every request a 503 "no endpoints".)

A leadership loss is typically caused by an API server that was unreachable for longer than the renew
deadline; when it comes back, the lease is retaken and both lists start at once: the pod list of a big
namespace (paged, 500 a page) takes far longer than the one-object pool list."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web
from helpers import serving

from .fakeapi import kubeconfig
from .harness import LEADER_ONLY_CONFIG, endpoints, kube_settings, running_app
from .kubeapi import eventually

NS = "ns"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
LEASE_ITEM = f"{LEASE}/epp-{NS}-llama.llm-d.ai"


class Api:
    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 10
        self.pods_fail = False  # the pod list does not come in (slow / failing)
        self.pod_lists = 0

    def rv(self) -> str:
        self.version += 1
        return str(self.version)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.query.get("watch"):
            response = web.StreamResponse()
            await response.prepare(request)
            await asyncio.sleep(3600)
            return response
        if path.startswith(LEASE):
            if request.method == "GET":
                if self.lease is None:
                    return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
                return web.json_response(self.lease)
            body = await request.json()
            body["metadata"] = {**body.get("metadata", {}), "resourceVersion": self.rv()}
            self.lease = body
            return web.json_response(body, status=201 if request.method == "POST" else 200)
        if path.endswith("/inferencepools"):
            pool = {
                "metadata": {"name": "llama", "namespace": NS, "resourceVersion": "5"},
                "spec": {"selector": {"matchLabels": {"app": "v"}}, "targetPorts": [{"number": 8000}]},
            }
            return web.json_response({"metadata": {"resourceVersion": self.rv()}, "items": [pool]})
        if path.endswith("/pods"):
            self.pod_lists += 1
            if self.pods_fail:
                return web.json_response({"kind": "Status", "code": 500, "message": "etcd slow"}, status=500)
            pod = {
                "metadata": {"name": "p", "namespace": NS, "resourceVersion": "6", "labels": {"app": "v"}},
                "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
            }
            return web.json_response({"metadata": {"resourceVersion": self.rv()}, "items": [pod]})
        return web.json_response({"metadata": {"resourceVersion": self.rv()}, "items": []})


async def test_a_regained_lease_is_not_ready_before_the_pods_are_listed_again(tmp_path: Path) -> None:
    api = Api()
    async with serving(api.handle) as url:
        settings = kube_settings(
            kubeconfig(tmp_path / "kc", url),
            NS,
            config_text=LEADER_ONLY_CONFIG,
            ha_enable_leader_election=True,
            ha_lease_duration=3.0,
            ha_renew_deadline=2.0,
            ha_retry_period=0.3,
            metrics_endpoint_auth=False,
        )
        async with running_app(settings) as app:
            await eventually(app.ready, within=10)
            assert endpoints(app.datastore) == {"p-rank-0": "10.0.0.1:8000"}
            # Another replica takes the lease (as after our renewals failed): we step down and forget.
            assert api.lease is not None
            api.lease = {
                **api.lease,
                "spec": {**api.lease["spec"], "holderIdentity": "other", "leaseDurationSeconds": 3600},
            }
            await eventually(lambda: not app.ready() and endpoints(app.datastore) == {}, within=10)
            # The lease is free again; the pod list is not answered (yet).
            api.pods_fail = True
            lists = api.pod_lists
            api.lease = None
            assert app.kube is not None
            await eventually(
                lambda: (
                    app.kube is not None
                    and app.kube.elector is not None
                    and app.kube.elector.is_leader
                    and api.pod_lists > lists
                ),
                within=10,
            )
            await asyncio.sleep(0.5)
            assert endpoints(app.datastore) == {}
            assert not app.ready(), "SERVING with an empty datastore: the new pod informer has not listed yet"
            api.pods_fail = False  # the pod list comes in: ready with the pool's endpoint again
            await eventually(app.ready, within=15)
            assert endpoints(app.datastore) == {"p-rank-0": "10.0.0.1:8000"}
