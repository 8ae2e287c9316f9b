"""What a sweep leaves behind, under ``<storage>/<name>/``:

- ``results.parquet``: one row per trial (status, group, every config field as ``section.field``,
  last metrics); ``progress.parquet``: every report of every trial (regret every N rounds);
- ``report/report.md`` with ``report/summary.json``: per group, the best complete trial's configuration
  and the default configuration re-run on fresh seeds (mean ± 95% CI), the uniform reference, the
  counts of texts encoded against unique texts, hyperparameter importance; ``report/rerun.parquet``
  (one row per configuration and fresh seed); PNG plots;
- ``report/serve/<dataset>-<split>-seed<k>.yaml``: the best configuration as a Serve config
  (``ray_router.serve.app:build_app``), validated against Serve's schema and the app's ``AppArgs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.config import parse
from ray_router.tune.spec import SweepSpec, section_values, slug
from ray_router.tune.trial import config_group, encoder_of

REPO = Path(__file__).resolve().parents[2]
TRIAL_METRICS = (
    "rounds_played",
    "mean_regret",
    "cum_regret_mean",
    "cum_regret_ci_low",
    "cum_regret_ci_high",
    "seeds_done",
    "time_total_s",
    "encoder_imported",
    "training_iteration",
)
PROGRESS_METRICS = (
    "training_iteration",
    "rounds_played",
    "seed",
    "seed_index",
    "round",
    "cum_regret",
    "mean_regret",
    "time_total_s",
)


# ------------------------------------------------------------------------------ frames
def _flat_config(spec: SweepSpec, config: Mapping[str, Any]) -> dict:
    out = {}
    for sec in ("embedding", "weighting", "fgts_cdb"):
        for k, v in section_values(spec, config, sec).items():
            out[f"{sec}.{k}"] = v
    return out


def result_frames(grid, spec: SweepSpec):
    """(trials, progress) DataFrames from a Tune ResultGrid. ``trials`` keeps the nested ``config``
    in memory (not written)."""
    import pandas as pd

    max_t = spec.max_rounds
    trial_metrics: tuple[str, ...] = TRIAL_METRICS
    progress_metrics: tuple[str, ...] = PROGRESS_METRICS
    if spec.objective is not None:  # progressive validation on logged duels (ray_router.tune.duels)
        from ray_router.tune.duels import TRIAL_METRICS as DUEL_METRICS

        trial_metrics, progress_metrics = TRIAL_METRICS + DUEL_METRICS, PROGRESS_METRICS + DUEL_METRICS
    rows, hist = [], []
    for r in grid:
        m = dict(r.metrics or {})
        c = dict(r.config or {})
        if "dataset" not in c:  # a trial that never started (the run was interrupted first)
            continue
        trial_id = m.get("trial_id") or (Path(str(r.path)).name if r.path else "?")
        complete = bool(m.get("complete")) and int(m.get("rounds_played") or 0) >= max_t
        status = "error" if r.error is not None else ("complete" if complete else "stopped")
        row = {
            "trial_id": str(trial_id),
            "status": status,
            "group": config_group(c),
            "dataset": c.get("dataset"),
            "split": c.get("split"),
            "split_seed": int(c.get("split_seed", 0)),
            "encoder": encoder_of(spec, c),
        }
        row.update(_flat_config(spec, c))
        row.update({k: m.get(k) for k in trial_metrics})
        row["error"] = None if r.error is None else str(r.error)[:2000]
        row["config"] = c
        rows.append(row)
        df = r.metrics_dataframe
        if df is not None and len(df):
            keep = [k for k in progress_metrics if k in df.columns]
            h = df[keep].copy()
            h.insert(0, "trial_id", str(trial_id))
            h.insert(1, "group", row["group"])
            hist.append(h)
    trials = pd.DataFrame(rows)
    if len(trials):
        numeric = ("mean_regret", "cum_regret_mean", "cum_regret_ci_low", "cum_regret_ci_high", "time_total_s")
        for k in numeric + tuple(k for k in trial_metrics if k not in TRIAL_METRICS):
            trials[k] = pd.to_numeric(trials[k], errors="coerce")
        trials = trials.sort_values(["group", "trial_id"]).reset_index(drop=True)
    progress = pd.concat(hist, ignore_index=True) if hist else pd.DataFrame(columns=["trial_id", "group"])
    return trials, progress


def write_frames(exp_dir: Path, trials, progress) -> dict[str, Path]:
    paths = {"results": exp_dir / "results.parquet", "progress": exp_dir / "progress.parquet"}
    flat = trials.drop(columns=["config"]) if "config" in trials.columns else trials
    flat.to_parquet(paths["results"], index=False)
    progress.to_parquet(paths["progress"], index=False)
    return paths


# -------------------------------------------------------------------------- importance
def _spearman2(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ² (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic ** 2)


def _eta2(labels: Sequence[Any], y: np.ndarray) -> float:
    names = np.asarray([str(v) for v in labels])
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0 or len(set(names.tolist())) < 2:
        return float("nan")
    between = sum(
        float((names == g).sum()) * (float(y[names == g].mean()) - float(y.mean())) ** 2 for g in set(names.tolist())
    )
    return between / total


def comparable(trials, progress, metric: str = "mean_regret"):
    """Per trial, a regret every trial of its group has: the mean regret per round over the first R
    rounds, R = the most rounds that every (non-error) trial of the group played (ASHA's first rung,
    or all rounds when nothing was stopped). Adds columns ``common_rounds`` and ``regret_at_common``.
    ``metric``: another running metric of the progress reports (a duels objective's ``log_loss``, ...)."""
    import pandas as pd

    t = trials[trials["status"] != "error"].copy()
    t["common_rounds"] = np.nan
    t["regret_at_common"] = np.nan
    if not len(t) or not len(progress):
        return t
    for _, g in t.groupby("group"):
        ids = set(g["trial_id"])
        pr = progress[progress["trial_id"].isin(ids)]
        reach = pr.groupby("trial_id")["rounds_played"].max()
        if not len(reach) or set(reach.index) != ids:
            continue
        R = int(reach.min())
        at = pr[pr["rounds_played"] == R].drop_duplicates("trial_id", keep="last").set_index("trial_id")[metric]
        t.loc[g.index, "common_rounds"] = R
        t.loc[g.index, "regret_at_common"] = pd.to_numeric(g["trial_id"].map(at), errors="coerce").to_numpy()
    return t


def _is_numeric(values) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)


