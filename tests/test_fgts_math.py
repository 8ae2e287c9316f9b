"""Closed-form checks of FGTS.CDB's maths (ALGORITHM.md s.2): gradient, SGLD -> MAP, regret."""

import math

import numpy as np
import pytest

from ray_router.errors import ConfigError
from ray_router.policies import FEATURE_MAPS, FGTSCDB, PolicyEnv, make_feature_map, make_policy
from ray_router.policies.base import Duel
from tests.bandits import replay


def paper_cfg(**kw):
    """The paper's FGTS.CDB (these tests check its maths); the offline extension is tested elsewhere."""
    from ray_router.policies.fgts_cdb import preset

    return preset("paper", **kw)


def _duels(rng, n, d, K):
    X = rng.normal(size=(n, d))
    first, second = rng.integers(0, K, n), rng.integers(0, K, n)
    y = rng.choice([0.0, 0.5, 1.0], n)
    mask = rng.random((n, K)) < 0.7
    mask[np.arange(n), first] = mask[np.arange(n), second] = True
    return X, first, second, y, mask


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_feature_map_ops_match_the_materialised_features(fmap):
    rng = np.random.default_rng(0)
    A, X = rng.normal(size=(5, 7)), rng.normal(size=(9, 7))
    fm = make_feature_map(fmap, A)
    Phi = fm.features(X)  # (n, K, p)
    theta = rng.normal(size=(3, fm.dim))
    np.testing.assert_allclose(fm.scores(theta, X), np.einsum("nkp,cp->cnk", Phi, theta), atol=1e-12)
    W = rng.normal(size=(3, 9, 5))
    np.testing.assert_allclose(fm.weighted_grad(W, X), np.einsum("cnk,nkp->cp", W, Phi), atol=1e-12)
    f, s = rng.integers(0, 5, 9), rng.integers(0, 5, 9)
    np.testing.assert_allclose(fm.pair_features(X, f, s), Phi[np.arange(9), f] - Phi[np.arange(9), s], atol=1e-12)
    # a stack of θ for one context (a served pool of samples)
    stack = rng.normal(size=(6, fm.dim))
    np.testing.assert_allclose(fm.stack_scores(stack, X[4]), np.einsum("kp,cp->ck", Phi[4], stack), atol=1e-12)


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
@pytest.mark.parametrize("clip", [0.3, math.inf])
def test_potential_gradient_matches_finite_differences(fmap, clip):
    rng = np.random.default_rng(1)
    d, K, n = 6, 4, 25
    policy = FGTSCDB(
        paper_cfg(
            feature_map=fmap,
            eta=1.7,
            mu=0.4,
            feel_good_clip=clip,
            prior_sigma=0.8,
            compute_dtype="float64",
            embedding_scale=1.0,
        ),
        rng.normal(size=(K, d)),
        seed=0,
    )
    batch = _duels(rng, n, d, K)
    theta = rng.normal(size=(2, policy.dim)) * 1.5
    grad = policy.potential_grad(theta, *batch)
    h = 1e-6
    for j in (1, 2):
        num = np.array(
            [
                (
                    policy.potential(theta[j - 1] + e, *batch, sampler=j)
                    - policy.potential(theta[j - 1] - e, *batch, sampler=j)
                )
                / (2 * h)
                for e in np.eye(policy.dim) * h
            ]
        )
        np.testing.assert_allclose(grad[j - 1], num, rtol=1e-5, atol=1e-6)


def test_minibatch_gradient_is_rescaled_by_n_over_b():
    rng = np.random.default_rng(2)
    policy = FGTSCDB(
        paper_cfg(mu=0.0, feature_map="hadamard", compute_dtype="float64"), rng.normal(size=(3, 4)), seed=0
    )
    X, f, s, y, m = _duels(rng, 10, 4, 3)
    theta = np.zeros((2, 4))
    full = policy.potential_grad(theta, X, f, s, y, m)
    doubled = policy.potential_grad(
        theta, np.concatenate([X, X]), np.r_[f, f], np.r_[s, s], np.r_[y, y], np.concatenate([m, m])
    )
    half = policy.potential_grad(theta, X, f, s, y, m, scale=2.0)
    np.testing.assert_allclose(half, doubled, atol=1e-12)
    assert not np.allclose(full, doubled)


