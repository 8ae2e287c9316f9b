"""The offline-informed extension (ALGORITHM.md s.5-6): the prior's fit, the augmented feature map,
FGTS.CDB starting from the offline estimate, reachability, hindsight references, served regret."""

import dataclasses

import numpy as np
import pytest

from ray_router.config import parse
from ray_router.errors import ConfigError
from ray_router.evaluation.experiment import EvalConfig, evaluate, paired_difference
from ray_router.evaluation.replay import ReplayStream
from ray_router.policies import (
    FGTSCDB,
    FGTSConfig,
    OfflinePrior,
    PolicyEnv,
    fit_offline_prior,
    get_entry,
    make_policy,
)
from ray_router.policies.features import OfflineAugmented, make_feature_map
from ray_router.policies.fgts_cdb import FGTSCDBLanes, preset
from ray_router.policies.reachability import unreachable_arms
from ray_router.policies.references import best_per_category_arms, oracle_arms
from tests.data_fixtures import shared_data_dir
from tests.test_evaluation import small_table


def _clusters(seed=0, M=3, K=4, d=12, n_per=60, noise=0.3):
    """Queries in M well-separated clusters; arm k's 0/1 score on category m ~ Bernoulli(P[m, k])."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, M)))[0].T  # orthonormal category directions
    cats = np.repeat(np.arange(M), n_per)
    X = centres[cats] + noise * rng.normal(size=(len(cats), d)) / np.sqrt(d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    P = rng.uniform(0.1, 0.9, size=(M, K))
    U = (rng.random((len(cats), K)) < P[cats]).astype(float)
    return X, U, np.array([f"c{m}" for m in cats]), P


def test_fit_recovers_categories_means_and_a_logit_scale_slope():
    X, U, cats, _P = _clusters()
    prior = fit_offline_prior(X, U, cats, shrink=False)
    assert prior.category_names == ("c0", "c1", "c2") and prior.counts.tolist() == [60, 60, 60]
    for m, c in enumerate(prior.category_names):
        np.testing.assert_allclose(prior.utility[m], U[cats == c].mean(axis=0))
    assert (prior.assignment(X).argmax(axis=1) == np.repeat(np.arange(3), 60)).mean() > 0.95
    assert prior.temperature > 5  # separated clusters: a sharp assignment
    # 0/1 scores: P(j beats k) ≈ 1/2 + Δp/2, i.e. a logit slope near 2, not the judge's κ
    assert 1.0 < prior.slope < 4.0
    np.testing.assert_allclose(prior.estimate(X[:5]), prior.assignment(X[:5]) @ prior.utility)
    # the standard error falls with the rows behind a cell; the pooled one is smaller still
    thin = fit_offline_prior(X[::12], U[::12], cats[::12], shrink=False)
    assert thin.stderr.mean() > 2 * prior.stderr.mean()
    assert (prior.arm_stderr < prior.stderr.min(axis=0)).all()


def test_shrinkage_pulls_thin_cells_towards_the_pooled_mean_and_leaves_rich_ones():
    X, U, cats, _ = _clusters(n_per=300)
    rich_raw, rich = fit_offline_prior(X, U, cats, shrink=False), fit_offline_prior(X, U, cats)
    np.testing.assert_allclose(rich.utility, rich_raw.utility, atol=0.02)
    rows = np.concatenate([np.flatnonzero(cats == c)[:3] for c in ("c0", "c1", "c2")])
    thin_raw, thin = (
        fit_offline_prior(X[rows], U[rows], cats[rows], shrink=False),
        fit_offline_prior(X[rows], U[rows], cats[rows]),
    )
    pooled = U[rows].mean(axis=0)
    assert np.abs(thin.utility - pooled).sum() < np.abs(thin_raw.utility - pooled).sum()


def test_prior_round_trips_and_validates():
    X, U, cats, _ = _clusters()
    prior = fit_offline_prior(X, U, cats, rank=3)
    again = OfflinePrior.from_dict(prior.to_dict())
    assert again.same_as(prior) and again.rank == 3
    assert not again.same_as(fit_offline_prior(X[:-30], U[:-30], cats[:-30], rank=3))
    with pytest.raises(ConfigError, match="missing field"):
        OfflinePrior.from_dict({"centroids": prior.centroids})
    with pytest.raises(ConfigError):
        fit_offline_prior(X, U[:-1], cats)
    with pytest.raises(ConfigError, match="NaN"):
        fit_offline_prior(X, np.where(U > 0, np.nan, U), cats)
    profile = OfflinePrior.from_profile(prior.centroids, prior.utility, [5, 5, 5], prior.category_names)
    assert profile.n_arms == 4 and (profile.stderr > prior.stderr).all()


@pytest.mark.parametrize("base", ["hadamard", "hadamard_bias", "concat"])
@pytest.mark.parametrize(
    "arm_bias,correction,rank", [(True, True, 2), (False, True, 0), (False, False, 3), (True, False, 0)]
)
def test_augmented_map_scores_and_gradient_match_its_features(base, arm_bias, correction, rank):
    rng = np.random.default_rng(3)
    K, d, M, n = 4, 6, 3, 9
    fmap = OfflineAugmented(make_feature_map(base, rng.normal(size=(K, d))), M, rank, correction, arm_bias)
    Xe = rng.normal(size=(n, fmap.context_dim))
    theta = rng.normal(size=(2, fmap.dim))
    F = fmap.features(Xe)  # (n, K, p)
    np.testing.assert_allclose(fmap.scores(theta, Xe), np.einsum("nkp,cp->cnk", F, theta), atol=1e-12)
    W = rng.normal(size=(2, n, K))
    np.testing.assert_allclose(fmap.weighted_grad(W, Xe), np.einsum("cnk,nkp->cp", W, F), atol=1e-12)
    first, second = rng.integers(0, K, n), rng.integers(0, K, n)
    np.testing.assert_allclose(
        fmap.pair_features(Xe, first, second), F[np.arange(n), first] - F[np.arange(n), second], atol=1e-12
    )
    stack = rng.normal(size=(5, fmap.dim))  # a stack of θ for one context (a served pool of samples)
    np.testing.assert_allclose(fmap.stack_scores(stack, Xe[2]), np.einsum("kp,cp->ck", F[2], stack), atol=1e-12)
    # the lanes' shapes: (G, W, C, p) parameters over (G, n, d) contexts
    A = rng.normal(size=(2, 3, K, d))
    lanes = OfflineAugmented(make_feature_map(base, A), M, rank, correction, arm_bias)
    th = rng.normal(size=(2, 3, 2, lanes.dim))
    Xg = rng.normal(size=(2, n, lanes.context_dim))
    S = lanes.scores(th, Xg)
    for g in range(2):
        for w in range(3):
            one = OfflineAugmented(make_feature_map(base, A[g, w]), M, rank, correction, arm_bias)
            np.testing.assert_allclose(S[g, w], one.scores(th[g, w], Xg[g]), atol=1e-10)
            Wl = rng.normal(size=(2, n, K))
            Wfull = np.zeros((2, 3, 2, n, K))
            Wfull[g, w] = Wl
            np.testing.assert_allclose(lanes.weighted_grad(Wfull, Xg)[g, w], one.weighted_grad(Wl, Xg[g]), atol=1e-10)


def _offline_env(seed=0, **kw):
    X, U, cats, P = _clusters(seed)
    rng = np.random.default_rng(seed)
    off = rng.permutation(len(X))[:90]
    env = PolicyEnv(
        n_arms=U.shape[1],
        arm_embeddings=rng.normal(size=(U.shape[1], X.shape[1])) * 0.1,
        offline={"X": X[off], "utilities": U[off], "scores": U[off], "categories": cats[off]},
    )
    return env, X, U, cats, P


def test_fgts_starts_from_the_offline_estimate_and_the_paper_preset_does_not():
    env, X, _U, _cats, _P = _offline_env()
    policy = make_policy("fgts_cdb", env, seed=0)
    assert policy.prior is not None and "fitted on 90 offline rows" in policy.prior_note
    static = make_policy("offline_static", env)
    agree = np.mean([policy.best(x) == static.best(x) for x in X])
    assert agree > 0.95  # at t = 0 the exploit arm is the offline estimate's best arm
    paper = make_policy("fgts_cdb_paper", env, seed=0)
    assert paper.prior is None and paper.config == preset("paper")
    # exploit-first: the first arm is always the posterior-mean best arm
    for x in X[:20]:
        duel = policy.select(x)
        assert duel.first == policy.best(x)
        policy.update(x, duel, 1.0)
    snap = policy.snapshot()
    clone = make_policy("fgts_cdb", PolicyEnv(env.n_arms, env.arm_embeddings), seed=5)  # no offline data
    clone.restore(snap)
    assert clone.prior.same_as(policy.prior)
    assert [clone.select(x) for x in X[:10]] == [policy.select(x) for x in X[:10]]


def test_without_offline_data_the_prior_is_off_and_says_so():
    rng = np.random.default_rng(0)
    policy = FGTSCDB(FGTSConfig(), rng.normal(size=(4, 6)), seed=0)
    assert policy.prior is None and "OFF" in policy.prior_note
    with pytest.raises(ConfigError, match=r"^fgts_cdb config: offline_prior: "):
        get_entry("fgts_cdb").config({"offline_prior": "knn-ish"})
    with pytest.raises(ConfigError, match=r"^fgts_cdb config: arm_selection: "):
        get_entry("fgts_cdb").config({"arm_selection": "greedy"})
    with pytest.raises(ConfigError, match=r"unknown FGTS\.CDB preset"):
        preset("nope")
    # a wrong type is a ConfigError naming the field (the CLI prints it as one error line)
    for field, value in [("correction_scale", "abc"), ("arm_bias", 1), ("query_rank", 2.5), ("prior_weight", "x")]:
        with pytest.raises(ConfigError, match=f"^FGTSConfig: {field}: "):
            parse(FGTSConfig, {field: value})
    assert FGTSConfig(prior_weight=None, eta=2).eta == 2  # ints are floats, None where allowed


def test_lanes_with_offline_priors_make_the_choices_of_lone_policies():
    env, X, _U, _cats, _ = _offline_env(seed=2)
    # the configuration the lone policies resolve to (these offline rows are thin: the thin preset's fields)
    cfg = make_policy("fgts_cdb", env, config=FGTSConfig(n_steps=3, batch_size=16)).config
    assert cfg.second_arm == "rival"
    seeds = [11, 12]
    lanes = FGTSCDBLanes(
        cfg, np.stack([env.arm_embeddings] * 2), seeds, priors=[make_policy("fgts_cdb", env, config=cfg).prior] * 2
    )
    lone = [FGTSCDB(cfg, env.arm_embeddings, seed=s, offline=env.offline) for s in seeds]
    rng = np.random.default_rng(0)
    for t in range(60):
        x = X[rng.integers(len(X))]
        Xl = np.stack([x, x])
        f, s2 = lanes.select(Xl)
        served = lanes.best(Xl)
        y = rng.choice([0.0, 1.0], 2)
        for i, p in enumerate(lone):
            duel = p.select(x)
            assert (duel.first, duel.second) == (f[i], s2[i]), t
            assert p.best(x) == served[i]
            p.update(x, duel, y[i])
        lanes.update(Xl, f, s2, y)


def test_a_convex_combination_arm_is_unreachable_without_a_per_arm_term():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 8))
    A = np.vstack([A, A[:3].mean(axis=0)])  # arm 4 inside the hull of arms 0-2
    assert unreachable_arms(preset("paper", feature_map="hadamard"), A) == [4]
    assert unreachable_arms(preset("paper", feature_map="concat"), A, arm_ids=list("abcde")) == ["e"]
    assert unreachable_arms(preset("paper", feature_map="hadamard_bias"), A) == []
    X, U, cats, _ = _clusters(d=8, K=5)
    prior = fit_offline_prior(X, U, cats)
    assert unreachable_arms(FGTSConfig(), A, prior) == []  # the offline blocks carry per-arm terms


@pytest.mark.skipif(shared_data_dir() is None, reason="a claim about the real RouterBench rows, which are not here")
def test_gpt4_is_unreachable_under_an_excel_weighting_at_lambda_0_on_routerbench():
    """ALGORITHM.md s.5: with excel_mask at λ = 0 gpt-4's category weights lie inside the others' hull."""
    from ray_router.data import load_dataset
    from ray_router.embeddings import get_encoder
    from ray_router.evaluation.experiment import arm_embeddings_for, make_split

    table = load_dataset("routerbench", data_dir=shared_data_dir())
    X = get_encoder("hash").encode(list(table.texts))
    cfg = EvalConfig(policies=("fgts_cdb",), weighting="excel_mask", cost_weight=0.0)
    split = make_split(table, cfg, 0)
    A = arm_embeddings_for(table, X, split.offline, cfg)
    dead = unreachable_arms(preset("paper", feature_map="hadamard"), A, arm_ids=table.arms)
    assert "gpt-4-1106-preview" in dead
    assert unreachable_arms(preset("paper"), A, arm_ids=table.arms) == []  # hadamard_bias
    assert (
        unreachable_arms(
            FGTSConfig(),
            A,
            fit_offline_prior(X[split.offline], table.scores[split.offline], table.categories[split.offline]),
        )
        == []
    )


def test_hindsight_references_on_a_hand_made_stream():
    U = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 0.0, 0.9], [0.0, 0.2, 1.0]])
    stream = ReplayStream(
        np.zeros((4, 2)), U, U, np.zeros_like(U), np.array([0, 1, 2, 3, 0]), categories=np.array(["a", "b", "a", "b"])
    )
    # category a rounds: rows 0, 2, 0 -> arm 0 (mean 1.0); category b: rows 1, 3 -> arm 2 (mean 0.75)
    assert best_per_category_arms(stream).tolist() == [0, 2, 0, 2, 0]
    assert oracle_arms(stream).tolist() == [0, 1, 0, 2, 0]
    with pytest.raises(ConfigError, match="hindsight reference"):
        make_policy("oracle", PolicyEnv(3))


def test_paired_difference_verdicts():
    assert paired_difference([1, 2, 3], [2, 3, 4.1])["verdict"] == "below"
    assert paired_difference([3, 2, 5], [2, 3, 4])["verdict"] == "no significant difference"
    assert paired_difference([5, 6, 7.2], [1, 2, 3])["verdict"] == "above"


def test_evaluate_reports_served_regret_references_pairs_and_the_constant_context_ablation():
    table, X = small_table(n=240, seed=4)
    cfg = EvalConfig(
        policies=("fgts_cdb", "offline_static", "best_fixed", "best_per_category", "oracle"),
        n_seeds=3,
        n_rounds=60,
        policy_configs={"fgts_cdb": {"n_steps": 3}},
    )
    res = evaluate(table, X, cfg)
    recs = {r["policy"]: r for r in res.records}
    for r in recs.values():
        assert len(r["served_regret_per_seed"]) == 3 and 0 <= r["self_duel_share"] <= 1
    assert recs["oracle"]["cum_regret_mean"] == 0 and recs["oracle"]["served_regret_mean"] == 0
    assert recs["best_per_category"]["served_regret_mean"] <= recs["best_fixed"]["served_regret_mean"] + 1e-9
    assert recs["best_fixed"]["served_regret_per_seed"] == recs["best_fixed"]["cum_regret_per_seed"]
    assert {"best_fixed", "best_per_category", "offline_static"} <= set(recs["fgts_cdb"]["paired"])
    assert {"served_regret", "cum_served_regret", "served"} <= set(res.curves.columns)
    const = evaluate(table, X, dataclasses.replace(cfg, policies=("offline_static",), context="constant"))
    rec = const.records[0]
    assert rec["context"] == "constant"
    run = const.runs[("offline_static", 0)]
    assert len(set(run.served.tolist())) == 1  # one context: the static router serves one arm
    with pytest.raises(ConfigError, match=r"^EvalConfig: context: "):
        parse(EvalConfig, {"context": "noise"})