def importance(trials, keys: Sequence[str], progress=None, metric: str = "mean_regret"):
    """Marginal importance of each swept field per group, averaged over groups: Spearman ρ² of a
    numeric field with ≥ 3 distinct values against the regret, else the correlation ratio η² (share of
    the regret's variance explained by the field's values). The regret is :func:`comparable`'s (the
    same rounds for every trial of a group, stopped ones included; ``metric``: see :func:`comparable`).
    A screening measure over random-search trials, not fANOVA."""
    import pandas as pd

    t = comparable(trials, progress if progress is not None else pd.DataFrame(), metric)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for _, g in t.groupby("group"):
        sub = g[np.isfinite(g["regret_at_common"].to_numpy(dtype=float))]
        if len(sub) < 3:
            continue
        y = sub["regret_at_common"].to_numpy(dtype=float)
        for k in keys:
            x = sub[k].to_numpy()
            if _is_numeric(x) and len(set(x.tolist())) >= 3:
                out[k].append(_spearman2(x.astype(float), y))
            else:
                out[k].append(_eta2(x, y))
    rows = [
        {
            "param": k,
            "importance": float(np.nanmean(v)) if v and not np.all(np.isnan(v)) else float("nan"),
            "n_groups": int(np.sum(~np.isnan(v))) if v else 0,
        }
        for k, v in out.items()
    ]
    df = pd.DataFrame(rows)
    return df.sort_values("importance", ascending=False, na_position="last").reset_index(drop=True)


