"""Ray Tune edge of ray-router: sweeps over CCFT weightings and FGTS.CDB hyperparameters.

The only package that imports ``ray.tune``, and only in :mod:`~ray_router.tune.sweep` (inside its
functions) and :mod:`~ray_router.tune.scheduler`. The sweep file model (:mod:`~ray_router.tune.spec`),
the trial loop (:mod:`~ray_router.tune.trial`) and the data preparation
(:mod:`~ray_router.tune.prepare`) are pure and unit-tested without a cluster.

    ray-router tune tune_jobs/paper_sweep.yaml [--smoke-test] [--address auto] [--storage-path DIR]

A sweep with ``objective: {duels: FILE, metric: log_loss}`` (or ``--duels FILE``) scores its trials by
progressive validation on a deployment's logged duels instead of a replay (:mod:`~ray_router.tune.duels`).
"""

from ray_router.tune.spec import EmbeddingChoice, SweepSpec, load_sweep, parse_sweep
from ray_router.tune.sweep import SweepOutcome, check_resources, run_sweep

__all__ = ["EmbeddingChoice", "SweepOutcome", "SweepSpec", "check_resources", "load_sweep", "parse_sweep", "run_sweep"]
