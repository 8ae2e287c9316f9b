"""Sweeps on a real (capped, local) Ray: the smoke test, resume after SIGKILL and Ctrl-C, and a trial
that asks for more CPUs than exist. Each runs ``ray-router tune`` in its own process group. How long
they take is measured by bench/sweep_smoke.py, not asserted here."""

from __future__ import annotations

import glob
import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.data_fixtures import shared_data_dir, write_routerbench_subset
from tests.tune.conftest import REPO, DirWatch, sweep_dict, write_sweep

pytestmark = pytest.mark.integration

COMMON = ["--num-cpus", "2", "--object-store-mb", "128"]


def _states(exp_dir: Path) -> dict[str, str]:
    """trial id -> status, from the experiment state Tune last saved to the storage path."""
    files = sorted(glob.glob(str(exp_dir / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        data = json.loads(Path(files[-1]).read_text())
    except (OSError, ValueError):
        return {}  # being rewritten
    out = {}
    for entry in data.get("trial_data", []):
        t = json.loads(entry[0])
        out[t["trial_id"]] = t["status"]
    return out


def _starts(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(line.split()[:2]) for line in log.read_text().splitlines() if line.strip()]


def test_smoke_test_runs_the_paper_sweep(tmp_path, tune_env, drivers):
    """`ray-router tune tune_jobs/paper_sweep.yaml --smoke-test`: real encoder, CCFT, ASHA, report, Serve
    export; on the real RouterBench subset where it is, else on a synthetic file in the same format."""
    data = shared_data_dir() or write_routerbench_subset(tmp_path / "data")
    env = {**tune_env, "RAY_ROUTER_DATA_DIR": str(data)}
    d = drivers(
        ["tune", "tune_jobs/paper_sweep.yaml", "--smoke-test", "--storage-path", str(tmp_path / "st"), *COMMON],
        env,
        tmp_path / "smoke.log",
    )
    rc = d.wait(timeout=900)  # a bound against hanging, not a speed target (bench/sweep_smoke.py)
    out = d.output()
    assert rc == 0, out[-4000:]
    exp = tmp_path / "st" / "paper_sweep-smoke"
    trials = pd.read_parquet(exp / "results.parquet")
    spec = yaml.safe_load((REPO / "tune_jobs" / "paper_sweep.yaml").read_text())["smoke_test"]
    assert len(trials) == spec["search"]["num_samples"]
    assert (trials["status"] != "error").all()
    assert {"fgts_cdb.eta", "weighting.name", "embedding.encoder", "mean_regret", "cum_regret_mean"} <= set(
        trials.columns
    )
    progress = pd.read_parquet(exp / "progress.parquet")
    per_trial = progress.groupby("trial_id")["rounds_played"].apply(list)
    assert all(v == sorted(v) and v[0] == spec["search"]["report_every"] for v in per_trial)  # every N rounds
    summary = json.loads((exp / "report" / "summary.json").read_text())
    assert summary["trials_that_imported_an_encoder"] == 0
    enc = summary["encoding_this_run"]
    assert enc["texts_encoded"] <= enc["unique_texts"] <= enc["texts_requested"]
    assert any("ccft" in r["encoder"] for r in summary["encoding_by_identity"])
    group = summary["groups"][0]
    assert {"default", "uniform"} <= set(group) and len(group["default"]["per_seed"]) == spec["report"]["seeds"]
    report = (exp / "report" / "report.md").read_text()
    assert "95% CI" in report and "unique (encoder, text) pairs" in report
    serve = sorted((exp / "report" / "serve").glob("*.yaml"))
    if group.get("best"):
        assert serve, report
        from ray.serve.schema import ServeDeploySchema

        from ray_router.serve.config import AppArgs

        cfg = yaml.safe_load(serve[0].read_text())
        ServeDeploySchema.model_validate(cfg)
        args = AppArgs.model_validate(cfg["applications"][0]["args"])
        best = group["best"]["config"]
        assert args.policy.config["eta"] == best["fgts_cdb.eta"]
        assert args.arm_embeddings.from_dataset.weighting.name == best["weighting.name"]


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, tune_env, synth_table, drivers, how):
    d = sweep_dict(
        synth_table,
        eval={"n_rounds": 300, "n_seeds": 3, "cost_weight": 0.0},
        search={"num_samples": 4, "report_every": 100, "scheduler": {"type": "fifo"}},
        report={"seeds": 2, "base_seed": 1000},
    )
    sweep = write_sweep(tmp_path / "resume.yaml", d)
    log = tmp_path / "trials.log"
    env = {**tune_env, "RAY_ROUTER_TUNE_TRIAL_LOG": str(log), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    args = ["tune", str(sweep), "--storage-path", str(tmp_path / "st"), "--cache-dir", str(tmp_path / "emb"), *COMMON]
    exp = tmp_path / "st" / "tiny"
    exp.mkdir(parents=True)  # empty: a fresh sweep; watched for Tune's experiment-state saves
    watch = DirWatch(exp)
    first = drivers(args, env, tmp_path / "run1.log")

    def some_finished_some_running() -> bool:  # as Tune last saved its experiment state
        states = _states(exp)
        return sum(s == "TERMINATED" for s in states.values()) >= 2 and any(s == "RUNNING" for s in states.values())

    ready = watch.wait_until(some_finished_some_running, timeout=300, while_alive=first.proc)
    watch.close()
    assert first.proc.poll() is None, "the sweep ended before it could be interrupted:\n" + first.output()[-3000:]
    assert ready, first.output()[-3000:]
    if how == "sigkill":
        os.kill(first.proc.pid, signal.SIGKILL)  # the driver only: its Ray processes may linger
        first.wait(timeout=60)
    else:
        os.kill(first.proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
        rc = first.wait(timeout=120)
        assert rc == 130, first.output()[-3000:]
        assert "run the same command again to resume" in first.output()
        first.kill_group()
    finished = {t for t, s in _states(exp).items() if s == "TERMINATED"}  # as last saved
    starts_before = _starts(log)

    # the Ctrl-C case skips the report (the SIGKILL case checks it), to keep the test short
    second = drivers(args + (["--no-report"] if how == "sigint" else []), env, tmp_path / "run2.log")
    rc = second.wait(timeout=300)
    out = second.output()
    assert rc == 0, out[-4000:]
    assert "resuming sweep" in out
    starts_after = _starts(log)[len(starts_before) :]
    rerun = sorted({t for t, _ in starts_after} & finished)
    assert not rerun, f"finished trials ran again: {rerun}"
    trials = pd.read_parquet(exp / "results.parquet")
    assert len(trials) == 4 * 2 and (trials["status"] == "complete").all()
    # an unfinished trial continued from its last finished seed when it had one
    assert all(kind in ("start", "resume") for _, kind in starts_after)
    from ray_router.tune.sweep import driver_runs

    runs = driver_runs(exp)
    assert [r["resumed"] for r in runs] == [False, True] and [r["interrupted"] for r in runs] == [True, False]
    assert runs[0]["texts_encoded"] == runs[0]["unique_texts"] > 0
    assert runs[1]["texts_encoded"] == 0  # the resume read every embedding from the on-disk cache
    if how == "sigkill":
        summary = json.loads((exp / "report" / "summary.json").read_text())
        assert summary["driver_runs"] == 2 and summary["resumes"] == 1 and summary["interrupted_runs"] == 1
        assert summary["trials_that_imported_an_encoder"] == 0


def test_a_trial_that_asks_for_more_cpus_than_exist_fails_fast(tmp_path, tune_env, synth_table, drivers):
    d = sweep_dict(synth_table, search={"num_samples": 1, "report_every": 50, "resources_per_trial": {"cpu": 3}})
    sweep = write_sweep(tmp_path / "big.yaml", d)
    log = tmp_path / "trials.log"
    drv = drivers(
        ["tune", str(sweep), "--storage-path", str(tmp_path / "st"), *COMMON],
        {**tune_env, "RAY_ROUTER_TUNE_TRIAL_LOG": str(log)},
        tmp_path / "big.log",
    )
    rc = drv.wait(timeout=120)
    out = drv.output()
    assert rc == 2, out[-3000:]
    assert "error: a trial asks for 3 CPUs but the Ray cluster has 2 CPUs in all" in out
    assert not log.exists(), "no trial may start"
