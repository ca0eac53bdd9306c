"""The admission controller's seat in the plugin pipeline.

`AdmissionHooks` is an internal ResponseCompleteProcessor added by `build_admission`:
- `response_complete` runs when a routed request ends (however it ends), after the director
  released the endpoint's in-flight counts: the flow controller may dispatch again;
- `aclose` (called for every plugin when the app stops) closes the controller, its
  dispatcher task and the objectives-file watcher.
"""

from __future__ import annotations

from llmepp.flowcontrol.interfaces import AdmissionController
from llmepp.framework.requestcontrol import ResponseCompleteProcessor
from llmepp.framework.scheduling import SchedulingResult
from llmepp.request.types import InferenceRequest, ResponseInfo

HOOK_NAME = "flow-control"


class AdmissionHooks(ResponseCompleteProcessor):
    """Internal (not configurable): completion and shutdown hooks of the admission controller."""

    type = "flow-control-hooks"

    def __init__(self, controller: AdmissionController, name: str = HOOK_NAME) -> None:
        super().__init__(name)
        self.controller = controller

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, result: SchedulingResult) -> None:
        self.controller.request_completed(request)

    async def aclose(self) -> None:
        await self.controller.aclose()
