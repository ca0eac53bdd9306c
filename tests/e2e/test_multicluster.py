"""Multicluster mode end to end on loopback: two "clusters", each a real Envoy + the `epp` program + two
simulated pods, and a hub (a real Envoy + the `epp` program with the multicluster plugins) in front of
them, routing each request to one cluster's Envoy. Requests reach both clusters; a prompt's prefix
follows it to the same cluster (and there to the same pod); a cluster whose pods are all gone (its EPP
reports no ready endpoints, and averages of 0), or all stopped but still listed (its EPP stops counting
pods whose /metrics no longer answers), gets nothing, body-less requests (GET /v1/models) included;
when one cluster is loaded (its pods'
queues grow, visible in its EPP's llm_d_epp_average_queue_size), new requests go to the other, and the
hub publishes the mean over its clusters' pods as its own llm_d_epp_average_queue_size."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import cast

import aiohttp
import pytest
import pytest_asyncio

from llmepp.testing.hub import HubStack
from llmepp.testing.stack import Stack, StackOptions, epp_metric

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "sim-model"
# Two seats per pod, so a burst of long requests queues; 12 ms per output token.
SIM = ["--latency-profile", "llama-8b-h100", "--max-num-seqs", "2"]
# The clusters' EPPs refresh their pool averages every 100 ms (5 s by default) so the hub follows fast;
# the hub its own, from its clusters', as often.
CLUSTER_EPP_ARGS = ["--refresh-prometheus-metrics-interval", "100ms"]
HUB_EPP_ARGS = CLUSTER_EPP_ARGS
UNAVAILABLE = "llm_d_epp_multicluster_cluster_unavailable_total"

HUB_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: multicluster-file-discovery
  parameters: {watchFile: true}
- type: multicluster-metrics-data-source
  parameters: {scheme: http, interval: 100ms}
- type: multicluster-metrics-extractor
- type: multicluster-queue-scorer
- type: multicluster-kv-cache-utilization-scorer
- type: multicluster-approx-prefix-cache-producer
- type: multicluster-prefix-cache-scorer
- type: multicluster-session-affinity-filter
  parameters: {encodedEndpointHeaderConfig: {header: x-cluster-session-token}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: multicluster-session-affinity-filter}
  - {pluginRef: multicluster-queue-scorer, weight: 2}
  - {pluginRef: multicluster-kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: multicluster-prefix-cache-scorer, weight: 3}
dataLayer:
  discovery: {pluginRef: multicluster-file-discovery}
  sources:
  - pluginRef: multicluster-metrics-data-source
    extractors: [{pluginRef: multicluster-metrics-extractor}]
"""

_serial = itertools.count()


