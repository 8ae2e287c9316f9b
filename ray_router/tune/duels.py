"""Sweeps whose objective is progressive validation on logged duels (issue 15).

    objective: {duels: duels.parquet, metric: log_loss}     # or: ray-router tune FILE --duels duels.parquet

A deployment's logged duels (``ray-router log export``) score each sampled configuration instead of a
replay: the trial builds FGTS.CDB under its configuration exactly as ``evaluate --duels`` does (the
group's dataset and split give the arm embeddings and the offline prior; the sampled ``weighting``
shapes the arm embeddings), walks the log in order, **predicts** each duel's verdict before learning
from it (:func:`ray_router.evaluation.progressive.run_progressive`), and reports every
``search.report_every`` duels the running mean so far of ``log_loss``, ``brier`` and ``accuracy``
(weighted by the duels' weights, over every seed played so far): ASHA compares trials of a group at
the same ``rounds_played`` (duels predicted over all seeds), i.e. on the same duels. The last report
equals :func:`~ray_router.evaluation.progressive.evaluate_duels`'s metric for the same configuration
and seeds.

The report re-runs the best configuration (by the objective's metric), the default configuration and
``uniform`` on fresh policy seeds over the same log, with moving-block bootstrap intervals and a paired
interval of best − default, and exports the best configuration as a Serve config labelled as chosen
on logged duels. Ray is imported only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.errors import ConfigError
from ray_router.evaluation.duels import DuelLog, read_duels
from ray_router.evaluation.progressive import (
    check_encoder,
    duel_losses,
    log_for_table,
    paired_difference,
    run_progressive,
    seed_policies,
)
from ray_router.tune.spec import SweepSpec, validate

METRICS = ("log_loss", "brier", "accuracy")
METRIC_LABEL = {"log_loss": "log-loss", "brier": "Brier score", "accuracy": "accuracy (non-tied duels)"}
TRIAL_METRICS = ("duel", *METRICS)  # reported beside rounds_played, seed, seed_index, complete

Report = Callable[[dict, "dict | None"], None]


# ----------------------------------------------------------------------------- the log
def head(log: DuelLog, n: int) -> DuelLog:
    """The first ``n`` duels of ``log``."""
    if n >= len(log):
        return log
    return dataclasses.replace(
        log,
        X=log.X[:n],
        first=log.first[:n],
        second=log.second[:n],
        y=log.y[:n],
        offered=log.offered[:n],
        weight=log.weight[:n],
        source=log.source[:n],
        ts=log.ts[:n],
        seq=log.seq[:n],
        config_version=log.config_version[:n],
        propensity=None if log.propensity is None else log.propensity[:n],
    )


def resolve_objective(spec: SweepSpec) -> tuple[SweepSpec, DuelLog | None]:
    """Read the objective's duel log (a DataError for a missing file or one that is not a duel log),
    take its first ``objective.n_duels`` duels, and return the spec with the log's absolute path and
    its duel count filled in (the trials' length: ASHA's time axis), re-validated. (spec, None)
    without an objective."""
    obj = spec.objective
    if obj is None:
        return spec, None
    path = Path(obj.duels).expanduser().resolve()
    log = read_duels(path)
    if obj.n_duels > len(log):
        raise ConfigError(f"objective.n_duels = {obj.n_duels}: the log {path} has {len(log)} duels")
    n = obj.n_duels or len(log)
    spec = spec.model_copy(update={"objective": obj.model_copy(update={"duels": str(path), "n_duels": n})})
    return validate(spec), head(log, n)


def file_digest(path: str | Path) -> str:
    """sha256 of a file (a resumed sweep must score the same log)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_log(spec: SweepSpec, prepared: Any, log: DuelLog) -> None:
    """Before any trial: the log's encoder is the sweep's base encoder (unless ``objective.any_encoder``),
    and every dataset of the sweep has the log's arms and its embedding dimension."""
    hint = ": set the sweep's encoder to the deployment's (or objective.any_encoder: true to score it anyway)"
    check_encoder(log, prepared.base_identity, spec.objective is not None and spec.objective.any_encoder, hint)
    for g in prepared.groups.values():
        table = prepared.tables[g.dataset]
        log_for_table(log, table, prepared.arrays[g.arrays["base"]])


