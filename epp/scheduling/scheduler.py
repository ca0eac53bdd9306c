"""The scheduler: the profile handler decides which profiles run, round by round."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import RequestError, ResourceExhausted
from llmepp.framework.scheduling import PROFILE_ERRORS, ProfileHandler, ProfileResult, SchedulingResult
from llmepp.observability.logging import LogLimiter
from llmepp.observability.plugin_timing import PluginTimers
from llmepp.request.types import InferenceRequest
from llmepp.scheduling.profile import SchedulerProfile

log = logging.getLogger(__name__)

# A handler that keeps asking for profiles is a bug; stop rather than spin.
_MAX_ROUNDS = 16


class Scheduler:
    def __init__(self, handler: ProfileHandler, profiles: dict[str, SchedulerProfile]) -> None:
        self.handler = handler
        self.profiles = profiles
        self._bug_log = LogLimiter(log, interval=30.0)  # a plugin bug fails every request: once per 30 s

    def schedule(
        self, request: InferenceRequest, candidates: Sequence[Endpoint], timers: PluginTimers | None = None
    ) -> SchedulingResult:
        """`timers`: time each filter, scorer and picker (a sampled request).

        A plugin bug (an exception other than a RequestError, from a filter, picker, decider or the handler)
        fails the request with a counted 500 and one error line with its traceback per 30 s, not one per request."""
        try:
            return self._schedule(request, candidates, timers)
        except RequestError:
            raise
        except Exception as e:
            self._bug_log.error("failed", "scheduling failed (profile handler %r)", self.handler.name, exc_info=True)
            raise RequestError(f"scheduling failed: {type(e).__name__}") from None

    def _schedule(
        self, request: InferenceRequest, candidates: Sequence[Endpoint], timers: PluginTimers | None
    ) -> SchedulingResult:
        results: dict[str, ProfileResult | None] = {}
        errors: dict[str, RequestError] | None = None  # allocated when a profile fails only
        for _ in range(_MAX_ROUNDS):
            start = time.perf_counter() if timers is not None else 0.0
            to_run = self.handler.pick_profiles(request, self.profiles, results)
            if timers is not None:
                timers.observe("ProfilePicker", self.handler, time.perf_counter() - start)
            if not to_run:
                break
            for profile in to_run:
                try:
                    results[profile.name] = profile.run(request, candidates, timers)
                except RequestError as e:
                    if len(self.profiles) == 1:
                        raise
                    # Multi-profile handlers decide whether a missing result is fatal.
                    results[profile.name] = None
                    errors = {**(errors or {}), profile.name: e}
        else:
            # A handler bug, on every request: a counted 500 and one log line per 30 s, not a traceback each.
            message = f"profile handler {self.handler.name!r} did not finish in {_MAX_ROUNDS} rounds"
            self._bug_log.error("runaway", "%s", message)
            raise RequestError(message)
        if not results:  # as the reference: "failed to run any scheduler profile"
            raise ResourceExhausted(f"profile handler {self.handler.name!r} ran no scheduling profile")
        if errors:
            request.data[PROFILE_ERRORS] = errors
        start = time.perf_counter() if timers is not None else 0.0
        result = self.handler.process_results(request, results)
        if timers is not None:
            timers.observe("ProcessProfilesResults", self.handler, time.perf_counter() - start)
        if not result.targets:
            # The primary profile's own error when it failed (e.g. Saturated: 429 rejected-saturated).
            error = errors.get(result.primary_profile) if errors else None
            if error is not None:
                raise error
            raise ResourceExhausted(f"no endpoint chosen by primary profile {result.primary_profile!r}")
        return result
