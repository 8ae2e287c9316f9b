"""``second_arm: rival`` in Serve's ranking (issue 10): the ingress's :class:`SampleView` duels the
arm most likely to beat the first, as ``FGTSCDB.select`` does, from the posterior mean and the
diagonal variance the posterior publishes with its samples. No Ray: the pure view, the policy and
the posterior state."""

from __future__ import annotations

import numpy as np
import pytest

from ray_router.policies import Duel
from ray_router.policies.common import sigmoid
from ray_router.policies.offline_prior import fit_offline_prior
from ray_router.serve.ranking import SampleView, choose_duel, normalised_prices
from ray_router.serve.state import PosteriorState, make_scorer
from ray_router.serve.tokens import quantise
from tests.serve.helpers import arm_embeddings, spec

K, DIM = 6, 16
PRICES = (0.002, 0.01, 0.0, 0.0005, 0.03, 0.001)
SUBSETS = (None, [0, 2, 3], [1, 4], [5, 1, 2, 0], [3])


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    X = rng.normal(size=(n, DIM))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def offline_prior() -> dict:
    """A fitted offline prior (3 categories), so the contexts carry the offline blocks' columns."""
    rng = np.random.default_rng(5)
    X = unit_rows(rng, 60)
    cats = np.array(["math", "code", "chat"])[np.arange(60) % 3]
    return fit_offline_prior(X, rng.uniform(0, 1, size=(60, K)), cats).to_dict()


def trained(config: dict, n_duels: int = 300, seed: int = 1):
    """A policy (the service's config) after ``n_duels`` duels of a fixed synthetic problem and a few
    refreshes: its θ, mean and diagonal variance are a posterior's, not the prior's."""
    A, prior = arm_embeddings(DIM, K), offline_prior()
    pol = make_scorer(A, config, seed, prior)
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=DIM)
    for x in unit_rows(rng, n_duels):
        a, b = rng.choice(K, size=2, replace=False)
        pol.update(x, Duel(int(a), int(b)), float(x @ A[a] * truth @ A[a] > x @ A[b] * truth @ A[b]))
    for _ in range(4):
        pol.refresh()
    return pol, A, prior


def view_of(pol, A, prior, config: dict, pool=None, variance="policy", seed: int = 0) -> SampleView:
    """The ingress's view (its own scorer of the same config) holding ``pol``'s published samples."""
    view = SampleView(make_scorer(A, config, 0, prior), PRICES, seed=seed)
    var = pol.posterior_variance() if isinstance(variance, str) else variance
    view.update(3, pol.theta, pol.theta_mean, pool, var)
    return view


def contexts(n: int = 12) -> list[np.ndarray]:
    return [quantise(x) for x in unit_rows(np.random.default_rng(9), n)]


@pytest.mark.parametrize("arm_selection", ["exploit_first", "thompson"])
@pytest.mark.parametrize("min_prob", [0.0, 0.05])
def test_at_zero_cost_weight_the_view_duels_the_policys_rival(arm_selection, min_prob):
    config = {"second_arm": "rival", "rival_min_prob": min_prob, "arm_selection": arm_selection, "n_steps": 5}
    pol, A, prior = trained(config)
    # a spread-out mean (larger per-arm terms), so some rivals fall under rival_min_prob
    pol.theta_mean = pol.theta_mean * 3.0
    view = view_of(pol, A, prior, config)
    thompson = rival = 0
    for x in contexts(30):
        for offered in SUBSETS:
            duel = pol.select(x, offered, resample=False)
            first, second, _, propensity = view.choose_with_propensity(x, offered, "duel")
            assert (first, second) == (duel.first, duel.second) and propensity == (1, 1)
            mask = np.zeros(K, bool)
            mask[offered if offered is not None else slice(None)] = True
            ts = choose_duel(view.scorer.arm_scores(x, pol.theta), mask, None, True, first)[1]
            thompson += second == ts
            rival += second != ts
            assert mask[first] and mask[second]
            if mask.sum() > 1:
                assert first != second  # distinct_arms (the service's default)
    # both rules were exercised: rivals other than θ²'s arm, and θ²'s arm (the same, or the fallback)
    assert rival >= 10 and thompson >= 10, (rival, thompson)


def test_the_fallback_under_rival_min_prob_is_taken():
    # thin_offline_rows 0: the prior rests on 20 rows per category, whose thin preset would fix rival_min_prob
    config = {"second_arm": "rival", "rival_min_prob": 0.05, "n_steps": 5, "thin_offline_rows": 0}
    pol, A, prior = trained(config)
    pol.theta_mean = pol.theta_mean * 3.0
    strict = view_of(pol, A, prior, config)
    loose = view_of(pol, A, prior, {**config, "rival_min_prob": 0.0})
    fell_back = 0
    for x in contexts(20):
        a = strict.choose_with_propensity(x, None, "duel")
        b = loose.choose_with_propensity(x, None, "duel")
        if a[:2] != b[:2]:
            ts = choose_duel(strict.scorer.arm_scores(x, pol.theta), np.ones(K, bool), None, True, a[0])[1]
            assert a[1] == ts  # below the threshold the second arm is θ²'s
            fell_back += 1
    assert fell_back > 0