# ---------------------------------------------------------------------------- the trial
def new_state() -> dict:
    return {
        "seeds_done": 0,
        "rounds_played": 0,
        "sums": {m: [0.0, 0.0] for m in METRICS},  # weighted sum, weight (NaN duels left out)
        "per_seed": {m: [] for m in METRICS},
        "seconds": 0.0,
    }


def _sums(values: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    ok = ~np.isnan(values)
    return float((values[ok] * w[ok]).sum()), float(w[ok].sum())


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def run_duels_trial(
    table: Any,
    X: np.ndarray,
    log: DuelLog,
    cfg: Any,
    report: Report,
    report_every: int = 100,
    refresh_every: int = 1,
    state: Mapping[str, Any] | None = None,
) -> dict:
    """Progressive validation of ``cfg.policies[0]`` (FGTS.CDB under the trial's configuration) on
    ``log`` for each of ``cfg.seeds``, calling ``report(metrics, checkpoint_state)`` every
    ``report_every`` duels and after each seed's last duel (``checkpoint_state``: a JSON-able dict
    after each finished seed, else None). ``state``: a checkpoint to resume from. Returns the last
    metrics. Each report holds ``rounds_played`` (duels predicted over all seeds so far), ``seed``,
    ``seed_index``, ``duel`` (within the seed) and the running weighted means of ``log_loss``,
    ``brier`` and ``accuracy`` over every duel predicted so far."""
    st: dict[str, Any] = json.loads(json.dumps({**new_state(), **dict(state or {})}))  # a private deep copy
    log = log_for_table(log, table, X)
    name, seeds, n = cfg.policies[0], cfg.seeds, len(log)
    y, w = log.y, log.weight
    last: dict = {}

    def metrics_now(i: int, seed: int, t: int, sums: Mapping[str, list[float]]) -> dict:
        return {
            "rounds_played": int(st["rounds_played"]) + t,
            "seed": int(seed),
            "seed_index": i,
            "duel": t,
            **{m: _ratio(*sums[m]) for m in METRICS},
            "seeds_done": int(st["seeds_done"]),
            "complete": False,
        }

    for i, seed in enumerate(seeds):
        if i < st["seeds_done"]:
            continue  # finished before an interruption
        t0 = time.perf_counter()
        policy = seed_policies(table, X, cfg, int(seed))[name]

        def hook(t: int, p: np.ndarray, i: int = i, seed: int = int(seed), t0: float = t0) -> None:
            nonlocal last
            losses = duel_losses(p, y[:t])
            seed_sums = {m: _sums(losses[m], w[:t]) for m in METRICS}
            sums = {m: [st["sums"][m][0] + seed_sums[m][0], st["sums"][m][1] + seed_sums[m][1]] for m in METRICS}
            metrics = metrics_now(i, seed, t, sums)
            checkpoint = None
            if t == n:
                st["sums"] = sums
                st["rounds_played"] = int(st["rounds_played"]) + n
                st["seeds_done"] = i + 1
                st["seconds"] = float(st["seconds"]) + time.perf_counter() - t0
                for m in METRICS:
                    st["per_seed"][m].append(_ratio(*seed_sums[m]))
                metrics.update(seeds_done=i + 1, complete=i + 1 == len(seeds))
                checkpoint = json.loads(json.dumps(st))
            last = metrics
            report(metrics, checkpoint)

        run_progressive(policy, log, refresh_every, on_progress=hook, progress_every=report_every)
    if not last and st["seeds_done"] == len(seeds):  # resumed after its last seed: report the result again
        last = metrics_now(len(seeds) - 1, int(seeds[-1]), 0, st["sums"])
        last.update(duel=n, rounds_played=int(st["rounds_played"]), complete=True)
        report(last, None)
    return last


# ----------------------------------------------------------------------------- re-runs
def _rerun_task(table, X, cfg, log: DuelLog, refresh_every: int, blas_threads: int):
    from threadpoolctl import threadpool_limits

    from ray_router.evaluation.progressive import evaluate_duels

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return evaluate_duels(table, X, cfg, log, refresh_every)[0]


def best_trial(spec: SweepSpec, rows: Any) -> Any:
    """The best of ``rows`` (complete trials of one group) by the objective's metric, or None."""
    metric, mode = spec.metric
    ok = rows[np.isfinite(rows[metric].to_numpy(dtype=float))]
    if not len(ok):
        return None
    return ok.sort_values([metric, "trial_id"], ascending=[mode == "min", True]).iloc[0]


def rerun_on_duels(spec: SweepSpec, prepared: Any, data: dict, trials: Any, log: Callable[[str], None]) -> list[dict]:
    """Per group: the best complete trial's configuration, the default configuration and ``uniform``,
    each validated progressively on the log with ``report.seeds`` fresh policy seeds (Ray tasks)."""
    import ray

    from ray_router.tune.spec import default_config
    from ray_router.tune.trial import trial_eval_config

    assert spec.objective is not None
    task = ray.remote(num_cpus=spec.search.resources_per_trial.cpu)(_rerun_task)
    fresh = {"base_seed": spec.report.base_seed, "n_seeds": spec.report.seeds}
    defaults = default_config(spec)
    jobs = []
    for g in prepared.groups.values():
        gd = data["groups"][g.key]
        rows = trials[(trials["group"] == g.key) & (trials["status"] == "complete")] if len(trials) else trials
        best = best_trial(spec, rows) if len(rows) else None
        candidates: list[tuple[str, Mapping[str, Any], tuple[str, ...], str | None]] = []
        if best is not None:
            candidates.append(("best", dict(best["config"]), ("fgts_cdb",), str(best["trial_id"])))
        else:
            log(f"{g.key}: no complete trial (all stopped early or failed); re-running the default only")
        candidates += [("default", defaults, ("fgts_cdb",), None), ("uniform", {}, ("uniform",), None)]
        for role, config, policies, trial_id in candidates:
            cfg = trial_eval_config(spec, config, g.split_kwargs, policies=policies, **fresh)
            ref = task.remote(
                gd["table"], gd["X"]["base"], cfg, data["duels"], spec.objective.refresh_every, spec.search.blas_threads
            )
            meta = {"group": g.key, "role": role, "config": dict(config), "trial_id": trial_id}
            jobs.append((meta, ref))
    t0 = time.time()
    log(
        f"re-running {len(jobs)} configurations on the logged duels with {spec.report.seeds} fresh seeds "
        f"({spec.report.base_seed}..{spec.report.base_seed + spec.report.seeds - 1})"
    )
    out = [{**meta, "summary": ray.get(ref)} for meta, ref in jobs]
    log(f"re-runs done in {time.time() - t0:.0f}s")
    return out


# ------------------------------------------------------------------------------ report
def _ci(m: Mapping[str, float]) -> str:
    return f"{m['mean']:.4f} [{m['lo']:.4f}, {m['hi']:.4f}]"


def verdict(diff: Mapping[str, float], metric: str, mode: str) -> str:
    """Best − default on ``metric`` (paired interval) in words."""
    better_when_below = mode == "min"
    if not (np.isfinite(diff["lo"]) and np.isfinite(diff["hi"])):
        return "not comparable (no interval)"
    if (diff["hi"] < 0) if better_when_below else (diff["lo"] > 0):
        return f"best better than default on {metric} (paired 95% CI of the difference excludes 0)"
    if (diff["lo"] > 0) if better_when_below else (diff["hi"] < 0):
        return f"default better than best on {metric} (paired 95% CI): the sweep's pick did not hold up on fresh seeds"
    return "no significant difference (paired 95% CI of the difference contains 0)"


def write_duels_report(
    exp_dir: Path,
    spec: SweepSpec,
    prepared: Any,
    trials: Any,
    progress: Any,
    reruns: list[dict],
    log: DuelLog,
    runs: list[dict],
    say: Callable[[str], None] = print,
    wall_seconds: float = 0.0,
) -> dict[str, Path]:
    """``report/report.md``, ``report/summary.json``, ``report/reliability_*.png`` and the best
    configuration's Serve config ``report/serve/<dataset>-<split>-seed<k>.yaml`` (labelled as chosen on
    logged duels). Returns the paths by name."""
    import pandas as pd

    from ray_router.tune import report as rep
    from ray_router.tune.spec import default_config

    assert spec.objective is not None
    metric, mode = spec.metric
    out = exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"report": out / "report.md", "summary": out / "summary.json"}
    keys = [f"{sec}.{k}" for sec, k in spec.swept_keys()]
    imp = (
        rep.importance(trials, keys, progress, metric=metric)
        if keys and len(trials)
        else pd.DataFrame(columns=["param", "importance", "n_groups"])
    )
    top = [p for p in imp["param"].tolist() if p in trials.columns][: spec.report.top_params]
    plots = rep.plot_params(trials, top, spec, out, progress, metric=metric) if top else []
    defaults = default_config(spec)
    groups, sections = [], []
    for g in prepared.groups.values():
        entry, section = _group(spec, prepared, g, trials, reruns, log, out, defaults, say)
        groups.append(entry)
        sections.append(section)
        if entry.get("serve_config"):
            paths[f"serve:{g.key}"] = Path(entry["serve_config"])
        if entry.get("reliability_plot"):
            paths[f"plot:reliability:{g.key}"] = Path(entry["reliability_plot"])
    summary = {
        "sweep": spec.name,
        "description": spec.description,
        "objective": {
            "duels": spec.objective.duels,
            "n_duels": len(log),
            "encoder": log.encoder,
            "metric": metric,
            "mode": mode,
            "refresh_every": spec.objective.refresh_every,
        },
        "trials": len(trials),
        "complete": int((trials["status"] == "complete").sum()) if len(trials) else 0,
        "stopped_early": int((trials["status"] == "stopped").sum()) if len(trials) else 0,
        "errored": int((trials["status"] == "error").sum()) if len(trials) else 0,
        "driver_runs": len(runs),
        "resumes": sum(1 for r in runs if r.get("resumed")),
        "wall_seconds_this_run": round(wall_seconds, 1),
        "encoding_this_run": prepared.encoding_totals(),
        "trials_that_imported_an_encoder": int(trials["encoder_imported"].fillna(False).astype(bool).sum())
        if len(trials)
        else 0,
        "importance": imp.to_dict(orient="records"),
        "groups": groups,
        "report_seeds": list(range(spec.report.base_seed, spec.report.base_seed + spec.report.seeds)),
        "trial_seeds": [int(s) for s in _trial_seeds(spec)],
    }
    paths["summary"].write_text(json.dumps(summary, indent=2, default=rep._json_default) + "\n")
    paths["report"].write_text(_report_md(spec, summary, imp, plots, sections))
    paths.update({f"plot:{p.stem}": p for p in plots})
    say(f"report: {paths['report']}")
    return paths


