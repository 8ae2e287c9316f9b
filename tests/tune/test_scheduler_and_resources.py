"""Per-group ASHA and the resource check (no cluster needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ray_router.errors import ConfigError
from ray_router.tune.spec import ResourcesSpec
from ray_router.tune.sweep import check_resources


def _trial(i: int, dataset: str):
    return SimpleNamespace(trial_id=f"t{i}", config={"dataset": dataset, "split": "stratified", "split_seed": 0})


def test_grouped_asha_compares_trials_only_within_their_group():
    from ray.tune.schedulers import TrialScheduler

    from ray_router.tune.scheduler import GroupedASHA

    s = GroupedASHA(time_attr="rounds_played", max_t=400, grace_period=100, reduction_factor=2)
    assert s.set_search_properties("mean_regret", "min")
    easy = [_trial(i, "easy") for i in range(4)]
    hard = [_trial(10 + i, "hard") for i in range(4)]
    for t in easy + hard:
        s.on_trial_add(None, t)
    # the easy group's trials all have far lower regret than any trial of the hard group
    for k, t in enumerate(easy):
        s.on_trial_result(None, t, {"rounds_played": 100, "mean_regret": 0.01 * (k + 1)})
    decisions = {
        t.trial_id: s.on_trial_result(None, t, {"rounds_played": 100, "mean_regret": 0.5 + 0.01 * k})
        for k, t in enumerate(hard)
    }
    # within the hard group the first trial sets the bar: a single ASHA over both groups would stop all four
    assert decisions["t10"] == TrialScheduler.CONTINUE
    assert TrialScheduler.STOP in decisions.values()
    assert s.on_trial_result(None, hard[0], {"rounds_played": 400, "mean_regret": 0.5}) == TrialScheduler.STOP  # max_t
    s.on_trial_complete(None, hard[0], {"rounds_played": 400, "mean_regret": 0.5})
    s.on_trial_remove(None, hard[1])
    # a trial restored from an interrupted run is unknown to the scheduler: it is added on first sight
    restored = _trial(99, "easy")
    assert s.on_trial_result(None, restored, {"rounds_played": 100, "mean_regret": 0.001}) == TrialScheduler.CONTINUE
    assert "2 groups" in s.debug_string()


def test_grouped_asha_pickles_with_the_tuner():
    import pickle

    from ray_router.tune.scheduler import GroupedASHA

    s = GroupedASHA(time_attr="rounds_played", max_t=10, grace_period=1)
    s.set_search_properties("mean_regret", "min")
    s.on_trial_add(None, _trial(1, "a"))
    assert pickle.loads(pickle.dumps(s)).debug_string() == s.debug_string()


CASES = [
    # (request, total, available, expected concurrency or error text)
    ((1, 0), {"CPU": 2}, {"CPU": 2}, 2),
    ((0.5, 0), {"CPU": 2}, {"CPU": 2}, 4),
    ((2, 0), {"CPU": 2}, {"CPU": 2}, 1),
    ((3, 0), {"CPU": 2}, {"CPU": 2}, "asks for 3 CPUs but the Ray cluster has 2 CPUs in all"),
    ((1, 1), {"CPU": 2}, {"CPU": 2}, "asks for 1 GPUs but the Ray cluster has 0"),
    ((1, 0), {"CPU": 2}, {"CPU": 0}, "only 0 CPUs"),  # e.g. Serve replicas hold both CPUs
    ((1, 1), {"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}, 2),
]


@pytest.mark.parametrize("request_,total,available,expected", CASES)
def test_check_resources(request_, total, available, expected):
    req = ResourcesSpec(cpu=request_[0], gpu=request_[1])
    if isinstance(expected, int):
        assert check_resources(req, total, available) == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            check_resources(req, total, available)
