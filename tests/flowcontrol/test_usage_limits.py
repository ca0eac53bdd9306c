"""Usage-limit policies: the ceilings they give, their parameters, and gating in the controller."""

from __future__ import annotations

import asyncio

import pytest

from llmepp.config.loader import build, load_config
from llmepp.flowcontrol.controller import FlowController
from llmepp.framework.plugin import ConfigError
from llmepp.plugins.flowcontrol.usage_limit import SoftReflectiveCeilingPolicy

from .kit import Server, concurrency_pool, controller, plugin, req, until


# -- priority-holdback-policy ------------------------------------------------------------------------
def test_holdback_rank_domain_spaces_ceilings_evenly() -> None:
    p = plugin("priority-holdback-policy", minCeiling=0.4, maxCeiling=0.9)
    assert p.ceilings(0.0, [100, 50, 7, -3]) == pytest.approx([0.9, 0.9 - 0.5 / 3, 0.9 - 1.0 / 3, 0.4])
    assert p.ceilings(0.0, [5]) == [0.9]  # one band: the top ceiling


def test_holdback_value_domain_follows_priority_spacing() -> None:
    p = plugin("priority-holdback-policy", domain="value", minCeiling=0.2)
    # maxCeiling defaults to 1.0; 90 is 90% of the way from 0 to 100.
    assert p.ceilings(0.0, [100, 90, 0]) == pytest.approx([1.0, 0.92, 0.2])
    assert p.ceilings(0.0, [3, 3]) == [1.0, 1.0]


def test_holdback_explicit_domain_reads_the_table_and_an_unlisted_priority_as_the_listed_one_below() -> None:
    """An unlisted priority (an objective added later) is gated like the nearest listed priority below it,
    below them all like the lowest. It read ceiling 0, gated even on an idle pool; and since a gated band
    holds back every band below it, one such request stopped all lower traffic until its TTL."""
    p = plugin("priority-holdback-policy", domain="explicit", ceilings={"100": 0.95, "50": 0.7, "10": 0.3})
    assert p.ceilings(0.0, [100, 50, 10]) == [0.95, 0.7, 0.3]
    assert p.ceilings(0.0, [200, 100, 75, 50, 10, 0, -5]) == [0.95, 0.95, 0.7, 0.7, 0.3, 0.3, 0.3]


def test_holdback_ceilings_follow_a_new_band_list() -> None:
    p = plugin("priority-holdback-policy", minCeiling=0.5)
    assert p.ceilings(0.0, [1, 0]) == [1.0, 0.5]
    assert p.ceilings(0.0, [2, 1, 0]) == [1.0, 0.75, 0.5]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "minCeiling is required for domain rank"),
        ({"minCeiling": 1.0}, "minCeiling must be in [0, 1)"),
        ({"minCeiling": 0.5, "maxCeiling": 0.0}, "maxCeiling must be in (0, 1]"),
        ({"minCeiling": 0.8, "maxCeiling": 0.6}, "minCeiling (0.8) is above maxCeiling (0.6)"),
        ({"minCeiling": 0.5, "shape": "step"}, "shape must be linear"),
        ({"minCeiling": 0.5, "domain": "rnak"}, "domain must be rank, value or explicit"),
        ({"domain": "explicit"}, "domain explicit needs `ceilings`"),
        ({"domain": "explicit", "minCeiling": 0.1, "ceilings": {"1": 0.5}}, "must not be set"),
        ({"domain": "explicit", "ceilings": {"1": 1.5}}, "ceilings[1] must be in [0, 1]"),
        ({"domain": "explicit", "ceilings": {"10": 0.3, "1": 0.6}}, "must not increase"),
        ({"minCeiling": 0.5, "ceilings": {"1": 0.5}}, "`ceilings` is for domain explicit"),
    ],
)
def test_holdback_parameters_are_validated(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        plugin("priority-holdback-policy", **params)
    assert "priority-holdback-policy" in str(e.value) and message in str(e.value)


# -- soft-reflective-ceiling-policy --------------------------------------------------------------------
def _open_share(policy: SoftReflectiveCeilingPolicy, saturation: float, bands: int, calls: int = 900) -> list[float]:
    prios = list(range(bands, 0, -1))
    opened = [0] * bands
    for _ in range(calls):
        for i, c in enumerate(policy.ceilings(saturation, prios)):
            opened[i] += saturation < c
    return [o / calls for o in opened]


def test_soft_reflective_leaves_bands_open_below_their_reflective_ceiling() -> None:
    # Three bands at saturation 0.4: reflective ceilings 1, 0.8, 0.6 are all above it.
    assert _open_share(plugin("soft-reflective-ceiling-policy"), 0.4, 3) == [1.0, 1.0, 1.0]


def test_soft_reflective_thins_out_lower_bands_past_their_ceiling() -> None:
    # Two bands at saturation 0.75: band 1's reflective ceiling is 0.25, so it alternates with
    # period round(0.75/0.25) = 3 and dispatches on one call in three; band 0 is never held.
    assert _open_share(plugin("soft-reflective-ceiling-policy"), 0.75, 2) == pytest.approx([1.0, 1 / 3])
    # At 0.9 the period is 9.
    assert _open_share(plugin("soft-reflective-ceiling-policy"), 0.9, 2) == pytest.approx([1.0, 1 / 9])


def test_soft_reflective_closes_every_band_at_full_saturation() -> None:
    assert _open_share(plugin("soft-reflective-ceiling-policy"), 1.0, 3, calls=10) == [0.0, 0.0, 0.0]
    # And opens them again when saturation falls.
    assert _open_share(plugin("soft-reflective-ceiling-policy"), 0.2, 3, calls=10) == [1.0, 1.0, 1.0]


def test_soft_reflective_takes_no_parameters() -> None:
    with pytest.raises(ConfigError, match="soft-reflective-ceiling-policy"):
        plugin("soft-reflective-ceiling-policy", threshold=0.5)


# -- in the controller and from config --------------------------------------------------------------
async def test_holdback_keeps_the_low_band_queued_while_the_high_band_dispatches() -> None:
    # Saturation 0.5 (1 of 2 slots busy): the high band's ceiling is 1.0, the low band's 0.5.
    pool, det = concurrency_pool(1, max_concurrency=2)
    ctl = controller(pool, det, objectives={"vip": 5}, usage_limit=plugin("priority-holdback-policy", minCeiling=0.5))
    pool()[0].inflight.requests = 1
    srv = Server(ctl, pool)
    srv.submit(req("high-warm", objective="vip"))  # provisions the vip band
    await until(lambda: srv.order == ["high-warm"])
    pool()[0].inflight.requests = 1
    srv.submit(req("low"))
    await asyncio.sleep(0.02)
    assert srv.order == ["high-warm"] and ctl.queued == 1
    srv.submit(req("high", objective="vip"))
    await until(lambda: srv.order == ["high-warm", "high"])
    assert ctl.queued == 1
    pool()[0].inflight.requests = 0  # saturation 0 < 0.5: the low band goes
    await until(lambda: srv.order == ["high-warm", "high", "low"])
    await srv.close()


REFERENCE_SOFT_REFLECTIVE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: soft-reflective-ceiling-policy
flowControl:
  usageLimitPolicyPluginRef: soft-reflective-ceiling-policy
"""


def test_the_reference_soft_reflective_example_loads() -> None:
    admission = build(load_config(REFERENCE_SOFT_REFLECTIVE)).pipeline.admission
    assert isinstance(admission, FlowController)
    assert isinstance(admission.config.usage_limit, SoftReflectiveCeilingPolicy)