def _trial_seeds(spec: SweepSpec) -> list[int]:
    from ray_router.tune.spec import eval_config

    return list(eval_config(spec.eval).seeds)


def _record(summary: Any) -> dict:
    return {
        **{m: dict(summary.metrics[m]) for m in METRICS},
        "ece": summary.calibration["ece"],
        "n_seeds": summary.n_seeds,
        "served_share": summary.served_share,
    }


def _group(
    spec: SweepSpec,
    prepared: Any,
    g: Any,
    trials: Any,
    reruns: list[dict],
    log: DuelLog,
    out: Path,
    defaults: Mapping[str, Any],
    say: Callable[[str], None],
) -> tuple[dict, str]:
    from ray_router.evaluation.progressive import plot_reliability
    from ray_router.tune import report as rep
    from ray_router.tune.spec import slug

    metric, mode = spec.metric
    rs = {r["role"]: r for r in reruns if r["group"] == g.key}
    gt = trials[trials["group"] == g.key] if len(trials) else trials
    entry: dict[str, Any] = {
        "group": g.key,
        "dataset": g.dataset,
        "split": g.split,
        "split_seed": g.split_seed,
        "held_out": g.split_kwargs.get("held_out"),
        "n_offline": g.n_offline,
        "trials": len(gt),
        "complete": int((gt["status"] == "complete").sum()) if len(gt) else 0,
        "stopped": int((gt["status"] == "stopped").sum()) if len(gt) else 0,
        "errored": int((gt["status"] == "error").sum()) if len(gt) else 0,
    }
    for role, r in rs.items():
        entry[role] = {"trial_id": r["trial_id"], **_record(r["summary"])}
    if "best" in rs:
        bt = gt[gt["trial_id"] == rs["best"]["trial_id"]].iloc[0]
        entry["best"]["trial_estimate"] = {m: float(bt[m]) for m in METRICS}
        entry["best"]["config"] = {k: bt[k] for k in rep._flat_config(spec, rs["best"]["config"])}
        if "default" in rs:
            diff = paired_difference(
                rs["best"]["summary"], rs["default"]["summary"], metric, log, seed=spec.report.base_seed
            )
            entry["best_minus_default"] = {"metric": metric, **diff}
            entry["verdict"] = verdict(diff, metric, mode)
    labelled = []
    for role in ("best", "default", "uniform"):
        if role in rs:
            label = f"best (trial {rs[role]['trial_id']})" if role == "best" else role
            labelled.append(dataclasses.replace(rs[role]["summary"], policy=label))
    if labelled:
        plot = plot_reliability(labelled, out / f"reliability_{slug(g.dataset)}_{slug(g.split)}_seed{g.split_seed}.png")
        entry["reliability_plot"] = str(plot)
    if "best" in rs and spec.report.export_serve and g.split_kwargs["split"] != "holdout":
        _export(spec, prepared, g, rs, entry, out, log, say)
    return entry, _section(spec, g, entry, defaults, out)


