"""The literature baselines: MaxInP, CoLSTIM, the Laplace sampler of FGTS.CDB's posterior, the kNN router.

Closed-form checks of their maths (MLE / MAP against Newton's method, design matrices, Laplace
covariance and draws), regret on a synthetic linear dueling bandit with known θ*, the kNN router
on clustered offline data, and tables of invalid configs. The generic contract (offered arms,
seeding, snapshots, extreme inputs) is in test_policy_contract.py.
"""

import numpy as np
import pytest

from ray_router.config import parse
from ray_router.errors import ConfigError
from ray_router.evaluation.replay import ReplayStream, run_replay
from ray_router.policies import (
    FGTSCDB,
    CoLSTIM,
    CoLSTIMConfig,
    FGTSConfig,
    KNNConfig,
    KNNRouter,
    LaplaceTS,
    LaplaceTSConfig,
    MaxInP,
    MaxInPConfig,
    PolicyEnv,
    make_policy,
)
from ray_router.policies.base import Duel
from ray_router.policies.snapshot import snapshot_from_bytes, snapshot_to_bytes
from tests.bandits import synthetic as _synthetic


# ------------------------------------------------------------------------------- helpers
def _run(policy_name, seed, T=1500, config=None):
    A, X, U = _synthetic(seed)
    order = np.random.default_rng(100 + seed).integers(0, len(X), T)
    stream = ReplayStream(X, U, U, np.zeros_like(U), order)
    policy = make_policy(policy_name, PolicyEnv(len(A), A), seed=seed, config=config)
    result = run_replay(policy, stream, kappa=10.0, rng=np.random.default_rng(seed))
    return policy, result.cum_regret, (A, X, U)


def _duels(rng, n, d, K):
    X = rng.normal(size=(n, d))
    first, second = rng.integers(0, K, n), rng.integers(0, K, n)
    y = rng.choice([0.0, 0.5, 1.0], n)
    return X, first, second, y


def _feed(policy, X, first, second, y):
    for i in range(len(y)):
        policy.update(X[i], Duel(int(first[i]), int(second[i])), float(y[i]))


def _newton_map(D, y, eta, lam, iters=50):
    """Independent MAP of η·Σ ℓ(y, Dθ) + (λ/2)||θ||² by plain Newton on explicit features."""
    theta = np.zeros(D.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-D @ theta))
        g = eta * D.T @ (p - y) + lam * theta
        H = eta * (D * (p * (1 - p))[:, None]).T @ D + lam * np.eye(D.shape[1])
        theta -= np.linalg.solve(H, g)
    p = 1 / (1 + np.exp(-D @ theta))
    return theta, eta * (D * (p * (1 - p))[:, None]).T @ D + lam * np.eye(D.shape[1])


# ------------------------------------------------------------------------ regret (synthetic)
@pytest.mark.parametrize("name", ["maxinp", "colstim", "laplace_ts"])
def test_regret_on_a_synthetic_linear_dueling_bandit_is_sublinear_and_beats_uniform(name):
    runs = np.array([_run(name, s)[1] for s in range(3)])
    uniform = np.array([_run("uniform", s)[1] for s in range(3)])
    thirds = np.diff(runs[:, [0, 499, 999, 1499]], axis=1).mean(axis=0)  # regret per 500 rounds
    assert thirds[2] < 0.25 * thirds[0], thirds  # learning: the last third costs far less than the first
    assert thirds[2] <= thirds[1] * 1.1, thirds
    assert runs[:, -1].max() < 0.1 * uniform[:, -1].min(), (runs[:, -1], uniform[:, -1])


def test_maxinp_eliminates_arms_but_keeps_the_best():
    policy, _, (A, X, U) = _run("maxinp", 0)
    fresh = MaxInP(MaxInPConfig(), A)
    assert all(fresh.candidates(x).all() for x in X[:20])  # nothing is eliminated before any duel
    C = np.array([policy.candidates(x) for x in X])
    assert C[np.arange(len(X)), U.argmax(axis=1)].mean() > 0.97  # the true best arm survives
    assert C.sum(axis=1).mean() < 1.5  # and most others are gone
    assert np.mean([policy.best(x) == u.argmax() for x, u in zip(X, U)]) > 0.95


