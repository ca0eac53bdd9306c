"""Scheduling extension points: Filter → Scorer → Picker, run per profile by a ProfileHandler.

All of them are synchronous and run on the event loop: keep them allocation-light, they
run for every request. Endpoint lists are plain Python lists/tuples; a scorer returns one
float per endpoint, in order.
"""

from __future__ import annotations

import builtins
import enum
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from llmepp.datalayer.endpoint import Endpoint, join_hostport
from llmepp.framework.plugin import Plugin, PluginParams, reference_default
from llmepp.request.types import InferenceRequest

if TYPE_CHECKING:
    from llmepp.scheduling.profile import SchedulerProfile


class ScorerCategory(enum.Enum):
    DISTRIBUTION = "distribution"  # spreads load
    AFFINITY = "affinity"  # concentrates related requests


class Filter(Plugin):
    """Removes endpoints that must not serve the request. Returns the kept endpoints, in order: each at
    most once, and only endpoints it was given (the profile checks only an answer longer than its input,
    cut to the given endpoints once each and logged; a shorter one is trusted)."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("filter",)

    @abstractmethod
    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]: ...


class Scorer(Plugin):
    """Rates each endpoint in [0, 1] (higher is better); the profile sums weight·score.

    Values outside [0, 1] are clamped by the framework (NaN to 0). A column of the wrong length, or
    an exception, counts as 0 for every endpoint (logged, rate-limited): the other scorers decide.
    """

    sync_hooks: ClassVar[tuple[str, ...]] = ("score",)

    category: ClassVar[ScorerCategory] = ScorerCategory.DISTRIBUTION

    @abstractmethod
    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[float]: ...


class PickerParams(PluginParams):
    # How many endpoints to return; more than one gives Envoy an ordered fallback list.
    # (< 1: the default, as the reference's pickers do: "on invalid configuration value, fallback to
    # default value"; see Picker.)
    max_num_of_endpoints: int = 1


class Picker(Plugin):
    """Chooses the ordered target list from the scored endpoints."""

    sync_hooks: ClassVar[tuple[str, ...]] = ("pick",)

    Params: ClassVar[builtins.type[PluginParams]] = PickerParams

    def __init__(self, name: str, params: PickerParams | None = None) -> None:
        super().__init__(name, params)
        # An author's own Params need not derive from PickerParams: then one endpoint, the default.
        n = getattr(self.params, "max_num_of_endpoints", 1)
        self.max_num_of_endpoints: int = n if n >= 1 else reference_default(self.type, "maxNumOfEndpoints", n, 1, "< 1")

    @abstractmethod
    def pick(self, endpoints: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]: ...


@dataclass(slots=True)
class ProfileResult:
    """A profile's outcome: targets in preference order (first = primary).

    `candidates` / `totals` are every endpoint that reached the scorers and its weighted total
    (references, not copies) for explainability; `breakdown` holds each scorer's column and is
    filled only when debug logging is on.
    """

    targets: list[Endpoint]
    candidates: Sequence[Endpoint] = ()
    totals: Sequence[float] = ()
    breakdown: dict[str, Sequence[float]] | None = None

    def ranked(self, limit: int | None = None) -> list[tuple[Endpoint, float]]:
        """Candidates with their totals, best first."""
        pairs = sorted(zip(self.candidates, self.totals), key=lambda p: p[1], reverse=True)
        return pairs[:limit] if limit is not None else pairs


# request.data key: {profile name: the RequestError its run raised}, for the profile handler's process_results
# (set only when a profile of a multi-profile handler failed).
PROFILE_ERRORS = "scheduling/profile-errors"


@dataclass(slots=True)
class SchedulingResult:
    primary_profile: str
    profiles: dict[str, ProfileResult | None]
    # The profile whose pick runs this request's prefill remotely (P/D), named by the profile handler.
    prefill_profile: str = ""
    # Port Envoy sends the primary targets to instead of their own (0: their own), set by a profile
    # handler when a pod's server on one port fronts its other endpoints (data-parallel ranks behind
    # rank 0). Only the address changes: the targets stay the endpoints whose load and cache count it.
    destination_port: int = 0

    @property
    def targets(self) -> list[Endpoint]:
        res = self.profiles.get(self.primary_profile)
        return res.targets if res is not None else []

    def destinations(self) -> list[str]:
        """`ip:port` Envoy sends each primary target to: its own, or its IP at `destination_port`.

        At `destination_port` two picked ranks of one pod share an address: it is listed once, at the
        first's place (a repeat in Envoy's fallback list only retries the endpoint that just failed)."""
        port = self.destination_port
        if port:
            return list(dict.fromkeys([join_hostport(ep.address, port) for ep in self.targets]))
        return [ep.hostport for ep in self.targets]

    def kv_targets(self) -> list[Endpoint]:
        """The endpoints that will hold this prompt's KV cache: the primary pick, and the prefill
        profile's pick when a remote prefill runs."""
        out = []
        for name in (self.primary_profile, self.prefill_profile):
            res = self.profiles.get(name) if name else None
            if res is not None and res.targets:
                out.append(res.targets[0])
        return out


class ProfileHandler(Plugin):
    """Decides which profiles run (in rounds) and which result is primary."""

    sync_hooks: ClassVar[tuple[str, ...]] = (
        "pick_profiles",
        "process_results",
    )

    def validate_profiles(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        """Raise ConfigError at start-up if the configured profiles don't suit this handler."""

    @abstractmethod
    def pick_profiles(
        self,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> Sequence[SchedulerProfile]:
        """Profiles to run next given results so far; an empty list ends the loop."""
        ...

    @abstractmethod
    def process_results(
        self, request: InferenceRequest, results: dict[str, ProfileResult | None]
    ) -> SchedulingResult: ...


class Decider(Plugin):
    """Decides whether a disaggregated stage (prefill or encode) runs for one request.

    An ordinary plugin (its own entry in `plugins:`) that `disagg-profile-handler` names in
    `deciders.prefill` / `deciders.encode`. Asked once per request, after the decode profile
    picked its endpoint (decode-first); in prefill-first mode the encode decider is asked with
    `None`. Runs on the event loop inside scheduling: keep it allocation-light.
    """

    sync_hooks: ClassVar[tuple[str, ...]] = ("disaggregate",)

    @abstractmethod
    def disaggregate(self, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        """True to run the stage; `endpoint` is the decode pick (None when not chosen yet)."""