def _export(spec: SweepSpec, prepared, g, rs: Mapping[str, dict], entry: dict, out: Path, log: DuelLog, say) -> None:
    from ray_router.tune import report as rep
    from ray_router.tune.spec import slug

    assert spec.objective is not None
    metric, _ = spec.metric
    best = rs["best"]
    fresh = f"Fresh-seed {METRIC_LABEL[metric]} on the log: {_ci(entry['best'][metric])}" + (
        f" (default {_ci(entry['default'][metric])})" if "default" in entry else ""
    )
    try:
        cfg, header = rep.serve_config(
            spec, prepared, g, best["config"], spec.report.serve_template, trial_id=best["trial_id"], fresh=fresh
        )
        chosen = "\n".join(
            [
                "# CHOSEN ON LOGGED DUELS: this configuration won a sweep scored by progressive validation",
                f"# ({METRIC_LABEL[metric]}) on {len(log)} logged duels of {spec.objective.duels}",
                f"# (embedded by {log.encoder or 'an unknown encoder'}), not by replaying a benchmark.",
            ]
        )
        path = out / "serve" / f"{slug(g.dataset)}-{slug(g.split)}-seed{g.split_seed}.yaml"
        entry["serve_config"] = str(rep._write_yaml(path, cfg, chosen + "\n" + header))
    except Exception as e:  # noqa: BLE001 - the report still lists the config
        entry["serve_config_error"] = f"{type(e).__name__}: {e}"
        say(f"{g.key}: Serve config not exported: {e}")


