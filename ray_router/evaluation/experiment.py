"""Many-seed replay evaluation: split, model embeddings, stream, every policy, summary with 95% CIs.

Each seed fixes the offline/online split, the order of the online stream, the policies' RNG and
the judge's RNG. Every policy of one seed sees the same split and the same stream (common random
numbers), so differences between policies are not differences of luck in the stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ray_router.data.table import RoutingTable
from ray_router.errors import ConfigError
from ray_router.evaluation.replay import ReplayResult, ReplayStream, run_replay
from ray_router.evaluation.stats import mean_ci95
from ray_router.policies.base import PolicyEnv, get_entry, make_policy

SPLITS = ("stratified", "k_per_category", "holdout")


@dataclass(frozen=True)
class EvalConfig:
    """One replay experiment. Policy hyperparameters go in ``policy_configs[name]`` (field names)."""

    policies: tuple[str, ...] = ("fgts_cdb", "uniform")
    n_seeds: int = 5
    base_seed: int = 0
    n_rounds: int = 2000
    cost_weight: float = 0.0  # λ in r = score − λ·cost_norm
    kappa: float = 10.0  # judge sharpness; inf = noiseless
    use_pairwise_labels: bool = True  # real labels (MixInstruct cmp_results) where present
    split: str = "stratified"  # stratified | k_per_category | holdout
    offline_fraction: float = 0.2
    k_per_category: int = 5
    held_out: str | None = None  # category held out of the offline part (split="holdout")
    split_seed: int | None = None  # fix the offline/online split for every seed (None: each seed splits anew)
    weighting: str = "perf"
    weighting_beta: float = 10.0
    weighting_tau: int = 3
    weighting_cost_weight: float | None = None  # λ inside the weighting; None = cost_weight
    policy_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError("at least one policy is needed")
        for name in self.policies:
            get_entry(name)  # raises on an unknown name
        for name, values in self.policy_configs.items():
            entry = get_entry(name)
            names = {f.name for f in dataclasses.fields(entry.config_cls)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ConfigError(f"policy {name!r} has no field(s) {unknown}; fields: {sorted(names)}")
        if self.n_seeds < 1 or self.n_rounds < 1:
            raise ConfigError("n_seeds and n_rounds must be >= 1")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.split == "holdout" and not self.held_out:
            raise ConfigError("split='holdout' needs held_out=<category>")
        if not 0 < self.offline_fraction < 1:
            raise ConfigError("offline_fraction must be in (0, 1)")
        if not self.kappa > 0:
            raise ConfigError("kappa must be > 0 (inf = noiseless judge)")

    @property
    def seeds(self) -> list[int]:
        return [self.base_seed + i for i in range(self.n_seeds)]

    def policy_config(self, name: str) -> Any:
        from ray_router.policies.base import config_from_dict

        return config_from_dict(get_entry(name).config_cls, self.policy_configs.get(name))


@dataclass
class EvalResult:
    records: list[dict]
    curves: "Any"  # pandas.DataFrame: one row per (policy, seed, round)
    runs: dict[tuple[str, int], ReplayResult] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- preparation
def make_split(table: RoutingTable, cfg: EvalConfig, seed: int):
    from ray_router.data import splits

    cats = table.categories
    if cfg.split == "stratified":
        return splits.stratified_split(cats, offline_fraction=cfg.offline_fraction, seed=seed)
    if cfg.split == "k_per_category":
        return splits.k_per_category(cats, k=cfg.k_per_category, seed=seed)
    if cfg.held_out not in set(table.category_names):
        raise ConfigError(f"held-out category {cfg.held_out!r} not in {list(table.category_names)}")
    return splits.hold_out_category(cats, held_out=cfg.held_out, offline_fraction=cfg.offline_fraction, seed=seed)


def arm_embeddings_for(table: RoutingTable, X: np.ndarray, offline: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """Model embeddings a_k from the offline rows (ALGORITHM.md s.3) with the configured weighting."""
    from ray_router.embeddings.model_embeddings import (
        WeightingConfig,
        category_stats,
        model_embeddings,
        normalise_costs,
    )

    lam = cfg.cost_weight if cfg.weighting_cost_weight is None else cfg.weighting_cost_weight
    wcfg = WeightingConfig(name=cfg.weighting, cost_weight=lam, top_tau=cfg.weighting_tau, beta=cfg.weighting_beta)
    offline_cats = table.categories[offline]
    names = tuple(dict.fromkeys(str(c) for c in offline_cats))
    P, C = category_stats(table, offline, names)
    return model_embeddings(X[offline], offline_cats, P, normalise_costs(C), wcfg, category_names=names)


def make_stream(
    table: RoutingTable, X: np.ndarray, online: np.ndarray, cfg: EvalConfig, rng: np.random.Generator
) -> ReplayStream:
    n = len(online)
    reps = math.ceil(cfg.n_rounds / n)
    order = np.concatenate([rng.permutation(n) for _ in range(reps)])[: cfg.n_rounds]
    sub = table.subset(online)
    pairwise = sub.pairwise.lookup() if (cfg.use_pairwise_labels and sub.pairwise is not None) else None
    return ReplayStream(
        contexts=np.asarray(X[online], dtype=np.float64),
        utilities=sub.utilities(cfg.cost_weight, normaliser=table.cost_normaliser()),
        scores=sub.scores,
        costs=sub.costs if sub.costs is not None else np.zeros_like(sub.scores),
        order=order,
        pairwise=pairwise,
    )


def _seed_streams(seed: int) -> tuple[int, np.random.Generator]:
    """Independent streams of one seed: the split's seed and the stream-order RNG."""
    split_ss, order_ss = np.random.SeedSequence(seed).spawn(2)
    return int(split_ss.generate_state(1)[0]), np.random.default_rng(order_ss)


