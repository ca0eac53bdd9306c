"""InferenceObjective → ObjectiveStore (k8s/objectives.py), without an API server."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest

from llmepp.flowcontrol.objectives import ObjectiveStore
from llmepp.k8s.models import InferenceObjective
from llmepp.k8s.objectives import ObjectiveSync

GROUP = "inference.networking.k8s.io"


def objective(name: str, priority: Any = None, pool: str = "p", **spec: Any) -> InferenceObjective:
    doc: dict[str, Any] = {"metadata": {"name": name}, "spec": {"poolRef": {"name": pool}, **spec}}
    if priority is not None:
        doc["spec"]["priority"] = priority
    return msgspec.convert(doc, InferenceObjective)


def test_priority_by_name_default_zero_other_pool_ignored_update_and_delete() -> None:
    store = ObjectiveStore()
    sync = ObjectiveSync(store, "p", GROUP)
    sync.upsert(objective("premium", 10))
    sync.upsert(objective("unset"))
    sync.upsert(objective("foreign", 99, pool="q"))
    sync.upsert(objective("other-group", 5, poolRef={"name": "p", "group": "x.io"}))
    assert store.snapshot() == {"premium": 10, "unset": 0}
    assert store.priority("foreign") == 0 and store.priority("nope") == 0 and store.priority("") == 0
    sync.upsert(objective("premium", -3))
    assert store.priority("premium") == -3
    sync.delete(objective("premium", -3))
    assert store.get("premium") is None and sync.rejected == 0


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, 2**40])
def test_a_priority_outside_int32_is_a_counted_logged_skip(priority: int, caplog: pytest.LogCaptureFixture) -> None:
    # The API server does not enforce `format: int32` (it accepts 2**40); the reference cannot decode such an
    # object (its Priority is an *int32), so its requests run at the default 0. Ours must not admit them in a
    # band of their own either, and the file loader already rejects the same value.
    store = ObjectiveStore()
    sync = ObjectiveSync(store, "p", GROUP)
    sync.upsert(objective("o", 7))
    with caplog.at_level(logging.WARNING, logger="llmepp.k8s.objectives"):
        sync.upsert(objective("o", priority))
    assert store.get("o") is None and store.priority("o") == 0
    assert sync.rejected == 1
    assert any("int32" in r.getMessage() and "'o'" in r.getMessage() for r in caplog.records), caplog.text
    sync.upsert(objective("o", 2**31 - 1))  # the bounds themselves are fine
    sync.upsert(objective("lo", -(2**31)))
    assert store.snapshot() == {"o": 2**31 - 1, "lo": -(2**31)} and sync.rejected == 1