def plot_params(
    trials, params: Sequence[str], spec: SweepSpec, out_dir: Path, progress=None, metric: str = "mean_regret"
) -> list[Path]:
    """Per dataset: each trial's regret over the group's common rounds (see :func:`comparable`) against
    each of ``params`` (rows: the dataset's groups; o complete trials, x stopped by ASHA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker
    import pandas as pd

    dists = {f"{sec}.{k}": d for sec, fields in spec.space_dists().items() for k, d in fields.items()}
    paths = []
    ok = comparable(trials, progress if progress is not None else pd.DataFrame(), metric)
    what = "regret/round" if metric == "mean_regret" else metric
    for ds, dft in ok.groupby("dataset", sort=False):
        groups = list(dict.fromkeys(dft["group"]))
        fig, axes = plt.subplots(
            len(groups), len(params), figsize=(3.4 * len(params), 2.9 * len(groups)), squeeze=False
        )
        for i, gk in enumerate(groups):
            g = dft[dft["group"] == gk]
            R = g["common_rounds"].iloc[0]
            for j, p in enumerate(params):
                ax = axes[i][j]
                numeric = _is_numeric(g[p].to_numpy())
                cats = sorted({str(v) for v in g[p].to_numpy()})
                for status, marker in (("complete", "o"), ("stopped", "x")):
                    sub = g[g["status"] == status]
                    if not len(sub):
                        continue
                    x = sub[p].to_numpy()
                    y = sub["regret_at_common"].to_numpy(dtype=float)
                    if numeric:
                        ax.scatter(x.astype(float), y, marker=marker, alpha=0.75, label=status)
                    else:
                        pos = np.array([cats.index(str(v)) for v in x], dtype=float)
                        pos += np.random.default_rng(j).uniform(-0.12, 0.12, len(pos))
                        ax.scatter(pos, y, marker=marker, alpha=0.75, label=status)
                if not numeric:
                    ax.set_xticks(range(len(cats)))
                    ax.set_xticklabels([c[:16] for c in cats], rotation=25, fontsize=7)
                d = dists.get(p)
                if d is not None and d.kind in ("loguniform", "lograndint"):
                    ax.set_xscale("log")
                    ax.xaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
                    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
                ax.set_xlabel(p, fontsize=8)
                if j == 0:
                    rounds = f"first {int(R)} rounds" if np.isfinite(R) else "last report"
                    ax.set_ylabel(f"{gk.split('|', 1)[1]}\n{what}, {rounds}", fontsize=8)
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=7)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(
            f"{ds}: {'mean regret per round' if metric == 'mean_regret' else metric} over the rounds every "
            "trial of the group played "
            "(o complete, x stopped by ASHA)",
            fontsize=9,
        )
        fig.tight_layout()
        path = out_dir / f"params_{slug(ds)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# -------------------------------------------------------------------------- Serve export
def serve_config(
    spec: SweepSpec,
    prepared,
    group,
    config: Mapping[str, Any],
    template: str | Path,
    trial_id: str | None = None,
    fresh: str = "",
) -> tuple[dict, str]:
    """A Serve config that deploys ``config`` (the measured FGTS.CDB config, weighting, encoder) for
    the group's dataset, built from ``template`` (``serve_configs/local.yaml``). Returns (config, header)."""
    from ray_router.policies.fgts_cdb import FGTSConfig
    from ray_router.serve import launch
    from ray_router.tune.trial import trial_eval_config

    tpath = Path(template)
    if not tpath.is_absolute():
        tpath = REPO / tpath
    cfg = launch.load_serve_config(tpath)
    apps = launch.our_apps(cfg)
    if not apps:
        raise ValueError(f"{tpath} has no app with import_path {launch.IMPORT_PATH}")
    app = apps[0]
    args = app.setdefault("args", {})
    table = prepared.tables[group.dataset]
    ds = spec.dataset(group.dataset)
    ecfg = trial_eval_config(spec, config, group.split_kwargs)
    prices = table.costs.mean(axis=0) if table.costs is not None else np.zeros(table.n_arms)
    args["arms"] = [{"id": a, "price_usd": float(f"{p:.3g}")} for a, p in zip(table.arms, prices)]
    lam = ecfg.cost_weight if ecfg.weighting_cost_weight is None else ecfg.weighting_cost_weight
    from_dataset = {
        "name": ds.name,
        "data_dir": None,
        "split": ecfg.split,
        "offline_fraction": ecfg.offline_fraction,
        "k_per_category": ecfg.k_per_category,
        "seed": int(group.split_seed),
        "weighting": {
            "name": ecfg.weighting,
            "cost_weight": float(lam),
            "top_tau": int(ecfg.weighting_tau),
            "beta": float(ecfg.weighting_beta),
        },
    }
    if ds.options:
        from_dataset["options"] = dict(ds.options)
    args["arm_embeddings"] = {"from_dataset": from_dataset}
    enc = encoder_of(spec, config)
    encoder = {"name": group.ccft_path if enc == "ccft" else spec.encoder.name, "device": "auto"}
    if enc != "ccft" and spec.encoder.max_seq_length is not None:
        encoder["max_seq_length"] = spec.encoder.max_seq_length
    if spec.encoder.backend != "torch":
        encoder["backend"] = spec.encoder.backend
    if spec.encoder.openai is not None:  # a remote encoder's options (never the key: only its variable's name)
        encoder["openai"] = spec.encoder.openai.model_dump(exclude_defaults=True)
    args["encoder"] = encoder
    measured = dataclasses.asdict(parse(FGTSConfig, section_values(spec, config, "fgts_cdb"), where="fgts_cdb"))
    old = dict((args.get("policy") or {}).get("config") or {})
    if "max_history" in old and measured.get("max_history", 0) == 0:
        measured["max_history"] = old["max_history"]  # serving-only memory bound, not a learning setting
    policy = dict(args.get("policy") or {})
    policy.update({"name": "fgts_cdb", "config": measured})
    args["policy"] = policy
    launch.validate_config(cfg)  # Serve's ServeDeploySchema and our AppArgs
    header = "\n".join(
        [
            f"# ray-router Serve config exported by the sweep {spec.name!r} (ray-router tune).",
            f"# Best configuration for {group.dataset} / split {group.split} / split seed {group.split_seed}"
            + (f" (trial {trial_id})" if trial_id else "")
            + ".",
            f"# {fresh}" if fresh else "#",
            "# policy.config is the FGTSConfig the trials measured (every field), except max_history, a",
            "# serving-only memory bound taken from the template; arm_embeddings.from_dataset rebuilds the",
            "# measured weighting from the same split and seed; encoder.name is the packaged base encoder or",
            "# the CCFT artifact the trials used (an absolute path in the CCFT artifact cache; keep it).",
            (
                f"# The sweep used a stratified subsample of {ds.subsample} queries; Serve reads the whole dataset,"
                if ds.subsample
                else "#"
            ),
            ("# so its offline rows differ from the sweep's (same split rule and seed)." if ds.subsample else "#"),
            f"# Template: {tpath.relative_to(REPO) if tpath.is_relative_to(REPO) else tpath}. Run: ray-router serve --config <this file>",
        ]
    )
    return cfg, header


