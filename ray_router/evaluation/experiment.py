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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ray_router.config import config_dataclass, parse
from ray_router.data.table import RoutingTable
from ray_router.embeddings.model_embeddings import CostNormaliser, WeightingName
from ray_router.errors import ConfigError
from ray_router.evaluation.replay import ReplayResult, ReplayStream, reference_result, run_replay, run_replay_lanes
from ray_router.evaluation.stats import mean_ci95
from ray_router.policies.base import PolicyEnv, get_entry, make_policy
from ray_router.policies.common import Positive, PositiveInt

Split = Literal["stratified", "k_per_category", "holdout"]
SPLITS: tuple[str, ...] = get_args(Split)
Context = Literal["query", "constant"]
CONTEXTS: tuple[str, ...] = get_args(Context)
# Reference lines every comparison is made against (paired per-seed differences), when they ran.
PAIRED_REFERENCES = ("best_fixed", "best_per_category", "offline_static", "knn", "colstim", "uniform")


def _invalid(e: ConfigError) -> PydanticCustomError:
    """A ConfigError raised while validating a field, as pydantic's error (its message kept verbatim)."""
    return PydanticCustomError("invalid", "{message}", {"message": str(e)})


@config_dataclass
class EvalConfig:
    """One replay experiment. Policy hyperparameters go in ``policy_configs[name]`` (field names)."""

    policies: Annotated[tuple[str, ...], Field(strict=False)] = ("fgts_cdb", "uniform")  # a YAML list is fine
    n_seeds: PositiveInt = 5
    base_seed: int = 0
    n_rounds: PositiveInt = 2000
    cost_weight: float = 0.0  # λ in r = score − λ·cost_norm
    kappa: Positive = 10.0  # judge sharpness; inf = noiseless
    use_pairwise_labels: bool = True  # real labels (MixInstruct cmp_results) where present
    split: Split = "stratified"
    offline_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    k_per_category: int = 5
    held_out: str | None = None  # category held out of the offline part (split="holdout")
    split_seed: int | None = None  # fix the offline/online split for every seed (None: each seed splits anew)
    weighting: WeightingName = "perf"
    weighting_beta: float = 10.0
    weighting_tau: int = 3
    weighting_cost_weight: float | None = None  # λ inside the weighting; None = cost_weight
    # "shared": the weightings divide costs by the environment's normaliser (one scale everywhere);
    # "category_max": by the largest category-mean cost of the offline rows (the code before issue 10)
    cost_normaliser: CostNormaliser = "shared"
    context: Context = "query"  # "constant": every query embedding replaced by one vector (the ablation)
    policy_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @field_validator("policies")
    @classmethod
    def _registered(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if not names:
            raise PydanticCustomError("empty", "at least one policy is needed")
        try:
            for name in names:
                get_entry(name)
        except ConfigError as e:
            raise _invalid(e) from None
        return names

    @field_validator("policy_configs")
    @classmethod
    def _policy_configs(cls, configs: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
        try:
            for name, values in configs.items():
                get_entry(name).config(values)  # unknown policy, unknown field or bad value: a ConfigError
        except ConfigError as e:
            raise _invalid(e) from None
        return configs

    @model_validator(mode="after")
    def _holdout_names_its_category(self) -> EvalConfig:
        if self.split == "holdout" and not self.held_out:
            raise PydanticCustomError("holdout", "split='holdout' needs held_out=<category>")
        return self

    @property
    def seeds(self) -> list[int]:
        return [self.base_seed + i for i in range(self.n_seeds)]

    def policy_config(self, name: str) -> Any:
        return get_entry(name).config(self.policy_configs.get(name))


@dataclass
class EvalResult:
    records: list[dict]
    curves: Any  # pandas.DataFrame: one row per (policy, seed, round)
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
    from ray_router.embeddings.model_embeddings import WeightingConfig, offline_arm_embeddings

    lam = cfg.cost_weight if cfg.weighting_cost_weight is None else cfg.weighting_cost_weight
    wcfg = parse(
        WeightingConfig,
        {"name": cfg.weighting, "cost_weight": lam, "top_tau": cfg.weighting_tau, "beta": cfg.weighting_beta},
        where="EvalConfig weighting",
    )
    return offline_arm_embeddings(table, X[offline], offline, wcfg, cost_normaliser=cfg.cost_normaliser)


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
        categories=np.asarray(sub.categories),
    )


def _seed_streams(seed: int) -> tuple[int, np.random.Generator]:
    """Independent streams of one seed: the split's seed and the stream-order RNG."""
    split_ss, order_ss = np.random.SeedSequence(seed).spawn(2)
    return int(split_ss.generate_state(1)[0]), np.random.default_rng(order_ss)


def prepare_seed(table: RoutingTable, X: np.ndarray, cfg: EvalConfig, seed: int) -> tuple[PolicyEnv, ReplayStream]:
    """The split, model embeddings, policy environment and online stream of one seed."""
    split_seed, order_rng = _seed_streams(seed)
    split = make_split(table, cfg, split_seed if cfg.split_seed is None else cfg.split_seed)
    if cfg.context == "constant":  # the ablation: one vector for every query, offline and online
        v = np.asarray(X[split.offline], dtype=np.float64).mean(axis=0)
        X = np.broadcast_to(v / max(float(np.linalg.norm(v)), 1e-12), np.shape(X))
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
    return env, stream


def _policy_seeds(name: str, seed: int) -> tuple[int, np.random.SeedSequence]:
    """The policy's seed and the judge's seed sequence for ``name`` on ``seed``. Keyed by name: a
    policy's draws do not depend on which other policies or configurations run beside it."""
    policy_ss, judge_ss = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).spawn(2)
    return int(policy_ss.generate_state(1)[0]), judge_ss


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
    env, stream = prepare_seed(table, X, cfg, seed)
    out = {}
    for name in cfg.policies:
        policy_seed, judge_ss = _policy_seeds(name, seed)
        policy = make_policy(name, env, seed=policy_seed, config=cfg.policy_config(name))
        hook = None if on_progress is None else (lambda t, r, _name=name: on_progress(_name, t, r))
        out[name] = run_replay(
            policy,
            stream,
            cfg.kappa,
            np.random.default_rng(judge_ss),
            progress=progress,
            desc=f"{name} seed {seed}",
            on_progress=hook,
            progress_every=progress_every,
        )
    return out