# ------------------------------------------------------------------------- MaxInP / CoLSTIM
@pytest.mark.parametrize("cls,cfg", [(MaxInP, MaxInPConfig), (CoLSTIM, CoLSTIMConfig)])
def test_mle_equals_the_ridge_logistic_map_and_v_tracks_the_history(cls, cfg):
    rng = np.random.default_rng(3)
    d, K, n = 5, 4, 80
    A = rng.normal(size=(K, d))
    X, f, s, y = _duels(rng, n, d, K)
    for schedule in ({"refresh_every": 10_000, "refresh_fraction": 0.0}, {"refresh_every": 30}):
        policy = cls(cfg(reg=0.7, **schedule), A)  # V⁻¹ by Sherman–Morrison only / also exactly at refits
        _feed(policy, X, f, s, y)
        D = policy.fmap.pair_features(X, f, s)
        np.testing.assert_allclose(policy.V_inv, np.linalg.inv(0.7 * np.eye(policy.dim) + D.T @ D), atol=1e-10)
        theta, _ = _newton_map(D, y, eta=1.0, lam=0.7)
        np.testing.assert_allclose(policy.refit(n_steps=200, tol=0.0), theta, atol=1e-8)


def test_maxinp_plays_the_most_informative_pair_before_any_duel():
    rng = np.random.default_rng(5)
    A = rng.normal(size=(6, 4))
    policy = MaxInP(MaxInPConfig(reg=2.0), A)
    for x in rng.normal(size=(10, 4)):
        duel = policy.select(x)
        Phi = policy.fmap.features(x[None])[0]  # θ̂ = 0, V = λI: all arms are candidates, width ∝ ||φ_i − φ_j||
        widths = np.linalg.norm(Phi[:, None] - Phi[None], axis=2)
        assert widths[duel.first, duel.second] == pytest.approx(widths.max())
        sub = [1, 2, 5]
        duel = policy.select(x, sub)
        assert widths[duel.first, duel.second] == pytest.approx(widths[np.ix_(sub, sub)].max())


def test_colstim_without_perturbation_duels_the_leader_with_the_optimistic_challenger():
    rng = np.random.default_rng(6)
    d, K = 5, 6
    A = rng.normal(size=(K, d))
    policy = CoLSTIM(CoLSTIMConfig(perturbation="none", alpha=0.8), A)
    _feed(policy, *_duels(rng, 60, d, K))
    for x in rng.normal(size=(20, d)):
        duel = policy.select(x)
        Phi, theta, Vinv = policy.fmap.features(x[None])[0], policy.theta, policy.V_inv
        s = Phi @ theta
        assert duel.first == s.argmax() == policy.best(x)
        diff = Phi - Phi[duel.first]
        bonus = np.sqrt(np.einsum("kp,pq,kq->k", diff, Vinv, diff))
        assert duel.second == np.argmax(s + 0.8 * bonus)


def test_colstim_perturbation_explores_early_and_fades():
    def agreement(policy, X):  # how often the perturbed first arm is the exploit arm
        return np.mean([policy.select(x).first == policy.best(x) for x in X for _ in range(20)])

    trained, _, (A, X, _) = _run("colstim", 0)
    fresh = CoLSTIM(CoLSTIMConfig(), A, seed=0)
    assert agreement(fresh, X[:30]) < 0.4  # θ̂ = 0: the Gumbel noise decides (≈ 1/K)
    assert agreement(trained, X[:30]) > 0.9  # explored directions: the noise has shrunk


@pytest.mark.parametrize("name", ["maxinp", "colstim"])
def test_explore_rounds_play_random_distinct_pairs_first(name):
    rng = np.random.default_rng(8)
    A = rng.normal(size=(5, 3))
    policy = make_policy(name, PolicyEnv(5, A), seed=1, config={"explore_rounds": 30})
    duels = []
    for x in rng.normal(size=(30, 3)):
        duel = policy.select(x)
        duels.append((duel.first, duel.second))
        policy.update(x, duel, 1.0)
    assert all(a != b for a, b in duels) and len(set(duels)) > 10