def _write_yaml(path: Path, cfg: dict, header: str) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=110))
    return path


# ------------------------------------------------------------------------------ report
def _ci(rec: Mapping[str, Any]) -> str:
    lo, hi = rec["cum_regret_ci95"]
    return f"{rec['cum_regret_mean']:.1f} ± {(hi - lo) / 2:.1f}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def best_vs_default(config: Mapping[str, Any], defaults: Mapping[str, Any], spec: Any) -> list[str]:
    """Markdown table rows: each field of the best configuration beside the default's value."""
    lines = ["| field | best | default |", "|---|---|---|"]
    for k, v in config.items():
        sec, f = k.split(".", 1)
        d = defaults.get(sec, {}).get(f, spec.fixed.get(sec, {}).get(f, "(dataclass default)"))
        lines.append(f"| {k} | {_fmt(v)} | {_fmt(d)} |")
    return [*lines, ""]


def _verdict(best: Mapping, default: Mapping) -> str:
    b_lo, b_hi = best["cum_regret_ci95"]
    d_lo, d_hi = default["cum_regret_ci95"]
    if b_hi < d_lo:
        return "best < default (95% CIs disjoint)"
    if d_hi < b_lo:
        return "default < best (95% CIs disjoint): the sweep's pick did not hold up on fresh seeds"
    return "no significant difference (95% CIs overlap)"


