"""Where each kind the EPP reads or writes lives in the API (REST paths)."""

from __future__ import annotations

from dataclasses import dataclass

POOL_GROUP = "inference.networking.k8s.io"
# The pre-GA group (v1alpha2: flat `selector` map, one `targetPortNumber`), still served by older installs.
LEGACY_POOL_GROUP = "inference.networking.x-k8s.io"
LLMD_GROUP = "llm-d.ai"


@dataclass(frozen=True, slots=True)
class Resource:
    """A namespaced kind: `/api/v1/namespaces/<ns>/pods` or `/apis/<group>/<version>/namespaces/<ns>/<plural>`."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str

    def collection(self, namespace: str) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{base}/namespaces/{namespace}/{self.plural}"

    def item(self, namespace: str, name: str) -> str:
        return f"{self.collection(namespace)}/{name}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PODS = Resource("", "v1", "pods", "Pod")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
INFERENCE_OBJECTIVES = Resource(LLMD_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective")
INFERENCE_MODEL_REWRITES = Resource(LLMD_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite")


def inference_pools(group: str = POOL_GROUP) -> Resource:
    """`--pool-group` picks the API group: v1 for the GA group (and any other), v1alpha2 for the legacy one."""
    return Resource(group, "v1alpha2" if group == LEGACY_POOL_GROUP else "v1", "inferencepools", "InferencePool")
