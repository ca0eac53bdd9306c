"""`disagg-profile-handler`: prefill/decode (and encode) disaggregation across scheduling profiles."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import msgspec
from prometheus_client import CollectorRegistry, Counter

from llmepp.errors import REASON_NO_ENDPOINTS, Saturated, ServiceUnavailable
from llmepp.framework.plugin import ConfigError, PluginContext, PluginParams
from llmepp.framework.requestcontrol import PreRequest
from llmepp.framework.scheduling import PROFILE_ERRORS, Decider, ProfileHandler, ProfileResult, SchedulingResult
from llmepp.observability.metrics import MAX_MODEL_LABELS, PREFIX, BoundedLabels, per_registry
from llmepp.request import parsers
from llmepp.request.types import InferenceRequest, RequestKind
from llmepp.scheduling.profile import SchedulerProfile

log = logging.getLogger(__name__)

# Headers the decode-side sidecar reads (reference pkg/common/routing/common.go).
PREFILL_HEADER = parsers.H_PREFILLER
ENCODER_HEADER = parsers.H_ENCODERS
# request.data key: the endpoint picked by the earlier stage (the decode pick before prefill
# runs in decode-first, the prefill pick before decode in prefill-first), for topology plugins.
PEER_ENDPOINT = "peer-endpoint"

DECODE_FIRST = "decode-first"
PREFILL_FIRST = "prefill-first"
# The reference parses the order loosely (case, '-' and '_' ignored; "decode"/"prefill" accepted).
_STAGE_ORDERS = {"": DECODE_FIRST, "decodefirst": DECODE_FIRST, "decode": DECODE_FIRST,
                 "prefillfirst": PREFILL_FIRST, "prefill": PREFILL_FIRST}  # fmt: skip

# The request kinds a remote prefill can serve: those the decode pod's sidecar splits (llmepp.sidecar.proxy
# PD_PATHS). Embeddings have no decode to hand over, and the sidecar sends every other kind straight to its
# own vLLM, so a prefill pick for them would charge a prefill pod for work it never does, or fail the request
# (503) when no prefill pod is up.
PREFILL_KINDS = frozenset({RequestKind.COMPLETIONS, RequestKind.CHAT_COMPLETIONS})
# vLLM's render endpoints (`.../completions/render`, `.../chat/completions/render`) parse as those kinds but
# only tokenize: the sidecar passes them through, there is no prefill to run remotely.
RENDER_SUFFIX = "/render"


# The role filters' types (plugins/filters/roles.py): a stage they empty has no pod of its role.
ROLE_FILTERS = frozenset({"prefill-filter", "decode-filter", "encode-filter"})


def _remote_prefill_possible(request: InferenceRequest) -> bool:
    """The decode pod's sidecar would split this request into a remote prefill and a local decode."""
    path = request.path
    # The sidecar matches its paths exactly: with a trailing slash it passes the request to its vLLM as is
    # (which redirects it to the path without one, then split).
    return request.kind in PREFILL_KINDS and not path.endswith("/") and not path.endswith(RENDER_SUFFIX)


DECODE_ONLY = "decode-only"
PREFILL_DECODE = "prefill-decode"
ENCODE_DECODE = "encode-decode"
ENCODE_PREFILL_DECODE = "encode-prefill-decode"


class DisaggProfiles(PluginParams):
    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = "encode"


class DisaggDeciders(PluginParams):
    prefill: str = ""
    encode: str = ""


def _decisions_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        PREFIX + "disagg_decision",
        "Disaggregation routing decisions.",
        ("plugin_name", "plugin_type", "model_name", "decision_type"),
        registry=registry,
    )