def _section(spec: SweepSpec, g, entry: dict, defaults: Mapping[str, Any], out: Path) -> str:
    from ray_router.tune.report import best_vs_default

    metric, _ = spec.metric
    lines = [
        f"## {g.dataset} / {g.split}"
        + (f" (held out: {entry['held_out']})" if entry.get("held_out") else "")
        + f" / split seed {g.split_seed}",
        "",
        f"Arm embeddings and offline prior from {g.n_offline} offline queries. Trials: {entry['trials']} "
        f"({entry['complete']} complete, {entry['stopped']} stopped early, {entry['errored']} errored).",
        "",
    ]
    roles = [r for r in ("best", "default", "uniform") if r in entry]
    if roles:
        lines += [
            f"Progressive validation on the log with {spec.report.seeds} fresh seeds "
            f"({spec.report.base_seed}..{spec.report.base_seed + spec.report.seeds - 1}; the trials used other "
            "seeds), mean [95% moving-block bootstrap CI]:",
            "",
            "| configuration | log-loss | accuracy | Brier | ECE |",
            "|---|---|---|---|---:|",
        ]
        for role in roles:
            e = entry[role]
            name = f"best (trial {e['trial_id']})" if role == "best" else role
            lines.append(
                f"| {name} | {_ci(e['log_loss'])} | {_ci(e['accuracy'])} | {_ci(e['brier'])} | {e['ece']:.4f} |"
            )
        lines.append("")
    if "best_minus_default" in entry:
        d = entry["best_minus_default"]
        lines += [
            f"Best − default, {METRIC_LABEL[metric]}, paired over the same duels: {_ci(d)}. "
            f"Verdict: **{entry['verdict']}**.",
            "",
        ]
    best = entry.get("best", {})
    if "config" in best:
        est = best["trial_estimate"][metric]
        lines += [
            f"In the sweep this configuration scored {METRIC_LABEL[metric]} {est:.4f} on the trial seeds "
            "(optimistic: it was picked as the best of many).",
            "",
            *best_vs_default(best["config"], defaults, spec),
        ]
    if entry.get("serve_config"):
        rel = Path(entry["serve_config"]).relative_to(out)
        lines += [f"Serve config of the best configuration, **chosen on logged duels**: [`{rel}`]({rel})", ""]
    elif g.split_kwargs["split"] == "holdout":
        lines += ["No Serve config: a held-out split is a robustness test.", ""]
    elif entry.get("serve_config_error"):
        lines += [f"Serve config not exported: {entry['serve_config_error']}", ""]
    if entry.get("reliability_plot"):
        lines += [f"![reliability {g.key}]({Path(entry['reliability_plot']).name})", ""]
    return "\n".join(lines)


