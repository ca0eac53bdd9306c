"""Without the flowControl gate: sheddable requests are dropped only while the pool is saturated."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from helpers import endpoint, request

from llmepp.config.loader import build, load_config
from llmepp.config.schema import DEFAULT_CONFIG
from llmepp.datalayer.datastore import Datastore
from llmepp.datalayer.endpoint import Endpoint
from llmepp.director import Director, RoutingDecision
from llmepp.errors import RequestError
from llmepp.flowcontrol.interfaces import SaturationDetector
from llmepp.flowcontrol.legacy import LegacyAdmission
from llmepp.flowcontrol.objectives import ObjectiveStore
from llmepp.observability.metrics import EppMetrics

from .kit import plugin


def legacy(objectives: dict[str, int] | None = None) -> LegacyAdmission:
    return LegacyAdmission(plugin("utilization-detector"), ObjectiveStore(objectives or {"batch": -1, "vip": 3}))


async def test_sheddable_and_saturated_is_429_saturated() -> None:
    adm = legacy()
    saturated = [endpoint(0, queue=5), endpoint(1, kv=0.9)]
    r = request(objective="batch")
    with pytest.raises(RequestError) as err:
        await adm.admit(r, saturated)
    assert (err.value.status, err.value.reason) == (429, None)  # the reference sets no dropped-reason header
    assert r.priority == -1


async def test_non_sheddable_passes_when_saturated_and_sheddable_passes_below_saturation() -> None:
    adm = legacy()
    saturated = [endpoint(0, queue=5), endpoint(1, kv=0.9)]
    await adm.admit(request(objective="vip"), saturated)
    await adm.admit(request(), saturated)  # no objective: priority 0
    await adm.admit(request(objective="unknown"), saturated)  # unknown objective: priority 0
    await adm.admit(request(objective="batch"), [endpoint(0, queue=4), endpoint(1, kv=0.7)])  # 0.85 < 1


async def test_stale_metrics_shed_sheddable_requests() -> None:
    adm = legacy()
    with pytest.raises(RequestError):
        await adm.admit(request(objective="batch"), [endpoint(0, scraped=False)])


async def test_a_nan_saturation_reading_sheds_sheddable_requests() -> None:
    # A detector that cannot tell (NaN) is read as saturated, as the flow controller reads it.
    class Unknown(SaturationDetector):
        type = "test-nan-detector"

        def saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
            return math.nan

    adm = LegacyAdmission(Unknown("nan"), ObjectiveStore({"batch": -1}))
    with pytest.raises(RequestError) as err:
        await adm.admit(request(objective="batch"), [endpoint(0)])
    assert err.value.status == 429
    await adm.admit(request(), [endpoint(0)])  # priority 0 is never shed


async def test_director_without_gate_uses_legacy_admission_end_to_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from llmepp.settings import Settings

    objectives = tmp_path / "o.yaml"
    objectives.write_text(
        "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: batch}\nspec: {priority: -2}\n"
    )
    ds = Datastore()
    ds.upsert(endpoint(0).spec)  # never scraped: the utilization detector reads it as saturated
    metrics = EppMetrics()
    settings = Settings(objectives_file=str(objectives))
    c = build(load_config(DEFAULT_CONFIG), datastore=ds, metrics=metrics, settings=settings)
    assert isinstance(c.pipeline.admission, LegacyAdmission)
    d = Director(ds, c.pipeline, metrics)
    decision = await d.handle_request(request(), None)  # priority 0 is never shed
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name == "pod-0"
    with pytest.raises(RequestError) as err:
        await d.handle_request(request(objective="batch"), None)
    assert err.value.status == 429
    await c.pipeline.admission.aclose()


async def test_legacy_admission_reads_the_saturation_of_the_subset_hint_not_the_whole_pool() -> None:
    # The reference sheds on Saturation(candidates located with the request's subset hint): a sheddable
    # request pinned to a full pod is shed though the rest of the pool is idle, and one pinned to an
    # idle pod is admitted though the rest of the pool is overloaded.
    ds = Datastore()
    metrics = EppMetrics()
    c = build(load_config(DEFAULT_CONFIG), datastore=ds, metrics=metrics)
    adm = c.pipeline.admission
    assert isinstance(adm, LegacyAdmission)
    adm.objectives = ObjectiveStore({"batch": -1})
    d = Director(ds, c.pipeline, metrics)
    full, idle, overloaded = endpoint(0, queue=5), endpoint(1), endpoint(2, queue=50)
    for ep in (full, idle, overloaded):
        ds.upsert(ep.spec)
        ds.get(ep.name).metrics = ep.metrics  # type: ignore[union-attr]
    # Pool mean (1 + 0 + 10) / 3 ≥ 1; the idle pod alone reads 0: admitted.
    decision = await d.handle_request(request(objective="batch"), [idle.hostport])
    assert isinstance(decision, RoutingDecision)
    assert decision.targets[0].name == "pod-1"
    ds.delete(overloaded.name)  # pool mean (1 + 0) / 2 < 1; the full pod alone reads 1: shed.
    with pytest.raises(RequestError) as err:
        await d.handle_request(request(objective="batch"), [full.hostport])
    assert err.value.status == 429
    await adm.aclose()
