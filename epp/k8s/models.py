"""The fields the EPP reads of each Kubernetes kind, as msgspec Structs.

msgspec skips every JSON field a Struct does not declare without building it, so a pod
event costs a parse of its bytes and the handful of objects below — not the thousands of
nested fields of a real Pod. All fields have defaults: a missing field is a zero value,
never a decode error (the API server already validated the object against its schema).
"""

from __future__ import annotations

from typing import Any

import msgspec

from llmepp.k8s.resources import POOL_GROUP


class _Model(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


class ObjectMeta(_Model, frozen=True):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    # RFC 3339, second precision ("2026-11-20T23:40:00Z"): string order is time order.
    creation_timestamp: str = ""
    deletion_timestamp: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class ListMeta(_Model, frozen=True):
    resource_version: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class RawList(_Model, frozen=True):
    """A list answer whose items are decoded one by one (one bad item must not sink the list)."""

    metadata: ListMeta = ListMeta()
    items: list[msgspec.Raw] = []


class WatchEvent(_Model, frozen=True):
    type: str
    object: msgspec.Raw


class Status(_Model, frozen=True):
    """`kind: Status`: what an ERROR watch event carries (e.g. 410 Expired)."""

    code: int = 0
    reason: str = ""
    message: str = ""


class _Version(_Model, frozen=True):
    resource_version: str = ""


class Metadata(_Model, frozen=True):
    """Just the resourceVersion of any object: what a bookmark is for. Not ObjectMeta: a built-in kind's bookmark
    is an empty typed object, whose zero metav1.Time is sent as `"creationTimestamp": null`."""

    metadata: _Version = _Version()


# -- Pod -----------------------------------------------------------------------------------
class PodCondition(_Model, frozen=True):
    type: str = ""
    status: str = ""


class PodSpec(_Model, frozen=True):
    # Set by the pod's author (a StatefulSet sets it to the pod name); the topology extractor's
    # fallback when the hostname label is missing.
    hostname: str = ""


class PodStatus(_Model, frozen=True):
    phase: str = ""
    pod_ip: str = msgspec.field(default="", name="podIP")
    # The node's address: where a DaemonSet exporter (DCGM) of that node listens.
    host_ip: str = msgspec.field(default="", name="hostIP")
    conditions: list[PodCondition] = []


class Pod(_Model, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()

    @property
    def ready(self) -> bool:
        """Routable: PodReady=True (the kubelet ANDs readiness gates into it), not terminating, has an IP."""
        if self.metadata.deletion_timestamp or not self.status.pod_ip:
            return False
        return any(c.type == "Ready" and c.status == "True" for c in self.status.conditions)


# -- InferencePool (inference.networking.k8s.io/v1; legacy x-k8s.io/v1alpha2) ---------------
class PortNumber(_Model, frozen=True):
    number: int = 0


class InferencePoolSpec(_Model, frozen=True):
    # v1: {matchLabels: {...}}; v1alpha2: a flat label map.
    selector: dict[str, Any] = {}
    target_ports: list[PortNumber] = []
    target_port_number: int | None = None  # v1alpha2
    # v1: "http" or "kubernetes.io/h2c"; "" (unset): no protocol check.
    app_protocol: str = ""


class InferencePool(_Model, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: InferencePoolSpec = InferencePoolSpec()

    def match_labels(self) -> dict[str, str]:
        sel = self.spec.selector
        inner = sel.get("matchLabels")
        labels = inner if isinstance(inner, dict) else ({} if "matchExpressions" in sel else sel)
        return {str(k): str(v) for k, v in labels.items()}

    def ports(self) -> tuple[int, ...]:
        """The target ports in order, a repeat ignored (the CRD's uniqueness rule is CEL, which an older API
        server does not enforce; two rank endpoints at one host:port would collide)."""
        if self.spec.target_ports:
            return tuple(dict.fromkeys(p.number for p in self.spec.target_ports))
        return (self.spec.target_port_number,) if self.spec.target_port_number else ()


# -- llm-d.ai/v1alpha2 ------------------------------------------------------------------------
class PoolRef(_Model, frozen=True):
    group: str = POOL_GROUP
    kind: str = "InferencePool"
    name: str = ""


class InferenceObjectiveSpec(_Model, frozen=True):
    priority: int | None = None
    pool_ref: PoolRef | None = None


class InferenceObjective(_Model, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: InferenceObjectiveSpec = InferenceObjectiveSpec()


class ModelMatch(_Model, frozen=True):
    type: str = "Exact"
    value: str = ""


class Match(_Model, frozen=True):
    model: ModelMatch | None = None


class TargetModel(_Model, frozen=True):
    model_rewrite: str = ""
    weight: int | None = None


class RewriteRule(_Model, frozen=True):
    matches: list[Match] = []
    targets: list[TargetModel] = []


class InferenceModelRewriteSpec(_Model, frozen=True):
    pool_ref: PoolRef | None = None
    rules: list[RewriteRule] = []


class InferenceModelRewrite(_Model, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: InferenceModelRewriteSpec = InferenceModelRewriteSpec()


# -- coordination.k8s.io/v1 Lease -------------------------------------------------------------
class LeaseSpec(_Model, frozen=True):
    holder_identity: str | None = None
    lease_duration_seconds: int | None = None
    acquire_time: str | None = None
    renew_time: str | None = None
    lease_transitions: int | None = None


class Lease(_Model, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: LeaseSpec = LeaseSpec()
