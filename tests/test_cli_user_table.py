"""A user's own Parquet/CSV table through the CLI: --arms, --text-column, --category-column, --id-column."""

import json

import numpy as np
import pandas as pd
import pytest

from ray_router.cli import main
from ray_router.data import load_generic
from ray_router.errors import DataError

ARMS = ["gpt-4-1106-preview", "meta/llama-2-70b-chat", "mistralai/mixtral-8x7b-chat"]
COLUMN_FLAGS = ("--text-column", "question", "--category-column", "domain")  # the test tables' columns
CATEGORIES = ["math", "code", "trivia"]
COLUMNS = ["question", "domain", "qid", *ARMS]


def _frame(n: int = 60) -> pd.DataFrame:
    """60 queries, 3 categories, 0/1 scores per arm; column names that the loader does not guess."""
    rng = np.random.default_rng(7)
    df = pd.DataFrame(
        {
            "question": [f"question {i}: something about {CATEGORIES[i % 3]}" for i in range(n)],
            "domain": [CATEGORIES[i % 3] for i in range(n)],
            "qid": [f"user-{i:03d}" for i in range(n)],
        }
    )
    for k, arm in enumerate(ARMS):
        df[arm] = (rng.random(n) < 0.3 + 0.25 * k).astype(float)
    return df


@pytest.fixture()
def parquet_table(tmp_path):
    path = tmp_path / "my_logs.parquet"
    _frame().to_parquet(path)
    return path


@pytest.fixture()
def csv_table(tmp_path):
    path = tmp_path / "my_logs.csv"
    _frame().to_csv(path, index=False)
    return path


