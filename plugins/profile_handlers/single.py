"""`single-profile-handler`: run the one configured profile once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmepp.framework.plugin import ConfigError
from llmepp.framework.scheduling import ProfileHandler, ProfileResult, SchedulingResult
from llmepp.request.types import InferenceRequest
from llmepp.scheduling.profile import SchedulerProfile


class SingleProfileHandler(ProfileHandler):
    """Runs the only profile; its result is primary. Auto-injected when one profile exists."""

    type = "single-profile-handler"

    def validate_profiles(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        if len(profiles) != 1:
            raise ConfigError(f"needs exactly one scheduling profile, found {len(profiles)}: {', '.join(profiles)}")

    def pick_profiles(
        self,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> Sequence[SchedulerProfile]:
        return () if results else tuple(profiles.values())

    def process_results(self, request: InferenceRequest, results: dict[str, ProfileResult | None]) -> SchedulingResult:
        name = next(iter(results))
        return SchedulingResult(primary_profile=name, profiles=results)