def run_seeds(
    table: RoutingTable, X: np.ndarray, cfg: EvalConfig, seeds: Sequence[int], progress: bool = False
) -> dict[tuple[str, int], ReplayResult]:
    """Every policy on every seed in ``seeds``; the same results as :func:`run_seed` seed by seed."""
    return run_grid(table, X, [cfg], seeds, progress)[0]


def run_grid(
    table: RoutingTable, X: np.ndarray, cfgs: Sequence[EvalConfig], seeds: Sequence[int], progress: bool = False
) -> list[dict[tuple[str, int], ReplayResult]]:
    """Every policy of every configuration in ``cfgs`` on every seed in ``seeds``.

    A policy with a lanes implementation (FGTS.CDB) runs all its (configuration, seed) pairs that
    share its hyperparameters and T as lanes of one array program (``run_replay_lanes``), with
    the same choices as run one by one. Where those configurations also share each seed's stream
    (they differ only in the weighting, its λ/τ/β, or the utility's λ), one seed's lanes form a
    group that shares minibatch rows and GEMMs (``FGTSCDBLanes``: equal up to float32 rounding).
    """
    prepared = {(i, seed): prepare_seed(table, X, cfg, seed) for i, cfg in enumerate(cfgs) for seed in seeds}
    outs: list[dict[tuple[str, int], ReplayResult]] = [{} for _ in cfgs]
    jobs: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        for name in cfg.policies:
            jobs.setdefault((name, repr(cfg.policy_config(name)), cfg.n_rounds), []).append(i)
    for (name, _, _), idxs in jobs.items():
        entry = get_entry(name)
        if entry.reference is not None:  # hindsight reference: computed from the stream, not replayed
            for i in idxs:
                for seed in seeds:
                    stream = prepared[(i, seed)][1]
                    outs[i][(name, seed)] = reference_result(entry.reference(stream), stream)
            continue
        pcfg = cfgs[idxs[0]].policy_config(name)
        seeded = {seed: _policy_seeds(name, seed) for seed in seeds}
        pairs = [(i, seed) for seed in seeds for i in idxs]  # seed-major: one seed's configurations together
        lanes = None
        if entry.lanes is not None and len(pairs) > 1:
            W = len(idxs) if all(_same_stream([prepared[(i, s)][1] for i in idxs]) for s in seeds) else 1
            lanes = entry.lanes(pcfg, [prepared[p][0] for p in pairs], [seeded[s][0] for _, s in pairs], W)
        if lanes is not None:
            results = run_replay_lanes(
                lanes,
                [prepared[p][1] for p in pairs],
                [cfgs[i].kappa for i, _ in pairs],
                [np.random.default_rng(seeded[s][1]) for _, s in pairs],
                progress=progress,
                desc=f"{name} x {len(pairs)} lanes",
            )
            for (i, seed), res in zip(pairs, results):
                outs[i][(name, seed)] = res
            continue
        for i, seed in pairs:
            env, stream = prepared[(i, seed)]
            policy = make_policy(name, env, seed=seeded[seed][0], config=pcfg)
            outs[i][(name, seed)] = run_replay(
                policy,
                stream,
                cfgs[i].kappa,
                np.random.default_rng(seeded[seed][1]),
                progress=progress,
                desc=f"{name} seed {seed}",
            )
    return outs