def _report_md(spec: SweepSpec, s: dict, imp: Any, plots: list[Path], sections: list[str]) -> str:
    o = s["objective"]
    lines = [f"# Sweep `{s['sweep']}`: chosen on logged duels", ""]
    if s["description"]:
        lines += [s["description"].strip(), ""]
    lines += [
        f"- Objective: **{METRIC_LABEL[o['metric']]}** ({'lower' if o['mode'] == 'min' else 'higher'} is better) of "
        f"FGTS.CDB's progressive validation on **{o['n_duels']} logged duels** from `{o['duels']}` (encoder "
        f"`{o['encoder'] or 'unknown'}`): each configuration predicts every duel before it learns from it. "
        "A policy that always says ½ scores log-loss ln 2 = 0.693.",
        f"- Trials: **{s['trials']}** ({s['complete']} complete, {s['stopped_early']} stopped early, "
        f"{s['errored']} errored), seeds {s['trial_seeds']} each; wall time of this driver run "
        f"{s['wall_seconds_this_run'] / 60:.1f} min.",
        "",
        *sections,
        "## Hyperparameter importance",
        "",
        f"Marginal screening over the trials (Spearman ρ² for numeric fields with ≥ 3 values, else η²) of the "
        f"running {METRIC_LABEL[o['metric']]} over the duels every trial of a group predicted.",
        "",
        "| field | importance | groups |",
        "|---|---:|---:|",
    ]
    for _, r in imp.iterrows():
        v = r["importance"]
        lines.append(f"| {r['param']} | {'n/a' if not np.isfinite(v) else f'{v:.2f}'} | {r['n_groups']} |")
    lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
