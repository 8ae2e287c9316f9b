"""Sweeps scored by progressive validation on logged duels (ray_router/tune/duels.py, issue 15).

The duel log is written by the writer ``ray-router log export`` uses (``write_duels``), from a replay
of a small synthetic table whose best arm depends on the category: a deployment that dueled
uniformly at random with a noiseless judge. On it:

- a trial reports, every N duels, the running mean of the metric so far, and its last report is the
  score ``evaluate_duels`` gives the same configuration without Tune;
- a real local Ray Tune run (in-process, 4 configurations, 200 duels, fifo) picks the same best
  configuration as scoring the 4 configurations directly, and the offline-informed prior (which
  knows each category's best arm) beats the uninformed one; the report re-runs best, default and
  uniform on fresh seeds and exports the winner's Serve config, labelled as chosen on logged duels;
- bad input (missing log, a file that is not a duel log, an unknown metric, ...) is one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ray_router.config import parse
from ray_router.errors import ConfigError, DataError
from ray_router.evaluation import EvalConfig
from ray_router.evaluation.duels import read_duels, write_duels
from ray_router.evaluation.progressive import duel_losses, duels_from_replay, evaluate_duels, run_progressive
from ray_router.tune.spec import load_sweep, parse_sweep
from tests.test_cli import run_cli
from tests.tune.conftest import REPO, write_sweep, write_synthetic_table

N_DUELS = 200
GRID = {"offline_prior": ["category", "none"], "n_steps": [5, 10]}


@pytest.fixture(scope="module")
def duel_data(tmp_path_factory) -> dict:
    """The synthetic table, its hash embeddings and a 200-duel log written as the export writes it."""
    from ray_router.data import load_dataset
    from ray_router.embeddings import get_encoder
    from ray_router.evaluation.experiment import prepare_seed
    from ray_router.evaluation.replay import run_replay
    from ray_router.policies.base import make_policy

    d = tmp_path_factory.mktemp("duels")
    table_path = write_synthetic_table(d / "synth.parquet")
    table = load_dataset(str(table_path))
    encoder = get_encoder("hash")
    X = encoder.encode(list(table.texts))
    cfg = parse(EvalConfig, {"policies": ("uniform",), "n_rounds": N_DUELS, "cost_weight": 0.0}, where="log")
    env, stream = prepare_seed(table, X, cfg, 100)
    played = run_replay(make_policy("uniform", env, seed=5), stream, math.inf, np.random.default_rng(7))
    log_path = write_duels(duels_from_replay(played, stream, table.arms, encoder.identity), d / "duels.parquet")
    return {"dir": d, "table_path": table_path, "table": table, "X": X, "log_path": log_path}


def duels_sweep(data: dict, **overrides) -> dict:
    """4 configurations (a grid) of FGTS.CDB scored on the log, 2 seeds each, reports every 50 duels."""
    base: dict = {
        "name": "duels",
        "datasets": [{"name": str(data["table_path"]), "label": "synth"}],
        "splits": [{"split": "stratified", "offline_fraction": 0.25}],
        "encoder": {"name": "hash"},
        "eval": {"n_seeds": 2, "cost_weight": 0.0},
        "objective": {"duels": str(data["log_path"]), "metric": "log_loss"},
        "space": {"fgts_cdb": {k: {"grid": v} for k, v in GRID.items()}},
        "search": {"num_samples": 1, "report_every": 50, "scheduler": {"type": "fifo"}},
        "report": {"seeds": 2, "base_seed": 1000, "serve_template": "serve_configs/local.yaml"},
    }
    base.update(overrides)
    return base


def eval_cfg(data: dict, spec, fgts: dict, **overrides) -> EvalConfig:
    """The EvalConfig a trial of ``spec`` with FGTS.CDB config ``fgts`` runs (via the sweep's own code)."""
    from ray_router.tune.prepare import split_kwargs
    from ray_router.tune.trial import trial_eval_config

    kw = split_kwargs(spec, data["table"], spec.splits[0].key, 0)
    return trial_eval_config(spec, {"fgts_cdb": fgts}, kw, **overrides)


def test_a_trial_reports_the_running_mean_and_ends_at_the_progressive_score(duel_data):
    from ray_router.evaluation.progressive import seed_policies
    from ray_router.tune.duels import run_duels_trial

    spec = parse_sweep(duels_sweep(duel_data))
    cfg = eval_cfg(duel_data, spec, {"offline_prior": "category", "n_steps": 5})
    table, X, log = duel_data["table"], duel_data["X"], read_duels(duel_data["log_path"])
    reports: list[tuple[dict, dict | None]] = []
    last = run_duels_trial(table, X, log, cfg, lambda m, c: reports.append((m, c)), report_every=30)
    # every 30 duels and at each seed's last duel, on the running time axis of all seeds
    assert [m["rounds_played"] for m, _ in reports] == [*range(30, 181, 30), 200, *range(230, 381, 30), 400]
    assert [c is not None for _, c in reports].count(True) == 2  # a checkpoint after each seed
    # the running mean so far, recomputed from an independent walk of the same policies
    losses = []
    for seed in cfg.seeds:
        run = run_progressive(seed_policies(table, X, cfg, seed)["fgts_cdb"], log)
        losses.append(duel_losses(run.p, log.y))
    for m, _ in reports:
        done = m["rounds_played"]
        for metric in ("log_loss", "brier", "accuracy"):
            series = np.concatenate([ls[metric] for ls in losses])[:done]
            assert m[metric] == pytest.approx(np.nanmean(series), rel=1e-12), (done, metric)
    # the last report is evaluate_duels' score of the same configuration and seeds (no Tune)
    direct = evaluate_duels(table, X, cfg, log)[0]
    assert last["complete"] and last["rounds_played"] == 2 * N_DUELS
    for metric in ("log_loss", "brier", "accuracy"):
        assert last[metric] == pytest.approx(direct.metrics[metric]["mean"], rel=1e-9)
    # resuming from the first seed's checkpoint replays only the second seed, to the same end
    first_ckpt = next(c for _, c in reports if c is not None)
    again: list[dict] = []
    resumed = run_duels_trial(table, X, log, cfg, lambda m, c: again.append(m), report_every=30, state=first_ckpt)
    assert again[0]["rounds_played"] == N_DUELS + 30 and resumed["log_loss"] == pytest.approx(last["log_loss"])


@pytest.mark.integration
def test_a_tune_sweep_on_logged_duels_picks_what_progressive_validation_picks(duel_data, tmp_path):
    from ray_router.tune.sweep import run_sweep

    sweep = write_sweep(tmp_path / "duels.yaml", duels_sweep(duel_data))
    lines: list[str] = []
    out = run_sweep(
        sweep,
        storage_path=tmp_path / "st",
        num_cpus=2,
        object_store_mb=128,
        cache_dir=tmp_path / "emb",
        log=lines.append,
    )
    assert out.n_trials == 4 and out.n_complete == 4, "\n".join(lines)
    trials = pd.read_parquet(out.experiment_dir / "results.parquet")
    assert set(trials["status"]) == {"complete"} and (trials["rounds_played"] == 2 * N_DUELS).all()
    progress = pd.read_parquet(out.experiment_dir / "progress.parquet")
    for _, pr in progress.groupby("trial_id"):
        assert pr["rounds_played"].tolist() == list(range(50, 2 * N_DUELS + 1, 50))  # every N duels
        assert pr["log_loss"].notna().all()

    # the same 4 configurations scored directly, without Tune
    spec = parse_sweep(duels_sweep(duel_data))
    log = read_duels(duel_data["log_path"])
    direct = {}
    for prior in GRID["offline_prior"]:
        for steps in GRID["n_steps"]:
            cfg = eval_cfg(duel_data, spec, {"offline_prior": prior, "n_steps": steps})
            s = evaluate_duels(duel_data["table"], duel_data["X"], cfg, log)[0]
            direct[(prior, steps)] = s.metrics["log_loss"]["mean"]
    tuned = {(r["fgts_cdb.offline_prior"], int(r["fgts_cdb.n_steps"])): r["log_loss"] for _, r in trials.iterrows()}
    assert set(tuned) == set(direct)
    for key, value in direct.items():
        assert tuned[key] == pytest.approx(value, rel=1e-9), key
    assert sorted(tuned, key=tuned.get) == sorted(direct, key=direct.get)  # rank the same way
    best = min(direct, key=direct.get)
    assert best[0] == "category", direct  # the prior that knows each category's best arm wins

    # the report: best, default and uniform on fresh seeds, a paired verdict, the winner's Serve config
    summary = json.loads((out.experiment_dir / "report" / "summary.json").read_text())
    assert summary["objective"]["metric"] == "log_loss" and summary["objective"]["n_duels"] == N_DUELS
    group = summary["groups"][0]
    assert {"best", "default", "uniform"} <= set(group)
    assert group["best"]["n_seeds"] == 2 and summary["report_seeds"] == [1000, 1001]
    assert group["best"]["config"]["fgts_cdb.offline_prior"] == best[0]
    assert group["best"]["config"]["fgts_cdb.n_steps"] == best[1]
    assert group["uniform"]["log_loss"]["mean"] == pytest.approx(math.log(2))
    for role in ("best", "default"):
        ll = group[role]["log_loss"]
        assert ll["lo"] <= ll["mean"] <= ll["hi"]
    d = group["best_minus_default"]
    assert d["metric"] == "log_loss" and d["lo"] <= d["mean"] <= d["hi"] and group["verdict"]
    report = (out.experiment_dir / "report" / "report.md").read_text()
    assert "chosen on logged duels" in report and "default" in report and "uniform" in report
    serve = Path(group["serve_config"])
    text = serve.read_text()
    assert text.startswith("# CHOSEN ON LOGGED DUELS") and str(duel_data["log_path"]) in text
    from ray.serve.schema import ServeDeploySchema

    from ray_router.serve.config import AppArgs

    cfg = yaml.safe_load(text)
    ServeDeploySchema.model_validate(cfg)
    args = AppArgs.model_validate(cfg["applications"][0]["args"])
    assert args.policy.config["offline_prior"] == best[0] and args.policy.config["n_steps"] == best[1]
    assert (out.experiment_dir / "report" / Path(group["reliability_plot"]).name).stat().st_size > 0


def test_the_log_must_match_the_sweeps_encoder_and_arms(duel_data, tmp_path):
    from ray_router.tune.duels import check_log, resolve_objective
    from ray_router.tune.prepare import prepare

    spec, log = resolve_objective(parse_sweep(duels_sweep(duel_data)))
    assert log is not None and spec.max_rounds == 2 * N_DUELS
    prepared = prepare(spec, tmp_path / "art", log=lambda m: None)
    check_log(spec, prepared, log)  # the right log passes
    other = dataclasses.replace(log, encoder="sentence-transformers:other")
    with pytest.raises(ConfigError, match="was embedded by 'sentence-transformers:other'"):
        check_log(spec, prepared, other)
    check_log(
        spec.model_copy(update={"objective": spec.objective.model_copy(update={"any_encoder": True})}), prepared, other
    )
    foreign = dataclasses.replace(log, arm_ids=tuple(f"x{k}" for k in range(len(log.arm_ids))))
    with pytest.raises(DataError, match="arms that the table does not have"):
        check_log(spec, prepared, foreign)
    short, short_log = resolve_objective(
        parse_sweep(duels_sweep(duel_data, objective={"duels": str(duel_data["log_path"]), "n_duels": 120}))
    )
    assert len(short_log) == 120 and short.max_rounds == 240


@pytest.mark.parametrize(
    "change,message",
    [
        ({"duels": "missing.parquet"}, "no duel log at"),
        ({"duels": "TABLE"}, "not a duel log, columns missing"),
        ({"objective": {"duels": "LOG", "metric": "auc"}}, "objective.metric"),
        ({"objective": {"duels": "LOG", "n_duels": 10_000}}, "objective.n_duels = 10000: the log"),
        ({"space": {"embedding": {"encoder": {"choice": ["base", "ccft"]}}}}, "ccft cannot be scored on logged duels"),
        ({"eval": {"n_seeds": 2, "n_rounds": 100}}, "eval.n_rounds: not used with objective.duels"),
    ],
    ids=["missing", "not-a-log", "metric", "too-many", "ccft", "n_rounds"],
)
def test_bad_input_is_one_error_line(duel_data, tmp_path, change, message):
    """`ray-router tune FILE [--duels X]` in a subprocess: exit code 2, one `error:` line, no traceback,
    and no Ray started (the checks run first)."""
    d = duels_sweep(duel_data)
    extra = []
    subst = {"LOG": str(duel_data["log_path"]), "TABLE": str(duel_data["table_path"])}
    if "duels" in change:
        extra = ["--duels", subst.get(change["duels"], str(tmp_path / change["duels"]))]
    else:
        for k, v in change.items():
            if k == "objective":
                v = {**v, "duels": subst[v["duels"]]}
            d[k] = v
    sweep = write_sweep(tmp_path / "bad.yaml", d)
    res = run_cli("tune", str(sweep), "--storage-path", str(tmp_path / "st"), "--num-cpus", "1", *extra, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], res.stderr[-3000:]
    assert not (tmp_path / "st").exists()  # failed before the sweep's folder (or Ray) was made


def test_the_example_sweep_takes_the_log_from_the_command_line(duel_data):
    from ray_router.tune.duels import resolve_objective

    path = REPO / "tune_jobs" / "duels_sweep.yaml"
    for smoke in (False, True):
        spec = load_sweep(path, smoke_test=smoke, duels=duel_data["log_path"])
        assert spec.objective is not None and spec.objective.duels == str(duel_data["log_path"])
        assert spec.metric == ("log_loss", "min")
        assert ("fgts_cdb", "eta") in spec.swept_keys()
        resolved, log = resolve_objective(spec)
        n = 100 if smoke else N_DUELS  # the smoke budget takes the log's first 100 duels
        assert len(log) == n and resolved.max_rounds == n * int(spec.eval.get("n_seeds", 5))
