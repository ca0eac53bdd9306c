"""Pods churn (rollouts, autoscaling: new names and addresses every time): per-endpoint state must go
with the endpoint, and a name that comes back at another address must start clean.

Every shipped config (the built-in default, deploy/config, the reference set) is built against a real
Datastore, driven through the Director while generations of pods come and go, and then checked: no
removed endpoint is still referenced, no container is keyed by a removed pod's name or address, and no
metric series names a removed pod.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FILE_CONFIG, request

from llmepp.app import App
from llmepp.config.loader import build, load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, EndpointSpec
from llmepp.director import Director, RoutingDecision
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, scoped
from llmepp.observability.metrics import EppMetrics
from llmepp.request.types import InferenceRequest, ResponseInfo
from llmepp.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
NS = "churn"  # only this test's endpoints live in this namespace
FILES = [*(ROOT / "deploy/config").glob("*.yaml"), *(ROOT / "tests/plugins/reference_configs").glob("*.yaml")]
CONFIGS = {"built-in default": DEFAULT_CONFIG} | {
    str(p.relative_to(ROOT)): p.read_text() for p in sorted(FILES) if p.name != "endpoints.example.yaml"
}
PODS = 8


def _role(config: str, i: int) -> str:
    if "pd" in config:
        return ("prefill", "decode")[i % 2]
    return "encode" if "encode" in config else "prefill" if "prefill-config" in config else "decode"


def _spec(config: str, k: int, *, name: str = "", address: str = "") -> EndpointSpec:
    return EndpointSpec(
        name=name or f"pod-{k}",
        namespace=NS,
        address=address or f"10.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}",
        port=8000,
        labels={"llm-d.ai/role": _role(config, k)},
    )


def _scraped(ds: Datastore) -> None:
    for i, ep in enumerate(ds.endpoints):
        ep.metrics = EndpointMetrics(
            waiting_queue_size=i % 3, running_requests_size=1, kv_cache_usage_percent=0.3,
            cache_block_size=16, cache_num_blocks=1000, update_time=time.monotonic(),
        )  # fmt: skip


async def _route(d: Director, n: int, tag: str) -> InferenceRequest:
    req = request()
    for r in range(n):
        req = request(prompt=b"shared system prompt " * 20 + f"{tag} {r}".encode() * 10)
        req.request_id = f"{tag}-{r}"
        req.headers = {"x-session-id": f"s{r}", "x-llm-d-slo-ttft-ms": "100", "x-llm-d-slo-tpot-ms": "20"}
        decision = await d.handle_request(req, None)
        assert isinstance(decision, RoutingDecision)
        response = ResponseInfo(status=200, first_byte_at=time.monotonic(), finished_at=time.monotonic())
        d.response_headers(req, response, {})
        d.response_first_chunk(req, response)
        d.response_metadata(req, response)
        d.response_complete(req, response, decision)
    return req


def _keys(obj: Any, seen: set[int], depth: int = 0) -> Iterator[Any]:
    """Keys and members of the containers reachable from a plugin's attributes (a few levels deep)."""
    if depth > 4 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, type, Endpoint)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        yield from obj
        for v in list(obj.values())[:4]:
            yield from _keys(v, seen, depth + 1)
    elif isinstance(obj, (set, frozenset)):
        yield from obj
    elif isinstance(obj, (list, tuple)):
        for v in obj[:4]:
            yield from _keys(v, seen, depth + 1)
    elif type(obj).__module__.startswith("llmepp"):
        attrs = dict(getattr(obj, "__dict__", {}))
        for cls in type(obj).__mro__:
            attrs.update((s, getattr(obj, s)) for s in getattr(cls, "__slots__", ()) if hasattr(obj, s))
        for name, v in attrs.items():
            if name not in ("datastore", "_plugins", "plugins"):
                yield from _keys(v, seen, depth + 1)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_churned_endpoints_leave_nothing_behind(config: str) -> None:
    async def run() -> None:
        ds, metrics = Datastore(), EppMetrics()
        ds.add_listener(metrics)  # as App wires it
        components = build(load_config(CONFIGS[config]), datastore=ds, metrics=metrics)
        director = Director(ds, components.pipeline, metrics)
        generations = 120
        for g in range(generations + 1):
            specs = [_spec(config, g * PODS + i) for i in range(PODS)]
            for spec in specs:
                ds.upsert(spec)
            _scraped(ds)
            await _route(director, 3, f"g{g}")
            if g < generations:  # the last generation stays
                for spec in specs:
                    ds.delete(spec.name, NS)
        await asyncio.sleep(0)

        gone_names = {f"pod-{k}" for k in range(generations * PODS)}
        gone_addrs = {_spec(config, k).hostport for k in range(generations * PODS)}
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, Endpoint) and o.removed and o.namespace == NS]
        assert not alive, f"{len(alive)} removed endpoints still referenced, e.g. by {_holders(alive[0])}"
        seen: set[int] = set()
        for name, plugin in components.plugins.items():
            stale = [k for k in _keys(plugin, seen) if isinstance(k, str) and (k in gone_names or k in gone_addrs)]
            assert not stale, f"plugin {name}: keyed by removed pods {stale[:5]} ({len(stale)})"
        for family in metrics.registry.collect():
            for sample in family.samples:
                assert gone_names.isdisjoint(sample.labels.values()), f"series of a removed pod: {sample}"
        for plugin in components.plugins.values():
            await plugin.aclose()

    # A logged failure's record (kept by pytest's log capture) holds its exception, whose traceback holds
    # the candidates of the request that saw it: not a plugin's state.
    logging.disable(logging.CRITICAL)
    try:
        asyncio.run(run())
    finally:
        logging.disable(logging.NOTSET)


