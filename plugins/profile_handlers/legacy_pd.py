"""Deprecated P/D plugins of llm-d before v0.7, kept so existing configs load unchanged:
`pd-profile-handler` (now `disagg-profile-handler` + a decider), and `prefill-header-handler` /
`disagg-headers-handler` (the header stamping `disagg-profile-handler` does itself)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, TOKENIZED_PROMPT
from llmepp.framework.plugin import PluginContext, PluginParams
from llmepp.framework.requestcontrol import PreRequest
from llmepp.framework.scheduling import Decider, ProfileResult, SchedulingResult
from llmepp.observability.fast import Counter, Tally
from llmepp.observability.metrics import PREFIX, per_registry
from llmepp.plugins.profile_handlers.always_disagg_decider import AlwaysDisaggPDDecider
from llmepp.plugins.profile_handlers.disagg import (
    ENCODER_HEADER,
    PREFILL_HEADER,
    DisaggDeciders,
    DisaggProfileHandler,
    DisaggProfiles,
)
from llmepp.plugins.profile_handlers.prefix_based_decider import PrefixBasedPDDecider
from llmepp.request.types import InferenceRequest
from llmepp.scheduling.profile import SchedulerProfile

log = logging.getLogger(__name__)


# `llm_d_epp_pd_decision_total{model_name, decision_type}`, the deprecated handler's own counter in the
# reference (besides disagg_decision_total): one per registry (per_registry), shared by the instances.
def _pd_decisions(registry: CollectorRegistry) -> Counter:
    return Counter(
        PREFIX + "pd_decision_total", "P/D decisions of the deprecated pd-profile-handler.",
        ("model_name", "decision_type"), registry=registry,
    )  # fmt: skip


class PdProfileHandler(DisaggProfileHandler):
    """Deprecated `pd-profile-handler`: `disagg-profile-handler` (decode first) configured from the
    legacy parameters.

        decodeProfile, prefillProfile (decode, prefill)  → profiles.decode, profiles.prefill
        deciderPluginName                                 → deciders.prefill (a configured decider)
        without one: the decider plugin named `prefix-based-pd-decider` if the config has one (the
        parameter's default in the reference), else the `threshold` T of the earlier versions: the
        prefill stage runs when at least T prompt tokens are not cached on the decode pick (a
        prefix-based-pd-decider with nonCachedTokens T); T = 0 (the default): every request
        prefixMatchInfoProducerName                       → that threshold decider's PrefixCacheMatchInfo
        producer (default: the only one)
        prefixPluginType, prefixPluginName, prefixScorerRef, hashBlockSize: accepted, not needed
        (the decider reads the prefix producer's match info itself)

    As in those versions, a config with no prefill profile is decode-only, and so is a request whose
    prefill profile found no endpoint (`disagg-profile-handler` fails it with 503). `primaryPort` (the
    data-parallel port rewrite) is refused: list every rank's port in the pool instead, each rank
    is an endpoint. Decisions are counted in `llm_d_epp_disagg_decision_total`, as for
    `disagg-profile-handler`, and in the reference's deprecated `llm_d_epp_pd_decision_total{model_name,
    decision_type}` (decode-only | prefill-decode).
    """

    type = "pd-profile-handler"
    consumes = frozenset({TOKENIZED_PROMPT, PREFIX_CACHE_MATCH_INFO})

    class Params(PluginParams):
        decode_profile: str = "decode"
        prefill_profile: str = "prefill"
        decider_plugin_name: str = ""
        threshold: int = 0
        hash_block_size: int = 0
        prefix_plugin_type: str = ""
        prefix_plugin_name: str = ""
        prefix_scorer_ref: str = ""
        prefix_match_info_producer_name: str = ""
        primary_port: int = 0

        def __post_init__(self) -> None:
            if self.threshold < 0:
                raise ValueError(f"threshold must be >= 0, got {self.threshold}")
            if self.primary_port:
                raise ValueError(
                    "primaryPort (the data-parallel port rewrite) is not supported: list every rank's port "
                    "in the pool (InferencePool targetPorts), each rank is an endpoint"
                )

    def __init__(self, name: str, params: Params) -> None:
        profiles = DisaggProfiles(decode=params.decode_profile, prefill=params.prefill_profile)
        if profiles.encode in (profiles.decode, profiles.prefill):
            profiles.encode = f"{name}-unused-encode"
        converted = DisaggProfileHandler.Params(
            profiles=profiles, deciders=DisaggDeciders(prefill=params.decider_plugin_name)
        )
        super().__init__(name, converted)
        self.legacy = params
        self._pd_decisions: Counter | None = None
        self._pd_children: dict[tuple[str, str], Tally] = {}

    def setup(self, ctx: PluginContext) -> None:
        super().setup(ctx)
        if ctx.metrics is not None:
            self._pd_decisions = per_registry(ctx.metrics.registry, "pd_decision", _pd_decisions)
        if self.prefill_decider is not None:
            return
        # deciderPluginName's default in the reference versions that have it (those ignore `threshold`).
        named = [p for p in ctx.plugins_of(Decider) if p.name == PrefixBasedPDDecider.type]  # type: ignore[type-abstract]
        if named:
            self.prefill_decider = named[0]
            return
        threshold = self.legacy.threshold
        if threshold:
            decider = PrefixBasedPDDecider(
                f"{self.name}/threshold",
                PrefixBasedPDDecider.Params(
                    non_cached_tokens=threshold,
                    prefix_match_info_producer_name=self.legacy.prefix_match_info_producer_name,
                ),
            )
            decider.setup(ctx)
            self.prefill_decider = decider
        else:
            self.prefill_decider = AlwaysDisaggPDDecider(f"{self.name}/threshold")

    def validate_profiles(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        if not self.legacy.decider_plugin_name and self.prefill not in profiles:
            log.info("%s: no %r profile: decode-only", self.name, self.prefill)
            self.prefill_decider = None
        super().validate_profiles(profiles)

    def _record(self, model: str, decision: str) -> None:
        super()._record(model, decision)
        if self._pd_decisions is None:
            return
        key = (self._models(model), decision)  # the model cap of disagg_decision (admitted just above)
        child = self._pd_children.get(key)
        if child is None:
            child = self._pd_children[key] = self._pd_decisions.labels(key[0] or "unknown", decision)
        child.inc()

    def process_results(self, request: InferenceRequest, results: dict[str, ProfileResult | None]) -> SchedulingResult:
        prefill = results.get(self.prefill)
        if self.prefill in results and (prefill is None or not prefill.targets):
            # The reference's pd-profile-handler keeps only a prefill result that exists: decode-only.
            results = {name: res for name, res in results.items() if name != self.prefill}
        return super().process_results(request, results)


class DisaggHeadersHandler(PreRequest):
    """Deprecated `disagg-headers-handler`: stamps `x-prefiller-host-port` (the `prefillProfile` pick) and
    `x-encoder-hosts-ports` (the `encodeProfile` picks) for the decode pod's sidecar. The P/D profile
    handlers stamp them already; listing this plugin changes nothing but keeps old configs loading.
    Parameters: `prefillProfile` (prefill), `encodeProfile` (encode)."""

    type = "disagg-headers-handler"

    class Params(PluginParams):
        prefill_profile: str = "prefill"
        encode_profile: str = "encode"

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        headers = request.upstream_headers
        prefill = result.profiles.get(self.params.prefill_profile)
        if prefill is not None and prefill.targets:
            headers[PREFILL_HEADER] = prefill.targets[0].hostport
        encode = result.profiles.get(self.params.encode_profile)
        if encode is not None and encode.targets:
            headers[ENCODER_HEADER] = ",".join(ep.hostport for ep in encode.targets)


class PrefillHeaderHandler(DisaggHeadersHandler):
    """Deprecated `prefill-header-handler`: `disagg-headers-handler` under its older name."""

    type = "prefill-header-handler"