def write_report(
    exp_dir: Path,
    spec: SweepSpec,
    prepared,
    trials,
    progress,
    reruns: list[dict],
    runs: list[dict],
    data_dir=None,
    log: Callable[[str], None] = print,
    wall_seconds: float = 0.0,
) -> dict[str, Path]:
    """The files of ``<exp_dir>/report`` (module docstring); returns their paths by name."""
    out = exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {
        "report": out / "report.md",
        "summary": out / "summary.json",
        "rerun": out / "rerun.parquet",
    }
    _write_reruns(paths["rerun"], spec, reruns)
    imp, param_plots = _importance_plots(spec, trials, progress, out)
    groups, sections = [], []
    for g in prepared.groups.values():
        entry, section = _group_report(spec, prepared, g, trials, reruns, out, log)
        groups.append(entry)
        sections.append(section)
        if entry.get("serve_config"):
            paths[f"serve:{g.key}"] = Path(entry["serve_config"])
    summary = _summary(spec, prepared, trials, runs, imp, groups, wall_seconds)
    paths["summary"].write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    paths["report"].write_text(_report_md(spec, summary, imp, param_plots, sections))
    paths.update({f"plot:{p.stem}": p for p in param_plots})
    log(f"report: {paths['report']}")
    return paths


def _n_rounds(spec: SweepSpec) -> int:
    return int(spec.eval.get("n_rounds", 2000))


def _write_reruns(path: Path, spec: SweepSpec, reruns: list[dict]) -> None:
    """``rerun.parquet``: one row per re-run configuration and fresh seed."""
    import pandas as pd

    rows = []
    for r in reruns:
        rec = r["record"]
        for seed, v in zip(
            range(spec.report.base_seed, spec.report.base_seed + rec["n_seeds"]), rec["cum_regret_per_seed"]
        ):
            rows.append(
                {
                    "group": r["group"],
                    "dataset": r["dataset"],
                    "split": r["split"],
                    "split_seed": r["split_seed"],
                    "role": r["role"],
                    "trial_id": r["trial_id"],
                    "encoder": r["encoder"],
                    "seed": seed,
                    "cum_regret": float(v),
                    "n_rounds": rec["n_rounds"],
                    "config": json.dumps(r["config"], sort_keys=True, default=str),
                }
            )
    pd.DataFrame(rows).to_parquet(path, index=False)


def _importance_plots(spec: SweepSpec, trials, progress, out: Path):
    """(importance table, plots of the ``report.top_params`` most important swept fields)."""
    import pandas as pd

    keys = [f"{sec}.{k}" for sec, k in spec.swept_keys()]
    imp = (
        importance(trials, keys, progress)
        if keys and len(trials)
        else pd.DataFrame(columns=["param", "importance", "n_groups"])
    )
    top = [p for p in imp["param"].tolist() if p in trials.columns][: spec.report.top_params]
    return imp, (plot_params(trials, top, spec, out, progress) if top else [])


def _group_report(
    spec: SweepSpec, prepared, g, trials, reruns: list[dict], out: Path, log: Callable[[str], None]
) -> tuple[dict[str, Any], str]:
    """One group's summary entry and report section: its trials, its fresh-seed re-runs (plotted),
    the best configuration with its Serve config."""
    from ray_router.tune.spec import default_config

    rs = {r["role"]: r for r in reruns if r["group"] == g.key}
    gt = trials[trials["group"] == g.key]
    plot_path = _plot_reruns(g, rs, out)
    entry: dict[str, Any] = {
        "group": g.key,
        "dataset": g.dataset,
        "split": g.split,
        "split_seed": g.split_seed,
        "held_out": g.split_kwargs.get("held_out"),
        "n_offline": g.n_offline,
        "n_online": g.n_online,
        "trials": len(gt),
        "complete": int((gt["status"] == "complete").sum()),
        "stopped": int((gt["status"] == "stopped").sum()),
        "errored": int((gt["status"] == "error").sum()),
    }
    for role, r in rs.items():
        rec = r["record"]
        entry[role] = {
            "cum_regret_mean": rec["cum_regret_mean"],
            "cum_regret_ci95": rec["cum_regret_ci95"],
            "per_seed": rec["cum_regret_per_seed"],
            "served_score_mean": rec["served_score_mean"],
            "encoder": r["encoder"],
            "trial_id": r["trial_id"],
        }
    if "best" in rs:
        _add_best(spec, prepared, g, entry, rs, gt, out, log)
    return entry, _group_section(spec, g, entry, rs, default_config(spec), plot_path, out, _n_rounds(spec))