def _same_stream(streams: Sequence[ReplayStream]) -> bool:
    """True when every stream plays the same contexts in the same order."""
    s0 = streams[0]
    return all(np.array_equal(s.order, s0.order) and np.array_equal(s.contexts, s0.contexts) for s in streams[1:])


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


def evaluate_grid(
    table: RoutingTable,
    X: np.ndarray,
    cfgs: Sequence[EvalConfig],
    encoder: str = "minilm",
    progress: bool = False,
    workers: int = 1,
    blas_threads: int | None = 1,
) -> list[EvalResult]:
    """:func:`evaluate` for several configurations over the same seeds and embeddings at once.

    Each result is what ``evaluate(table, X, cfg)`` gives (FGTS.CDB up to float32 rounding, see
    :func:`run_grid`); running them together lets FGTS.CDB's runs share array programs, e.g. one
    seed's stream under the four weightings of the paper's grid.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _evaluate_grid(table, X, list(cfgs), encoder, progress, workers, None)


def _evaluate(table, X, cfg, encoder, progress, workers, on_seed) -> EvalResult:
    return _evaluate_grid(table, X, [cfg], encoder, progress, workers, on_seed)[0]


def _evaluate_grid(table, X, cfgs, encoder, progress, workers, on_seed) -> list[EvalResult]:
    if len(X) != table.n_queries:
        raise ConfigError(f"embeddings have {len(X)} rows, table {table.name!r} has {table.n_queries}")
    if not cfgs or any(c.seeds != cfgs[0].seeds for c in cfgs):
        raise ConfigError("a grid needs at least one configuration, all with the same seeds")
    t0 = time.perf_counter()
    outs: list[dict[tuple[str, int], ReplayResult]] = [{} for _ in cfgs]
    seeds = cfgs[0].seeds
    if workers > 1 and len(seeds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # one contiguous block of seeds per worker; each block runs as lanes where it can
        blocks = [[int(s) for s in b] for b in np.array_split(seeds, min(workers, len(seeds)))]
        with ProcessPoolExecutor(
            max_workers=len(blocks), mp_context=mp.get_context("spawn"), initializer=_limit_threads
        ) as pool:
            futures = [pool.submit(run_grid, table, X, cfgs, block, False) for block in blocks]
            for block, fut in zip(blocks, futures):
                for out, part in zip(outs, fut.result()):
                    out.update(part)
                for seed in block:
                    if on_seed:
                        on_seed(seed)
    else:
        for out, part in zip(outs, run_grid(table, X, cfgs, seeds, progress)):
            out.update(part)
        for seed in seeds:
            if on_seed:
                on_seed(seed)
    results = []
    for cfg, runs in zip(cfgs, outs):
        runs = {(name, seed): runs[(name, seed)] for seed in seeds for name in cfg.policies}
        records = summarise(table, cfg, runs, encoder=encoder)
        for r in records:
            r["wall_seconds"] = round(time.perf_counter() - t0, 2)
        results.append(EvalResult(records=records, curves=curves_frame(runs), runs=runs))
    return results


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
        served_final = np.array([r.cum_served_regret[-1] for r in results])
        mean, lo, hi = mean_ci95(final)
        smean, slo, shi = mean_ci95(served_final)
        pcfg = cfg.policy_config(name)
        entry = get_entry(name)
        records.append(
            {
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
                "served_regret_mean": float(smean),
                "served_regret_ci95": [float(slo), float(shi)],
                "served_regret_per_seed": [float(v) for v in served_final],
                "served_regret_per_round": float(smean / cfg.n_rounds),
                "self_duel_share": float(np.mean([r.self_duel_share for r in results])),
                "context": cfg.context,
                "served_score_mean": float(np.mean([r.served_score.mean() for r in results])),
                "served_cost_mean_usd": float(np.mean([r.served_cost.mean() for r in results])),
                "cost_weight": cfg.cost_weight,
                "kappa": cfg.kappa if math.isfinite(cfg.kappa) else "inf",
                "n_arms": table.n_arms,
                "real_label_share": float(np.mean([r.n_real_labels / len(r.regret) for r in results])),
                "replay_seconds": float(sum(r.seconds for r in results)),
                "policy_config": _jsonable(dataclasses.asdict(pcfg)),
            }
        )
    add_paired(records)
    return records


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean per-seed difference a − b with its 95% t-interval (common random numbers: same seeds)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    m, lo, hi = mean_ci95(d)
    verdict = "below" if hi < 0 else ("above" if lo > 0 else "no significant difference")
    return {"mean": float(m), "ci95": [float(lo), float(hi)], "verdict": verdict}


def add_paired(records: list[dict], references: Sequence[str] = PAIRED_REFERENCES) -> None:
    """Add ``paired[ref] = {"served": ..., "dueling": ...}`` to every record: its per-seed cumulative
    regret minus the reference's (same dataset, split, λ and seeds), for every reference that ran."""
    by_policy = {r["policy"]: r for r in records}
    for r in records:
        r["paired"] = {}
        for ref in references:
            other = by_policy.get(ref)
            if other is None or other is r or len(other["cum_regret_per_seed"]) != len(r["cum_regret_per_seed"]):
                continue
            r["paired"][ref] = {
                "served": paired_difference(r["served_regret_per_seed"], other["served_regret_per_seed"]),
                "dueling": paired_difference(r["cum_regret_per_seed"], other["cum_regret_per_seed"]),
            }