def run_seed(
    table: RoutingTable,
    X: np.ndarray,
    cfg: EvalConfig,
    seed: int,
    progress: bool = False,
    on_progress: Callable[[str, int, np.ndarray], None] | None = None,
    progress_every: int = 0,
) -> dict[str, ReplayResult]:
    """All policies of one seed on the same split and stream.

    ``on_progress(policy, t, regret)``: see :func:`run_replay` (called every ``progress_every`` rounds)."""
    split_seed, order_rng = _seed_streams(seed)
    split = make_split(table, cfg, split_seed if cfg.split_seed is None else cfg.split_seed)
    needs_emb = any(get_entry(p).needs_embeddings for p in cfg.policies)
    A = arm_embeddings_for(table, X, split.offline, cfg) if needs_emb else None
    stream = make_stream(table, X, split.online, cfg, order_rng)
    offline = split.offline
    env = PolicyEnv(
        n_arms=table.n_arms,
        arm_embeddings=A,
        hindsight_utility=stream.hindsight_utility,
        offline={  # for supervised baselines: the offline rows only, never the online stream
            "X": np.asarray(X[offline], dtype=np.float64),
            "utilities": table.utilities(cfg.cost_weight, normaliser=table.cost_normaliser())[offline],
            "scores": table.scores[offline],
            "categories": table.categories[offline],
        },
    )
    out = {}
    for name in cfg.policies:
        # keyed by name: a policy's draws do not depend on which other policies run beside it
        policy_ss, judge_ss = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).spawn(2)
        policy = make_policy(name, env, seed=int(policy_ss.generate_state(1)[0]), config=cfg.policy_config(name))
        hook = None if on_progress is None else (lambda t, r, _name=name: on_progress(_name, t, r))
        out[name] = run_replay(
            policy, stream, cfg.kappa, np.random.default_rng(judge_ss), progress=progress, desc=f"{name} seed {seed}",
            on_progress=hook, progress_every=progress_every,
        )
    return out