def _evaluate(dataset, out, *extra):
    return main(
        [
            "evaluate",
            "--dataset",
            str(dataset),
            *extra,
            "--policies",
            "uniform,best_fixed",
            "--seeds",
            "2",
            "--rounds",
            "30",
            "--encoder",
            "hash",
            "--cache-dir",
            str(out.parent / "cache"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )


def _assert_one_error_line(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_evaluate_parquet_with_named_columns_and_arms(parquet_table, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _evaluate(
        parquet_table,
        out,
        "--arms",
        ",".join(ARMS),
        *COLUMN_FLAGS,
        "--id-column",
        "qid",
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in summary] == ["uniform", "best_fixed"]
    assert all(r["n_arms"] == 3 and r["dataset"] == "my_logs" for r in summary)
    assert all(r["n_seeds"] == 2 and r["n_rounds"] == 30 for r in summary)
    assert "60 queries x 3 arms, 3 categories" in captured.err


def test_evaluate_csv_with_a_subset_of_arms(csv_table, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _evaluate(
        csv_table,
        out,
        "--arms",
        "meta/llama-2-70b-chat,gpt-4-1106-preview",
        *COLUMN_FLAGS,
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert {r["policy"] for r in summary} == {"uniform", "best_fixed"}
    assert all(r["n_arms"] == 2 for r in summary)


def test_sibling_summary_still_names_the_arms_without_flags(csv_table, tmp_path, capsys):
    (tmp_path / "my_logs.summary.json").write_text(json.dumps({"models": ARMS[:2]}))
    out = tmp_path / "out"
    rc = _evaluate(csv_table, out, "--text-column", "question", "--category-column", "domain")
    assert rc == 0, capsys.readouterr().err
    assert all(r["n_arms"] == 2 for r in json.loads((out / "summary.json").read_text()))


def test_table_without_summary_or_arms_says_to_pass_arms(parquet_table, tmp_path, capsys):
    rc = _evaluate(parquet_table, tmp_path / "out", *COLUMN_FLAGS)
    line = _assert_one_error_line(
        capsys, rc, "--arms", "cannot tell which columns are arms", "my_logs.summary.json", "|total_cost"
    )
    assert all(repr(c) in line for c in COLUMNS), line
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--arms", "gpt-4-1106-preview,meta/llama-3-70b"], ["unknown arm 'meta/llama-3-70b'"]),
        (["--arms", "gpt-4,claude-v2"], ["unknown arms ['gpt-4', 'claude-v2']"]),
        (["--arms", ",".join(ARMS), "--text-column", "prompt_text"], ["text column 'prompt_text'"]),
        (["--arms", ",".join(ARMS), "--category-column", "topic"], ["category column 'topic'"]),
        (["--arms", ",".join(ARMS), "--id-column", "uuid"], ["id column 'uuid'"]),
    ],
)
def test_unknown_column_names_list_the_available_columns(parquet_table, tmp_path, capsys, extra, words):
    cols = list(COLUMN_FLAGS)
    named = {extra[i] for i in range(0, len(extra), 2)}
    cols = [x for i in range(0, len(cols), 2) if cols[i] not in named for x in cols[i : i + 2]]
    rc = _evaluate(parquet_table, tmp_path / "out", *cols, *extra)
    line = _assert_one_error_line(capsys, rc, "my_logs.parquet", "available columns", *words)
    assert all(repr(c) in line for c in COLUMNS), line


def test_unknown_arm_in_a_csv_lists_the_columns(csv_table, tmp_path, capsys):
    rc = _evaluate(
        csv_table, tmp_path / "out", "--arms", "nope", "--text-column", "question", "--category-column", "domain"
    )
    line = _assert_one_error_line(capsys, rc, "my_logs.csv", "unknown arm 'nope'")
    assert all(repr(c) in line for c in COLUMNS), line


@pytest.mark.parametrize("arms", ["", ",", " , "])
def test_empty_arms_flag_is_an_error(parquet_table, tmp_path, capsys, arms):
    rc = _evaluate(
        parquet_table, tmp_path / "out", f"--arms={arms}", "--text-column", "question", "--category-column", "domain"
    )
    _assert_one_error_line(capsys, rc, "--arms needs at least one column name")


def test_column_flags_on_a_named_benchmark_are_a_clear_error(tmp_path, capsys):
    # Checked before the data is read, so no data files are needed.
    rc = main(["data", "info", "routerbench", "--data-dir", str(tmp_path), "--text-column", "prompt"])
    _assert_one_error_line(capsys, rc, "--text-column", "'routerbench'", "Parquet/CSV")
    rc = main(
        [
            "evaluate",
            "--dataset",
            "mixinstruct",
            "--data-dir",
            str(tmp_path),
            "--category-column",
            "task",
            "--encoder",
            "hash",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    _assert_one_error_line(capsys, rc, "--category-column", "'mixinstruct'")


def test_run_command_takes_the_table_flags(csv_table, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--dataset",
            str(csv_table),
            "--arms",
            ",".join(ARMS),
            *COLUMN_FLAGS,
            "--policies",
            "uniform,best_fixed",
            "--workers",
            "1",
            "--seeds",
            "1",
            "--rounds",
            "20",
            "--encoder",
            "hash",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert all(r["n_arms"] == 3 for r in json.loads((out / "summary.json").read_text()))


def test_data_info_takes_the_table_flags(parquet_table, capsys):
    rc = main(
        [
            "data",
            "info",
            str(parquet_table),
            "--arms",
            "mistralai/mixtral-8x7b-chat,gpt-4-1106-preview",
            *COLUMN_FLAGS,
            "--id-column",
            "qid",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    info = json.loads(captured.out)
    assert info["n_queries"] == 60 and info["n_arms"] == 2
    assert list(info["mean_score"]) == ["mistralai/mixtral-8x7b-chat", "gpt-4-1106-preview"]
    assert info["categories"] == {c: 20 for c in CATEGORIES}


def test_data_info_without_arms_says_to_pass_arms(csv_table, capsys):
    rc = main(["data", "info", str(csv_table), "--text-column", "question", "--category-column", "domain"])
    _assert_one_error_line(capsys, rc, "--arms a,b,c", "arms=[...]")


def test_loader_message_names_the_cli_flag_and_the_python_keyword(parquet_table):
    with pytest.raises(DataError) as err:
        load_generic(parquet_table, text_col="question", category_col="domain")
    msg = str(err.value)
    for word in ("--arms a,b,c", "arms=[...]", "my_logs.summary.json", '"models"', "'<arm>|total_cost'"):
        assert word in msg, msg
    with pytest.raises(DataError, match=r"pass --category-column NAME \(Python: category_col=\.\.\.\)"):
        load_generic(parquet_table, arms=ARMS)  # 'question' is a default text column, 'domain' no default category
