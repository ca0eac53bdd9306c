"""Admission without the flowControl feature gate (reference `LegacyAdmissionController`).

Sheddable requests (priority < 0) are rejected with 429 `rejected-saturated` while the
candidates' saturation is ≥ 1.0; everything else goes straight to scheduling. Nothing is
queued, so there is nothing to fair-share, expire or drain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.errors import ResourceExhausted
from llmepp.flowcontrol.interfaces import AdmissionController, SaturationDetector
from llmepp.flowcontrol.objectives import ObjectivesFileWatcher, ObjectiveStore
from llmepp.request.types import InferenceRequest


class LegacyAdmission(AdmissionController):
    mode = "legacy"

    def __init__(
        self,
        detector: SaturationDetector,
        objectives: ObjectiveStore | None = None,
        *,
        watcher: ObjectivesFileWatcher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.detector = detector
        self.objectives = objectives if objectives is not None else ObjectiveStore()
        self._watcher = watcher
        self._clock = clock
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            if self._watcher is not None:
                self._watcher.start()

    async def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> None:
        if not self._started:
            self.start()
        if request.objective:
            request.priority = self.objectives.priority(request.objective)
        # Only sheddable requests pay for the saturation computation.
        # `not <` rather than `>=`: a NaN reading counts as saturated, as in the flow controller.
        if request.priority < 0 and not self.detector.saturation(candidates, self._clock()) < 1.0:
            # No x-llm-d-request-dropped-reason: the reference's rejectIfSheddableAndSaturated sets no header.
            raise ResourceExhausted("pool is saturated: sheddable request (priority < 0) dropped")

    async def aclose(self) -> None:
        if self._watcher is not None:
            await self._watcher.aclose()
