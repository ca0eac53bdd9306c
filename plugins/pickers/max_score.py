"""`max-score-picker`: the highest total score wins; ties are broken at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Picker, PickerParams


class MaxScorePicker(Picker):
    """Returns the `maxNumOfEndpoints` (1) best endpoints, best first.

    Equivalent to the reference's shuffle-then-stable-sort: equal scores come out in random
    order. With one target it is a single pass (max, then a random choice among the ties).
    """

    type = "max-score-picker"

    def __init__(self, name: str, params: PickerParams | None = None) -> None:
        super().__init__(name, params)
        self._rng = random.Random()

    def pick(self, endpoints: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        if not endpoints:
            return []
        if self.max_num_of_endpoints == 1:
            best = max(scores)
            if scores.count(best) == 1:
                return [endpoints[scores.index(best)]]
            return [endpoints[self._rng.choice([i for i, s in enumerate(scores) if s == best])]]
        order = list(range(len(endpoints)))
        self._rng.shuffle(order)
        order.sort(key=scores.__getitem__, reverse=True)  # stable: shuffled ties stay random
        return [endpoints[i] for i in order[: self.max_num_of_endpoints]]
