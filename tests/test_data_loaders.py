"""Loaders and registry: real shared files, exact-format fixtures, and a table of bad files."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ray_router.data import (
    DATASET_NAMES,
    PairwiseJudgments,
    RoutingTable,
    load_dataset,
    load_generic,
    load_mixinstruct,
    load_routerbench,
    resolve_data_dir,
)
from ray_router.errors import ConfigError, DataError
from tests.data_fixtures import (
    GPT35,
    MIXINSTRUCT_MODELS,
    RB_MODELS,
    ROUTERDC,
    SUBSET,
    routerbench_reference_columns,
    shared_data_dir,
    write_mixinstruct_fixture,
    write_routerbench_pickle,
)

DATA = shared_data_dir()
needs_shared = pytest.mark.skipif(DATA is None, reason="shared data dir with the real Parquet files not found")


# --------------------------------------------------------------------------- real RouterBench subset
@needs_shared
def test_real_routerbench_subset_counts_and_means():
    table = load_dataset("routerbench", data_dir=DATA)
    summary = json.loads((DATA / SUBSET.replace(".parquet", ".summary.json")).read_text())
    assert table.name == "routerbench"
    assert table.meta["variant"] == "5shot_arc_mbpp_winogrande"
    assert (table.n_queries, table.n_arms) == (3164, 11)
    assert list(table.arms) == RB_MODELS  # file order of the score columns
    assert table.describe()["categories"] == {"arc-challenge": 1470, "mbpp": 427, "winogrande": 1267}
    assert table.meta["dropped_nan_rows"] == 0
    assert len(set(table.query_ids)) == 3164
    for k, arm in enumerate(table.arms):
        for cat, expected in summary["mean_score_by_model_and_eval"][arm].items():
            got = table.scores[table.categories == cat, k].mean()
            assert got == pytest.approx(expected, abs=6e-5), (arm, cat)
        assert table.costs[:, k].mean() == pytest.approx(summary["mean_cost_usd_by_model"][arm], rel=1e-9)
    assert set(np.unique(table.scores)) <= {0.0, 1.0}


@needs_shared
def test_real_routerdc_loads_through_generic_loader():
    table = load_dataset("routerdc", data_dir=DATA)
    summary = json.loads((DATA / ROUTERDC.replace(".parquet", ".summary.json")).read_text())
    assert (table.n_queries, table.n_arms) == (15343, 7)
    assert list(table.arms) == summary["models"]
    assert table.costs is None
    counts = {}
    for t in summary["tasks"]:
        counts[t["task"]] = counts.get(t["task"], 0) + t["n"]
    assert table.describe()["categories"] == counts
    assert len(counts) == 5
    for cat, means in summary["mean_score_by_task"].items():
        for arm, expected in means.items():
            got = table.scores[table.categories == cat, table.arm_index(arm)].mean()
            assert got == pytest.approx(expected, abs=6e-5), (arm, cat)
    # the same file through load_generic directly, with a per-arm price table
    prices = {arm: 0.001 * (k + 1) for k, arm in enumerate(table.arms)}
    priced = load_generic(DATA / ROUTERDC, text_col="question", category_col="task", id_col="row_id", prices=prices)
    assert priced.costs.shape == (15343, 7)
    np.testing.assert_allclose(priced.costs[0], [0.001 * (k + 1) for k in range(7)])


# --------------------------------------------------------------------------- RouterBench pickle format
@pytest.mark.parametrize("dup_order", ["normal_first", "gpt_first"])
def test_routerbench_pickle_exact_format_merges_duplicates(tmp_path, dup_order):
    path = tmp_path / "routerbench_5shot.pkl"
    expected = write_routerbench_pickle(path, dup_order=dup_order)
    ref_cols = routerbench_reference_columns()
    if ref_cols is not None:
        assert list(expected["frame"].columns) == ref_cols  # the fixture really is the release layout
    assert all(expected["frame"][m].dtype == object for m in RB_MODELS)

    table = load_routerbench(path)
    assert list(table.arms) == RB_MODELS
    assert list(table.query_ids) == ["arc-challenge.test.0", "arc-challenge.test.1", "mbpp.dev.1", "winogrande.dev.2"]
    assert table.meta["merged_duplicate_ids"] == ["arc-challenge.test.1"]
    assert table.meta["dropped_nan_rows"] == 1
    assert table.meta["n_rows_read"] == 6
    row = list(table.query_ids).index("arc-challenge.test.1")
    np.testing.assert_array_equal(table.scores[row], expected["merged_scores"])
    np.testing.assert_allclose(table.costs[row], expected["merged_costs"])
    assert table.costs[row, RB_MODELS.index(GPT35)] == pytest.approx(4.2e-4)  # cost came with the score
    assert table.texts[row] == expected["arc_prompt"]  # the normal row's single prompt, not the doubled one
    assert table.texts[2] == "Write a function that adds two numbers.\n\ndef add(a, b):"
    assert table.scores.dtype == np.float64 and not np.isnan(table.scores).any()


def test_routerbench_pickle_nan_zero(tmp_path):
    path = tmp_path / "rb.pkl"
    expected = write_routerbench_pickle(path)
    table = load_routerbench(path, nan="zero")
    assert table.n_queries == 5 and table.meta["dropped_nan_rows"] == 0
    assert table.meta["filled_nan_cells"] == 1
    c2 = RB_MODELS.index("claude-v2")
    assert table.scores[4, c2] == 0.0 and table.costs[4, c2] == 0.0
    np.testing.assert_array_equal(np.delete(table.scores[4], c2), np.delete(expected["nan_row_scores"], c2))
    with pytest.raises(ConfigError):
        load_routerbench(path, nan="mean")


def test_routerbench_parquet_with_str_list_prompts(tmp_path):
    """The loader also fits a Parquet/CSV export of the pickle (prompts still str(list))."""
    src = tmp_path / "rb.pkl"
    frame = write_routerbench_pickle(src)["frame"]
    frame = frame.astype({m: float for m in RB_MODELS})
    frame.to_csv(tmp_path / "rb.csv", index=False)
    table = load_routerbench(tmp_path / "rb.csv")
    assert table.n_queries == 4 and table.texts[2].endswith("\n\ndef add(a, b):")


def test_registry_routerbench_preference(tmp_path):
    write_routerbench_pickle(tmp_path / "routerbench_5shot.pkl")
    assert load_dataset("routerbench", data_dir=tmp_path).meta["variant"] == "5shot"
    write_routerbench_pickle(tmp_path / "routerbench_0shot.pkl", seed=1)
    table = load_dataset("routerbench", data_dir=tmp_path)
    assert table.meta["variant"] == "0shot" and table.name == "routerbench"
    assert Path(table.source).name == "routerbench_0shot.pkl"
    assert load_dataset("routerbench", data_dir=tmp_path, variant="5shot").meta["variant"] == "5shot"
    with pytest.raises(DataError, match=re.escape("routerbench_5shot_arc_mbpp_winogrande.parquet")):
        load_dataset("routerbench", data_dir=tmp_path, variant="5shot_arc_mbpp_winogrande")


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refusing to load global"):
        load_routerbench(path)


# --------------------------------------------------------------------------- generic loader
def _generic_frame(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "qid": [f"q{i}" for i in range(n)],
            "prompt": [f"prompt {i}" for i in range(n)],
            "eval_name": ["a", "b"] * (n // 2),
            "m1": rng.uniform(size=n),
            "m2": rng.uniform(size=n),
            "m1|total_cost": np.full(n, 0.01),
            "m2|total_cost": np.full(n, 0.02),
            "other_number": np.arange(n, dtype=float),
        }
    )


def test_generic_arm_detection_rules(tmp_path):
    df = _generic_frame()
    df.to_parquet(tmp_path / "t.parquet")
    by_cost = load_generic(tmp_path / "t.parquet")
    assert by_cost.arms == ("m1", "m2") and by_cost.costs[0].tolist() == [0.01, 0.02]
    assert list(by_cost.query_ids) == [str(i) for i in range(6)]  # no default id column: row numbers
    explicit = load_generic(
        tmp_path / "t.parquet", arms=["m2", "other_number"], id_col="qid", prices={"other_number": 0.5}
    )
    assert explicit.arms == ("m2", "other_number") and explicit.query_ids[0] == "q0"
    assert explicit.costs[:, 1].tolist() == [0.5] * 6
    (tmp_path / "t.summary.json").write_text(json.dumps({"models": ["m2", "m1"]}))
    assert load_generic(tmp_path / "t.parquet").arms == ("m2", "m1")


def test_generic_csv_nan_and_prices(tmp_path):
    df = _generic_frame().drop(columns=["m1|total_cost", "m2|total_cost"])
    df.loc[2, "m1"] = np.nan
    df.to_csv(tmp_path / "t.csv", index=False)
    dropped = load_generic(tmp_path / "t.csv", arms=["m1", "m2"])
    assert dropped.n_queries == 5 and dropped.meta["dropped_nan_rows"] == 1 and dropped.costs is None
    zero = load_generic(tmp_path / "t.csv", arms=["m1", "m2"], nan="zero", prices={"m1": 0.1, "m2": 0.0})
    assert zero.n_queries == 6 and zero.scores[2, 0] == 0.0
    assert zero.costs.tolist() == [[0.1, 0.0]] * 6
    with pytest.raises(ConfigError, match="unknown arm 'm9'"):
        load_generic(tmp_path / "t.csv", arms=["m1", "m2"], prices={"m9": 1.0})
    with pytest.raises(ConfigError, match="non-negative"):
        load_generic(tmp_path / "t.csv", arms=["m1", "m2"], prices={"m1": -1.0, "m2": 0.0})


def test_load_dataset_by_path_and_options(tmp_path):
    _generic_frame().to_parquet(tmp_path / "t.parquet")
    assert load_dataset(str(tmp_path / "t.parquet")).n_queries == 6
    assert load_dataset("t.parquet", data_dir=tmp_path).arms == ("m1", "m2")  # relative to the data dir
    write_routerbench_pickle(tmp_path / "x.pkl")
    assert load_dataset(tmp_path / "x.pkl").n_arms == 11
    write_mixinstruct_fixture(tmp_path / "mi.jsonl", n=3, seed=0)
    assert load_dataset(tmp_path / "mi.jsonl").n_queries == 3
    with pytest.raises(ConfigError, match="bogus"):
        load_dataset("routerbench", data_dir=tmp_path, bogus=1)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("nonsense", data_dir=tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent.parquet")
    assert DATASET_NAMES == ("routerbench", "routerdc", "mixinstruct")


@pytest.mark.parametrize(
    "name,files",
    [
        ("routerbench", ["routerbench_0shot.pkl", "routerbench_5shot.pkl", SUBSET]),
        ("mixinstruct", ["test_data_prepared.jsonl"]),
        ("routerdc", [ROUTERDC]),
    ],
)
def test_missing_named_dataset_says_what_was_looked_for(tmp_path, name, files):
    with pytest.raises(DataError) as err:
        load_dataset(name, data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and f"ray-router data download {name}" in msg
    for f in files:
        assert f in msg


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ROUTER_DATA_DIR", raising=False)
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv("RAY_ROUTER_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/x/y") == Path("/x/y")


# --------------------------------------------------------------------------- MixInstruct
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_mixinstruct_fixture_loads(tmp_path):
    path = write_mixinstruct_fixture(tmp_path / "test_data_prepared.jsonl", n=25, seed=3)
    records = _read_jsonl(path)
    assert set(records[0]) == {"id", "instruction", "input", "output", "candidates", "cmp_results"}
    assert len(records[0]["candidates"]) == 11
    assert set(records[0]["candidates"][0]) == {"decoding_method", "model", "text", "scores"}
    assert isinstance(records[0]["cmp_results"], str)
    assert any(r["cmp_results"] == "null" for r in records)

    table = load_dataset("mixinstruct", data_dir=tmp_path)
    assert table.name == "mixinstruct" and table.meta["split"] == "test" and table.meta["metric"] == "bartscore"
    assert table.arms == MIXINSTRUCT_MODELS and table.costs is None
    assert set(table.category_names) == {"unified_chip2", "dolly_15k", "itwgpt4", "sharegpt"}
    assert all(r["id"].startswith(c + "/") for r, c in zip(records, table.categories))
    expected = np.array([[c["scores"]["bartscore"] for c in r["candidates"]] for r in records])
    np.testing.assert_array_equal(table.scores, expected)
    assert table.texts[0] == records[0]["input"]  # empty instruction skipped
    assert table.texts[1] == records[1]["instruction"]  # empty input skipped
    assert table.texts[2] == records[2]["instruction"] + "\n\n" + records[2]["input"]

    with_cmp = [i for i, r in enumerate(records) if r["cmp_results"] != "null"]
    assert table.meta["n_with_cmp_results"] == len(with_cmp)
    pw = table.pairwise
    assert isinstance(pw, PairwiseJudgments) and len(pw) == 55 * len(with_cmp)
    assert sorted(set(pw.rows.tolist())) == with_cmp
    lookup = pw.lookup()
    index = {m: k for k, m in enumerate(table.arms)}
    outcome = {"A is better": 1.0, "B is better": 0.0, "Same good": 0.5, "Same bad": 0.5}
    for i in with_cmp[:3]:
        for key, verdict in json.loads(records[i]["cmp_results"]).items():
            a, b = key.split(",")
            assert lookup[(i, index[a], index[b])] == outcome[verdict]


def _record(rid: str, scores: dict[str, float | None], cmp) -> dict:
    return {
        "id": rid,
        "instruction": "Say hi.",
        "input": "",
        "output": "hi",
        "candidates": [
            {
                "decoding_method": "top_p_sampling",
                "model": m,
                "text": "hi",
                "scores": {"bartscore": s, "bertscore": 0.5},
            }
            for m, s in scores.items()
        ],
        "cmp_results": cmp,
    }


def test_mixinstruct_verdicts_nan_and_array_file(tmp_path):
    verdicts = {"a,b": "A is better", "b,c": "B is better", "a,c": "Same good", "c,b": "Same bad"}
    records = [
        _record("itwgpt4/1", {"a": -3.0, "b": None, "c": -4.0}, json.dumps({"a,b": "A is better"})),
        _record("dolly_15k/closed_qa/2", {"a": -3.0, "b": -2.0, "c": -4.0}, json.dumps(verdicts)),
        _record("sharegpt/3", {"a": -1.0, "b": -2.0, "c": -4.0}, None),
        _record("sharegpt/4", {"a": -1.0, "b": -2.0, "c": -4.0}, "null"),
    ]
    del records[3]["cmp_results"]  # absent field
    path = tmp_path / "val_data_prepared.json"
    path.write_text(json.dumps(records))
    table = load_mixinstruct(path)
    assert table.meta["split"] == "val" and table.meta["dropped_nan_rows"] == 1
    assert list(table.query_ids) == ["dolly_15k/closed_qa/2", "sharegpt/3", "sharegpt/4"]
    assert list(table.categories) == ["dolly_15k", "sharegpt", "sharegpt"]
    pw = table.pairwise
    assert pw.rows.tolist() == [0, 0, 0, 0]  # the first record's judgment went with its NaN row
    assert pw.first.tolist() == [0, 1, 0, 2] and pw.second.tolist() == [1, 2, 2, 1]
    assert pw.outcome.tolist() == [1.0, 0.0, 0.5, 0.5]
    zero = load_mixinstruct(path, nan="zero", metric="bertscore", arms=["c", "a"])
    assert zero.arms == ("c", "a") and zero.n_queries == 4 and zero.scores[0].tolist() == [0.5, 0.5]
    assert zero.pairwise.rows.tolist() == [1] and zero.pairwise.outcome.tolist() == [0.5]  # only a,c kept


def test_mixinstruct_missing_candidate_drop_option(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = [_record("itwgpt4/1", {"a": -1.0, "b": -2.0}, "null"), _record("itwgpt4/2", {"a": -1.0}, "null")]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(DataError, match=r"line 2 \(id 'itwgpt4/2'\).*model 'b'"):
        load_mixinstruct(path)
    table = load_mixinstruct(path, missing="drop", prices={"a": 0.001, "b": 0.002})
    assert table.n_queries == 1 and table.meta["dropped_missing_candidate_rows"] == 1
    assert table.costs.tolist() == [[0.001, 0.002]]
    with pytest.raises(ConfigError, match="metric"):
        load_mixinstruct(path, metric="accuracy")


# --------------------------------------------------------------------------- bad files
def _write(path: Path, content) -> Path:
    if isinstance(content, pd.DataFrame):
        {".parquet": content.to_parquet, ".csv": lambda p: content.to_csv(p, index=False), ".pkl": content.to_pickle}[
            path.suffix
        ](path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _jsonl(*records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


_ok = _record("itwgpt4/1", {"a": -1.0, "b": -2.0}, "null")
_no_cands = {k: v for k, v in _ok.items() if k != "candidates"}
_no_metric = json.loads(json.dumps(_ok))
del _no_metric["candidates"][1]["scores"]["bartscore"]
_str_score = json.loads(json.dumps(_ok))
_str_score["candidates"][0]["scores"]["bartscore"] = "high"

BAD_FILES = [
    # (file name, content, loader, kwargs, expected words in the message)
    ("no_text.parquet", _generic_frame().drop(columns=["prompt"]), load_generic, {"text_col": "prompt"}, ["'prompt'"]),
    ("str_score.csv", _generic_frame().assign(m1=["x"] * 6), load_generic, {}, ["'m1'", "numeric"]),
    ("unknown_arm.parquet", _generic_frame(), load_generic, {"arms": ["m1", "gpt-9"]}, ["unknown arm 'gpt-9'"]),
    ("no_arms.parquet", _generic_frame().drop(columns=["m1|total_cost", "m2|total_cost"]), load_generic, {}, ["arms"]),
    (
        "half_costs.parquet",
        _generic_frame().drop(columns=["m2|total_cost"]),
        load_generic,
        {"arms": ["m1", "m2"]},
        ["m2", "|total_cost"],
    ),
    ("dup_ids.csv", _generic_frame().assign(qid=["q"] * 6), load_generic, {"id_col": "qid"}, ["'qid'", "duplicate"]),
    ("int_text.parquet", _generic_frame().assign(prompt=list(range(6))), load_generic, {}, ["'prompt'", "strings"]),
    ("null_cat.parquet", _generic_frame().assign(eval_name=["a", None] * 3), load_generic, {}, ["'eval_name'"]),
    ("garbage.parquet", b"not a parquet file", load_generic, {}, ["cannot read"]),
    (
        "rb_no_eval.pkl",
        _generic_frame().drop(columns=["eval_name"]).rename(columns={"qid": "sample_id"}),
        load_routerbench,
        {},
        ["'eval_name'"],
    ),
    (
        "rb_bad_score.pkl",
        _generic_frame()
        .rename(columns={"qid": "sample_id"})
        .assign(m2=pd.Series(["1.0", "wrong", None, 0.0, 1.0, 0.0], dtype=object)),
        load_routerbench,
        {},
        ["'m2'"],
    ),
    ("rb_list.pkl", pickle.dumps([1, 2, 3]), load_routerbench, {}, ["DataFrame"]),
    (
        "malformed.jsonl",
        _jsonl(_ok, _ok, '{"id": "x/1", "candidates": [}'),
        load_mixinstruct,
        {},
        ["line 3", "malformed JSON"],
    ),
    ("no_candidates.jsonl", _jsonl(_ok, _no_cands), load_mixinstruct, {}, ["line 2", "'candidates'"]),
    ("no_metric.jsonl", _jsonl(_no_metric), load_mixinstruct, {}, ["line 1", "candidates[1].scores.bartscore"]),
    ("str_metric.jsonl", _jsonl(_str_score), load_mixinstruct, {}, ["candidates[0].scores.bartscore"]),
    (
        "bad_verdict.jsonl",
        _jsonl(_record("x/1", {"a": 1.0, "b": 2.0}, json.dumps({"a,b": "A wins"}))),
        load_mixinstruct,
        {},
        ["'cmp_results'", "A wins"],
    ),
    (
        "bad_cmp_json.jsonl",
        _jsonl(_record("x/1", {"a": 1.0, "b": 2.0}, "{oops")),
        load_mixinstruct,
        {},
        ["'cmp_results'", "malformed"],
    ),
    (
        "cmp_unknown_model.jsonl",
        _jsonl(_record("x/1", {"a": 1.0, "b": 2.0}, json.dumps({"a,z": "Same good"}))),
        load_mixinstruct,
        {},
        ["'cmp_results'", "'z'"],
    ),
    ("unknown_arm.jsonl", _jsonl(_ok), load_mixinstruct, {"arms": ["a", "q"]}, ["unknown arm 'q'"]),
    ("not_object.jsonl", _jsonl([1, 2]), load_mixinstruct, {}, ["line 1", "JSON object"]),
    ("id_type.jsonl", _jsonl({**_ok, "id": 7}), load_mixinstruct, {}, ["'id'"]),
]


@pytest.mark.parametrize("filename,content,loader,kwargs,words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_data_error(tmp_path, filename, content, loader, kwargs, words):
    path = _write(tmp_path / filename, content)
    with pytest.raises(DataError) as err:
        loader(path, **kwargs)
    msg = str(err.value)
    assert filename in msg, msg
    for word in words:
        assert word in msg, msg


def test_tables_are_routing_tables(tmp_path):
    _generic_frame().to_parquet(tmp_path / "t.parquet")
    assert isinstance(load_generic(tmp_path / "t.parquet"), RoutingTable)


def test_import_pulls_in_neither_ray_nor_huggingface_hub():
    code = (
        "import sys, ray_router.data as d; "
        "assert 'ray' not in sys.modules, 'ray'; "
        "assert 'huggingface_hub' not in sys.modules, 'hf'; "
        "assert callable(d.download_dataset)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