@pytest.mark.parametrize("arm_selection", ["exploit_first", "thompson"])
def test_each_pool_sample_duels_as_the_policy_would_and_the_propensity_counts_them(arm_selection):
    config = {"second_arm": "rival", "rival_min_prob": 0.05, "arm_selection": arm_selection, "n_steps": 5}
    pol, A, prior = trained(config)
    pool = []
    for _ in range(8):
        pol.refresh()
        pool.append(pol.theta)
    pool_arr = np.stack(pool)
    view = view_of(pol, A, prior, config, pool=pool_arr, seed=4)
    for x in contexts(6):
        for offered in SUBSETS[:4]:
            pairs = []
            for th in pool_arr:  # the policy with each published sample as its θ
                pol.theta = th
                d = pol.select(x, offered, resample=False)
                pairs.append((d.first, d.second))
            for _ in range(20):
                first, second, _, (count, M) = view.choose_with_propensity(x, offered, "duel")
                assert (first, second) in pairs and M == 8 and count == pairs.count((first, second))


def test_without_a_published_variance_the_second_arm_is_thetas():
    """An older posterior publishes no variance: the ingress duels θ²'s arm, as before."""
    config = {"second_arm": "rival", "n_steps": 5}
    pol, A, prior = trained(config)
    view = view_of(pol, A, prior, config, variance=None)
    assert view.variance is None
    for x in contexts(6):
        first, second, _, _ = view.choose_with_propensity(x, None, "duel")
        assert (first, second) == choose_duel(
            view.scorer.arm_scores(x, pol.theta), np.ones(K, bool), None, True, pol.best(x)
        )


def test_a_single_offered_arm_duels_itself_and_ranked_keeps_thetas_order():
    config = {"second_arm": "rival", "rival_min_prob": 0.05, "n_steps": 5}
    pol, A, prior = trained(config)
    view = view_of(pol, A, prior, config)
    x = contexts(1)[0]
    assert view.choose_with_propensity(x, [3], "duel")[:2] == (3, 3)
    # the fallback order of a failed second arm is θ²'s (the rival is one arm, not an order)
    u2 = view.scorer.arm_scores(x, pol.theta)[1]
    assert view.ranked(x, None, "duel", 0.0, slot=1) == [int(i) for i in np.argsort(-u2, kind="stable")]


def test_the_shadow_judges_second_arm_is_the_rival_too():
    config = {"second_arm": "rival", "n_steps": 5}
    pol, A, prior = trained(config)
    view = view_of(pol, A, prior, config)
    for x in contexts(6):
        for offered in SUBSETS[:4]:
            mask = np.zeros(K, bool)
            mask[offered if offered is not None else slice(None)] = True
            first = pol.best(x, offered)
            assert view.second_for(x, first, mask, None) == pol.select(x, offered, resample=False).second


def test_with_a_cost_weight_a_cheap_rival_beats_a_slightly_likelier_expensive_one():
    """Arm 0 is the clear first; arm 1 (the dearest) is a slightly likelier rival than arm 2 (free):
    0.05 logits apart. At λ = 0 the rival is arm 1; at λ = 0.02 the penalty, in logits at arm 0's
    slope p0·(1 − p0) ≈ 0.10, costs arm 1 ≈ 0.19 logits and the rival is arm 2 (read in win
    probability, 0.02 alone would not outweigh 0.05 logits); at λ = 0.004 (≈ 0.04 logits) arm 1 stays."""
    config = {"second_arm": "rival", "offline_prior": "none", "feature_map": "hadamard_bias", "n_steps": 5}
    A = arm_embeddings(DIM, K)
    scorer = make_scorer(A, config)
    p = scorer.dim
    bias = np.array([2.0, 0.5, 0.45, -1.0, -1.0, -1.0])
    mean = np.zeros(p)
    mean[DIM:] = bias  # u_k = bias_k: the per-arm terms only
    theta = np.zeros((2, p))
    theta[:, DIM:] = [0, 0, 0, 5.0, 0, 0]  # θ² prefers arm 3: not the rival
    var = np.full(p, 1e-12)
    var[DIM:] = 1.0  # sd_k = sqrt(2) for every k ≠ 0: z_k ∝ u_k − u_0
    prices = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    view = SampleView(scorer, prices)
    view.update(1, theta, mean, None, var)
    x = quantise(unit_rows(np.random.default_rng(2), 1)[0])
    assert view.choose_with_propensity(x, None, "duel", 0.0)[:2] == (0, 1)
    assert view.choose_with_propensity(x, None, "duel", 0.02)[:2] == (0, 2)
    assert view.choose_with_propensity(x, None, "duel", 0.004)[:2] == (0, 1)
    # the z the docstring states: arm 1 loses λ·1/(p0·(1 − p0)) logits
    p0 = sigmoid(bias[0] - bias.mean())
    for lam, rival in ((0.02, 2), (0.004, 1)):
        pen = lam * normalised_prices(prices)
        z = (bias - bias[0] - (pen - pen[0]) / (p0 * (1 - p0))) / np.sqrt(2.0)
        z[0] = -np.inf
        assert int(z.argmax()) == rival


def test_the_posterior_publishes_the_variance_of_its_last_refresh(tmp_path):
    st = PosteriorState(
        spec(tmp_path, policy_config={"feature_map": "hadamard_bias", "n_steps": 5, "second_arm": "rival"})
    )
    st.open()
    try:
        np.testing.assert_array_equal(st.view()["variance"], st.policy.posterior_variance())  # before any refresh
        st.refresh()
        at_refresh = st.policy.posterior_variance()
        x = unit_rows(np.random.default_rng(0), 1)[0]
        st.policy.update(x, Duel(0, 1), 1.0)  # an update after the refresh: the published variance stays
        v = st.view()
        np.testing.assert_array_equal(v["variance"], at_refresh)
        assert v["variance"].shape == v["theta_mean"].shape
        assert not np.array_equal(st.policy.posterior_variance(), at_refresh)
    finally:
        st.close()
    plain = PosteriorState(spec(tmp_path / "plain"))  # second_arm: thompson publishes none
    plain.open()
    try:
        plain.refresh()
        assert "variance" not in plain.view()
    finally:
        plain.close()
