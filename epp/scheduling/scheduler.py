"""The scheduler: the profile handler decides which profiles run, round by round."""

from __future__ import annotations

from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import RequestError, ResourceExhausted
from llmepp.framework.scheduling import ProfileHandler, ProfileResult, SchedulingResult
from llmepp.observability.plugin_timing import PluginTimers
from llmepp.request.types import InferenceRequest
from llmepp.scheduling.profile import SchedulerProfile

# A handler that keeps asking for profiles is a bug; stop rather than spin.
_MAX_ROUNDS = 16


class Scheduler:
    def __init__(self, handler: ProfileHandler, profiles: dict[str, SchedulerProfile]) -> None:
        self.handler = handler
        self.profiles = profiles

    def schedule(
        self, request: InferenceRequest, candidates: Sequence[Endpoint], timers: PluginTimers | None = None
    ) -> SchedulingResult:
        """`timers`: time each filter, scorer and picker (a sampled request)."""
        results: dict[str, ProfileResult | None] = {}
        for _ in range(_MAX_ROUNDS):
            to_run = self.handler.pick_profiles(request, self.profiles, results)
            if not to_run:
                break
            for profile in to_run:
                try:
                    results[profile.name] = profile.run(request, candidates, timers)
                except RequestError:
                    if len(self.profiles) == 1:
                        raise
                    # Multi-profile handlers decide whether a missing result is fatal.
                    results[profile.name] = None
        else:
            raise RuntimeError(f"profile handler {self.handler.name!r} did not finish in {_MAX_ROUNDS} rounds")
        result = self.handler.process_results(request, results)
        if not result.targets:
            raise ResourceExhausted(f"no endpoint chosen by primary profile {result.primary_profile!r}")
        return result