@pytest.mark.parametrize("preconditioner", ["none", "diag_fisher"])
def test_sgld_without_noise_converges_to_the_map_of_a_logistic_problem(preconditioner):
    rng = np.random.default_rng(3)
    d, K, n = 5, 4, 60
    A = rng.normal(size=(K, d))
    X, f, s, y, _ = _duels(rng, n, d, K)
    D = X * (A[f] - A[s])  # φ(x, a¹) − φ(x, a²)
    lipschitz = np.linalg.eigvalsh(D.T @ D / 4).max() + 1 / 1.5**2
    cfg = paper_cfg(
        eta=1.0,
        mu=0.0,
        prior_sigma=1.5,
        langevin_noise=0.0,
        step_size=1.0 / lipschitz,
        n_steps=5000,
        batch_size=1000,
        feature_map="hadamard",
        preconditioner=preconditioner,
        compute_dtype="float64",
        embedding_scale=1.0,
    )
    policy = FGTSCDB(cfg, A, seed=0)
    for i in range(n):
        policy.update(X[i], Duel(int(f[i]), int(s[i])), float(y[i]))
    policy.refresh()
    # independent MAP: Newton's method on the same objective built from explicit features
    theta = np.zeros(d)
    for _ in range(50):
        p = 1 / (1 + np.exp(-D @ theta))
        g = D.T @ (p - y) + theta / cfg.prior_sigma**2
        H = (D * (p * (1 - p))[:, None]).T @ D + np.eye(d) / cfg.prior_sigma**2
        theta -= np.linalg.solve(H, g)
    np.testing.assert_allclose(policy.theta[0], theta, atol=1e-6)
    np.testing.assert_allclose(policy.theta[1], theta, atol=1e-6)


def _regret(policy_name, seed, T=1500, config=None):
    return replay(policy_name, seed, T, config).cum_regret


def test_float32_and_float64_sgld_gradients_agree():
    rng = np.random.default_rng(6)
    A = rng.normal(size=(5, 16))
    batch = _duels(rng, 40, 16, 5)
    theta = rng.normal(size=(2, 21))
    g32 = FGTSCDB(paper_cfg(compute_dtype="float32"), A, seed=0).potential_grad(
        theta, batch[0].astype(np.float32), *batch[1:]
    )
    g64 = FGTSCDB(paper_cfg(compute_dtype="float64"), A, seed=0).potential_grad(theta, *batch)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-4)


def test_regret_on_a_synthetic_linear_dueling_bandit_is_sublinear_and_beats_uniform():
    fgts = np.array([_regret("fgts_cdb", s) for s in range(3)])
    uniform = np.array([_regret("uniform", s) for s in range(3)])
    thirds = np.diff(fgts[:, [0, 499, 999, 1499]], axis=1).mean(axis=0)  # regret per 500 rounds
    assert thirds[2] < 0.5 * thirds[0], thirds  # learning: the last third costs far less than the first
    assert thirds[2] <= thirds[1] * 1.1, thirds
    assert fgts[:, -1].max() < 0.25 * uniform[:, -1].min(), (fgts[:, -1], uniform[:, -1])


def test_distinct_arms_never_duels_an_arm_with_itself():
    rng = np.random.default_rng(4)
    policy = FGTSCDB(paper_cfg(distinct_arms=True, n_steps=2), rng.normal(size=(5, 3)), seed=0)
    for _ in range(200):
        x = rng.normal(size=3)
        duel = policy.select(x)
        assert duel.first != duel.second
        policy.update(x, duel, 1.0)
    assert policy.select(rng.normal(size=3), arms=[2]) == Duel(2, 2)  # one offered arm: nothing else


