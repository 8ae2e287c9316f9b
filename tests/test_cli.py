"""The ray-router command line: real subprocesses, real files, clear errors instead of tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.test_evaluation import small_table

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "ray_router.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def write_toy_csv(directory: Path, n: int = 90) -> Path:
    """``small_table(n)`` as a RouterBench-style CSV (scores and ``<arm>|total_cost`` columns) in ``directory``."""
    table, _ = small_table(n=n)
    df = pd.DataFrame({"sample_id": table.query_ids, "prompt": table.texts, "eval_name": table.categories})
    for k, arm in enumerate(table.arms):
        df[arm] = table.scores[:, k]
        df[f"{arm}|total_cost"] = table.costs[:, k]
    path = Path(directory) / "toy.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    return write_toy_csv(tmp_path_factory.mktemp("data"))


def test_evaluate_writes_summary_curves_and_plot(toy_csv, tmp_path):
    out = tmp_path / "out"
    res = run_cli(
        "evaluate",
        "--dataset",
        str(toy_csv),
        "--policies",
        "fgts_cdb,uniform",
        "--seeds",
        "2",
        "--rounds",
        "40",
        "--encoder",
        "hash",
        "--set",
        "fgts_cdb.n_steps=3",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in summary] == ["fgts_cdb", "uniform"]
    assert summary[0]["policy_config"]["n_steps"] == 3
    assert len(pd.read_parquet(out / "curves.parquet")) == 2 * 2 * 40
    assert (out / "regret.png").stat().st_size > 0
    assert "dueling regret" in res.stdout and "served regret" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--encoder", "hash", "--policies", "fgts_cdb,nope"], "unknown policy 'nope'"),
        (["--encoder", "hash", "--set", "fgts_cdb.eta"], "POLICY.FIELD=VALUE"),
        (["--encoder", "hash", "--set", "fgts_cdb.temperature=2"], "temperature"),
        (
            ["--encoder", "hash", "--set", "fgts_cdb.eta=-1"],
            "fgts_cdb config: eta: Input should be greater than or equal to 0",
        ),
        (["--encoder", "hash", "--split", "holdout", "--held-out", "zzz"], "held-out category 'zzz'"),
        (["--encoder", "no-such-encoder"], "unknown encoder"),
    ],
)
def test_bad_arguments_give_one_clear_error_line(toy_csv, tmp_path, args, message):
    res = run_cli(
        "evaluate", "--dataset", str(toy_csv), "--seeds", "1", "--rounds", "5", "--out", str(tmp_path / "o"), *args
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr and "Traceback" not in res.stderr


def test_missing_dataset_names_the_files_and_the_download_command(tmp_path):
    res = run_cli("evaluate", "--dataset", "routerbench", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "ray-router data download routerbench" in res.stderr


def test_data_download_offline_fails_at_once_with_a_message(tmp_path):
    res = run_cli("data", "download", "routerbench", "--dest", str(tmp_path), timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "huggingface" in res.stderr.lower()


def test_data_info_describes_a_dataset(toy_csv):
    res = run_cli("data", "info", str(toy_csv))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["n_queries"] == 90 and info["n_arms"] == 4


def test_policies_lists_the_registry():
    res = run_cli("policies")
    assert res.returncode == 0 and "fgts_cdb" in res.stdout and "uniform" in res.stdout
