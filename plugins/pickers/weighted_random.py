"""`weighted-random-picker`: pick endpoints at random with probability proportional to score."""

from __future__ import annotations

import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import accumulate

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.scheduling import Picker, PickerParams

_LOG = math.log


class WeightedRandomPicker(Picker):
    """A-Res weighted sampling without replacement (Efraimidis–Spirakis):

        key(e) = U^(1/score(e)),  U uniform in (0, 1) (a drawn 0 becomes 1e-10)
        targets = the `maxNumOfEndpoints` (1) endpoints with the largest keys, largest first

    so the first target is endpoint e with probability score(e) / Σ score. Endpoints scoring
    ≤ 0 get key 0 (they come last, in random order, only if more targets are asked for than there
    are positive scores). When every score is ≤ 0 it picks uniformly at random (as random-picker).

    Why: max-score-picker sends every similar request to the same top endpoint (hot-spotting);
    sampling by score spreads them in proportion to how good each endpoint is — the picker the
    reference pairs with prefix-cache-affinity-filter and latency scoring.

    For one target this is the inverse-CDF draw (one random number over the cumulative
    positive scores), which has exactly that distribution and costs one C-level pass; for
    several, keys are compared as ln(U)/score (the same order as U^(1/score), a monotone
    transform that cannot overflow for tiny scores). Parameters: `maxNumOfEndpoints` (1).
    """

    type = "weighted-random-picker"

    def __init__(self, name: str, params: PickerParams | None = None) -> None:
        super().__init__(name, params)
        self._rng = random.Random()

    def pick(self, endpoints: Sequence[Endpoint], scores: Sequence[float]) -> list[Endpoint]:
        n = len(endpoints)
        if not n:
            return []
        k = self.max_num_of_endpoints
        if max(scores) <= 0.0:
            if k == 1:
                return [self._rng.choice(endpoints)]
            return self._rng.sample(list(endpoints), min(k, n))
        if k == 1:
            cumulative = list(accumulate([s if s > 0.0 else 0.0 for s in scores]))
            total = cumulative[-1]
            i = bisect_right(cumulative, self._rng.random() * total)
            if i == n:  # random()·total rounded up to total (tiny totals): the last positive score
                i = bisect_left(cumulative, total)
            return [endpoints[i]]
        rnd, log = self._rng.random, _LOG
        keys = {i: log(rnd() or 1e-10) / s for i, s in enumerate(scores) if s > 0.0}
        order = sorted(keys, key=keys.__getitem__, reverse=True)[:k]
        if len(order) < k:  # then the scores ≤ 0 (all key 0), in random order: not candidate order
            rest = [i for i, s in enumerate(scores) if not s > 0.0]
            order += self._rng.sample(rest, min(k - len(order), len(rest)))
        return [endpoints[i] for i in order]
