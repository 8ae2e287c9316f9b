"""Replay environment, many-seed evaluation, summaries and outputs."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from ray_router.config import parse
from ray_router.data import make_table
from ray_router.errors import ConfigError
from ray_router.evaluation import EvalConfig, ReplayEnvironment, evaluate, format_table, mean_ci95, write_outputs
from ray_router.policies.base import Duel


def small_table(n=240, K=4, seed=0):
    """Three categories; the best arm depends on the category; costs fall with the arm index."""
    rng = np.random.default_rng(seed)
    cats = np.array(["a", "b", "c"])[np.arange(n) % 3]
    best = {"a": 0, "b": 1, "c": 2}
    scores = (rng.random((n, K)) < 0.35).astype(float)
    for i, c in enumerate(cats):
        scores[i, best[c]] = float(rng.random() < 0.9)
    costs = np.tile(np.linspace(0.004, 0.001, K), (n, 1))
    table = make_table(
        "toy",
        [f"q{i}" for i in range(n)],
        [f"question {i} about {c}" for i, c in enumerate(cats)],
        cats,
        [f"m{k}" for k in range(K)],
        scores,
        costs,
    )
    X = rng.normal(size=(n, 6)) + 3 * np.eye(6)[np.array([best[c] for c in cats])]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return table, X


def test_noiseless_judge_prefers_the_better_arm_and_ties_are_fair_coins():
    env = ReplayEnvironment(np.array([[1.0, 0.0, 1.0]]), kappa=math.inf)
    rng = np.random.default_rng(0)
    assert env.feedback(0, Duel(0, 1), rng) == 1.0
    assert env.feedback(0, Duel(1, 0), rng) == 0.0
    coin = [env.feedback(0, Duel(0, 2), rng) for _ in range(2000)]
    assert set(coin) == {0.0, 1.0} and abs(np.mean(coin) - 0.5) < 0.05
    assert env.feedback(0, Duel(2, 2), rng) == 0.5  # an arm against itself is a tie


def test_btl_judge_matches_the_logistic_probability():
    env = ReplayEnvironment(np.array([[0.3, 0.1]]), kappa=10.0)
    rng = np.random.default_rng(1)
    wins = np.mean([env.feedback(0, Duel(0, 1), rng) for _ in range(20000)])
    assert wins == pytest.approx(1 / (1 + math.exp(-10 * 0.2)), abs=0.01)


def test_real_pairwise_labels_take_precedence():
    env = ReplayEnvironment(np.array([[1.0, 0.0]]), kappa=math.inf, pairwise={(0, 0, 1): 0.0, (0, 1, 0): 1.0})
    assert env.feedback(0, Duel(0, 1), np.random.default_rng(0)) == 0.0
    assert env.n_real_labels == 1


def test_regret_is_best_minus_the_mean_of_the_two_arms():
    env = ReplayEnvironment(np.array([[0.9, 0.5, 0.1]]))
    assert env.regret(0, Duel(1, 2)) == pytest.approx(0.9 - 0.3)
    assert env.regret(0, Duel(0, 0)) == 0.0
    assert env.regret(0, Duel(1, 1), mask=np.array([False, True, True])) == 0.0


# t_{0.975, df} in closed form (independent of the code's scipy call): df = 1 is a Cauchy quantile,
# df = 2 has t_p = (2p − 1) / sqrt(2p(1 − p)).
T975_DF1 = math.tan(math.pi * (0.975 - 0.5))  # 12.7062...
T975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.3027...


def _t_cdf_df4(t: float) -> float:
    """The Student-t CDF with 4 degrees of freedom, in closed form."""
    u = t / math.sqrt(4 + t * t)
    return 0.5 + 0.75 * u * (1 - u * u / 3)


def test_mean_ci95_half_width_is_the_student_t_quantile():
    for values, t in [([3.0, 5.0], T975_DF1), ([1.0, 2.0, 6.0], T975_DF2)]:
        mean, lo, hi = mean_ci95(np.array(values))
        half = t * np.std(values, ddof=1) / math.sqrt(len(values))
        assert mean == pytest.approx(np.mean(values))
        assert (lo, hi) == (pytest.approx(mean - half, rel=1e-9), pytest.approx(mean + half, rel=1e-9))
    # df = 4: the half-width, in units of the standard error, is the t whose CDF is 0.975
    v = np.array([1.0, 2.0, 3.0, 4.0, 9.0])
    mean, lo, hi = mean_ci95(v)
    t_used = (hi - mean) / (np.std(v, ddof=1) / math.sqrt(5))
    assert _t_cdf_df4(t_used) == pytest.approx(0.975, abs=1e-9)
    assert hi - mean == pytest.approx(mean - lo)
    m1, l1, h1 = mean_ci95(np.array([7.0]))  # one value: no spread can be estimated
    assert m1 == l1 == h1 == 7.0


@pytest.mark.parametrize("n", [3, 5, 40])
def test_mean_ci95_covers_the_true_mean_95_percent_of_the_time(n):
    """Coverage on 20000 simulated normal samples of size n: the binomial sd of the rate is 0.0015,
    so ±0.006 is four sd. The normal 1.96 instead of t would cover 81% (n = 3), 87.8% (n = 5) or
    94.3% (n = 40): each fails here."""
    rng = np.random.default_rng(n)
    samples = rng.normal(loc=2.5, scale=3.0, size=(n, 20000))
    mean, lo, hi = mean_ci95(samples, axis=0)
    np.testing.assert_allclose(mean, samples.mean(axis=0))
    covered = np.mean((lo <= 2.5) & (hi >= 2.5))
    assert covered == pytest.approx(0.95, abs=0.006)


def test_evaluate_writes_the_record_schema_and_is_reproducible(tmp_path):
    table, X = small_table()
    cfg = EvalConfig(
        policies=("fgts_cdb", "uniform", "best_fixed"),
        n_seeds=3,
        n_rounds=150,
        policy_configs={"fgts_cdb": {"n_steps": 5}},
    )
    result = evaluate(table, X, cfg, encoder="base")
    again = evaluate(table, X, cfg, encoder="base")
    strip = lambda recs: [{k: v for k, v in r.items() if "seconds" not in k} for r in recs]  # noqa: E731
    assert strip(result.records) == strip(again.records)
    by = {r["policy"]: r for r in result.records}
    for r in result.records:
        for key in (
            "dataset",
            "policy",
            "encoder",
            "weighting",
            "n_seeds",
            "n_rounds",
            "cum_regret_mean",
            "cum_regret_ci95",
        ):
            assert key in r
        assert r["n_seeds"] == 3 and r["n_rounds"] == 150
        for kind in ("cum_regret", "served_regret"):  # the record's interval is the t-interval of its seeds
            per_seed = r[f"{kind}_per_seed"]
            assert r[f"{kind}_mean"] == pytest.approx(np.mean(per_seed))
            half = T975_DF2 * np.std(per_seed, ddof=1) / math.sqrt(3)
            assert r[f"{kind}_ci95"] == [
                pytest.approx(np.mean(per_seed) - half),
                pytest.approx(np.mean(per_seed) + half),
            ]
    assert by["fgts_cdb"]["encoder"] == "base" and by["uniform"]["encoder"] == "none"
    curves = result.curves
    assert len(curves) == 3 * 3 * 150
    # common random numbers: every policy of a seed plays the same stream of queries
    rows = curves.pivot_table(index=["seed", "round"], columns="policy", values="row")
    assert (rows["fgts_cdb"] == rows["uniform"]).all()
    # the best fixed arm in hindsight has the least regret on this stream
    assert by["best_fixed"]["cum_regret_mean"] < by["uniform"]["cum_regret_mean"]

    paths = write_outputs(result, tmp_path / "out")
    summary = json.loads(paths["summary"].read_text())
    assert [r["policy"] for r in summary] == ["fgts_cdb", "uniform", "best_fixed"]
    back = pd.read_parquet(paths["curves"])
    assert len(back) == len(curves) and {"policy", "seed", "round", "cum_regret"} <= set(back.columns)
    assert paths["plot"].stat().st_size > 5000
    assert "fgts_cdb" in format_table(result.records)


def test_policies_draws_do_not_depend_on_which_other_policies_run():
    table, X = small_table()
    alone = evaluate(table, X, EvalConfig(policies=("uniform",), n_seeds=2, n_rounds=60)).records[0]
    both = evaluate(table, X, EvalConfig(policies=("best_fixed", "uniform"), n_seeds=2, n_rounds=60)).records[1]
    assert alone["cum_regret_per_seed"] == both["cum_regret_per_seed"]


def test_cost_weight_changes_the_utility_and_the_served_cost():
    table, X = small_table()
    cheap = evaluate(table, X, EvalConfig(policies=("best_fixed",), n_seeds=1, n_rounds=100, cost_weight=50.0))
    free = evaluate(table, X, EvalConfig(policies=("best_fixed",), n_seeds=1, n_rounds=100, cost_weight=0.0))
    assert cheap.records[0]["served_cost_mean_usd"] < free.records[0]["served_cost_mean_usd"]


def test_holdout_split_keeps_the_category_out_of_the_offline_part():
    from ray_router.evaluation.experiment import make_split

    table, _ = small_table()
    split = make_split(table, EvalConfig(split="holdout", held_out="b"), seed=0)
    assert "b" not in set(table.categories[split.offline])
    assert "b" in set(table.categories[split.online])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"policies": ("nope",)}, "policies: unknown policy"),
        ({"policies": ()}, "policies: at least one"),
        ({"n_seeds": 0}, "n_seeds: "),
        ({"split": "random"}, "split: "),
        ({"split": "holdout"}, "needs held_out"),
        ({"offline_fraction": 1.0}, "offline_fraction: "),
        ({"kappa": 0.0}, "kappa: "),
        ({"cost_normaliser": "max"}, "cost_normaliser: "),
        (
            {"policy_configs": {"fgts_cdb": {"temperature": 1}}},
            r"policy_configs: fgts_cdb config: unknown field\(s\) \['temperature'\]",
        ),
        ({"policy_configs": {"fgts_cdb": {"eta": -1.0}}}, "policy_configs: fgts_cdb config: eta: "),
    ],
)
def test_invalid_eval_configs_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=f"^EvalConfig: .*{match}"):
        parse(EvalConfig, kwargs)


def test_embeddings_must_match_the_table():
    table, X = small_table()
    with pytest.raises(ConfigError, match="rows"):
        evaluate(table, X[:10], EvalConfig(n_seeds=1, n_rounds=5))
