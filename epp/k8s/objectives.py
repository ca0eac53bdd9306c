"""InferenceObjective objects → flow control's ObjectiveStore (name → priority).

Only objectives whose `spec.poolRef` names our pool (and its API group) count, like the
reference reconciler: an objective that points elsewhere — or is edited to — is removed
from the store. A missing `spec.priority` is 0. A priority outside int32 (the API server
does not enforce `format: int32`; the reference cannot decode such an object, so its
requests run at 0) is a logged skip counted in `ObjectiveSync.rejected` (on /metrics:
`llm_d_epp_kubernetes_informer_rejected_total`): the objective
leaves the store, as the file loader rejects the same value.
"""

from __future__ import annotations

import logging

from llmepp.flowcontrol.objectives import INT32_RANGE, ObjectiveStore
from llmepp.k8s.models import InferenceObjective, PoolRef

log = logging.getLogger(__name__)


def refers_to_pool(ref: PoolRef | None, pool_name: str, pool_group: str) -> bool:
    return ref is not None and ref.name == pool_name and ref.group == pool_group


class ObjectiveSync:
    """Informer handler: keeps `store` equal to the pool's objectives."""

    def __init__(self, store: ObjectiveStore, pool_name: str, pool_group: str) -> None:
        self.store = store
        self.pool_name = pool_name
        self.pool_group = pool_group
        self.rejected = 0  # objects left out because of an unusable value (each logged)

    def upsert(self, obj: InferenceObjective) -> None:
        name = obj.metadata.name
        if not refers_to_pool(obj.spec.pool_ref, self.pool_name, self.pool_group) or obj.metadata.deletion_timestamp:
            if self.store.get(name) is not None:
                log.info("inference objective %s no longer applies to this pool", name)
            self.store.delete(name)
            return
        priority = obj.spec.priority or 0
        if not INT32_RANGE[0] <= priority <= INT32_RANGE[1]:
            self.rejected += 1
            log.warning(
                "inference objective %r: spec.priority %d is outside int32: skipped (priority 0)", name, priority
            )
            self.store.delete(name)
            return
        if self.store.get(name) != priority:
            log.info("inference objective %s: priority %d", name, priority)
        self.store.upsert(name, priority)

    def delete(self, obj: InferenceObjective) -> None:
        self.store.delete(obj.metadata.name)
