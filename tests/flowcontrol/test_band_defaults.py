"""Priority bands as the reference builds them (pkg/epp/config/loader/flowcontrol.go, registry/config.go):
explicit bands and the negative template take the system defaults (5000 requests, 1 GB, fcfs, global-strict)
for unset fields, not defaultPriorityBand's; band 0 always exists; the legacy shedding 429 has no reason header.
"""

from __future__ import annotations

import pytest

from llmepp.config.loader import build, load_config
from llmepp.flowcontrol.controller import FlowController
from llmepp.plugins.flowcontrol.fairness import GlobalStrictFairnessPolicy
from llmepp.plugins.flowcontrol.ordering import FcfsOrderingPolicy

HEAD = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: round-robin-fairness-policy
  name: rr
- type: edf-ordering-policy
  name: edf
"""


def controller_of(text: str) -> FlowController:
    admission = build(load_config(HEAD + text)).pipeline.admission
    assert isinstance(admission, FlowController)
    return admission


# -- an explicit priority band / the negative template take the reference's system defaults -------------
# Reference: pkg/epp/config/loader/flowcontrol.go::buildPriorityBand builds every band (explicit ones and both
# templates) with registry.NewPriorityBandConfig(priority, defaults, opts...), where `defaults` are the global
# fcfs / global-strict policies (buildPriorityBandPolicyDefaults) and applyDefaults fills MaxBytes 1 GB and
# MaxRequests 5000 (pkg/epp/flowcontrol/registry/config.go). DefaultPriorityBand is only the template for
# *dynamically provisioned* priorities (config.go: "DefaultPriorityBand serves as a template for dynamically
# provisioning priority bands when a request arrives with a priority level that was not explicitly configured").


def test_explicit_band_without_limits_gets_reference_defaults_not_the_template() -> None:
    fc = controller_of(
        """
flowControl:
  defaultPriorityBand: {maxRequests: 10, maxBytes: 1000, fairnessPolicyRef: rr, orderingPolicyRef: edf}
  priorityBands:
  - {priority: 100}
"""
    )
    band = fc.config.bands[100]
    assert (band.max_requests, band.max_bytes) == (5000, 1_000_000_000)
    assert isinstance(band.fairness, GlobalStrictFairnessPolicy)
    assert isinstance(band.ordering, FcfsOrderingPolicy)


def test_negative_template_without_limits_gets_reference_defaults_not_the_default_template() -> None:
    fc = controller_of(
        """
flowControl:
  defaultPriorityBand: {maxRequests: 10, fairnessPolicyRef: rr}
  defaultNegativePriorityBand: {maxBytes: 4096}
"""
    )
    neg = fc.config.default_negative_band
    assert neg is not None
    assert (neg.max_requests, neg.max_bytes) == (5000, 4096)
    assert isinstance(neg.fairness, GlobalStrictFairnessPolicy)


# -- band 0 is always provisioned (and so never garbage-collected) ---------------------------------------
# Reference registry/config.go::NewConfig: "Ensure priority 0 is always provisioned. It is the fallback band for
# unmatched requests" -- PriorityBands[0] is added from DefaultPriorityBand when not configured, a static band.
# The usage-limit policy receives AllOrderedPriorityLevels() (processor.go::dispatchCycle), so band 0 counts in
# priority-holdback's rank domain N and in soft-reflective's rank i.


def test_priority_zero_band_exists_from_the_start_and_shapes_holdback_ceilings() -> None:
    fc = _holdback_controller()
    assert 0 in fc.bands and not fc.bands[0].dynamic
    ceilings = list(fc.config.usage_limit.ceilings(0.0, fc._priorities))
    # Reference: levels [10, 5, 0], N = 3 -> [1.0, 0.75, 0.5]; without band 0 band 5 is held back at 0.5.
    assert fc._priorities == [10, 5, 0]
    assert ceilings == pytest.approx([1.0, 0.75, 0.5])


def _holdback_controller() -> FlowController:
    text = (
        HEAD
        + """
- type: priority-holdback-policy
  name: holdback
  parameters: {domain: rank, minCeiling: 0.5}
flowControl:
  usageLimitPolicyPluginRef: holdback
  priorityBands:
  - {priority: 10}
  - {priority: 5}
"""
    )
    admission = build(load_config(text)).pipeline.admission
    assert isinstance(admission, FlowController)
    return admission
