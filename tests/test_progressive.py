"""Progressive validation on logged duels (ray_router/evaluation/progressive.py, duels.py).

- the metrics equal a hand computation on a small log;
- every prediction is made before the duel it predicts is learned (out of sample);
- the duel-log file round-trips and bad files get clear errors;
- on the log of a replayed RouterBench stream, progressive validation ranks configurations the way
  the replay evaluator ranks them (the real shared data, the real encoder).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_router.errors import ConfigError, DataError
from ray_router.evaluation.duels import DuelLog, read_duels, write_duels
from ray_router.evaluation.progressive import (
    block_bootstrap_ci,
    duels_from_replay,
    evaluate_duels,
    run_progressive,
    summarise,
)
from ray_router.policies.base import PolicyEnv, make_policy
from tests.data_fixtures import shared_data_dir

DATA = shared_data_dir()  # the real RouterBench rows (tests/data_fixtures.py)


def small_log(y=(1.0, 0.0, 0.5, 1.0), weight=None) -> DuelLog:
    """Four duels in 2-d: queries near e1 or e2, arms 0..2."""
    X = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    n = len(y)
    return DuelLog(
        arm_ids=("a", "b", "c"),
        encoder="test",
        X=X[:n],
        first=np.array([0, 1, 2, 0])[:n],
        second=np.array([1, 2, 0, 2])[:n],
        y=np.array(y, dtype=float),
        offered=[None, None, [0, 2], None][:n],
        weight=np.ones(n) if weight is None else np.asarray(weight, dtype=float),
        source=np.array(["human", "judge", "human", "judge"][:n], dtype=object),
        ts=np.arange(n, dtype=float),
        seq=np.arange(1, n + 1),
        config_version=np.array(["v1"] * n, dtype=object),
    )


def knn_env() -> PolicyEnv:
    # offline: a query at e1 where arm 0 is best, one at e2 where arm 1 is best (utilities known)
    U = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]])
    return PolicyEnv(n_arms=3, offline={"X": np.eye(2), "utilities": U, "scores": U, "categories": np.array([0, 1])})


def test_metrics_equal_a_hand_computation():
    log = small_log()
    run = run_progressive(make_policy("knn", knn_env(), config={"k": 1}), log)
    # k = 1: the nearest offline row's utilities; p = 1/2 + (u_first - u_second)/2
    hand_p = np.array([0.5 + (0.9 - 0.1) / 2, 0.5 + (0.8 - 0.4) / 2, 0.5 + (0.5 - 0.9) / 2, 0.5 + (0.2 - 0.4) / 2])
    np.testing.assert_allclose(run.p, hand_p)
    assert list(run.served) == [0, 1, 0, 1]  # round 3 offered only arms 0 and 2
    s = summarise("knn", [run], log)
    y = log.y
    hand_ll = np.mean(-(y * np.log(hand_p) + (1 - y) * np.log(1 - hand_p)))
    assert s.metrics["log_loss"]["mean"] == pytest.approx(hand_ll)
    # non-ties: duel 1 (p .9, first won: right), duel 2 (p .7, second won: wrong), duel 4 (p .4, first won: wrong)
    assert s.metrics["accuracy"]["mean"] == pytest.approx(1 / 3)
    assert s.metrics["brier"]["mean"] == pytest.approx(np.mean((hand_p - y) ** 2))
    assert s.served_share["a"]["mean"] == pytest.approx(0.5) and s.served_share["b"]["mean"] == pytest.approx(0.5)
    # weights: a duel of weight 0 does not count
    s0 = summarise("knn", [run], small_log(weight=[1, 1, 1, 0]))
    assert s0.metrics["log_loss"]["mean"] == pytest.approx(
        np.mean(-(y * np.log(hand_p) + (1 - y) * np.log(1 - hand_p))[:3])
    )
    # uniform: ln 2 whatever the verdicts
    su = summarise("uniform", [run_progressive(make_policy("uniform", PolicyEnv(n_arms=3)), log)], log)
    assert su.metrics["log_loss"]["mean"] == pytest.approx(math.log(2))
    assert su.metrics["accuracy"]["mean"] == pytest.approx(0.5)


def test_calibration_bins_by_hand():
    log = small_log()
    run = run_progressive(make_policy("knn", knn_env(), config={"k": 1}), log)
    cal = summarise("knn", [run], log).calibration
    filled = sorted((round(b["p_mean"], 9), b["y_rate"], b["n"]) for b in cal["bins"] if b["n"])
    # p = .9 (y 1), .7 (y 0), .3 (y .5), .4 (y 1): one duel per bin
    assert filled == [(0.3, 0.5, 1), (0.4, 1.0, 1), (0.7, 0.0, 1), (0.9, 1.0, 1)]
    assert all(b["lo"] <= b["p_mean"] <= b["hi"] for b in cal["bins"] if b["n"])
    assert cal["ece"] == pytest.approx((0.1 + 0.7 + 0.2 + 0.6) / 4)


def test_predictions_are_made_before_learning():
    """Flipping duel t's verdict changes no prediction up to and including duel t, and later ones do change."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 2))
    env = PolicyEnv(n_arms=3, arm_embeddings=A)
    cfg = {"offline_prior": "none"}
    y = np.array([1.0, 0.0, 1.0, 1.0])
    base = run_progressive(make_policy("fgts_cdb", env, seed=3, config=cfg), small_log(y))
    flipped = y.copy()
    flipped[1] = 1.0
    other = run_progressive(make_policy("fgts_cdb", env, seed=3, config=cfg), small_log(flipped))
    np.testing.assert_array_equal(base.p[:2], other.p[:2])
    assert base.p[3] != other.p[3]  # ... and the policy did learn from it (duel 4 has duel 2's query)
    assert ((base.p > 0) & (base.p < 1)).all()


