"""Conformance with the reference's filters, scorers, pickers and profile handlers (audit findings)."""

from __future__ import annotations

from typing import cast

from helpers import endpoint, request

from llmepp.director import RoutingDecision
from llmepp.framework.plugin import PluginContext, registry
from llmepp.plugins.filters.endpoint_attribute import EndpointAttributeFilter

from .test_pd_plugins import director

# -- header-profile-handler ------------------------------------------------------------------------
HEADER_STAGES = """
plugins:
- {type: decode-filter}
- {type: prefill-filter}
- {type: header-profile-handler}
schedulingProfiles:
- {name: decode-stage, plugins: [{pluginRef: decode-filter}]}
- {name: prefill-stage, plugins: [{pluginRef: prefill-filter}]}
"""


async def test_header_profile_handler_loads_without_a_decode_profile_when_default_is_implicit() -> None:
    # Reference NewHeaderProfileHandler: defaultProfile unset is "decode", and a defaultProfile missing from
    # schedulingProfiles is only a per-request error (logged when a request lacks the header), never a load
    # error: a config whose profiles carry other names loads and routes every request that names one.
    d, _, _ = director(HEADER_STAGES, [("p0", "prefill"), ("d0", "decode")])
    req = request(b"x")
    req.headers["epp-profile"] = "prefill-stage"
    assert cast(RoutingDecision, await d.handle_request(req, None)).targets[0].name == "p0"


async def test_header_profile_handler_trims_default_profile() -> None:
    # Reference NewHeaderProfileHandler: defaultProfile = strings.TrimSpace(defaultProfile).
    config = HEADER_STAGES.replace(
        "{type: header-profile-handler}",
        "{type: header-profile-handler, parameters: {defaultProfile: ' prefill-stage '}}",
    )
    d, _, _ = director(config, [("p0", "prefill"), ("d0", "decode")])
    assert cast(RoutingDecision, await d.handle_request(request(b"x"), None)).targets[0].name == "p0"


# -- endpoint-attribute-filter --------------------------------------------------------------------
def test_attribute_filter_percentile_position_is_not_pushed_up_by_float_error() -> None:
    # 14 % of 50 values is position 7 exactly, but 14/100·50 is 7.000000000000001 in floating point: a plain
    # ceil makes it 8. The reference's nearest rank, int(P/100·N + 0.999999), stays at 7.
    eps = [endpoint(i, queue=i) for i in range(50)]  # values 0..49
    f = registry.build(
        "endpoint-attribute-filter",
        "f",
        {
            "attribute": "waiting-queue",
            "algorithm": {"type": "percentile", "percentile": {"percentile": 14, "higherIsBetter": False}},
        },
    )
    assert isinstance(f, EndpointAttributeFilter)
    f.setup(PluginContext({"f": f}, None, None, None))
    kept = f.filter(request(), eps)
    assert [ep.name for ep in kept] == [f"pod-{i}" for i in range(7)]  # cutoff = 7th smallest value, 6
