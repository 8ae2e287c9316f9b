"""ASHA per group: trials compete only with trials of the same dataset, split and split seed.

One sweep runs every configuration on several groups whose regret levels differ (RouterBench's 11
arms vs RouterDC's 7, a held-out category vs none). A single ASHA would compare them with each other
and stop every trial of the harder group. :class:`GroupedASHA` keeps one
:class:`~ray.tune.schedulers.AsyncHyperBandScheduler` per group and forwards each event to the
trial's own one; everything else (state save/restore with the tuner, FIFO choice of the next trial)
is Tune's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from ray_router import raycompat


def _default_group(config: dict[str, Any]) -> str:
    return f"{config.get('dataset')}|{config.get('split')}|{config.get('split_seed')}"


class GroupedASHA(FIFOScheduler):
    """:class:`AsyncHyperBandScheduler` arguments, plus ``group_of(config) -> hashable``."""

    def __init__(self, group_of: Callable[[dict[str, Any]], Any] = _default_group, **asha_kwargs: Any):
        super().__init__()
        self._group_of = group_of
        self._metric = asha_kwargs.pop("metric", None)
        self._mode = asha_kwargs.pop("mode", None)
        self._asha_kwargs = dict(asha_kwargs)
        self._schedulers: dict[Any, AsyncHyperBandScheduler] = {}
        self._trial_group: dict[str, Any] = {}

    # --------------------------------------------------------------- plumbing
    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        for s in self._schedulers.values():
            s.set_search_properties(self._metric, self._mode)
        return True

    def _sched(self, trial: Trial) -> AsyncHyperBandScheduler:
        group = self._trial_group.get(trial.trial_id)
        if group is None:
            group = self._group_of(trial.config)
            self._trial_group[trial.trial_id] = group
        s = self._schedulers.get(group)
        if s is None:
            s = AsyncHyperBandScheduler(metric=self._metric, mode=self._mode, **self._asha_kwargs)
            self._schedulers[group] = s
        return s

    def _known(self, sched: AsyncHyperBandScheduler, tune_controller, trial: Trial) -> None:
        if not raycompat.asha_knows(sched, trial.trial_id):  # e.g. a trial restored from an interrupted run
            sched.on_trial_add(tune_controller, trial)

    # ----------------------------------------------------------------- events
    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._sched(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        s = self._sched(trial)
        self._known(s, tune_controller, trial)
        return s.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        s = self._sched(trial)
        self._known(s, tune_controller, trial)
        s.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        raycompat.asha_forget(self._sched(trial), trial.trial_id)

    def debug_string(self) -> str:
        stopped = sum(s._num_stopped for s in self._schedulers.values())
        return f"GroupedASHA: {len(self._schedulers)} groups, {stopped} trials stopped early"

    @property
    def num_stopped(self) -> int:
        return sum(s._num_stopped for s in self._schedulers.values())


__all__ = ["GroupedASHA", "TrialScheduler"]
