"""`header-profile-handler`: the client names the one profile to run in a request header."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import msgspec

from llmepp.errors import BadRequest
from llmepp.framework.plugin import ConfigError, PluginParams
from llmepp.framework.scheduling import ProfileHandler, ProfileResult, SchedulingResult
from llmepp.request.types import InferenceRequest
from llmepp.scheduling.profile import SchedulerProfile

log = logging.getLogger(__name__)


class HeaderProfileHandler(ProfileHandler):
    """Runs exactly the profile named by a request header; its result is primary.

    Why: an orchestrator that drives P/D (or E/P/D) itself (the reference's coordinator) calls
    the gateway once per phase and says which phase it wants, e.g. `EPP-Profile: prefill`.

    Decision rule: with exactly one configured profile, that profile (whatever the header says,
    as the reference). Otherwise profile = value of `headerName` (surrounding spaces stripped),
    else `defaultProfile` when the header is missing or empty. A name that is not a configured
    profile is answered **400 Bad Request** naming the known profiles; the reference lets it
    surface as 429, which wrongly tells clients to back off and retry a request that can never
    succeed. When `defaultProfile` names no configured profile, a request without the header is a 400.

    Parameters: `headerName` ("EPP-Profile", also when blank; matched case-insensitively),
    `defaultProfile` ("decode", also when blank, as the reference; when set, it must name a configured
    profile when there are several, checked at start-up; left unset, a config without a `decode` profile
    loads as in the reference, with a warning).
    """

    type = "header-profile-handler"

    class Params(PluginParams):
        header_name: str = "EPP-Profile"
        # UNSET: "decode", but not checked at start-up (the reference loads a config without it).
        default_profile: str | msgspec.UnsetType = msgspec.UNSET

        def __post_init__(self) -> None:
            if not self.header_name.strip():  # as the reference: blank is the default
                self.header_name = "EPP-Profile"

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        # The ext_proc layer lower-cases request header names.
        self.header = params.header_name.strip().lower()
        # Trimmed, blank the default, as the reference (it names a schedulingProfiles entry: case kept).
        default = "" if isinstance(params.default_profile, msgspec.UnsetType) else params.default_profile.strip()
        self.explicit_default = bool(default)
        self.default = default or "decode"

    def validate_profiles(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        # One profile always runs (below): defaultProfile is not used then.
        if len(profiles) > 1 and self.default not in profiles:
            if not self.explicit_default:
                log.warning(
                    "%s: no scheduling profile named %r (the default defaultProfile; have: %s): "
                    "requests without header %s are refused",
                    self.name, self.default, ", ".join(profiles), self.params.header_name,
                )  # fmt: skip
                return
            raise ConfigError(
                f"defaultProfile: no scheduling profile named {self.default!r} (have: {', '.join(profiles)})"
            )

    def pick_profiles(
        self,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> Sequence[SchedulerProfile]:
        if results:
            return ()
        if len(profiles) == 1:  # nothing to choose, as the reference: the header is not read
            return tuple(profiles.values())
        wanted = request.headers.get(self.header, "").strip() or self.default
        profile = profiles.get(wanted)
        if profile is None:
            raise BadRequest(
                f"header {self.params.header_name}: unknown scheduling profile {wanted[:64]!r}; "
                f"known: {', '.join(profiles)}"
            )
        return (profile,)

    def process_results(self, request: InferenceRequest, results: dict[str, ProfileResult | None]) -> SchedulingResult:
        # Exactly one profile ran; a failed run leaves it without targets (the scheduler's 429).
        name = next(iter(results))
        return SchedulingResult(primary_profile=name, profiles=results)
