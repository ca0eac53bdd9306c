"""KV-event subscriptions are per `ip:port`, and discovery can briefly hold two endpoints at one `ip:port` while
it applies a change (a name moving onto the address another name leaves in the same change). Every endpoint
that stays must end up subscribed, on its own rank's socket. (The address's only subscription was stopped
when the leaving endpoint was removed, for as long as the staying one lived.)"""

from __future__ import annotations

import asyncio

import msgspec

from llmepp.config.loader import build, load_config
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.framework.plugin import Plugin
from llmepp.k8s.models import Pod
from llmepp.k8s.pool import PoolReconciler, PoolSpec
from llmepp.observability.metrics import EppMetrics
from llmepp.plugins.discovery.file import FileDiscovery
from llmepp.plugins.producers.precise_prefix import PrecisePrefixCacheProducer

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    kvEventsConfig:
      podDiscoveryConfig:
        socketPort: 5557
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer}
"""


def _producer() -> tuple[Datastore, PrecisePrefixCacheProducer, list[Plugin]]:
    ds = Datastore()
    components = build(load_config(CONFIG), datastore=ds, metrics=EppMetrics())
    producer = components.plugins["precise-prefix-cache-producer"]
    assert isinstance(producer, PrecisePrefixCacheProducer)
    return ds, producer, list(components.plugins.values())


def _subscribed(producer: PrecisePrefixCacheProducer, ds: Datastore) -> dict[str, str]:
    """ip:port of each endpoint -> the ZeroMQ endpoint its KV events are read from ("" when none)."""
    subs = {ep.hostport: producer.pool.subscriber(ep.hostport) for ep in ds.endpoints}
    return {pod: sub.endpoint if sub is not None else "" for pod, sub in subs.items()}


async def test_file_reload_that_shifts_names_onto_addresses_keeps_every_address_subscribed() -> None:
    """An endpoints file with index names (vllm-0, vllm-1, ...) over the live pods' addresses: the first pod goes
    away, so every name moves one address down (vllm-0 lands on .12 while vllm-1 still holds it)."""
    ds, producer, plugins = _producer()
    disc = FileDiscovery("file", FileDiscovery.Params(path="unused"))
    ips = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]

    def specs(addrs: list[str]) -> list[EndpointSpec]:
        return [EndpointSpec(name=f"vllm-{i}", address=a, port=8000) for i, a in enumerate(addrs)]

    try:
        disc._apply(ds, specs(ips))
        await asyncio.sleep(0.05)
        assert _subscribed(producer, ds) == {f"{ip}:8000": f"tcp://{ip}:5557" for ip in ips}

        disc._apply(ds, specs(ips[1:]))  # the pod at .11 left
        await asyncio.sleep(0.05)
        assert _subscribed(producer, ds) == {f"{ip}:8000": f"tcp://{ip}:5557" for ip in ips[1:]}
        assert len(producer.pool) == 2
    finally:
        for p in plugins:
            await p.aclose()


async def test_k8s_target_ports_shift_keeps_every_rank_subscribed_on_its_own_socket() -> None:
    """An InferencePool's targetPorts [8000, 8001] -> [8001, 8002] (a data-parallel pod's ranks move up one port):
    rank 0 lands on 8001 while rank 1 still holds it. Each rank reads its own socket (5557 + rank) afterwards."""
    ds, producer, plugins = _producer()
    rec = PoolReconciler(ds, "default")
    pod = msgspec.convert(
        {
            "metadata": {"name": "dp", "namespace": "default", "labels": {"app": "vllm"}, "resourceVersion": "1"},
            "status": {"podIP": "127.0.0.21", "conditions": [{"type": "Ready", "status": "True"}]},
        },
        Pod,
    )
    try:
        rec.set_pool(PoolSpec(target_ports=(8000, 8001), selector={"app": "vllm"}))
        rec.pod_changed(pod)
        await asyncio.sleep(0.05)
        assert _subscribed(producer, ds) == {
            "127.0.0.21:8000": "tcp://127.0.0.21:5557",
            "127.0.0.21:8001": "tcp://127.0.0.21:5558",
        }

        rec.set_pool(PoolSpec(target_ports=(8001, 8002), selector={"app": "vllm"}))
        await asyncio.sleep(0.05)
        assert _subscribed(producer, ds) == {
            "127.0.0.21:8001": "tcp://127.0.0.21:5557",
            "127.0.0.21:8002": "tcp://127.0.0.21:5558",
        }
    finally:
        for p in plugins:
            await p.aclose()