class Deployment:
    def __init__(self, a: Stack, b: Stack, hub: HubStack) -> None:
        self.a, self.b, self.hub = a, b, hub

    def cluster_of(self, port: str) -> str:
        """Which cluster a pod answered from (each cluster's pods share one port, the clusters differ)."""
        return {str(self.a.pod_port): "a", str(self.b.pod_port): "b"}[port]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment() -> AsyncIterator[Deployment]:
    # Pods on 127.0.0.244-247 (unused by other suites).
    a = Stack(StackOptions(pods=2, first_host=244, sim_args=SIM, epp_args=CLUSTER_EPP_ARGS))
    b = Stack(StackOptions(pods=2, first_host=246, sim_args=SIM, epp_args=CLUSTER_EPP_ARGS))
    try:
        await asyncio.gather(a.start(), b.start())
        async with HubStack([a, b], HUB_CONFIG, HUB_EPP_ARGS) as hub:
            yield Deployment(a, b, hub)
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def complete(
    http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int = 2
) -> tuple[str, str, dict[str, object]]:
    """POST /v1/completions; (pod port, pod name, usage)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        return resp.headers["x-inference-port"], resp.headers["x-inference-pod"], answer["usage"]


def fresh_prompt(words: int = 40) -> str:
    """A prompt sharing no prefix with any other."""
    n = next(_serial)
    return f"{n:04d} request {n} " + " ".join(f"w{n}x{i}" for i in range(words))


async def test_requests_reach_both_clusters(deployment: Deployment, http: aiohttp.ClientSession) -> None:
    seen = []
    for _ in range(12):  # idle clusters tie (or alternate as their KV fills): both are used
        port, _, _ = await complete(http, deployment.hub.url, fresh_prompt())
        seen.append(deployment.cluster_of(port))
    assert set(seen) == {"a", "b"}, seen


async def test_a_prompt_prefix_follows_it_to_the_same_cluster(
    deployment: Deployment, http: aiohttp.ClientSession
) -> None:
    for n in range(3):
        shared = f"conversation {n}: " + " ".join(f"token{n}-{i}" for i in range(700))
        placed = []
        for turn in range(3):
            port, pod, usage = await complete(http, deployment.hub.url, f"{shared} turn {turn}")
            placed.append((deployment.cluster_of(port), pod))
            if turn:  # the cluster's EPP sent it on to the pod holding the prefix
                details = cast(dict[str, int], usage.get("prompt_tokens_details") or {})
                assert details.get("cached_tokens", 0) > 500, usage
        assert len(set(placed)) == 1, placed


async def models_from(deployment: Deployment, http: aiohttp.ClientSession) -> str:
    """GET /v1/models through the hub (a body-less request); the cluster whose pod answered."""
    async with http.get(f"{deployment.hub.url}/v1/models") as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["data"][0]["id"] == MODEL
        return deployment.cluster_of(resp.headers["x-inference-port"])


async def wait_for_metric(
    http: aiohttp.ClientSession, url: str, name: str, cond: Callable[[float], bool], what: str, **labels: str
) -> None:
    for _ in range(100):
        if cond(await epp_metric(http, url, name, **labels)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_a_cluster_whose_pods_are_all_gone_gets_no_hub_traffic(
    deployment: Deployment, http: aiohttp.ClientSession
) -> None:
    b, hub = deployment.b, deployment.hub
    ready = "llm_d_epp_ready_endpoints"
    await wait_for_metric(http, hub.metrics_url, ready, lambda v: v == 4, "the hub never counted 2 + 2 pods")
    went = await epp_metric(http, hub.metrics_url, UNAVAILABLE, cluster=hub.cluster_name(1))
    # B's pods leave its pool (as Kubernetes takes pods that are going away out of it) and stop. B's EPP
    # now reports 0 ready endpoints and averages of 0: the idlest-looking cluster.
    b.write_endpoints([])
    await wait_for_metric(
        http, hub.metrics_url, UNAVAILABLE, lambda v: v == went + 1, "the hub never saw B empty",
        cluster=hub.cluster_name(1),
    )  # fmt: skip
    await b.stop_pods()
    assert await epp_metric(http, b.metrics_url, "llm_d_epp_average_queue_size") == 0
    sent_to = [deployment.cluster_of((await complete(http, hub.url, fresh_prompt()))[0]) for _ in range(8)]
    assert sent_to == ["a"] * 8, sent_to
    # Body-less requests too (B's EPP, with an empty pool, would answer them 503).
    assert [await models_from(deployment, http) for _ in range(8)] == ["a"] * 8
    await wait_for_metric(http, hub.metrics_url, ready, lambda v: v == 2, "the hub still counts B's pods")
    # The pods come back: B is counted again (and only once gone above).
    await b.start_pods()
    b.write_endpoints(b.pods)
    await wait_for_metric(http, hub.metrics_url, ready, lambda v: v == 4, "the hub never counted B's pods again")
    seen = {deployment.cluster_of((await complete(http, hub.url, fresh_prompt()))[0]) for _ in range(12)}
    assert seen == {"a", "b"}, seen
    assert await epp_metric(http, hub.metrics_url, UNAVAILABLE, cluster=hub.cluster_name(1)) == went + 1


async def test_a_cluster_whose_pods_stopped_but_are_still_listed_gets_no_hub_traffic(
    deployment: Deployment, http: aiohttp.ClientSession
) -> None:
    b, hub = deployment.b, deployment.hub
    ready = "llm_d_epp_ready_endpoints"
    await wait_for_metric(http, hub.metrics_url, ready, lambda v: v == 4, "the hub never counted 2 + 2 pods")
    went = await epp_metric(http, hub.metrics_url, UNAVAILABLE, cluster=hub.cluster_name(1))
    # B's model servers die but its endpoints file still lists them (file discovery; in Kubernetes, pods
    # still Ready): B's EPP stops counting them once their /metrics has failed for its grace period (1 s).
    await b.stop_pods()
    await wait_for_metric(http, b.metrics_url, ready, lambda v: v == 0, "B's EPP still counts its dead pods")
    await wait_for_metric(
        http, hub.metrics_url, UNAVAILABLE, lambda v: v == went + 1, "the hub never saw B unavailable",
        cluster=hub.cluster_name(1),
    )  # fmt: skip
    sent_to = [deployment.cluster_of((await complete(http, hub.url, fresh_prompt()))[0]) for _ in range(8)]
    assert sent_to == ["a"] * 8, sent_to
    assert [await models_from(deployment, http) for _ in range(8)] == ["a"] * 8
    # The model servers come back (the file never changed): B is ready and in rotation again.
    await b.start_pods()
    await wait_for_metric(http, hub.metrics_url, ready, lambda v: v == 4, "the hub never counted B's pods again")
    seen = {deployment.cluster_of((await complete(http, hub.url, fresh_prompt()))[0]) for _ in range(12)}
    assert seen == {"a", "b"}, seen


async def test_new_requests_avoid_the_loaded_cluster(deployment: Deployment, http: aiohttp.ClientSession) -> None:
    a, b, hub = deployment.a, deployment.b, deployment.hub
    # Load cluster A directly (not through the hub): 12 long requests on 4 seats, so 8 wait.
    burst = [asyncio.create_task(complete(http, a.url, fresh_prompt(), max_tokens=400)) for _ in range(12)]
    try:
        for _ in range(100):  # A's EPP publishes its pods' queues (every 100 ms)
            if await epp_metric(http, a.metrics_url, "llm_d_epp_average_queue_size") >= 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("cluster A's average queue never grew")
        await asyncio.sleep(0.3)  # the hub scrapes it every 100 ms
        sent_to = [deployment.cluster_of((await complete(http, hub.url, fresh_prompt()))[0]) for _ in range(6)]
        assert sent_to == ["b"] * 6, sent_to
        assert await epp_metric(http, a.metrics_url, "llm_d_epp_average_queue_size") >= 1  # still loaded
        # The hub publishes its own average: the mean over its clusters' pods (2 + 2: A's and B's halves).
        for _ in range(60):
            queue = "llm_d_epp_average_queue_size"
            qa, qb = await epp_metric(http, a.metrics_url, queue), await epp_metric(http, b.metrics_url, queue)
            q_hub = await epp_metric(http, hub.metrics_url, queue)
            if qa >= 1 and q_hub == pytest.approx((qa + qb) / 2):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the hub's average queue {q_hub} is not its clusters' mean ({qa} + {qb}) / 2")
    finally:
        for task in burst:
            task.cancel()
        await asyncio.gather(*burst, return_exceptions=True)


async def test_a_cluster_whose_epp_cannot_be_read_is_not_taken_for_idle(
    deployment: Deployment, http: aiohttp.ClientSession
) -> None:
    a, b, hub = deployment.a, deployment.b, deployment.hub
    for _ in range(200):  # the burst of the previous test is gone
        if await epp_metric(http, a.metrics_url, "llm_d_epp_average_queue_size") == 0:
            break
        await asyncio.sleep(0.05)
    # B's EPP goes away (its pods and Envoy stay): the hub cannot read B's load any more.
    errors = await epp_metric(http, hub.metrics_url, "llm_d_epp_datalayer_poll_errors_total")
    assert b.epp is not None
    await b.epp.stop()
    for _ in range(100):
        if await epp_metric(http, hub.metrics_url, "llm_d_epp_datalayer_poll_errors_total") >= errors + 3:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the hub never failed to scrape cluster B")
    # Its last published load was idle; unknown now, it loses to A, whose load is known.
    sent_to = [deployment.cluster_of((await complete(http, hub.url, fresh_prompt()))[0]) for _ in range(6)]
    assert sent_to == ["a"] * 6, sent_to
