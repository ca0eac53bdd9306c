"""`always-disagg-multimodal-decider`: run the encode stage for requests that carry media."""

from __future__ import annotations

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Decider
from llmepp.request.types import InferenceRequest


class AlwaysDisaggMultimodalDecider(Decider):
    """decision = the request carries an image, video, audio or document part (the parsers flag
    chat `image_url` / `video_url` / `input_audio` / `audio_url`, Responses `input_image` /
    `input_file`, Anthropic `image` / `document`).

    Why: in E/P/D serving only multimodal requests need an encoder pod; text-only requests skip
    the encode stage. Name it in `disagg-profile-handler`'s `deciders.encode`. Parameters: none.
    """

    type = "always-disagg-multimodal-decider"

    def disaggregate(self, request: InferenceRequest, endpoint: Endpoint | None) -> bool:
        return request.multimodal