# ------------------------------------------------------------------------------ evaluate
def evaluate(
    table: RoutingTable,
    X: np.ndarray,
    cfg: EvalConfig,
    encoder: str = "minilm",
    progress: bool = False,
    workers: int = 1,
    on_seed: Callable[[int], None] | None = None,
    blas_threads: int | None = 1,
) -> EvalResult:
    """Run every policy over ``cfg.n_seeds`` seeds. ``X`` holds the embedding of every table row.

    ``blas_threads``: BLAS threads during the replay (None = leave as is). SGLD multiplies small
    matrices (256 x 384 by 384 x 22), where one thread is as fast as two on a quiet machine and
    several times faster on a busy one (multi-threaded OpenBLAS spins when cores are shared).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _evaluate(table, X, cfg, encoder, progress, workers, on_seed)


def _evaluate(table, X, cfg, encoder, progress, workers, on_seed) -> EvalResult:
    if len(X) != table.n_queries:
        raise ConfigError(f"embeddings have {len(X)} rows, table {table.name!r} has {table.n_queries}")
    t0 = time.perf_counter()
    runs: dict[tuple[str, int], ReplayResult] = {}
    if workers > 1 and cfg.n_seeds > 1:
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_limit_threads) as pool:
            futures = {seed: pool.submit(run_seed, table, X, cfg, seed, False) for seed in cfg.seeds}
            for seed, fut in futures.items():
                for name, res in fut.result().items():
                    runs[(name, seed)] = res
                if on_seed:
                    on_seed(seed)
    else:
        for seed in cfg.seeds:
            for name, res in run_seed(table, X, cfg, seed, progress).items():
                runs[(name, seed)] = res
            if on_seed:
                on_seed(seed)
    records = summarise(table, cfg, runs, encoder=encoder)
    for r in records:
        r["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return EvalResult(records=records, curves=curves_frame(runs), runs=runs)


def _limit_threads() -> None:
    """One BLAS thread per worker process: the workers already use every core."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def summarise(
    table: RoutingTable, cfg: EvalConfig, runs: Mapping[tuple[str, int], ReplayResult], encoder: str
) -> list[dict]:
    records = []
    for name in cfg.policies:
        seeds = [s for (p, s) in runs if p == name]
        results = [runs[(name, s)] for s in seeds]
        final = np.array([r.cum_regret[-1] for r in results])
        mean, lo, hi = mean_ci95(final)
        pcfg = cfg.policy_config(name)
        entry = get_entry(name)
        records.append({
            "dataset": table.name,
            "policy": name,
            "encoder": encoder if entry.needs_embeddings else "none",
            "weighting": cfg.weighting if entry.needs_embeddings else "none",
            "split": cfg.split if cfg.split != "holdout" else f"holdout:{cfg.held_out}",
            "n_seeds": len(results),
            "n_rounds": cfg.n_rounds,
            "cum_regret_mean": float(mean),
            "cum_regret_ci95": [float(lo), float(hi)],
            "cum_regret_per_seed": [float(v) for v in final],
            "mean_regret_per_round": float(mean / cfg.n_rounds),
            "served_score_mean": float(np.mean([r.served_score.mean() for r in results])),
            "served_cost_mean_usd": float(np.mean([r.served_cost.mean() for r in results])),
            "cost_weight": cfg.cost_weight,
            "kappa": cfg.kappa if math.isfinite(cfg.kappa) else "inf",
            "n_arms": table.n_arms,
            "real_label_share": float(np.mean([r.n_real_labels / len(r.regret) for r in results])),
            "replay_seconds": float(sum(r.seconds for r in results)),
            "policy_config": _jsonable(dataclasses.asdict(pcfg)),
        })
    return records


def _jsonable(d: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in d.items()}


def curves_frame(runs: Mapping[tuple[str, int], ReplayResult]):
    import pandas as pd

    frames = []
    for (name, seed), r in runs.items():
        T = len(r.regret)
        frames.append(pd.DataFrame({
            "policy": np.full(T, name, dtype=object),
            "seed": np.full(T, seed, dtype=np.int64),
            "round": np.arange(1, T + 1, dtype=np.int64),
            "row": r.rows,
            "first": r.first,
            "second": r.second,
            "outcome": r.outcome,
            "regret": r.regret,
            "cum_regret": r.cum_regret,
            "served_score": r.served_score,
            "served_cost": r.served_cost,
        }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------- outputs
def format_table(records: Sequence[dict]) -> str:
    """Plain-text table: one line per record, cumulative regret mean and 95% CI."""
    head = f"{'dataset':<12} {'policy':<12} {'encoder':<8} {'weighting':<16} {'seeds':>5} {'T':>6}  " \
           f"{'cum. regret (mean [95% CI])':<30} {'served score':>12}"
    lines = [head, "-" * len(head)]
    for r in records:
        lo, hi = r["cum_regret_ci95"]
        ci = f"{r['cum_regret_mean']:.1f} [{lo:.1f}, {hi:.1f}]"
        lines.append(
            f"{r['dataset']:<12} {r['policy']:<12} {r['encoder']:<8} {r['weighting']:<16} {r['n_seeds']:>5} "
            f"{r['n_rounds']:>6}  {ci:<30} {r['served_score_mean']:>12.3f}"
        )
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    from ray_router.evaluation.plots import plot_regret

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "curves": out / "curves.parquet", "plot": out / "regret.png"}
    paths["summary"].write_text(json.dumps(result.records, indent=2) + "\n")
    result.curves.to_parquet(paths["curves"], index=False)
    plot_regret(result.curves, paths["plot"], title=title)
    return paths
