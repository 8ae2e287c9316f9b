"""Progressive validation of policies on logged duels (issue 15).

A candidate policy walks the log in order. At each duel it first *predicts* the verdict, the
probability ``p_t`` that the first arm wins, from what it learned on the duels before, then learns
from the duel (``update``, then a posterior refresh where the policy has one). Every prediction is
therefore made out of sample, on the deployment's own traffic, and the per-duel losses form a time
series (Blum, Kalai and Langford 1999, "progressive validation").

Reported per policy (means over seeds of the per-duel values, then over the log, each duel weighted
by its ``weight``):

- **log-loss** ``−[y log p + (1 − y) log(1 − p)]`` (a tie is ``y = ½``; ``p`` clipped to
  ``[1e-6, 1 − 1e-6]``); a policy that always says ½ scores ``ln 2 = 0.693``;
- **accuracy** on the duels that were not ties: 1 when ``p`` is on the side of the verdict, ½ when
  ``p = ½`` exactly, else 0;
- **Brier score** ``(p − y)²``;
- **calibration**: duels binned by ``p`` (10 equal bins), mean ``p`` and observed rate per bin (the
  reliability plot) and the expected calibration error ``Σ_b (n_b/n)·|p̄_b − ȳ_b|``;
- **served share**: the share of duels at which the policy, asked before the update, would have
  served each arm (``best`` over the arms offered that round).

Intervals (95%) come from a moving-block bootstrap over time (blocks of ``⌈n^{1/3}⌉`` consecutive
duels, 1,000 resamples): feedback is autocorrelated (a burst of traffic of one kind), and blocks
keep that structure, where an i.i.d. bootstrap would give intervals that are too narrow.

How each policy predicts (what ``p`` is):

- models of a logistic preference (``fgts_cdb``, ``laplace_ts``, ``maxinp``, ``colstim``):
  ``σ(s_first − s_second)`` with ``s`` the scores under the posterior mean (FGTS.CDB: its running
  mean ``θ̄``; the Laplace family: ``θ̂``), the same scores their ``best`` uses;
- utility estimators (``knn``, ``offline_static``): ``½ + (û_first − û_second)/2``, clipped to
  ``[0.01, 0.99]``: with 0/1 scores and a tie counted as ½, ``P(first wins) = ½ + (p₁ − p₂)/2``
  (ALGORITHM.md §5);
- ``uniform``: ½.

Hindsight references (``best_fixed``, ``best_per_category``, ``oracle``) need the stream's utilities,
which a log does not have: they are refused. Pure numpy; no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.errors import ConfigError
from ray_router.evaluation.duels import DuelLog
from ray_router.policies.base import Duel, Policy
from ray_router.policies.common import sigmoid

EPS = 1e-6
N_BINS = 10
UTILITY_CLIP = 0.01


def predictor(policy: Policy) -> Callable[[np.ndarray, int, int], float]:
    """``predict(x, first, second) -> P(first wins)`` for ``policy`` (see the module docstring)."""
    name = getattr(policy, "name", type(policy).__name__)
    if hasattr(policy, "theta_mean") and hasattr(policy, "arm_scores"):  # FGTS.CDB
        p: Any = policy

        def fgts(x: np.ndarray, i: int, j: int) -> float:
            s = p.arm_scores(x, p.theta_mean)
            return float(sigmoid(s[i] - s[j]))

        return fgts
    if hasattr(policy, "post") and hasattr(policy, "fmap"):  # the Laplace family
        lp: Any = policy

        def laplace(x: np.ndarray, i: int, j: int) -> float:
            s = lp.fmap.scores(lp.theta, x[None, :])[0]
            return float(sigmoid(s[i] - s[j]))

        return laplace
    if name == "knn":
        kp: Any = policy
        return lambda x, i, j: _from_utilities(kp.predict(x), i, j)
    if name == "offline_static":
        op: Any = policy
        return lambda x, i, j: _from_utilities(op.prior.estimate(x[None])[0], i, j)
    if name == "uniform":
        return lambda x, i, j: 0.5
    raise ConfigError(
        f"policy {name!r} cannot predict a duel's verdict (hindsight references need the stream's utilities, "
        "which a log does not have)"
    )


def _from_utilities(u: np.ndarray, i: int, j: int) -> float:
    return float(np.clip(0.5 + (u[i] - u[j]) / 2.0, UTILITY_CLIP, 1.0 - UTILITY_CLIP))


@dataclass(frozen=True)
class ProgressiveRun:
    """One policy, one seed, over the whole log: per-duel predictions and served arms."""

    p: np.ndarray  # (n,) P(first wins), predicted before the update
    served: np.ndarray  # (n,) the arm ``best`` would have served before the update


def run_progressive(
    policy: Policy,
    log: DuelLog,
    refresh_every: int = 1,
    on_progress: Callable[[int, np.ndarray], None] | None = None,
    progress_every: int = 0,
) -> ProgressiveRun:
    """Predict, then learn, duel by duel in log order. ``refresh_every``: a policy with a posterior
    sampler (``refresh``) refreshes after every that many updates (1: after each, as the replay does
    when it selects). ``on_progress(t, p[:t])`` after every ``progress_every`` duels and after the last
    (a sweep's intermediate reports)."""
    n = len(log)
    p = np.empty(n)
    served = np.empty(n, dtype=np.int64)
    predict = predictor(policy)
    refresh = getattr(policy, "refresh", None)
    for t in range(n):
        x = np.asarray(log.X[t], dtype=np.float64)
        a, b, offered = int(log.first[t]), int(log.second[t]), log.offered[t]
        p[t] = predict(x, a, b)
        served[t] = policy.best(x, offered)
        policy.update(x, Duel(a, b), float(log.y[t]), offered)
        if refresh is not None and refresh_every and (t + 1) % refresh_every == 0:
            refresh()
        if on_progress is not None and progress_every and ((t + 1) % progress_every == 0 or t + 1 == n):
            on_progress(t + 1, p[: t + 1])
    return ProgressiveRun(p=p, served=served)


# ---------------------------------------------------------------------------- metrics
def duel_losses(p: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-duel log-loss, Brier score and correctness (NaN on ties, which have no side)."""
    pc = np.clip(p, EPS, 1.0 - EPS)
    logloss = -(y * np.log(pc) + (1.0 - y) * np.log(1.0 - pc))
    brier = (p - y) ** 2
    side = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    correct = np.where(y == 0.5, np.nan, np.where(side == 0.5, 0.5, (side == y).astype(float)))
    return {"log_loss": logloss, "brier": brier, "accuracy": correct}


def reliability(p: np.ndarray, y: np.ndarray, w: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """Reliability bins of the predictions and the expected calibration error."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins = []
    ece = 0.0
    total = float(w.sum())
    for k in range(n_bins):
        m = b == k
        wk = float(w[m].sum())
        if wk <= 0:
            bins.append({"lo": edges[k], "hi": edges[k + 1], "n": int(m.sum()), "p_mean": None, "y_rate": None})
            continue
        pm, yr = float((w[m] * p[m]).sum() / wk), float((w[m] * y[m]).sum() / wk)
        ece += wk / total * abs(pm - yr)
        bins.append({"lo": edges[k], "hi": edges[k + 1], "n": int(m.sum()), "p_mean": pm, "y_rate": yr})
    return {"bins": bins, "ece": ece}


def block_bootstrap_ci(
    values: np.ndarray, weights: np.ndarray, rng: np.random.Generator, n_boot: int = 1000, block: int | None = None
) -> tuple[float, float]:
    """95% moving-block bootstrap interval of the weighted mean of ``values`` (NaN entries ignored)."""
    ok = ~np.isnan(values)
    v, w = np.where(ok, values, 0.0), np.where(ok, weights, 0.0)
    n = len(v)
    if n == 0 or w.sum() <= 0:
        return (math.nan, math.nan)
    L = block or max(1, math.ceil(n ** (1 / 3)))
    L = min(L, n)
    n_blocks = math.ceil(n / L)
    starts = rng.integers(0, n - L + 1, size=(n_boot, n_blocks))
    idx = (starts[:, :, None] + np.arange(L)).reshape(n_boot, -1)[:, :n]
    num, den = (v * w)[idx].sum(axis=1), w[idx].sum(axis=1)
    stats = num[den > 0] / den[den > 0]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return (float(lo), float(hi))


def _wmean(values: np.ndarray, w: np.ndarray) -> float:
    ok = ~np.isnan(values)
    den = float(w[ok].sum())
    return float((values[ok] * w[ok]).sum() / den) if den > 0 else math.nan


@dataclass
class ProgressiveSummary:
    policy: str
    n_duels: int
    n_seeds: int
    metrics: dict[str, dict[str, float]]  # name -> {"mean", "lo", "hi"}
    calibration: dict[str, Any]
    served_share: dict[str, dict[str, float]]  # arm -> {"mean", "lo", "hi"}
    p_mean: np.ndarray = field(repr=False)  # (n,) the seeds' mean prediction per duel
    series: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # metric -> (n,) per duel, seeds' mean

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.policy, "n_duels": self.n_duels, "n_seeds": self.n_seeds}
        for k, v in self.metrics.items():
            out[k], out[f"{k}_lo"], out[f"{k}_hi"] = v["mean"], v["lo"], v["hi"]
        out["ece"] = self.calibration["ece"]
        return out


def summarise(
    policy: str, runs: Sequence[ProgressiveRun], log: DuelLog, seed: int = 0, n_boot: int = 1000
) -> ProgressiveSummary:
    """The metrics of one policy over its seeds' runs on ``log`` (module docstring)."""
    y, w = log.y, log.weight
    per_seed = [duel_losses(r.p, y) for r in runs]
    rng = np.random.default_rng(seed)
    metrics, per_duel = {}, {}
    for name in ("log_loss", "accuracy", "brier"):
        series = np.mean([s[name] for s in per_seed], axis=0)  # a tie stays NaN in every seed
        lo, hi = block_bootstrap_ci(series, w, rng, n_boot)
        metrics[name] = {"mean": _wmean(series, w), "lo": lo, "hi": hi}
        per_duel[name] = series
    p_mean = np.mean([r.p for r in runs], axis=0)
    calibration = reliability(np.concatenate([r.p for r in runs]), np.tile(y, len(runs)), np.tile(w, len(runs)))
    share = {}
    for k, arm in enumerate(log.arm_ids):
        series = np.mean([(r.served == k).astype(float) for r in runs], axis=0)
        if not series.any():
            continue
        lo, hi = block_bootstrap_ci(series, np.ones_like(series), rng, n_boot)
        share[arm] = {"mean": float(series.mean()), "lo": lo, "hi": hi}
    return ProgressiveSummary(policy, len(log), len(runs), metrics, calibration, share, p_mean, per_duel)


def paired_difference(
    a: ProgressiveSummary, b: ProgressiveSummary, metric: str, log: DuelLog, seed: int = 0, n_boot: int = 1000
) -> dict[str, float]:
    """``a`` minus ``b`` on ``metric`` over the same duels: the weighted mean of the per-duel
    difference and its 95% moving-block bootstrap interval (paired: both scored the same log)."""
    diff = a.series[metric] - b.series[metric]
    lo, hi = block_bootstrap_ci(diff, log.weight, np.random.default_rng(seed), n_boot)
    return {"mean": _wmean(diff, log.weight), "lo": lo, "hi": hi}


# ---------------------------------------------------------------------------- outputs
def format_table(summaries: Sequence[ProgressiveSummary]) -> str:
    rows = [f"{'policy':<24} {'log-loss [95% CI]':<26} {'accuracy [95% CI]':<26} {'Brier':>7} {'ECE':>7}"]
    for s in sorted(summaries, key=lambda s: s.metrics["log_loss"]["mean"]):
        m = s.metrics
        ll, acc = m["log_loss"], m["accuracy"]
        rows.append(
            f"{s.policy:<24} {ll['mean']:.4f} [{ll['lo']:.4f}, {ll['hi']:.4f}]   "
            f"{acc['mean']:.4f} [{acc['lo']:.4f}, {acc['hi']:.4f}]   {m['brier']['mean']:7.4f} {s.calibration['ece']:7.4f}"
        )
    return "\n".join(rows)


def plot_reliability(summaries: Sequence[ProgressiveSummary], path: str | Path) -> Path:
    """Reliability diagram: observed win rate of the first arm against the predicted probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    for s in summaries:
        pts = [(b["p_mean"], b["y_rate"]) for b in s.calibration["bins"] if b["p_mean"] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", linewidth=1.5, label=f"{s.policy} (ECE {s.calibration['ece']:.3f})")
    ax.set_xlabel("predicted P(first arm wins)")
    ax.set_ylabel("observed rate (a tie counts ½)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Progressive validation: reliability")
    ax.legend(fontsize=8)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(
    summaries: Sequence[ProgressiveSummary], out_dir: str | Path, meta: Mapping[str, Any]
) -> dict[str, Path]:
    """``summary.json`` (metrics, calibration bins, served shares) and ``reliability.png``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        **dict(meta),
        "policies": [{**s.record(), "calibration": s.calibration, "served_share": s.served_share} for s in summaries],
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=2, allow_nan=True))
    return {"summary": out / "summary.json", "plot": plot_reliability(summaries, out / "reliability.png")}


