"""Formulas of the default-profile scorers and the pickers, with their edge cases."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import pytest
from helpers import endpoint, request

from llmepp.datalayer.endpoint import Endpoint
from llmepp.framework.datakeys import PREFIX_CACHE_MATCH_INFO, PrefixMatchInfo, scoped
from llmepp.framework.plugin import PluginContext
from llmepp.framework.scheduling import Filter, PickerParams, Scorer
from llmepp.observability.metrics import EppMetrics
from llmepp.observability.plugin_timing import PluginTimers
from llmepp.plugins.pickers.max_score import MaxScorePicker
from llmepp.plugins.pickers.random_picker import RandomPicker
from llmepp.plugins.pickers.weighted_random import WeightedRandomPicker
from llmepp.plugins.producers.approx_prefix import ApproxPrefixCacheProducer
from llmepp.plugins.scorers.kv_cache_utilization import KVCacheUtilizationScorer
from llmepp.plugins.scorers.prefix_cache import PrefixCacheScorer
from llmepp.plugins.scorers.queue import QueueScorer
from llmepp.plugins.scorers.running_requests import RunningRequestsSizeScorer
from llmepp.request.types import InferenceRequest
from llmepp.scheduling.profile import SchedulerProfile, WeightedScorer


def test_queue_scorer_min_max() -> None:
    eps = [endpoint(0, queue=0), endpoint(1, queue=5), endpoint(2, queue=10)]
    assert QueueScorer("q").score(request(), eps) == [1.0, 0.5, 0.0]


def test_queue_scorer_all_equal_and_empty() -> None:
    assert QueueScorer("q").score(request(), [endpoint(0, queue=3), endpoint(1, queue=3)]) == [1.0, 1.0]
    assert QueueScorer("q").score(request(), []) == []


def test_the_shortest_queue_scores_exactly_one() -> None:
    # (max - q) / (max - min) divides, as the reference: 49 * (1 / 49) is 0.9999999999999999, which would
    # turn a tie with another scorer's 1.0 into a fixed pick (below).
    eps = [endpoint(0, queue=0, running=0), endpoint(1, queue=49, running=49)]
    assert QueueScorer("q").score(request(), eps) == [1.0, 0.0]
    assert RunningRequestsSizeScorer("r").score(request(), eps) == [1.0, 0.0]


def test_a_tie_between_scorers_is_broken_at_random() -> None:
    # pod-0: shortest queue, full KV; pod-1: longest queue (span 49), empty KV: both total 1.0.
    profile = SchedulerProfile(
        name="default",
        picker=MaxScorePicker("p"),
        scorers=[WeightedScorer(QueueScorer("q"), 1.0), WeightedScorer(KVCacheUtilizationScorer("kv"), 1.0)],
    )
    eps = [endpoint(0, queue=0, kv=1.0), endpoint(1, queue=49, kv=0.0)]
    assert {profile.run(request(), eps).targets[0].name for _ in range(300)} == {"pod-0", "pod-1"}


def test_queue_scorer_leaves_a_never_scraped_endpoint_unscored() -> None:
    # As the reference's current queue scorer: an endpoint with no written metrics scores 0 and is
    # left out of the range, so a pod that just joined (or whose /metrics never answers) does not
    # read as the idlest one and draw every request until its first scrape.
    eps = [endpoint(0, queue=4), endpoint(1, scraped=False), endpoint(2, queue=8)]
    assert QueueScorer("q").score(request(), eps) == [1.0, 0.0, 0.0]
    assert QueueScorer("q").score(request(), [endpoint(0, queue=4), endpoint(1, scraped=False)]) == [1.0, 0.0]
    assert QueueScorer("q").score(request(), [endpoint(0, scraped=False), endpoint(1, scraped=False)]) == [0.0, 0.0]


def test_kv_cache_scorer() -> None:
    eps = [endpoint(0, kv=0.0), endpoint(1, kv=0.25), endpoint(2, kv=1.0)]
    assert KVCacheUtilizationScorer("kv").score(request(), eps) == [1.0, 0.75, 0.0]


def test_kv_cache_scorer_leaves_a_never_scraped_endpoint_unscored() -> None:
    eps = [endpoint(0, kv=0.5), endpoint(1, scraped=False)]
    assert KVCacheUtilizationScorer("kv").score(request(), eps) == [0.5, 0.0]


def _prefix_scorer(**params: object) -> tuple[PrefixCacheScorer, str]:
    producer = ApproxPrefixCacheProducer("approx", ApproxPrefixCacheProducer.Params())
    scorer = PrefixCacheScorer("prefix", PrefixCacheScorer.Params(**params))  # type: ignore[arg-type]
    scorer.setup(PluginContext({"approx": producer, "prefix": scorer}, None, None, None))
    return scorer, scoped(PREFIX_CACHE_MATCH_INFO, "approx")


def test_prefix_scorer_matched_fraction() -> None:
    scorer, key = _prefix_scorer()
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    req = request()
    req.data[key] = PrefixMatchInfo(block_size=64, total_blocks=4, hits={eps[0]: 4, eps[1]: 1}, hashes=[1, 2, 3, 4])
    assert scorer.score(req, eps) == [1.0, 0.25, 0.0]


def test_prefix_scorer_match_length_weight() -> None:
    scorer, key = _prefix_scorer(match_length_weight=0.5, match_length_scale_tokens=256)
    eps = [endpoint(0), endpoint(1)]
    req = request()
    req.data[key] = PrefixMatchInfo(block_size=64, total_blocks=8, hits={eps[0]: 2, eps[1]: 8}, hashes=[0] * 8)
    # e0: 0.5*min(1, 128/256)^2 + 0.5*2/8 = 0.125 + 0.125; e1: 0.5*1 + 0.5*1
    assert scorer.score(req, eps) == pytest.approx([0.25, 1.0])


def test_prefix_scorer_without_data_scores_zero() -> None:
    scorer, _ = _prefix_scorer()
    assert scorer.score(request(prompt=None), [endpoint(0), endpoint(1)]) == [0.0, 0.0]


def test_max_score_picker_picks_best() -> None:
    eps = [endpoint(i) for i in range(4)]
    assert MaxScorePicker("p").pick(eps, [0.1, 0.9, 0.3, 0.2]) == [eps[1]]


def test_max_score_picker_breaks_ties_at_random() -> None:
    eps = [endpoint(i) for i in range(3)]
    picker = MaxScorePicker("p")
    seen = Counter(picker.pick(eps, [1.0, 1.0, 0.5])[0].name for _ in range(400))
    assert set(seen) == {"pod-0", "pod-1"}
    assert min(seen.values()) > 120  # roughly even, never the lower score


def test_max_score_picker_fallback_list_is_ordered() -> None:
    eps = [endpoint(i) for i in range(5)]
    picker = MaxScorePicker("p", PickerParams(max_num_of_endpoints=3))
    assert [e.name for e in picker.pick(eps, [0.2, 0.9, 0.5, 0.7, 0.1])] == ["pod-1", "pod-3", "pod-2"]
    assert len(picker.pick(eps[:2], [0.1, 0.2])) == 2


def test_random_picker_ignores_scores() -> None:
    eps = [endpoint(i) for i in range(3)]
    picker = RandomPicker("r")
    seen = Counter(picker.pick(eps, [1.0, 0.0, 0.0])[0].name for _ in range(300))
    assert set(seen) == {"pod-0", "pod-1", "pod-2"}
    many = RandomPicker("r", PickerParams(max_num_of_endpoints=5)).pick(eps, [0.0] * 3)
    assert sorted(e.name for e in many) == ["pod-0", "pod-1", "pod-2"]


# -- the profile's clamp: what a scorer hands the picker -------------------------------------------
class _Column(Scorer):
    """A scorer answering a fixed column (stands for any scorer fed a NaN: an attribute a producer
    published as NaN, a min-max over values whose span overflows, a plugin bug)."""

    type = "column-test-scorer"

    def __init__(self, column: list[float]) -> None:
        super().__init__("column")
        self.column = column

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return list(self.column)


NAN = float("nan")


@pytest.mark.parametrize(
    ("column", "winners"),
    [
        ([NAN, 0.5, 0.9], {2}),  # NaN first: max-score-picker always took it (nothing compares above NaN)
        ([0.5, NAN, 0.9], {2}),
        ([NAN, NAN, NAN], {0, 1, 2}),  # every score NaN: IndexError (no score equals max(), which is NaN)
        ([NAN, 2.0, -1.0], {1}),
        ([0.2, NAN, 0.1], {0}),
    ],
)
def test_profile_clamps_nan_scores_to_zero(column: list[float], winners: set[int]) -> None:
    eps = [endpoint(i) for i in range(3)]
    for picker in (MaxScorePicker("max"), WeightedRandomPicker("wr")):
        # A weight 0 does not make a NaN harmless (0 · NaN is NaN): still clamped.
        profile = SchedulerProfile(
            "p", picker, scorers=[WeightedScorer(_Column(column), 1.0), WeightedScorer(QueueScorer("q"), 0.0)]
        )
        picked: Counter[int] = Counter()
        for _ in range(300):
            result = profile.run(request(), eps)
            assert all(0.0 <= t <= 1.0 for t in result.totals), result.totals
            picked[eps.index(result.targets[0])] += 1
        expected = winners if isinstance(picker, MaxScorePicker) else {i for i, s in enumerate(column) if s > 0.0}
        assert set(picked) == (expected or {0, 1, 2}), (picker.type, column, picked)


class _Broken(Scorer):
    """A scorer with a bug: a column of the wrong length, or an exception."""

    type = "broken-test-scorer"

    def __init__(self, column: list[float] | None) -> None:
        super().__init__("broken")
        self.column = column

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.column is None:
            raise ZeroDivisionError("plugin bug")
        return list(self.column)


@pytest.mark.parametrize("column", [[1.0], [1.0, 1.0, 1.0, 1.0], [], None])
def test_a_broken_scorer_counts_as_zero_and_is_logged_once(
    column: list[float] | None, caplog: pytest.LogCaptureFixture
) -> None:
    """As the reference, whose scorers answer a map (an endpoint it lacks scores 0): a column of the
    wrong length (or a raising scorer) contributes nothing; the other scorers still decide, and the bug
    is logged once, not as a traceback per request."""
    eps = [endpoint(0, queue=8), endpoint(1, queue=0), endpoint(2, queue=4)]
    profile = SchedulerProfile(
        "p",
        MaxScorePicker("max"),
        scorers=[WeightedScorer(_Broken(column), 5.0), WeightedScorer(QueueScorer("q"), 1.0)],
    )
    with caplog.at_level(logging.ERROR, logger="llmepp.scheduling"):
        for _ in range(5):
            result = profile.run(request(), eps)
            assert result.targets == [eps[1]]
            assert result.totals == [0.0, 1.0, 0.5]
    assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 1


# -- the profile's guard on filters: what a third-party filter hands the scorers -------------------
class _Extra(Filter):
    """A filter with a bug: it answers more endpoints than it was given (a repeat, or one not given)."""

    type = "extra-test-filter"

    def __init__(self, extra: Endpoint | None) -> None:
        super().__init__("extra")
        self.extra = extra

    def filter(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        # The pool's endpoints again (a repeat each), or a stale one the pool no longer holds.
        return [*endpoints, *endpoints] if self.extra is None else [endpoints[1], self.extra, *endpoints]


class _Seen(Scorer):
    type = "seen-test-scorer"

    def __init__(self) -> None:
        super().__init__("seen")
        self.seen: list[list[Endpoint]] = []

    def score(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        self.seen.append(list(endpoints))
        return [0.5] * len(endpoints)


@pytest.mark.parametrize("stale", [False, True])
@pytest.mark.parametrize("timed", [False, True])
def test_a_filter_answering_more_than_it_was_given_is_cut_to_its_input_once_each(
    stale: bool, timed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Scorers and pickers never see an endpoint twice (two fallbacks to one endpoint) or one the
    filter was not given (a pod removed from the pool): the filter's answer keeps each endpoint it
    was given once, in its order, and the bug is logged once per 30 s, not per request."""
    eps = [endpoint(i) for i in range(3)]
    seen = _Seen()
    profile = SchedulerProfile(
        "p",
        MaxScorePicker("max", PickerParams(max_num_of_endpoints=5)),
        filters=[_Extra(endpoint(9) if stale else None)],
        scorers=[WeightedScorer(seen, 1.0)],
    )
    timers = PluginTimers(EppMetrics().plugin_duration) if timed else None
    expected = [eps[1], eps[0], eps[2]] if stale else eps
    with caplog.at_level(logging.ERROR, logger="llmepp.scheduling"):
        for _ in range(5):
            result = profile.run(request(), eps, timers)
            assert list(result.candidates) == expected and seen.seen.pop() == expected
            assert sorted(result.targets, key=eps.index) == eps  # each once
    assert len([r for r in caplog.records if "'extra'" in r.getMessage()]) == 1