class DisaggProfileHandler(ProfileHandler, PreRequest):
    """Runs the decode profile, then (when deciders approve) the encode and prefill profiles.

    Why: prefill is compute-bound and decode memory-bound; running long uncached prefills on
    dedicated prefill pods keeps them from stalling the token stream of every request that
    shares the decode pod's batch. The decode pod stays the routing target; its sidecar runs
    the remote prefill first (see `llmepp.sidecar`).

    Decision rule, `stageOrder: decode-first` (default):
      1. run `decode`; if it picked nothing the request fails (429, like any empty primary
         profile) and no other stage runs;
      2. encode runs iff `deciders.encode` is set and approves (given the decode pick);
      3. prefill runs iff `deciders.prefill` is set and approves (given the decode pick);
         no prefill decider = decode-only for every request.
    `stageOrder: prefill-first`: `prefill` always runs, then `encode` (if its decider approves,
    asked with no endpoint), then `decode`; a prefill decider is a configuration error there.
    Requests other than completions and chat completions (PREFILL_KINDS: embeddings, the Responses and
    Anthropic APIs, ...) are decode-only in either order: the sidecar splits only those two.

    The primary profile is always `decode` (its pick becomes x-gateway-destination-endpoint). A
    stage that was chosen but found no endpoint fails the request for prefill (silently prefilling on
    the decode pod instead would defeat the split, as the reference argues): 503 when no candidate has
    the prefill role, else the profile's own error (429 rejected-saturated when a load filter refused
    every prefill pod); it is dropped for encode (the decode pod can encode itself).

    PreRequest stamps `x-prefiller-host-port: <ip:port>` of the prefill pick and
    `x-encoder-hosts-ports: <ip:port,...>` of the encode picks for the sidecar. A client-sent
    value of either header is overwritten with an empty value when the stage did not run, so a
    client cannot steer the sidecar to a host of its choice (the sidecar treats empty as absent).

    Metric: `llm_d_epp_disagg_decision_total{plugin_name, plugin_type, model_name, decision_type}`
    with decision_type ∈ decode-only | prefill-decode | encode-decode | encode-prefill-decode,
    once per successfully scheduled request.

    Parameters: `stageOrder` (decode-first), `profiles.{decode,prefill,encode}` (defaults, also for
    an empty value: the same names), `deciders.{prefill,encode}` (plugin names, default none). The
    profiles a configured stage needs must exist (checked at start-up).
    """

    type = "disagg-profile-handler"

    class Params(PluginParams):
        stage_order: str = DECODE_FIRST
        profiles: DisaggProfiles = msgspec.field(default_factory=DisaggProfiles)
        deciders: DisaggDeciders = msgspec.field(default_factory=DisaggDeciders)

        def __post_init__(self) -> None:
            key = self.stage_order.lower().replace("-", "").replace("_", "")
            order = _STAGE_ORDERS.get(key)
            if order is None:
                raise ValueError(f"stageOrder must be {DECODE_FIRST!r} or {PREFILL_FIRST!r}, got {self.stage_order!r}")
            self.stage_order = order
            if order == PREFILL_FIRST and self.deciders.prefill:
                raise ValueError(f"deciders.prefill is not supported with stageOrder {PREFILL_FIRST!r}")
            p = self.profiles
            # As the reference: an empty name is unset, i.e. the default.
            p.decode, p.prefill, p.encode = p.decode or "decode", p.prefill or "prefill", p.encode or "encode"
            if len({p.decode, p.prefill, p.encode}) != 3:
                raise ValueError("profiles.decode, profiles.prefill and profiles.encode must be distinct")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.prefill_first = params.stage_order == PREFILL_FIRST
        self.decode = params.profiles.decode
        self.prefill = params.profiles.prefill
        self.encode = params.profiles.encode
        self.prefill_decider: Decider | None = None
        self.encode_decider: Decider | None = None
        self._decisions: Counter | None = None
        # (model, decision) → counter child: .labels() costs a lock and a dict build per call.
        self._children: dict[tuple[str, str], Counter] = {}
        self._models = BoundedLabels(MAX_MODEL_LABELS)  # model_name label values (the reference's cap)

    def setup(self, ctx: PluginContext) -> None:
        d = self.params.deciders
        # mypy's type-abstract: ctx.plugin only isinstance-checks the (abstract) base class.
        if d.prefill:
            self.prefill_decider = ctx.plugin(d.prefill, Decider, referrer=self, field="deciders.prefill")  # type: ignore[type-abstract]
        if d.encode:
            self.encode_decider = ctx.plugin(d.encode, Decider, referrer=self, field="deciders.encode")  # type: ignore[type-abstract]
        registry = ctx.metrics.registry if ctx.metrics is not None else CollectorRegistry()
        self._decisions = per_registry(registry, "disagg_decision", _decisions_counter)

    def validate_profiles(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        needed = {"profiles.decode": self.decode}
        if self.prefill_first or self.prefill_decider is not None:
            needed["profiles.prefill"] = self.prefill
        if self.encode_decider is not None:
            needed["profiles.encode"] = self.encode
        for field, name in needed.items():
            if name not in profiles:
                raise ConfigError(f"{field}: no scheduling profile named {name!r} (have: {', '.join(profiles)})")
        unused = set(profiles) - set(needed.values())
        if unused:
            log.warning("%s: scheduling profiles %s are never run by this handler", self.name, sorted(unused))

    # -- ProfileHandler --------------------------------------------------------------------
    def pick_profiles(
        self,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> Sequence[SchedulerProfile]:
        if not _remote_prefill_possible(request):  # decode-only, whatever the stage order and the deciders
            return () if self.decode in results else (profiles[self.decode],)
        if self.prefill_first:
            return self._pick_prefill_first(request, profiles, results)
        if self.decode not in results:
            return (profiles[self.decode],)
        decode = results[self.decode]
        # Deciders are asked exactly once: the round after decode. A later round sees a stage
        # they approved in `results` and ends; when they approve nothing the loop ends at once.
        if decode is None or not decode.targets or self.encode in results or self.prefill in results:
            return ()
        chosen = decode.targets[0]
        run: list[SchedulerProfile] = []
        if self.encode_decider is not None and self.encode_decider.disaggregate(request, chosen):
            run.append(profiles[self.encode])
        if self.prefill_decider is not None and self.prefill_decider.disaggregate(request, chosen):
            request.data[PEER_ENDPOINT] = chosen
            run.append(profiles[self.prefill])
        return run

    def _pick_prefill_first(
        self,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> Sequence[SchedulerProfile]:
        if self.prefill not in results:
            return (profiles[self.prefill],)
        prefill = results[self.prefill]
        if self.decode in results or prefill is None or not prefill.targets:
            return ()  # done, or prefill failed: process_results reports it without a wasted decode run
        request.data[PEER_ENDPOINT] = prefill.targets[0]
        if self.encode_decider is not None and self.encode_decider.disaggregate(request, None):
            return (profiles[self.encode], profiles[self.decode])
        return (profiles[self.decode],)

    def process_results(self, request: InferenceRequest, results: dict[str, ProfileResult | None]) -> SchedulingResult:
        if self.prefill in results:  # it ran, so it was required (decider or prefill-first)
            prefill = results[self.prefill]
            if prefill is None or not prefill.targets:
                error = (request.data.get(PROFILE_ERRORS) or {}).get(self.prefill)
                if error is not None and not (isinstance(error, Saturated) and error.emptied_by in ROLE_FILTERS):
                    # Prefill pods are there but a load filter refused them all: the stage's own error (429
                    # rejected-saturated), as a failed decode stage answers.
                    raise error
                raise ServiceUnavailable(
                    f"prefill profile {self.prefill!r} was required but found no endpoint", reason=REASON_NO_ENDPOINTS
                )
        decode = results.get(self.decode)
        if decode is None or not decode.targets:
            # The scheduler turns a primary without targets into a 429 "no endpoint chosen".
            return SchedulingResult(primary_profile=self.decode, profiles=results, prefill_profile=self.prefill)
        kept: dict[str, ProfileResult | None] = {n: r for n, r in results.items() if r is not None and r.targets}
        encode_used = self.encode in kept
        prefill_used = self.prefill in kept
        if encode_used:
            decision = ENCODE_PREFILL_DECODE if prefill_used else ENCODE_DECODE
        else:
            decision = PREFILL_DECODE if prefill_used else DECODE_ONLY
        self._record(request.target_model or request.model, decision)
        return SchedulingResult(primary_profile=self.decode, profiles=kept, prefill_profile=self.prefill)

    # -- PreRequest ------------------------------------------------------------------------
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        headers = request.upstream_headers
        prefill = result.profiles.get(self.prefill)
        if prefill is not None and prefill.targets:
            headers[PREFILL_HEADER] = prefill.targets[0].hostport
        elif PREFILL_HEADER in request.headers:
            # Overwrite (Envoy's ext_proc replaces the value) rather than leave the client's.
            headers[PREFILL_HEADER] = ""
        encode = result.profiles.get(self.encode)
        if encode is not None and encode.targets:
            headers[ENCODER_HEADER] = ",".join(ep.hostport for ep in encode.targets)
        elif ENCODER_HEADER in request.headers:
            headers[ENCODER_HEADER] = ""

    # -- metrics ---------------------------------------------------------------------------
    def _record(self, model: str, decision: str) -> None:
        model = self._models(model)
        child = self._children.get((model, decision))
        if child is None:
            if self._decisions is None:  # setup() not run (direct construction in tests)
                return
            child = self._children[(model, decision)] = self._decisions.labels(
                plugin_name=self.name, plugin_type=self.type, model_name=model or "unknown", decision_type=decision
            )
        child.inc()