# ---------------------------------------------------------------------------- drivers
def evaluate_duels(
    table: Any,
    X: np.ndarray,
    cfg: Any,
    log: DuelLog,
    refresh_every: int = 1,
    on_run: Callable[[str, int], None] | None = None,
) -> list[ProgressiveSummary]:
    """Progressive validation of ``cfg.policies`` (with ``cfg``'s per-policy configs) on ``log``, one
    run per seed of ``cfg``. Each seed's policies are built exactly as the replay evaluator builds
    them (the seed's offline split of ``table``, embedded as ``X``, gives the arm embeddings and the
    offline data); the log is mapped onto ``table``'s arms by arm id."""
    from ray_router.policies.base import get_entry

    for name in cfg.policies:
        if get_entry(name).reference is not None or name == "best_fixed":
            raise ConfigError(f"policy {name!r} is a hindsight reference: a log has no utilities to compute it from")
    log = log_for_table(log, table, X)
    runs: dict[str, list[ProgressiveRun]] = {name: [] for name in cfg.policies}
    for seed in range(cfg.base_seed, cfg.base_seed + cfg.n_seeds):
        for name, policy in seed_policies(table, X, cfg, seed).items():
            runs[name].append(run_progressive(policy, log, refresh_every))
            if on_run is not None:
                on_run(name, seed)
    return [summarise(name, rs, log, seed=cfg.base_seed) for name, rs in runs.items()]


