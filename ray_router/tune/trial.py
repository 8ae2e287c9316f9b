"""One trial: FGTS.CDB replays on one group's data, reporting cumulative regret every N rounds.

Pure (no Ray): :mod:`ray_router.tune.sweep` wraps :func:`run_trial` into a Tune trainable whose
``report`` is ``tune.report``; tests call it with a list's ``append``.

A trial plays ``eval.n_seeds`` seeds one after the other (the same seeds, hence the same streams,
for every trial of a group: common random numbers), ``eval.n_rounds`` rounds each. Each report says

- ``rounds_played``: rounds played so far over all seeds (the scheduler's time axis);
- ``cum_regret``: cumulative regret of the current seed at ``round``;
- ``mean_regret``: mean per-round regret over every round played so far (the scheduler's metric;
  trials of one group are compared at equal ``rounds_played``, i.e. on the same rounds);
- at the end: ``cum_regret_mean`` and its 95% interval over the seeds (``complete`` = True).

After each seed the state (finished seeds' regrets) is handed to ``report`` as a checkpoint, so a
resumed trial skips the seeds it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ray_router.config import parse
from ray_router.data.table import RoutingTable
from ray_router.evaluation.experiment import EvalConfig, run_seed
from ray_router.evaluation.stats import mean_ci95
from ray_router.tune.spec import SweepSpec, section_values

# WeightingConfig field -> EvalConfig field
WEIGHTING_TO_EVAL = {
    "name": "weighting",
    "beta": "weighting_beta",
    "top_tau": "weighting_tau",
    "cost_weight": "weighting_cost_weight",
}

Report = Callable[[dict, "dict | None"], None]


def group_key(dataset: str, split: str, split_seed: int) -> str:
    return f"{dataset}|{split}|{int(split_seed)}"


def config_group(config: Mapping[str, Any]) -> str:
    return group_key(config["dataset"], config["split"], config["split_seed"])


def encoder_of(spec: SweepSpec, config: Mapping[str, Any]) -> str:
    return str(section_values(spec, config, "embedding").get("encoder", "base"))


def trial_eval_config(
    spec: SweepSpec,
    config: Mapping[str, Any],
    split_kwargs: Mapping[str, Any],
    policies: tuple[str, ...] = ("fgts_cdb",),
    **overrides: Any,
) -> EvalConfig:
    """The EvalConfig of one trial configuration on one group (``split_kwargs``: the group's split
    fields with the held-out category resolved). ``overrides``: e.g. fresh ``base_seed``/``n_seeds``."""
    weighting = {WEIGHTING_TO_EVAL[k]: v for k, v in section_values(spec, config, "weighting").items()}
    fgts = {"fgts_cdb": section_values(spec, config, "fgts_cdb")} if "fgts_cdb" in policies else {}
    values = {**spec.eval, **weighting, **split_kwargs, **overrides, "policies": policies, "policy_configs": fgts}
    return parse(EvalConfig, values, where="trial configuration")


def new_state() -> dict:
    return {"finals": [], "regret_sum": 0.0, "rounds_played": 0, "seconds": 0.0}


def run_trial(
    table: RoutingTable,
    X: np.ndarray,
    cfg: EvalConfig,
    report: Report,
    report_every: int = 100,
    state: Mapping[str, Any] | None = None,
) -> dict:
    """Replay ``cfg.policies[0]`` over ``cfg.seeds``, calling ``report(metrics, checkpoint_state)``
    every ``report_every`` rounds (``checkpoint_state`` is a JSON-able dict after each finished seed,
    else None). ``state``: a checkpoint to resume from. Returns the last metrics."""
    state = {**new_state(), **dict(state or {})}
    state["finals"] = list(state["finals"])
    name = cfg.policies[0]
    T, seeds = cfg.n_rounds, cfg.seeds
    last: dict = {}
    for i, seed in enumerate(seeds):
        if i < len(state["finals"]):
            continue  # finished before an interruption
        base_sum, base_played = float(state["regret_sum"]), int(state["rounds_played"])
        t0 = time.perf_counter()

        def hook(
            policy: str, t: int, regret: np.ndarray, i=i, seed=seed, base_sum=base_sum, base_played=base_played, t0=t0
        ) -> None:
            nonlocal last
            if policy != name:
                return
            cum = float(regret.sum())
            played = base_played + t
            metrics = {
                "rounds_played": played,
                "seed": int(seed),
                "seed_index": i,
                "round": t,
                "cum_regret": cum,
                "mean_regret": (base_sum + cum) / played,
                "seeds_done": len(state["finals"]),
                "complete": False,
                "cum_regret_mean": float("nan"),
                "cum_regret_ci_low": float("nan"),
                "cum_regret_ci_high": float("nan"),
            }
            checkpoint = None
            if t == T:
                state["finals"].append(cum)
                state["regret_sum"] = base_sum + cum
                state["rounds_played"] = played
                state["seconds"] = float(state["seconds"]) + time.perf_counter() - t0
                metrics["seeds_done"] = len(state["finals"])
                if len(state["finals"]) == len(seeds):
                    mean, lo, hi = mean_ci95(np.asarray(state["finals"]))
                    metrics.update(
                        complete=True,
                        cum_regret_mean=float(mean),
                        cum_regret_ci_low=float(lo),
                        cum_regret_ci_high=float(hi),
                    )
                checkpoint = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}
            last = metrics
            report(metrics, checkpoint)

        run_seed(table, X, cfg, seed, on_progress=hook, progress_every=report_every)
    if not last and len(state["finals"]) == len(seeds):  # resumed after its last seed: report the result again
        mean, lo, hi = mean_ci95(np.asarray(state["finals"], dtype=np.float64))
        last = {
            "rounds_played": int(state["rounds_played"]),
            "seed": int(seeds[-1]),
            "seed_index": len(seeds) - 1,
            "round": T,
            "cum_regret": float(state["finals"][-1]),
            "mean_regret": float(state["regret_sum"]) / max(1, int(state["rounds_played"])),
            "seeds_done": len(seeds),
            "complete": True,
            "cum_regret_mean": float(mean),
            "cum_regret_ci_low": float(lo),
            "cum_regret_ci_high": float(hi),
        }
        report(last, None)
    return last