def test_block_bootstrap():
    rng = np.random.default_rng(1)
    v = rng.normal(size=400)
    lo, hi = block_bootstrap_ci(v, np.ones(400), np.random.default_rng(0))
    assert lo < v.mean() < hi
    assert (lo, hi) == block_bootstrap_ci(v, np.ones(400), np.random.default_rng(0))
    # autocorrelated series: blocks give a wider interval than an i.i.d. bootstrap (block = 1)
    walk = np.repeat(rng.normal(size=20), 20)
    wide = block_bootstrap_ci(walk, np.ones(400), np.random.default_rng(0), block=20)
    narrow = block_bootstrap_ci(walk, np.ones(400), np.random.default_rng(0), block=1)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_duel_file_round_trip_and_errors(tmp_path):
    log = small_log()
    path = write_duels(log, tmp_path / "d.parquet")
    back = read_duels(path)
    assert back.arm_ids == log.arm_ids and back.encoder == "test"
    np.testing.assert_array_equal(back.first, log.first)
    np.testing.assert_array_equal(back.y, log.y)
    assert back.offered == log.offered and list(back.source) == list(log.source)
    # onto a table with the arms in another order
    moved = back.remap(["c", "a", "b", "d"])
    assert [moved.arm_ids[i] for i in moved.first] == [log.arm_ids[i] for i in log.first]
    with pytest.raises(DataError, match="does not have"):
        back.remap(["a", "b"])
    with pytest.raises(DataError, match="no duel log"):
        read_duels(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_duels(tmp_path / "junk.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"first": ["a"], "second": ["b"]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match="columns missing"):
        read_duels(tmp_path / "cols.parquet")
    t = pq.read_table(path)
    bad = t.set_column(t.column_names.index("outcome"), "outcome", pa.array(["first", "win", "tie", "first"]))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="row 1: outcome 'win'"):
        read_duels(tmp_path / "bad.parquet")


def test_hindsight_references_are_refused():
    from ray_router.config import parse
    from ray_router.data.table import RoutingTable
    from ray_router.evaluation import EvalConfig

    table = RoutingTable(
        name="t",
        query_ids=np.array(["1", "2", "3", "4"], dtype=object),
        texts=np.array(["q1", "q2", "q3", "q4"], dtype=object),
        categories=np.array(["x", "x", "y", "y"], dtype=object),
        arms=("a", "b", "c"),
        scores=np.ones((4, 3)),
    )
    cfg = parse(EvalConfig, {"policies": ("best_fixed",), "n_seeds": 1}, where="t")
    with pytest.raises(ConfigError, match="hindsight reference"):
        evaluate_duels(table, np.ones((4, 2)), cfg, small_log())


def test_ranks_configurations_like_the_replay_evaluator():
    """A RouterBench stream replayed with uniform duels, logged, then validated progressively: the
    configurations come out in the order of their replay regret."""
    from ray_router.config import parse
    from ray_router.data import load_dataset
    from ray_router.embeddings import get_encoder
    from ray_router.evaluation import EvalConfig, evaluate
    from ray_router.evaluation.experiment import prepare_seed
    from ray_router.evaluation.replay import run_replay

    table = load_dataset("routerbench", data_dir=DATA)
    encoder = get_encoder("minilm")
    X = encoder.encode(list(table.texts))
    policies = ("fgts_cdb", "knn", "uniform")
    cfg = parse(EvalConfig, {"policies": policies, "n_seeds": 1, "n_rounds": 400, "cost_weight": 0.2}, where="t")
    # the log: a deployment that dueled uniformly at random on seed 100's stream
    env, stream = prepare_seed(table, X, cfg, 100)
    replayed = run_replay(make_policy("uniform", env, seed=5), stream, cfg.kappa, np.random.default_rng(7))
    log = duels_from_replay(replayed, stream, table.arms, encoder.identity)
    by_loss = [
        s.policy for s in sorted(evaluate_duels(table, X, cfg, log), key=lambda s: s.metrics["log_loss"]["mean"])
    ]
    records = evaluate(table, X, cfg).records
    by_regret = [r["policy"] for r in sorted(records, key=lambda r: r["cum_regret_mean"])]
    assert by_loss == by_regret == ["fgts_cdb", "knn", "uniform"]


def test_cli_evaluate_duels(tmp_path):
    """`ray-router evaluate --duels` in a real subprocess: outputs, and clear errors (no traceback)."""
    import json

    from ray_router.embeddings import get_encoder
    from tests.test_cli import run_cli, write_toy_csv
    from tests.test_evaluation import small_table

    table, _ = small_table(n=90)
    csv = write_toy_csv(tmp_path)
    encoder = get_encoder("hash")
    X = encoder.encode(list(table.texts))
    rng = np.random.default_rng(0)
    n, K = 60, table.n_arms
    first = rng.integers(0, K, n)
    second = (first + rng.integers(1, K, n)) % K
    better = table.scores[np.arange(n), first] >= table.scores[np.arange(n), second]
    log = DuelLog(
        arm_ids=tuple(table.arms), encoder=encoder.identity, X=X[:n].astype(np.float32), first=first, second=second,
        y=better.astype(float), offered=[None] * n, weight=np.ones(n), source=np.array(["human"] * n, dtype=object),
        ts=np.arange(n, dtype=float), seq=np.arange(1, n + 1), config_version=np.array([""] * n, dtype=object),
    )  # fmt: skip
    duels = write_duels(log, tmp_path / "duels.parquet")
    common = ["evaluate", "--dataset", str(csv), "--encoder", "hash", "--seeds", "2", "--set", "fgts_cdb.n_steps=3"]
    out = tmp_path / "out"
    res = run_cli(*common, "--duels", str(duels), "--policies", "fgts_cdb,knn,uniform", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "log-loss" in res.stdout and "uniform" in res.stdout
    doc = json.loads((out / "summary.json").read_text())
    assert doc["n_duels"] == n and {p["policy"] for p in doc["policies"]} == {"fgts_cdb", "knn", "uniform"}
    uniform = next(p for p in doc["policies"] if p["policy"] == "uniform")
    assert uniform["log_loss"] == pytest.approx(math.log(2))
    assert (out / "reliability.png").stat().st_size > 0
    import dataclasses

    other = write_duels(dataclasses.replace(log, encoder="sentence-transformers:other"), tmp_path / "other.parquet")
    for extra, message in (
        (["--duels", str(tmp_path / "nope.parquet"), "--policies", "uniform"], "no duel log"),
        (["--duels", str(duels), "--policies", "best_fixed"], "hindsight reference"),
        (["--duels", str(other), "--policies", "uniform"], "was embedded by"),
    ):
        bad = run_cli(*common, *extra, "--out", str(tmp_path / "bad"))
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert message in bad.stderr