def log_for_table(log: DuelLog, table: Any, X: np.ndarray) -> DuelLog:
    """``log`` over ``table``'s arms (by arm id); an error when it names an arm the table lacks or its
    embeddings have another dimension than ``X``'s."""
    log = log.remap(list(table.arms))
    if log.dim != X.shape[1]:
        raise ConfigError(f"the log's embeddings have dim {log.dim}; the encoder gives {X.shape[1]}")
    return log


def seed_policies(table: Any, X: np.ndarray, cfg: Any, seed: int) -> dict[str, Policy]:
    """``cfg.policies`` for ``seed``, fresh, built exactly as the replay evaluator builds them (the
    seed's offline split of ``table``, embedded as ``X``, gives the arm embeddings and offline data;
    each policy's seed is keyed by its name)."""
    from ray_router.evaluation.experiment import _policy_seeds, prepare_seed
    from ray_router.policies.base import make_policy

    env, _ = prepare_seed(table, X, cfg, seed)
    return {
        name: make_policy(name, env, seed=_policy_seeds(name, seed)[0], config=cfg.policy_config(name))
        for name in cfg.policies
    }


def check_encoder(log: DuelLog, identity: str, any_encoder: bool = False, hint: str = "") -> None:
    """A ConfigError when ``log`` was embedded by another encoder than ``identity`` (unless
    ``any_encoder``, or either identity is unknown): its queries and the arm embeddings would not share a space."""
    if log.encoder and identity and log.encoder != identity and not any_encoder:
        raise ConfigError(f"the duel log was embedded by {log.encoder!r}, the policies would use {identity!r}{hint}")


def duels_from_replay(result: Any, stream: Any, arm_ids: Sequence[str], encoder: str = "") -> DuelLog:
    """The duels a replay played (its ``ReplayResult`` on ``stream``) as a duel log: what a deployment
    that had routed that stream would have logged (source ``replay``, weight 1, every arm offered)."""
    n = len(result.rows)
    return DuelLog(
        arm_ids=tuple(arm_ids),
        encoder=encoder,
        X=np.asarray(stream.contexts[result.rows], dtype=np.float32),
        first=np.asarray(result.first, dtype=np.int64),
        second=np.asarray(result.second, dtype=np.int64),
        y=np.asarray(result.outcome, dtype=np.float64),
        offered=[None] * n,
        weight=np.ones(n),
        source=np.array(["replay"] * n, dtype=object),
        ts=np.arange(n, dtype=np.float64),
        seq=np.arange(1, n + 1, dtype=np.int64),
        config_version=np.array([""] * n, dtype=object),
    )
