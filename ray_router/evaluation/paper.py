"""``ray-router experiment paper``: the paper's comparison end to end, with baselines and intervals.

For one dataset it runs, on one fixed offline/online split and ``n_seeds`` online streams:

1. **main grid** — FGTS.CDB on {general-purpose encoder (``base``), CCFT encoder (``ccft``)} ×
   {perf, perf_cost, excel_perf_cost, excel_mask}, plus every baseline on the base encoder;
2. **unseen category** — one category held out of the offline part (CCFT and the category
   statistics never see it), FGTS.CDB base vs CCFT, and uniform;
3. **perf–cost view** — FGTS.CDB (CCFT, ``perf_cost``) over a grid of λ: quality and cost of the arm
   it would serve, next to every single arm, and RouterBench's AIQ where the data has costs;
4. **category separation** of held-out queries, base vs CCFT (nearest-centroid accuracy, silhouette).

Outputs: ``report.md`` (tables with mean ± 95% CI, plots linked), ``summary.json`` (one record per
configuration, the ``evaluate`` schema plus ``split`` and ``aiq``), PNG plots, ``curves.parquet``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ray_router.data.table import RoutingTable
from ray_router.errors import ConfigError
from ray_router.evaluation.aiq import aiq
from ray_router.evaluation.experiment import EvalConfig, evaluate, evaluate_grid, make_split

WEIGHTINGS = ("perf", "perf_cost", "excel_perf_cost", "excel_mask")
BASELINES = ("uniform", "best_fixed", "maxinp", "colstim", "laplace_ts", "knn")


@dataclass(frozen=True)
class PaperConfig:
    dataset: str = "routerbench"
    n_seeds: int = 5
    n_rounds: int = 2000
    cost_weight: float = 0.2  # λ of the main grid: utility score − λ·cost_norm and the weightings' λ
    lambda_grid: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
    offline_fraction: float = 0.2
    split_seed: int = 0
    held_out: str | None = None  # None: the smallest category
    weightings: tuple[str, ...] = WEIGHTINGS
    baselines: tuple[str, ...] = BASELINES
    subsample: int = 0  # >0: a stratified sample of this many queries (for --quick)
    kappa: float = 10.0
    ccft: Any = None  # CCFTConfig; None = its defaults
    fgts: dict = field(default_factory=dict)  # FGTS.CDB overrides
    workers: int = 2

    @classmethod
    def quick(cls, **kw) -> "PaperConfig":
        from ray_router.embeddings.ccft import CCFTConfig

        base = dict(n_seeds=5, n_rounds=400, lambda_grid=(0.0, 0.25, 1.0), subsample=900,
                    ccft=CCFTConfig(queries_per_category=16, epochs=1, max_seq_length=128))
        base.update(kw)
        return cls(**base)


@dataclass
class PaperResult:
    records: list[dict]
    report: str
    paths: dict[str, Path]


def _log(msg: str) -> None:
    print(f"[paper] {msg}", file=sys.stderr, flush=True)


def _subsample(table: RoutingTable, n: int, seed: int) -> RoutingTable:
    if not n or n >= table.n_queries:
        return table
    from ray_router.data.splits import stratified_split

    keep = stratified_split(table.categories, offline_fraction=n / table.n_queries, seed=seed).offline
    return table.subset(keep)


def _ccft_encoder(table: RoutingTable, offline: np.ndarray, cfg: PaperConfig, art_dir: Path, cache_dir, device):
    """Fine-tune on the offline rows only (reused when an artifact with the same fingerprint exists)."""
    from ray_router.embeddings import get_encoder
    from ray_router.embeddings.ccft import CCFTConfig, ccft_fingerprint, fine_tune

    t0 = time.perf_counter()
    texts, cats, ccfg = list(table.texts[offline]), list(table.categories[offline]), cfg.ccft or CCFTConfig()
    # one folder per fingerprint (base model, config, training data): reruns reuse it, others never collide
    path = fine_tune(texts, cats, ccfg, art_dir / ccft_fingerprint(texts, cats, ccfg), device=device)
    _log(f"CCFT artifact {path} ready in {time.perf_counter() - t0:.0f}s")
    return get_encoder(str(path), cache_dir=cache_dir, device=device)


def _encode(encoder, table: RoutingTable, label: str) -> np.ndarray:
    t0 = time.perf_counter()
    X = encoder.encode(list(table.texts))
    _log(f"{label}: {table.n_queries} texts embedded in {time.perf_counter() - t0:.0f}s "
         f"({getattr(encoder, 'n_encoded', '?')} newly encoded)")
    return X


def _separation(X: np.ndarray, table: RoutingTable, split) -> dict:
    from ray_router.embeddings.ccft import category_separation

    cats = table.categories
    return category_separation(X[split.offline], cats[split.offline], X[split.online], cats[split.online])


def run_paper(cfg: PaperConfig, out_dir: str | Path, data_dir=None, cache_dir=None, device: str = "auto",
              progress: Callable[[str], None] = _log) -> PaperResult:
    from ray_router.data import load_dataset, resolve_data_dir
    from ray_router.embeddings import get_encoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    table = _subsample(load_dataset(cfg.dataset, data_dir=resolve_data_dir(data_dir)), cfg.subsample, cfg.split_seed)
    cats = table.category_names
    if len(cats) < 2:
        raise ConfigError(f"{table.name}: the paper experiment needs at least 2 categories, found {list(cats)}")
    held_out = cfg.held_out or min(cats, key=lambda c: int((table.categories == c).sum()))
    if held_out not in cats:
        raise ConfigError(f"held-out category {held_out!r} not in {list(cats)}")
    progress(f"{table.name}: {table.n_queries} queries x {table.n_arms} arms, categories {list(cats)}")

    X_base = _encode(get_encoder("minilm", cache_dir=cache_dir, device=device), table, "base encoder")
    common = dict(n_seeds=cfg.n_seeds, n_rounds=cfg.n_rounds, kappa=cfg.kappa, offline_fraction=cfg.offline_fraction,
                  split_seed=cfg.split_seed, policy_configs={"fgts_cdb": dict(cfg.fgts)} if cfg.fgts else {})
    main_cfg = EvalConfig(cost_weight=cfg.cost_weight, **common)
    split = make_split(table, main_cfg, cfg.split_seed)
    art_root = out / "artifacts"
    X_ccft = _encode(_ccft_encoder(table, split.offline, cfg, art_root, cache_dir, device),
                     table, "CCFT encoder")
    encoders = {"base": X_base, "ccft": X_ccft}
    separation = {name: _separation(X, table, split) for name, X in encoders.items()}
    progress(f"category separation of online queries: {json.dumps(separation)}")

    records: list[dict] = []
    curves = []

    def record(res, encoder: str, weighting: str, split_label: str, tag: str, seconds: float) -> list[dict]:
        for r in res.records:
            r["encoder"] = encoder
            r["weighting"] = weighting
            r["split"] = split_label
            r["aiq"] = None
            r["section"] = tag
        c = res.curves
        c["config"] = [f"{p}/{encoder}/{weighting}" for p in c["policy"]]
        c["section"] = tag
        curves.append(c[["section", "config", "policy", "seed", "round", "cum_regret", "served_score", "served_cost"]])
        progress(f"{tag}: {[r['policy'] for r in res.records]} {encoder}/{weighting} "
                 f"cum regret {[round(r['cum_regret_mean'], 1) for r in res.records]} ({seconds:.0f}s)")
        records.extend(res.records)
        return res.records

    def run(X, ecfg: EvalConfig, encoder: str, weighting: str, split_label: str, tag: str) -> list[dict]:
        t0 = time.perf_counter()
        res = evaluate(table, X, ecfg, encoder=encoder, workers=cfg.workers)
        return record(res, encoder, weighting, split_label, tag, time.perf_counter() - t0)

    def run_grid(X, ecfgs: list[EvalConfig], encoder: str, weightings, split_label: str, tags) -> list[list[dict]]:
        """Several configurations over one stream at once (FGTS.CDB's runs share array programs)."""
        t0 = time.perf_counter()
        results = evaluate_grid(table, X, ecfgs, encoder=encoder, workers=cfg.workers)
        seconds = (time.perf_counter() - t0) / len(ecfgs)
        return [record(res, encoder, w, split_label, tag, seconds) for res, w, tag in zip(results, weightings, tags)]

    # 1. main grid
    for enc, X in encoders.items():
        run_grid(X, [dataclasses.replace(main_cfg, policies=("fgts_cdb",), weighting=w) for w in cfg.weightings],
                 enc, cfg.weightings, "stratified", ["main"] * len(cfg.weightings))
    baselines = tuple(b for b in cfg.baselines)
    if baselines:
        run(X_base, dataclasses.replace(main_cfg, policies=baselines, weighting="perf"), "base", "perf",
            "stratified", "main")

    # 2. unseen category
    hold_cfg = dataclasses.replace(main_cfg, split="holdout", held_out=held_out, weighting="perf")
    hsplit = make_split(table, hold_cfg, cfg.split_seed)
    X_ccft_h = _encode(_ccft_encoder(table, hsplit.offline, cfg, art_root, cache_dir, device),
                       table, "CCFT encoder (held-out split)")
    label = f"holdout:{held_out}"
    run(X_base, dataclasses.replace(hold_cfg, policies=("fgts_cdb", "uniform")), "base", "perf", label, "unseen")
    run(X_ccft_h, dataclasses.replace(hold_cfg, policies=("fgts_cdb",)), "ccft", "perf", label, "unseen")

    # 3. perf-cost view (FGTS.CDB, CCFT, perf_cost weighting) over λ
    lam_recs = run_grid(
        X_ccft, [dataclasses.replace(main_cfg, policies=("fgts_cdb",), weighting="perf_cost", cost_weight=lam)
                 for lam in cfg.lambda_grid],
        "ccft", ["perf_cost"] * len(cfg.lambda_grid), "stratified", [f"lambda={lam:g}" for lam in cfg.lambda_grid])
    perf_cost = [(lam, recs[0]["served_cost_mean_usd"], recs[0]["served_score_mean"])
                 for lam, recs in zip(cfg.lambda_grid, lam_recs)]
    online = table.subset(split.online)
    arm_points = [(a, float(online.costs[:, k].mean()) if online.costs is not None else 0.0,
                   float(online.scores[:, k].mean())) for k, a in enumerate(table.arms)]
    router_aiq = aiq([p[1] for p in perf_cost], [p[2] for p in perf_cost]) if table.has_costs else None
    if router_aiq is not None:
        for r in records:
            if r["section"].startswith("lambda="):
                r["aiq"] = router_aiq

    curves_df = _concat(curves)
    paths = _write(out, cfg, table, records, curves_df, separation, perf_cost, arm_points, router_aiq, held_out,
                   time.perf_counter() - t_start)
    return PaperResult(records=records, report=paths["report"].read_text(), paths=paths)


def _concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _ci(r: dict) -> str:
    lo, hi = r["cum_regret_ci95"]
    return f"{r['cum_regret_mean']:.1f} ± {(hi - lo) / 2:.1f}"


def _table(rows: list[dict]) -> str:
    lines = ["| policy | encoder | weighting | split | cum. regret at T (mean ± 95% CI) | served score | served cost (USD) |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["cum_regret_mean"]):
        lines.append(f"| {r['policy']} | {r['encoder']} | {r['weighting']} | {r['split']} | {_ci(r)} | "
                     f"{r['served_score_mean']:.3f} | {r['served_cost_mean_usd']:.5f} |")
    return "\n".join(lines)


def _write(out: Path, cfg: PaperConfig, table: RoutingTable, records, curves, separation, perf_cost, arm_points,
           router_aiq, held_out, seconds) -> dict[str, Path]:
    from ray_router.evaluation.plots import plot_regret

    paths = {"summary": out / "summary.json", "report": out / "report.md", "curves": out / "curves.parquet",
             "main_plot": out / "regret_main.png", "unseen_plot": out / "regret_unseen.png",
             "cost_plot": out / "perf_cost.png"}
    clean = [{k: v for k, v in r.items() if k != "section"} | {"section": r["section"]} for r in records]
    paths["summary"].write_text(json.dumps(clean, indent=2) + "\n")
    curves.to_parquet(paths["curves"], index=False)
    main = curves[curves["section"] == "main"]
    plot_regret(main, paths["main_plot"], title=f"{table.name}: main grid", group="config")
    plot_regret(curves[curves["section"] == "unseen"], paths["unseen_plot"],
                title=f"{table.name}: '{held_out}' held out of the offline part", group="config")
    _plot_cost(paths["cost_plot"], perf_cost, arm_points, table.name, router_aiq)

    main_recs = [r for r in records if r["section"] == "main"]
    fg = {(r["encoder"], r["weighting"]): r for r in main_recs if r["policy"] == "fgts_cdb"}
    best = min(fg.values(), key=lambda r: r["cum_regret_mean"]) if fg else None
    lines = [
        f"# Paper experiment: {table.name}",
        "",
        f"{table.n_queries} queries × {table.n_arms} arms, categories {list(table.category_names)}; "
        f"offline fraction {cfg.offline_fraction}, split seed {cfg.split_seed}; {cfg.n_seeds} seeds × "
        f"{cfg.n_rounds} rounds; judge κ = {cfg.kappa}; main-grid λ = {cfg.cost_weight}. "
        f"Wall time {seconds / 60:.1f} min. Intervals: Student-t 95% over seeds.",
        "",
        "## Main grid",
        "",
        _table(main_recs),
        "",
        "![main](regret_main.png)",
        "",
    ]
    if best is not None:
        comp = []
        for w in cfg.weightings:
            b, c = fg.get(("base", w)), fg.get(("ccft", w))
            if b and c:
                overlap = not (c["cum_regret_ci95"][1] < b["cum_regret_ci95"][0] or b["cum_regret_ci95"][1] < c["cum_regret_ci95"][0])
                verdict = "no significant difference" if overlap else ("CCFT better" if c["cum_regret_mean"] < b["cum_regret_mean"] else "base better")
                comp.append(f"| {w} | {_ci(b)} | {_ci(c)} | {verdict} |")
        lines += ["### CCFT vs general-purpose encoder (FGTS.CDB)", "",
                  "| weighting | base | CCFT | verdict (95% CIs) |", "|---|---:|---:|---|", *comp, "",
                  f"Lowest mean regret: **{best['encoder']} / {best['weighting']}** ({_ci(best)}).", ""]
    lines += ["## Category separation of online queries (centroids from the offline part)", "",
              "| encoder | nearest-centroid accuracy | silhouette (cosine) |", "|---|---:|---:|"]
    for name, s in separation.items():
        lines.append(f"| {name} | {s.get('nearest_centroid_accuracy', float('nan')):.3f} | {s.get('silhouette', float('nan')):.3f} |")
    unseen = [r for r in records if r["section"] == "unseen"]
    lines += ["", f"## Unseen category: '{held_out}' held out of the offline part", "", _table(unseen), "",
              "![unseen](regret_unseen.png)", "",
              "## Perf–cost view (FGTS.CDB, CCFT, perf_cost weighting)", "",
              "| λ | served score | served cost (USD) |", "|---:|---:|---:|"]
    for lam, cost, score in perf_cost:
        lines.append(f"| {lam:g} | {score:.3f} | {cost:.5f} |")
    lines += ["", "| single arm | mean score | mean cost (USD) |", "|---|---:|---:|"]
    for a, cost, score in sorted(arm_points, key=lambda p: p[1]):
        lines.append(f"| {a} | {score:.3f} | {cost:.5f} |")
    if router_aiq is not None:
        arm_aiq = aiq([p[1] for p in arm_points], [p[2] for p in arm_points])
        lines += ["", f"AIQ (RouterBench; area under the non-decreasing convex hull / cost range): router "
                  f"**{router_aiq:.3f}**; hull of the single arms {arm_aiq:.3f}."]
    else:
        lines += ["", "AIQ: not applicable (the dataset has no costs)."]
    lines += ["", "![perf-cost](perf_cost.png)", ""]
    paths["report"].write_text("\n".join(lines))
    return paths


def _plot_cost(path: Path, perf_cost, arm_points, name: str, router_aiq) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[1] for p in arm_points], [p[2] for p in arm_points], marker="x", color="grey", label="single arms")
    for a, c, s in arm_points:
        ax.annotate(a.split("/")[-1][:18], (c, s), fontsize=6, alpha=0.7)
    ax.plot([p[1] for p in perf_cost], [p[2] for p in perf_cost], "o-",
            label="FGTS.CDB (CCFT) over λ" + (f", AIQ {router_aiq:.3f}" if router_aiq is not None else ""))
    for lam, c, s in perf_cost:
        ax.annotate(f"λ={lam:g}", (c, s), fontsize=7)
    ax.set_xlabel("mean cost of the served arm (USD)")
    ax.set_ylabel("mean score of the served arm")
    ax.set_title(f"{name}: quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