def _jsonable(d: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in d.items()}


def curves_frame(runs: Mapping[tuple[str, int], ReplayResult]):
    import pandas as pd

    frames = []
    for (name, seed), r in runs.items():
        T = len(r.regret)
        frames.append(
            pd.DataFrame(
                {
                    "policy": np.full(T, name, dtype=object),
                    "seed": np.full(T, seed, dtype=np.int64),
                    "round": np.arange(1, T + 1, dtype=np.int64),
                    "row": r.rows,
                    "first": r.first,
                    "second": r.second,
                    "outcome": r.outcome,
                    "regret": r.regret,
                    "cum_regret": r.cum_regret,
                    "served": r.served,
                    "served_regret": r.served_regret,
                    "cum_served_regret": r.cum_served_regret,
                    "served_score": r.served_score,
                    "served_cost": r.served_cost,
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------- outputs
def format_table(records: Sequence[dict]) -> str:
    """Plain-text table: one line per record; dueling and served cumulative regret, mean [95% CI]."""
    head = (
        f"{'dataset':<12} {'policy':<17} {'encoder':<8} {'weighting':<16} {'seeds':>5} {'T':>6}  "
        f"{'dueling regret [95% CI]':<26} {'served regret [95% CI]':<26} {'served score':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lo, hi = r["cum_regret_ci95"]
        slo, shi = r["served_regret_ci95"]
        ci = f"{r['cum_regret_mean']:.1f} [{lo:.1f}, {hi:.1f}]"
        sci = f"{r['served_regret_mean']:.1f} [{slo:.1f}, {shi:.1f}]"
        lines.append(
            f"{r['dataset']:<12} {r['policy']:<17} {r['encoder']:<8} {r['weighting']:<16} {r['n_seeds']:>5} "
            f"{r['n_rounds']:>6}  {ci:<26} {sci:<26} {r['served_score_mean']:>12.3f}"
        )
    paired = [
        (r, ref, v)
        for r in records
        for ref, v in r.get("paired", {}).items()
        if ref in ("best_fixed", "offline_static") and r["policy"] not in PAIRED_REFERENCES
    ]
    if paired:
        lines += ["", "paired per-seed differences of served regret (policy − reference), mean [95% CI]:"]
        for r, ref, v in paired:
            m, (lo, hi) = v["served"]["mean"], v["served"]["ci95"]
            lines.append(f"  {r['policy']:<17} − {ref:<15} {m:+8.1f} [{lo:+.1f}, {hi:+.1f}]  {v['served']['verdict']}")
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    from ray_router.evaluation.plots import plot_regret

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out / "summary.json",
        "curves": out / "curves.parquet",
        "plot": out / "regret.png",
        "served_plot": out / "served_regret.png",
    }
    paths["summary"].write_text(json.dumps(result.records, indent=2) + "\n")
    result.curves.to_parquet(paths["curves"], index=False)
    plot_regret(result.curves, paths["plot"], title=title)
    plot_regret(
        result.curves,
        paths["served_plot"],
        title=(title or "") + " (served arm)",
        column="cum_served_regret",
        ylabel="cumulative served regret",
    )
    return paths