# ---------------------------------------------------------------------------- Laplace TS
@pytest.mark.parametrize("hessian", ["full", "diag"])
def test_laplace_map_equals_the_map_of_a_logistic_problem(hessian):
    rng = np.random.default_rng(3)
    d, K, n = 5, 4, 60
    A = rng.normal(size=(K, d))
    X, f, s, y = _duels(rng, n, d, K)
    cfg = LaplaceTSConfig(eta=1.7, prior_sigma=1.5, hessian=hessian, refresh_every=25)  # default feature map
    policy = LaplaceTS(cfg, A, seed=0)
    _feed(policy, X, f, s, y)
    theta = policy.refit(n_steps=500, tol=0.0)
    D = policy.fmap.pair_features(X, f, s)  # φ(x, a¹) − φ(x, a²)
    expected, H = _newton_map(D, y, eta=1.7, lam=1 / 1.5**2)
    np.testing.assert_allclose(theta, expected, atol=1e-8)
    # the same posterior as FGTS.CDB with the feel-good term dropped: its potential is flat at the MAP
    fgts = FGTSCDB(FGTSConfig(eta=1.7, mu=0.0, prior_sigma=1.5), A, seed=0)
    assert fgts.dim == policy.dim
    mask = np.ones((n, K), dtype=bool)
    grad = fgts.potential_grad(np.stack([theta, theta + 0.1]), X, f, s, y, mask)
    assert np.abs(grad[0]).max() < 1e-3 < np.abs(grad[1]).max()  # (FGTS may compute in float32)
    # the Laplace covariance at the MAP is the inverse Hessian (or its diagonal's inverse)
    policy.rebuild()
    want = np.linalg.inv(H) if hessian == "full" else np.diag(1 / np.diag(H))
    np.testing.assert_allclose(policy.covariance(), want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("hessian", ["full", "diag"])
def test_an_online_laplace_step_is_the_exact_update_of_the_gaussian_prior_by_one_duel(hessian):
    rng = np.random.default_rng(12)
    d, K = 5, 4
    A = rng.normal(size=(K, d))
    policy = LaplaceTS(LaplaceTSConfig(eta=1.3, hessian=hessian, refresh_every=10), A)
    _feed(policy, *_duels(rng, 34, d, K))
    m, P = policy.theta.copy(), np.linalg.inv(policy.covariance())  # the prior: N(m, P⁻¹)
    for y in (1.0, 0.0, 0.5):
        X, f, s, _ = _duels(rng, 1, d, K)
        delta = policy.fmap.pair_features(X, f, s)[0]
        m, P = policy.theta.copy(), np.linalg.inv(policy.covariance())
        policy.update(X[0], Duel(int(f[0]), int(s[0])), y)
        theta = policy.theta
        z = delta @ theta
        sig = 1 / (1 + np.exp(-z))
        # the mode of N(m, P⁻¹)·exp(−η·ℓ(y, Δᵀθ)) and the precision there
        np.testing.assert_allclose(P @ (theta - m) + 1.3 * (sig - y) * delta, 0.0, atol=1e-9)
        P_new = P + 1.3 * sig * (1 - sig) * np.outer(delta, delta)
        want = np.linalg.inv(P_new) if hessian == "full" else np.diag(1 / np.diag(P_new))
        np.testing.assert_allclose(policy.covariance(), want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["laplace_ts", "maxinp", "colstim"])
def test_online_steps_track_the_map_between_refreshes(name):
    rng = np.random.default_rng(13)
    d, K = 6, 5
    A = rng.normal(size=(K, d))
    env = PolicyEnv(K, A)
    policy = make_policy(name, env)  # exact refits at 100, 200, ... duels; online steps between
    theta_star = rng.normal(size=policy.dim) * 2
    errors = []
    for t in range(1, 601):
        x = rng.normal(size=d)
        f, s = rng.choice(K, 2, replace=False)
        gap = theta_star @ policy.fmap.pair_features(x[None], np.array([f]), np.array([s]))[0]
        policy.update(x, Duel(int(f), int(s)), float(rng.random() < 1 / (1 + np.exp(-gap))))
        if t % 50 == 25:  # between refits
            clone = make_policy(name, env)
            clone.restore(policy.snapshot())
            exact = clone.refit(n_steps=200, tol=0.0)
            errors.append(np.linalg.norm(policy.theta - exact) / np.linalg.norm(exact))
    assert max(errors[2:]) < 0.1, np.round(errors, 3)  # online steps drift little from the exact MAP / MLE


def test_rank_one_updates_keep_the_laplace_precision_consistent_with_its_weights():
    rng = np.random.default_rng(4)
    d, K = 6, 5
    A = rng.normal(size=(K, d))
    policy = LaplaceTS(LaplaceTSConfig(eta=2.0, prior_sigma=0.8, refresh_every=10_000, refresh_fraction=0.0), A)
    _feed(policy, *_duels(rng, 200, d, K))
    h = policy.history
    H = 2.0 * (h.Dn * h.wn[:, None]).T @ h.Dn + np.eye(policy.dim) / 0.8**2
    np.testing.assert_allclose(policy.covariance(), np.linalg.inv(H), rtol=1e-8, atol=1e-12)
    assert len(set(np.round(h.wn, 6))) > 50  # each duel's weight was taken at a different mode


@pytest.mark.parametrize("hessian", ["full", "diag"])
def test_laplace_draws_follow_n_map_inverse_hessian(hessian):
    rng = np.random.default_rng(9)
    d, K = 4, 4
    A = rng.normal(size=(K, d))
    policy = LaplaceTS(LaplaceTSConfig(hessian=hessian, refresh_every=25, refresh_fraction=0.0), A, seed=2)
    _feed(policy, *_duels(rng, 60, d, K))
    assert policy.history.n - policy.post.rebuilt_rows == 10  # the draw covers pending rank-one terms too
    draws = policy.sample(40_000)
    cov = policy.covariance()
    np.testing.assert_allclose(draws.mean(axis=0), policy.theta, atol=4 * np.sqrt(np.diag(cov).max() / 40_000))
    assert np.linalg.norm(np.cov(draws.T) - cov) < 0.05 * np.linalg.norm(cov)


def test_laplace_refreshes_on_a_geometric_schedule():
    rng = np.random.default_rng(14)
    policy = LaplaceTS(LaplaceTSConfig(refresh_every=10, refresh_fraction=0.5), rng.normal(size=(3, 2)))
    at = []
    for x in rng.normal(size=(200, 2)):
        policy.update(x, Duel(0, 1), 1.0)
        if policy.post.refreshed_at == policy.n_updates:
            at.append(policy.n_updates)
    assert at == [10, 20, 30, 45, 68, 102, 153]  # gaps: max(10, ceil(0.5 · size at the last refresh))


def test_laplace_distinct_arms_never_duels_an_arm_with_itself():
    rng = np.random.default_rng(10)
    policy = LaplaceTS(LaplaceTSConfig(distinct_arms=True), rng.normal(size=(5, 3)), seed=0)
    for _ in range(200):
        x = rng.normal(size=3)
        duel = policy.select(x)
        assert duel.first != duel.second
        policy.update(x, duel, 1.0)
    assert policy.select(rng.normal(size=3), arms=[2]) == Duel(2, 2)


# --------------------------------------------------------------------------------- kNN
def _clustered(seed, n_per=40, d=16, K=5, M=4, noise=0.15):
    """Offline queries around M cluster centres; the best arm depends on the cluster only."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(M, d))
    best = rng.permutation(K)[:M]
    runner = (best + 1) % K

    def draw(n):
        c = rng.integers(0, M, n)
        X = centres[c] + noise * rng.normal(size=(n, d))
        U = 0.2 + 0.05 * rng.random((n, K))
        U[np.arange(n), best[c]] = 0.9
        U[np.arange(n), runner[c]] = 0.6
        return X, U, c

    return draw(n_per * M), draw(200), best, runner


def test_knn_routes_each_cluster_to_its_best_arm_and_does_not_learn_online():
    (X, U, c), (Xq, _, cq), best, runner = _clustered(0)
    env = PolicyEnv(n_arms=5, offline={"X": X, "utilities": U, "scores": U, "categories": c})
    policy = make_policy("knn", env, seed=0)
    duels = [policy.select(x) for x in Xq]
    assert all(d == Duel(int(best[k]), int(runner[k])) for d, k in zip(duels, cq))
    assert all(policy.best(x) == best[k] for x, k in zip(Xq, cq))
    before = policy.predict(Xq[0])
    for x, d in zip(Xq, duels):
        policy.update(x, d, 0.0)  # feedback against its choice changes nothing
    np.testing.assert_array_equal(policy.predict(Xq[0]), before)
    assert policy.n_updates == len(Xq)
    k = int(best[cq[0]])
    assert policy.best(Xq[0], [k, (k + 2) % 5]) == k and policy.select(Xq[0], [3]) == Duel(3, 3)


def test_knn_prediction_is_the_similarity_weighted_mean_of_the_nearest_neighbours():
    rng = np.random.default_rng(1)
    X, U = rng.normal(size=(30, 6)), rng.random((30, 3))
    x = rng.normal(size=6)
    cos = (X @ x) / np.linalg.norm(X, axis=1) / np.linalg.norm(x)
    nn = np.argsort(-cos)[:4]
    w = np.maximum(cos[nn], 0)
    np.testing.assert_allclose(KNNRouter(KNNConfig(k=4), X, U).predict(x), w @ U[nn] / w.sum())
    np.testing.assert_allclose(KNNRouter(KNNConfig(k=4, weighting="uniform"), X, U).predict(x), U[nn].mean(0))
    np.testing.assert_allclose(KNNRouter(KNNConfig(k=100, weighting="uniform"), X, U).predict(x), U.mean(0))


def test_knn_needs_offline_data_and_picks_its_target():
    with pytest.raises(ConfigError, match="offline"):
        make_policy("knn", PolicyEnv(n_arms=3))
    with pytest.raises(ConfigError, match="'X'"):
        make_policy("knn", PolicyEnv(n_arms=3, offline={"utilities": np.ones((2, 3))}))
    X, S = np.eye(3), np.eye(3)
    with pytest.raises(ConfigError, match="utilities"):
        make_policy("knn", PolicyEnv(3, offline={"X": X, "scores": S}), config={"target": "utilities"})
    with pytest.raises(ConfigError, match="arms"):
        make_policy("knn", PolicyEnv(4, offline={"X": X, "scores": S}))
    with pytest.raises(ConfigError, match="NaN"):
        make_policy("knn", PolicyEnv(3, offline={"X": X * np.nan, "scores": S}))
    auto = make_policy("knn", PolicyEnv(3, offline={"X": X, "scores": S}), config={"k": 1})  # no utilities: scores
    assert auto.best(np.array([0.0, 1.0, 0.1])) == 1
    scores = make_policy(
        "knn", PolicyEnv(3, offline={"X": X, "scores": S, "utilities": S[::-1]}), config={"k": 1, "target": "scores"}
    )
    assert scores.best(np.array([0.0, 1.0, 0.1])) == 1


def test_knn_snapshot_carries_its_training_data():
    (X, U, _c), (Xq, _, _), _, _ = _clustered(2)
    policy = make_policy("knn", PolicyEnv(5, offline={"X": X, "utilities": U}), config={"k": 7})
    clone = KNNRouter(KNNConfig(), np.ones((1, 16)), np.zeros((1, 5)))  # built from other data
    clone.restore(snapshot_from_bytes(snapshot_to_bytes(policy.snapshot())))
    assert clone.config == KNNConfig(k=7)
    assert [clone.select(x) for x in Xq] == [policy.select(x) for x in Xq]


# -------------------------------------------------------------------------- config tables
@pytest.mark.parametrize(
    "cls,field,value",
    [
        (MaxInPConfig, "reg", 0.0),
        (MaxInPConfig, "reg", float("inf")),
        (MaxInPConfig, "alpha", -1.0),
        (MaxInPConfig, "map_steps", 0),
        (MaxInPConfig, "map_steps", 1.5),
        (MaxInPConfig, "explore_rounds", -1),
        (MaxInPConfig, "refresh_every", 0),
        (MaxInPConfig, "refresh_fraction", -1.0),
        (MaxInPConfig, "feature_map", "mlp"),
        (CoLSTIMConfig, "reg", -1.0),
        (CoLSTIMConfig, "alpha", float("nan")),
        (CoLSTIMConfig, "perturbation", "cauchy"),
        (CoLSTIMConfig, "perturb_width", -0.5),
        (CoLSTIMConfig, "map_steps", True),
        (CoLSTIMConfig, "feature_map", ""),
        (CoLSTIMConfig, "refresh_fraction", "0.1"),
        (LaplaceTSConfig, "eta", 0.0),
        (LaplaceTSConfig, "prior_sigma", 0.0),
        (LaplaceTSConfig, "map_steps", 0),
        (LaplaceTSConfig, "hessian", "lowrank"),
        (LaplaceTSConfig, "refresh_every", 0),
        (LaplaceTSConfig, "refresh_fraction", -0.1),
        (LaplaceTSConfig, "feature_map", "mlp"),
        (LaplaceTSConfig, "distinct_arms", "yes"),
        (KNNConfig, "k", 0),
        (KNNConfig, "k", 2.0),
        (KNNConfig, "weighting", "gaussian"),
        (KNNConfig, "target", "costs"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_named(cls, field, value):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: {field}: "):
        parse(cls, {field: value})
    with pytest.raises(ValueError, match=rf"(?m)^{field}$"):  # built directly: pydantic's error, same field
        cls(**{field: value})


@pytest.mark.parametrize("name", ["maxinp", "colstim", "laplace_ts"])
def test_linear_baselines_take_the_fgts_feature_maps_and_reject_unknown_fields(name):
    rng = np.random.default_rng(11)
    A = rng.normal(size=(4, 3))
    for fmap, dim in [("hadamard", 3), ("hadamard_bias", 7), ("concat", 6)]:
        policy = make_policy(name, PolicyEnv(4, A), config={"feature_map": fmap})
        assert policy.dim == dim
        policy.update(rng.normal(size=3), policy.select(rng.normal(size=3)), 1.0)
    with pytest.raises(ConfigError, match="unknown field"):
        make_policy(name, PolicyEnv(4, A), config={"temperature": 1.0})
    with pytest.raises(ConfigError, match="dim"):
        make_policy(name, PolicyEnv(4, A)).select(np.ones(5))
