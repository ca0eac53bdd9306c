"""`max-score-picker`: the highest total score wins; ties are broken at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Picker


class MaxScorePicker(Picker):
    """Returns the `maxNumOfEndpoints` (1) best endpoints, best first.

    Equivalent to the reference's shuffle-then-stable-sort: equal scores come out in random
    order. With one target it is a single pass (max, then a random choice among the ties).
    """

    type = "max-score-picker"

    def __init__(self, name: str, params: Picker.Params | None = None) -> None:  # type: ignore[name-defined]
        super().__init__(name, params)
        self._rng = random.Random()

    def pick(self, endpoints: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        if not endpoints:
            return []
        if self.max_num_of_endpoints == 1:
            best = max(scores)
            ties = [i for i, s in enumerate(scores) if s == best]
            i = ties[0] if len(ties) == 1 else self._rng.choice(ties)
            return [endpoints[i]]
        order = list(range(len(endpoints)))
        self._rng.shuffle(order)
        order.sort(key=scores.__getitem__, reverse=True)  # stable: shuffled ties stay random
        return [endpoints[i] for i in order[: self.max_num_of_endpoints]]