def _plot_reruns(g, rs: Mapping[str, dict], out: Path) -> Path | None:
    """The group's fresh-seed regret curves, one line per configuration (None when nothing re-ran)."""
    import pandas as pd

    from ray_router.evaluation.plots import plot_regret

    curves = []
    for role, r in rs.items():
        c = r["curves"].copy()
        c["config"] = f"{role} ({r['encoder']})" if role != "uniform" else "uniform"
        curves.append(c)
    if not curves:
        return None
    plot_path = out / f"rerun_{slug(g.dataset)}_{slug(g.split)}_seed{g.split_seed}.png"
    plot_regret(
        pd.concat(curves, ignore_index=True),
        plot_path,
        group="config",
        title=f"{g.dataset} / {g.split} / split seed {g.split_seed}: fresh seeds",
    )
    return plot_path


def _add_best(
    spec: SweepSpec, prepared, g, entry: dict, rs: Mapping[str, dict], gt, out: Path, log: Callable[[str], None]
) -> None:
    """The best trial's own estimate and configuration, the verdict against the default, its Serve config."""
    best = rs["best"]
    bt = gt[gt["trial_id"] == best["trial_id"]].iloc[0]
    entry["best"]["trial_estimate"] = {
        "cum_regret_mean": float(bt["cum_regret_mean"]),
        "ci95": [float(bt["cum_regret_ci_low"]), float(bt["cum_regret_ci_high"])],
        "seeds": int(spec.eval.get("n_seeds", 5)),
    }
    entry["best"]["config"] = {k: bt[k] for k in _flat_config(spec, best["config"])}
    if "default" in rs:
        entry["verdict"] = _verdict(best["record"], rs["default"]["record"])
    if not spec.report.export_serve or g.split_kwargs["split"] == "holdout":
        return
    try:
        fresh = (
            f"Fresh-seed cumulative regret at T={_n_rounds(spec)}: {_ci(best['record'])} "
            f"(default {_ci(rs['default']['record'])})"
            if "default" in rs
            else ""
        )
        cfg, header = serve_config(
            spec, prepared, g, best["config"], spec.report.serve_template, trial_id=best["trial_id"], fresh=fresh
        )
        sp = _write_yaml(out / "serve" / f"{slug(g.dataset)}-{slug(g.split)}-seed{g.split_seed}.yaml", cfg, header)
        entry["serve_config"] = str(sp)
    except Exception as e:  # noqa: BLE001 - the report still lists the config
        entry["serve_config_error"] = f"{type(e).__name__}: {e}"
        log(f"{g.key}: Serve config not exported: {e}")