def _holders(obj: object) -> list[str]:
    return [type(r).__name__ for r in gc.get_referrers(obj) if not isinstance(r, list)][:5]


def test_the_no_hit_lru_forgets_removed_endpoints_so_live_ones_keep_their_order() -> None:
    """Dead pods left in the LRU pushed every live pod's rank past N − 1: all scored 0 for cold requests, so
    successive cold requests no longer spread least-recently-used first."""
    ds = Datastore()
    components = build(load_config(DEFAULT_CONFIG), datastore=ds)
    scorer: Any = components.plugins["no-hit-lru-scorer"]
    for g in range(scorer.lru_size // 2 + 1):
        for i in range(2):
            ds.upsert(_spec("", g * 2 + i))
            scorer._touch(ds.endpoints[-1])
        for i in range(2):
            ds.delete(f"pod-{g * 2 + i}", NS)
    assert not scorer.lru
    for i in range(3):
        ds.upsert(_spec("", 90_000 + i, name=f"live-{i}"))
    live = [ds.get(f"live-{i}", NS) for i in range(3)]
    for ep in live[::-1]:  # live-2 least recently used, live-0 most
        scorer._touch(ep)
    assert list(scorer.lru) == live[::-1]
    assert scorer._cold_scores(live) == pytest.approx([0.0, 0.5, 1.0])


def test_the_scheduler_attempts_series_go_with_their_endpoint() -> None:
    app = App(Settings(config_text=FILE_CONFIG))
    metrics, ds = app.metrics, app.datastore
    ds.upsert(_spec("", 1))
    ep = ds.get("pod-1", NS)
    assert ep is not None
    metrics.scheduler_attempt("success", "m", ep).inc()

    def names() -> set[str]:
        return {s.labels["endpoint_name"] for s in metrics.scheduler_attempts.collect().samples}

    assert names() == {"pod-1"}
    ds.delete("pod-1", NS)
    assert names() == set()
    assert not metrics._attempts
    # A request scheduled before the removal, counted after it, makes no series again.
    metrics.scheduler_attempt("success", "m", ep).inc()
    assert names() == set()


def test_a_name_back_at_another_address_has_no_prefix_affinity_left() -> None:
    async def run() -> None:
        ds, metrics = Datastore(), EppMetrics()
        components = build(load_config(DEFAULT_CONFIG), datastore=ds, metrics=metrics)
        director = Director(ds, components.pipeline, metrics)
        key = scoped(PREFIX_CACHE_MATCH_INFO, components.plugins["approx-prefix-cache-producer"].name)
        ds.upsert(_spec("", 1, name="pod-a", address="10.0.0.1"))
        _scraped(ds)
        await _route(director, 1, "same")
        await asyncio.sleep(0)  # the index records after the routing answer
        old = ds.get("pod-a", NS)
        assert old in (await _route(director, 1, "same")).data[key].hits
        ds.upsert(_spec("", 2, name="pod-a", address="10.0.0.2"))  # same name, another server
        new = ds.get("pod-a", NS)
        assert new is not old and old is not None and old.removed
        _scraped(ds)
        assert not (await _route(director, 1, "same")).data[key].hits

    asyncio.run(run())
