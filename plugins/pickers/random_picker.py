"""`random-picker`: ignores scores and picks uniformly at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Picker, PickerParams


class RandomPicker(Picker):
    """Returns `maxNumOfEndpoints` (1) distinct endpoints in random order, ignoring scores."""

    type = "random-picker"

    def __init__(self, name: str, params: PickerParams | None = None) -> None:
        super().__init__(name, params)
        self._rng = random.Random()

    def pick(self, endpoints: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        if self.max_num_of_endpoints == 1:
            return [self._rng.choice(endpoints)] if endpoints else []
        return self._rng.sample(list(endpoints), min(self.max_num_of_endpoints, len(endpoints)))
