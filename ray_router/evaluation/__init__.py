"""Replay evaluation on logged benchmarks: environment, runs, many-seed summaries, plots (no Ray)."""

from ray_router.evaluation.env import ReplayEnvironment
from ray_router.evaluation.experiment import EvalConfig, EvalResult, evaluate, format_table, write_outputs
from ray_router.evaluation.replay import ReplayResult, ReplayStream, run_replay
from ray_router.evaluation.stats import mean_ci95

__all__ = [
    "EvalConfig",
    "EvalResult",
    "ReplayEnvironment",
    "ReplayResult",
    "ReplayStream",
    "evaluate",
    "format_table",
    "mean_ci95",
    "run_replay",
    "write_outputs",
]