def _summary(spec: SweepSpec, prepared, trials, runs: list[dict], imp, groups: list[dict], wall_seconds: float) -> dict:
    """``summary.json``: counts, driver runs, encoding, CCFT artifacts, importance, groups."""
    n_imported = int(trials["encoder_imported"].fillna(False).astype(bool).sum()) if len(trials) else 0
    fresh_runs = [r for r in runs if not r.get("resumed")]
    base_seed, n_seeds = int(spec.eval.get("base_seed", 0)), int(spec.eval.get("n_seeds", 5))
    return {
        "sweep": spec.name,
        "description": spec.description,
        "trials": len(trials),
        "complete": int((trials["status"] == "complete").sum()),
        "stopped_early": int((trials["status"] == "stopped").sum()),
        "errored": int((trials["status"] == "error").sum()),
        "driver_runs": len(runs),
        "resumes": len(runs) - len(fresh_runs),
        "runs": runs,
        "interrupted_runs": sum(1 for r in runs if r.get("interrupted")),
        "fit_seconds_total": round(sum(r.get("fit_seconds", 0) for r in runs), 1),
        "prepare_seconds_total": round(sum(r.get("prepare_seconds", 0) for r in runs), 1),
        "wall_seconds_this_run": round(wall_seconds, 1),
        "cpus": runs[-1].get("cpus") if runs else None,
        "trial_cpu_seconds": round(float(trials["time_total_s"].fillna(0).sum()), 1) if len(trials) else 0.0,
        "encoding_this_run": prepared.encoding_totals(),
        "encoding_by_identity": prepared.encoding,
        "encoding_per_run": [
            {k: r.get(k) for k in ("texts_encoded", "unique_texts", "cache_hits", "resumed")} for r in runs
        ],
        "trials_that_imported_an_encoder": n_imported,
        "ccft_artifacts": prepared.ccft,
        "importance": imp.to_dict(orient="records"),
        "groups": groups,
        "report_seeds": list(range(spec.report.base_seed, spec.report.base_seed + spec.report.seeds)),
        "trial_seeds": list(range(base_seed, base_seed + n_seeds)),
        "n_rounds": _n_rounds(spec),
    }


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return str(v)


def _group_section(spec, g, entry, rs, defaults, plot_path, out: Path, n_rounds: int) -> str:
    title = (
        f"## {g.dataset} / {g.split}"
        + (f" (held out: {entry['held_out']})" if entry.get("held_out") else "")
        + f" / split seed {g.split_seed}"
    )
    lines = [
        title,
        "",
        f"{g.n_offline} offline / {g.n_online} online queries. Trials: {entry['trials']} "
        f"({entry['complete']} complete, {entry['stopped']} stopped early, {entry['errored']} errored).",
        "",
    ]
    if rs:
        lines += [
            f"Cumulative regret at T = {n_rounds} on {spec.report.seeds} fresh seeds "
            f"({spec.report.base_seed}..{spec.report.base_seed + spec.report.seeds - 1}; the trials used "
            f"{int(spec.eval.get('n_seeds', 5))} other seeds), mean ± 95% CI:",
            "",
            "| configuration | encoder | cum. regret | served score |",
            "|---|---|---:|---:|",
        ]
        for role in ("best", "default", "uniform"):
            r = rs.get(role)
            if r is not None:
                rec = r["record"]
                name = f"best (trial {r['trial_id']})" if role == "best" else role
                lines.append(
                    f"| {name} | {r['encoder'] if role != 'uniform' else '-'} | {_ci(rec)} | "
                    f"{rec['served_score_mean']:.3f} |"
                )
        lines.append("")
    if entry.get("verdict"):
        lines += [f"Verdict: **{entry['verdict']}**.", ""]
    best = entry.get("best", {})
    if "config" in best:
        est = best["trial_estimate"]
        lines += [
            f"In the sweep this configuration scored {est['cum_regret_mean']:.1f} "
            f"[{est['ci95'][0]:.1f}, {est['ci95'][1]:.1f}] on the trial seeds (optimistic: it was picked "
            "as the lowest of many).",
            "",
            *best_vs_default(best["config"], defaults, spec),
        ]
    if entry.get("serve_config"):
        lines += [
            f"Serve config: [`{Path(entry['serve_config']).relative_to(out)}`]"
            f"({Path(entry['serve_config']).relative_to(out)})",
            "",
        ]
    elif g.split_kwargs["split"] == "holdout":
        lines += [
            "No Serve config: a held-out split is a robustness test (Serve builds arm embeddings from a "
            "stratified or k-per-category split).",
            "",
        ]
    elif entry.get("serve_config_error"):
        lines += [f"Serve config not exported: {entry['serve_config_error']}", ""]
    if plot_path is not None:
        lines += [f"![{g.key}]({plot_path.name})", ""]
    return "\n".join(lines)


