"""The pool's `appProtocol` against the configured request parsers' protocols (reference §1.2, §8.3,
`cmd/epp/runner/health.go::checkProtocolSupport`): when the InferencePool sets `appProtocol` and a
configured parser does not support it, readiness is NOT_SERVING; without `appProtocol`, no check."""

from __future__ import annotations

from typing import cast

import msgspec
import pytest

from llmepp.app import App
from llmepp.framework.plugin import registry
from llmepp.framework.requestcontrol import APP_PROTOCOL_H2C, APP_PROTOCOL_HTTP, Parser
from llmepp.k8s.client import KubeClient
from llmepp.k8s.discovery import KubernetesDiscovery, _PoolEvents
from llmepp.k8s.models import InferencePool
from llmepp.k8s.pool import PoolReconciler
from llmepp.server.health import NOT_SERVING, SERVING, HealthService
from llmepp.settings import Settings

POOL = "llama"


def pool_object(app_protocol: str | None) -> bytes:
    spec: dict[str, object] = {"selector": {"matchLabels": {"app": "v"}}, "targetPorts": [{"number": 8000}]}
    if app_protocol is not None:
        spec["appProtocol"] = app_protocol
    obj = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": POOL, "namespace": "ns"},
        "spec": spec,
    }
    return msgspec.json.encode(obj)


def test_the_pool_model_reads_app_protocol() -> None:
    h2c = msgspec.json.decode(pool_object("kubernetes.io/h2c"), type=InferencePool)
    assert h2c.spec.app_protocol == "kubernetes.io/h2c" and h2c.ports() == (8000,)
    assert msgspec.json.decode(pool_object("http"), type=InferencePool).spec.app_protocol == "http"
    assert msgspec.json.decode(pool_object(None), type=InferencePool).spec.app_protocol == ""


@pytest.mark.parametrize(
    ("parser_type", "protocols"),
    [
        ("openai-parser", {APP_PROTOCOL_HTTP, APP_PROTOCOL_H2C}),
        ("anthropic-parser", {APP_PROTOCOL_HTTP, APP_PROTOCOL_H2C}),
        ("vllmhttp-parser", {APP_PROTOCOL_HTTP, APP_PROTOCOL_H2C}),
        ("sglanghttp-parser", {APP_PROTOCOL_HTTP, APP_PROTOCOL_H2C}),
        ("vllmgrpc-parser", {APP_PROTOCOL_H2C}),
        ("vertexai-parser", {APP_PROTOCOL_H2C}),
        ("passthrough-parser", None),  # any protocol
    ],
)
def test_parser_protocols_are_the_references(parser_type: str, protocols: set[str] | None) -> None:
    assert (APP_PROTOCOL_HTTP, APP_PROTOCOL_H2C) == ("http", "kubernetes.io/h2c")
    parser = registry.build(parser_type, parser_type, None)
    assert isinstance(parser, Parser)
    assert parser.protocols == (None if protocols is None else frozenset(protocols))
    for value in (APP_PROTOCOL_HTTP, APP_PROTOCOL_H2C, "kubernetes.io/ws"):
        assert parser.supports(value) == (protocols is None or value in protocols)


def parsers_config(*types: str) -> str:
    plugins = "\n".join(f"- type: {t}" for t in types)
    refs = ", ".join(f"{{pluginRef: {t}}}" for t in types)
    head = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
    return f"{head}{plugins}\nrequestHandler:\n  parsers: [{refs}]\n"


def pool_app(app_protocol: str | None, *parser_types: str) -> App:
    """A pool-mode App whose InferencePool arrived (no API server: the pool event is fed directly)."""
    config = parsers_config(*parser_types) if parser_types else None
    app = App(Settings(pool_name=POOL, pool_name_set=True, pool_namespace="ns", config_text=config))
    assert app.kube is not None
    discovery = KubernetesDiscovery(cast(KubeClient, None), app.kube.target)
    discovery.reconciler = PoolReconciler(app.datastore, "ns")
    app.kube.discovery = discovery
    _PoolEvents(discovery.reconciler, POOL).upsert(msgspec.json.decode(pool_object(app_protocol), type=InferencePool))
    discovery.synced = True  # its initial lists are in
    app.datastore.mark_synced()
    return app


@pytest.mark.parametrize(
    ("app_protocol", "parsers", "status"),
    [
        (None, (), SERVING),  # no appProtocol: no check
        ("http", (), SERVING),  # the default list: openai, anthropic, vllmhttp (http, h2c) and passthrough (any)
        ("kubernetes.io/h2c", (), SERVING),
        (None, ("vllmgrpc-parser",), SERVING),
        ("kubernetes.io/h2c", ("vllmgrpc-parser", "vertexai-parser"), SERVING),
        ("http", ("vllmgrpc-parser",), NOT_SERVING),  # an h2c-only parser on an HTTP/1.1 pool
        ("http", ("openai-parser", "vertexai-parser"), NOT_SERVING),  # any one parser excluding it suffices
        ("kubernetes.io/h2c", ("openai-parser", "passthrough-parser"), SERVING),
        ("kubernetes.io/ws", ("openai-parser",), NOT_SERVING),
        ("kubernetes.io/ws", ("passthrough-parser",), SERVING),
    ],
)
def test_readiness_needs_the_parsers_to_support_the_pools_app_protocol(
    app_protocol: str | None, parsers: tuple[str, ...], status: int
) -> None:
    app = pool_app(app_protocol, *parsers)
    health = HealthService(app.ready)
    for service in ("readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"):
        assert health.status(service) == status
    assert health.status("liveness") == SERVING


def test_a_pool_changing_its_app_protocol_changes_readiness() -> None:
    app = pool_app("kubernetes.io/h2c", "vllmgrpc-parser")
    assert app.ready()
    assert app.kube is not None and app.kube.discovery is not None and app.kube.discovery.reconciler is not None
    events = _PoolEvents(app.kube.discovery.reconciler, POOL)
    events.upsert(msgspec.json.decode(pool_object("http"), type=InferencePool))
    assert not app.ready()
    events.upsert(msgspec.json.decode(pool_object(None), type=InferencePool))
    assert app.ready()