def test_bounded_history_keeps_the_most_recent_duels():
    rng = np.random.default_rng(5)
    policy = FGTSCDB(paper_cfg(max_history=40, n_steps=1), rng.normal(size=(3, 3)), seed=0)
    xs = rng.normal(size=(100, 3))
    for x in xs:
        policy.update(x, Duel(0, 1), 1.0)
    assert policy.history.n <= 40 and policy.n_updates == 100
    np.testing.assert_allclose(policy.history.X[policy.history.n - 1], xs[-1])


def test_bounded_history_reserves_its_memory_once_and_keeps_it_across_a_restore():
    # serving's footprint is its steady state from the start: no doubling towards max_history, and a
    # restore (from a snapshot taken under a larger bound) keeps the buffer and the most recent duels
    rng = np.random.default_rng(6)
    policy = FGTSCDB(paper_cfg(max_history=300, n_steps=1), rng.normal(size=(3, 3)), seed=0)
    buffer = policy.history.X
    assert buffer.shape[0] == 300  # more than the growing buffer's first size (256)
    for x in rng.normal(size=(400, 3)):
        policy.update(x, Duel(0, 1), 1.0)
    assert policy.history.X is buffer

    bigger = FGTSCDB(paper_cfg(max_history=400, n_steps=1), rng.normal(size=(3, 3)), seed=0)
    xs = rng.normal(size=(350, 3))
    for x in xs:
        bigger.update(x, Duel(1, 2), 0.0)
    policy.history.load(bigger.history.arrays())
    assert policy.history.X is buffer and policy.history.n == 300
    np.testing.assert_allclose(policy.history.X[:300], xs[-300:])
    assert (policy.history.first[:300] == 1).all() and (policy.history.second[:300] == 2).all()
    policy.update(xs[0], Duel(0, 1), 1.0)  # full: the oldest quarter goes, the new duel is last
    assert policy.history.n == 226 and policy.history.X is buffer
    np.testing.assert_allclose(policy.history.X[225], xs[0])


def test_sqrt_step_decay_shrinks_with_history():
    policy = FGTSCDB(paper_cfg(step_decay="sqrt", step_size=1e-2), np.eye(3), seed=0)
    assert policy.step_size() == pytest.approx(1e-2)
    for _ in range(100):
        policy.update(np.ones(3), Duel(0, 1), 0.0)
    assert policy.step_size() == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "field,value",
    [
        ("eta", -1.0),
        ("mu", -0.1),
        ("feel_good_clip", 0.0),
        ("prior_sigma", 0.0),
        ("n_steps", 0),
        ("batch_size", 0),
        ("step_size", 0.0),
        ("step_decay", "cosine"),
        ("feature_map", "mlp"),
        ("exploit_ema", 0.0),
        ("max_history", -1),
        ("langevin_noise", -1.0),
        ("n_steps", 2.5),
        ("preconditioner", "adam"),
        ("compute_dtype", "float16"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_named(field, value):
    # the message names this very field ("FGTS.CDB preset 'paper': n_steps: Input should be ..."), not
    # another one that shares a word with it
    with pytest.raises(ConfigError, match=rf"^FGTS\.CDB preset 'paper': {field}: "):
        paper_cfg(**{field: value})


def test_unknown_config_field_and_policy_are_config_errors():
    with pytest.raises(ConfigError, match="unknown field"):
        make_policy("fgts_cdb", PolicyEnv(2, np.eye(2)), config={"temperature": 1.0})
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("nope", PolicyEnv(2, np.eye(2)))


def test_bad_inputs_to_the_policy_are_config_errors():
    policy = FGTSCDB(paper_cfg(), np.eye(3), seed=0)
    with pytest.raises(ConfigError, match="dim"):
        policy.select(np.ones(4))
    with pytest.raises(ConfigError, match="NaN"):
        policy.select(np.array([np.nan, 0, 0]))
    with pytest.raises(ConfigError, match="outcome"):
        policy.update(np.ones(3), Duel(0, 1), 2.0)
    with pytest.raises(ConfigError, match="out of range"):
        policy.update(np.ones(3), Duel(0, 7), 1.0)
    with pytest.raises(ConfigError, match="empty"):
        policy.select(np.ones(3), arms=[])
    assert policy.n_updates == 0 and policy.history.n == 0