def _run_line(i: int, r: Mapping[str, Any]) -> str:
    kind = "resume" if r.get("resumed") else "fresh"
    parts = [f"data {r.get('prepare_seconds', 0) / 60:.1f} min ({r.get('texts_encoded', '?')} texts encoded)"]
    if "fit_seconds" in r:
        parts.append(f"tuning {r['fit_seconds'] / 60:.1f} min")
    if "wall_seconds" in r:
        parts.append(f"wall {r['wall_seconds'] / 60:.1f} min")
    if r.get("interrupted"):
        parts.append("interrupted")
    return f"{i + 1}. {kind}: " + ", ".join(parts)


def _report_md(spec: SweepSpec, s: dict, imp, param_plots: list[Path], sections: list[str]) -> str:
    tot = s["encoding_this_run"]
    lines = [f"# Sweep `{s['sweep']}`", ""]
    if s["description"]:
        lines += [s["description"].strip(), ""]
    lines += [
        f"- Trials: **{s['trials']}** ({s['complete']} complete, {s['stopped_early']} stopped early by ASHA, "
        f"{s['errored']} errored) over {len(s['groups'])} groups (dataset × split × split seed), "
        f"{spec.search.num_samples} sampled configurations each; {s['n_rounds']} rounds × "
        f"{len(s['trial_seeds'])} seeds per complete trial.",
        f"- Wall time of this driver run: {s['wall_seconds_this_run'] / 60:.1f} min (Ray start, data, tuning, "
        f"re-runs; {s['cpus']} CPUs). Trial time summed over trials {s['trial_cpu_seconds'] / 60:.1f} min. "
        "Driver runs: " + "; ".join(_run_line(i, r) for i, r in enumerate(s["runs"])) + ".",
        f"- Texts: **{tot['texts_encoded']} encoded** by the driver in this run, for "
        f"**{tot['unique_texts']} unique (encoder, text) pairs** ({tot['texts_requested']} requested, "
        f"{tot['cache_hits']} from the on-disk cache). Trials that imported an encoder library: "
        f"**{s['trials_that_imported_an_encoder']} of {s['trials']}** (trials read embeddings from Ray's object store).",
        "",
        "| encoder identity | used for | requested | unique | encoded | cache hits |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in s["encoding_by_identity"]:
        lines.append(
            f"| `{r['encoder'][:70]}` | {', '.join(r['used_for'])[:80]} | {r['texts_requested']} | "
            f"{r['unique_texts']} | {r['texts_encoded']} | {r['cache_hits']} |"
        )
    if s["encoding_per_run"] and len(s["encoding_per_run"]) > 1:
        lines += [
            "",
            "Per driver run (a resume re-reads the cache): "
            + "; ".join(
                f"run {i + 1}{' (resume)' if r.get('resumed') else ''}: {r['texts_encoded']} encoded / {r['unique_texts']} unique"
                for i, r in enumerate(s["encoding_per_run"])
            ),
        ]
    if s["ccft_artifacts"]:
        lines += ["", "| CCFT artifact | offline queries | trained / reused | seconds |", "|---|---:|---|---:|"]
        for a in s["ccft_artifacts"]:
            lines.append(
                f"| {a['dataset']}/{a['split']}/seed{a['split_seed']} `{Path(a['path']).name}` | "
                f"{a['n_offline']} | {'reused' if a['reused'] else 'trained'} | {a['seconds']} |"
            )
    lines += ["", *sections]
    lines += [
        "## Hyperparameter importance",
        "",
        "Marginal screening over the random-search trials, averaged over groups: Spearman ρ² for numeric "
        "fields with ≥ 3 values, else the correlation ratio η² (variance of the regret explained). The regret "
        "of a trial is its mean regret per round over the rounds every trial of its group played (ASHA's "
        "first rung), so stopped trials count on equal terms.",
        "",
        "| field | importance | groups |",
        "|---|---:|---:|",
    ]
    for _, r in imp.iterrows():
        v = r["importance"]
        lines.append(f"| {r['param']} | {'n/a' if not np.isfinite(v) else f'{v:.2f}'} | {r['n_groups']} |")
    lines.append("")
    for p in param_plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    return "\n".join(lines)
