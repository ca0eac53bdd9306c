"""InferenceObjective → admission priorities and InferenceModelRewrite → the director, through a whole
App in Kubernetes mode against a real kube-apiserver."""

from __future__ import annotations

import json
from collections import Counter
from typing import cast

from prometheus_client import generate_latest

from llmepp.director import RoutingDecision
from llmepp.flowcontrol.objectives import ObjectiveStore
from llmepp.k8s.runtime import KubeRuntime
from llmepp.request.parsers import parse_request
from llmepp.request.types import ResponseInfo

from .cluster import Cluster
from .harness import kube_settings, running_app
from .kubeapi import TestKube, eventually

POOL = "llama"
APP = {"app": "vllm-llama"}


async def test_objectives_reach_the_admission_store(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.apply_objective(ns, "premium", POOL, 10)
    await kube.apply_objective(ns, "elsewhere", "another-pool", 99)
    async with running_app(kube_settings(cluster.kubeconfig, ns)) as app:
        store = getattr(app.components.pipeline.admission, "objectives", None)
        assert isinstance(store, ObjectiveStore)
        await eventually(lambda: store.get("premium") == 10, within=10)
        assert store.get("elsewhere") is None  # another pool's objective

        await kube.apply_objective(ns, "batch", POOL, -5)
        await eventually(lambda: store.get("batch") == -5)
        await kube.apply_objective(ns, "default-priority", POOL, None)
        await eventually(lambda: store.get("default-priority") == 0)
        await kube.apply_objective(ns, "premium", POOL, 20)
        await eventually(lambda: store.get("premium") == 20)
        await kube.apply_objective(ns, "premium", "another-pool", 20)  # moved away
        await eventually(lambda: store.get("premium") is None)
        await kube.delete_llmd(ns, "inferenceobjectives", "batch")
        await eventually(lambda: store.get("batch") is None)
        assert store.snapshot() == {"default-priority": 0}
        # Admission resolves a request's priority from the store.
        assert store.priority("default-priority") == 0 and store.priority("unknown") == 0


def completion(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "hello", "max_tokens": 4}).encode()


async def test_model_rewrites_are_applied_by_the_director(cluster: Cluster, kube: TestKube, namespace: str) -> None:
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.ready_pod(ns, "p", APP, "127.0.0.1")
    canary = [{"modelRewrite": "llama-v1", "weight": 90}, {"modelRewrite": "llama-v2", "weight": 10}]
    await kube.apply_rewrite(ns, "canary", POOL, [{"matches": [{"model": {"value": "llama"}}], "targets": canary}])
    await kube.apply_rewrite(
        ns, "newer", POOL,
        [
            {"matches": [{"model": {"value": "llama"}}], "targets": [{"modelRewrite": "loses-to-older"}]},
            {"targets": [{"modelRewrite": "fallback-a"}, {"modelRewrite": "fallback-b"}]},  # catch-all, uniform
            {"matches": [{"model": {"value": "mistral"}}], "targets": [{"modelRewrite": "mistral-instruct"}]},
        ],
    )  # fmt: skip
    await kube.apply_rewrite(ns, "foreign", "another-pool", [{"targets": [{"modelRewrite": "never"}]}])

    async with running_app(kube_settings(cluster.kubeconfig, ns)) as app:
        assert app.kube is not None
        await eventually(lambda: app.ready() and len(cast(KubeRuntime, app.kube).rewrites) == 2, within=10)

        async def route(model: str) -> str:
            headers = {":path": "/v1/completions", ":method": "POST"}
            request = parse_request(headers, completion(model), request_id="r")
            decision = await app.director.handle_request(request, None)
            assert isinstance(decision, RoutingDecision)
            app.director.response_complete(request, ResponseInfo(), decision)
            sent = json.loads(decision.body) if decision.body is not None else {"model": model}
            assert sent["model"] == request.target_model  # the upstream body carries the target
            return request.target_model

        picks = Counter([await route("llama") for _ in range(600)])
        assert set(picks) == {"llama-v1", "llama-v2"}  # exact match of the oldest rewrite wins
        assert 480 <= picks["llama-v1"] <= 600 - 25, picks  # 90/10 split (expected 540 ± 7.3 s.d.)
        assert await route("mistral") == "mistral-instruct"  # exact beats the catch-all
        fallbacks = Counter([await route("unknown-model") for _ in range(100)])
        assert set(fallbacks) == {"fallback-a", "fallback-b"} and min(fallbacks.values()) > 20, fallbacks

        registry = app.metrics.registry
        counted = registry.get_sample_value(
            "llm_d_epp_model_rewrite_decisions_total",
            {"model_rewrite_name": "canary", "model_name": "llama", "target_model": "llama-v1"},
        )
        assert counted == picks["llama-v1"]

        await kube.delete_llmd(ns, "inferencemodelrewrites", "canary")
        await eventually(lambda: len(app.kube.rewrites) == 1)  # type: ignore[union-attr]
        assert await route("llama") == "loses-to-older"  # now the only exact rule


async def test_objects_the_api_server_accepts_with_odd_values_are_skipped(
    cluster: Cluster, kube: TestKube, namespace: str
) -> None:
    # The API server does not enforce `format: int32`, and `targets` is optional (minItems bounds a list only
    # when it is there): both reach the EPP, which skips them (logged, counted) and keeps the rest.
    ns = namespace
    await kube.create_pool(ns, POOL, APP, [8000])
    await kube.apply_objective(ns, "huge", POOL, 2**40)
    await kube.apply_objective(ns, "fine", POOL, 3)
    await kube.apply_rewrite(
        ns, "odd", POOL,
        [{"matches": [{"model": {"value": "llama"}}]}, {"targets": [{"modelRewrite": "fallback"}]}],
    )  # fmt: skip
    async with running_app(kube_settings(cluster.kubeconfig, ns)) as app:
        assert app.kube is not None
        store = app.kube.objectives
        await eventually(lambda: store.get("fine") == 3 and len(app.kube.rewrites) == 1, within=10)  # type: ignore[union-attr]
        assert store.get("huge") is None and store.priority("huge") == 0
        rule = app.kube.rewrites.rule_for("llama")
        assert rule is not None and rule.targets[0].model == "fallback"  # the target-less rule was skipped
        text = generate_latest(app.metrics.registry).decode()
    # What an operator sees on /metrics: one objective and one rule left out.
    for resource in ("inferenceobjectives.llm-d.ai", "inferencemodelrewrites.llm-d.ai"):
        labels = f'namespace="{ns}",owner="epp",resource="{resource}"'
        assert f"llm_d_epp_kubernetes_informer_rejected_total{{{labels}}} 1.0" in text, text
