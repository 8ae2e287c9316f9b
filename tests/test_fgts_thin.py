"""FGTS.CDB fields for the thin offline regime (five rows per category, issue 10): the offline
shrinkage's τ floor and marginal standard error, the correction's slope floor, the rival second arm."""

import numpy as np
import pytest

from ray_router.errors import ConfigError
from ray_router.policies import FGTSCDB, FGTSConfig, fit_offline_prior, get_entry
from ray_router.policies.fgts_cdb import FGTSCDBLanes, preset, resolve_prior, rival_arm
from tests.test_fgts_lanes import _play


def _thin(seed=0, M=3, K=4, d=12, n_per=5):
    """Five rows per category in well-separated clusters; arm 0 scores the same on every category
    (its between-category variance is ~0: the moment estimate of τ² is ≤ 0) and the others differ."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, M)))[0].T
    cats = np.repeat(np.arange(M), n_per)
    X = centres[cats] + 0.2 * rng.normal(size=(len(cats), d)) / np.sqrt(d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    U = (rng.random((len(cats), K)) < 0.5).astype(float)
    U[:, 0] = np.tile([1.0, 0.0, 1.0, 0.0, 1.0], M * n_per // 5 + 1)[: M * n_per]  # 3/5 in every category
    return X, U, np.array([f"c{m}" for m in cats])


def test_tau_floor_and_marginal_stderr_keep_a_fully_shrunk_cell_uncertain():
    X, U, cats = _thin()
    plain = fit_offline_prior(X, U, cats)
    # arm 0's category means are equal: τ² ≤ 0, the cells shrink fully and claim certainty
    np.testing.assert_allclose(plain.utility[:, 0], 0.6)
    assert plain.stderr[:, 0].max() <= 1e-3
    marginal = fit_offline_prior(X, U, cats, marginal_stderr=True)
    np.testing.assert_allclose(marginal.utility, plain.utility)  # the means do not move
    # a fully shrunk cell is as uncertain as the arm's pooled mean (15 rows), not certain
    np.testing.assert_allclose(marginal.stderr[:, 0], marginal.arm_stderr[0], rtol=1e-3)
    assert (marginal.stderr >= plain.stderr - 1e-12).all()
    floored = fit_offline_prior(X, U, cats, tau_floor=0.3)
    # a between-category sd of at least 0.3: each cell keeps part of its own five rows' evidence
    assert (floored.stderr[:, 0] > 0.05).all()
    raw = fit_offline_prior(X, U, cats, shrink=False)
    pooled = U.mean(axis=0)
    dist = lambda p: np.abs(p.utility - pooled).sum()  # noqa: E731
    assert dist(plain) < dist(floored) < dist(raw)


def test_the_config_passes_the_shrinkage_fields_to_the_fit():
    X, U, cats = _thin()
    offline = {"X": X, "utilities": U, "categories": cats}
    # thin_offline_rows=0: the fields as given (these rows are thin: the defaults would take the thin preset's)
    default, _ = resolve_prior(FGTSConfig(thin_offline_rows=0), offline)
    assert default.same_as(fit_offline_prior(X, U, cats))  # the defaults fit what they fitted before
    both, _ = resolve_prior(
        FGTSConfig(shrinkage_tau_floor=0.3, shrinkage_stderr="marginal", thin_offline_rows=0), offline
    )
    assert both.same_as(fit_offline_prior(X, U, cats, tau_floor=0.3, marginal_stderr=True))
    with pytest.raises(ConfigError, match="shrinkage_stderr"):
        get_entry("fgts_cdb").config({"shrinkage_stderr": "exact"})
    with pytest.raises(ConfigError, match="correction_slope_floor"):
        get_entry("fgts_cdb").config({"correction_slope_floor": 0})
    with pytest.raises(ConfigError, match="second_arm"):
        get_entry("fgts_cdb").config({"second_arm": "ucb"})


def test_correction_slope_floor_sets_the_correction_and_bias_prior_sd():
    X, U, cats = _thin()
    offline = {"X": X, "utilities": U, "categories": cats}
    # a fitted slope near 0 (as on some five-row splits) would freeze both per-arm blocks
    for floor in (0.1, 2.0):
        p = FGTSCDB(
            FGTSConfig(prior_weight=0.05, correction_slope_floor=floor, thin_offline_rows=0),
            np.eye(4, 12),
            offline=offline,
        )
        f, (mean, prec) = p.fmap, p.moments
        sd = 1 / np.sqrt(prec)
        assert mean[f.i_w] == 0.05
        np.testing.assert_allclose(sd[f.i_c : f.i_q], np.maximum(floor * p.prior.stderr.reshape(-1), 1e-3))
        np.testing.assert_allclose(sd[f.i_b : f.i_c], np.maximum(floor * p.prior.arm_stderr, 1e-3))
    # a fitted slope above the floor is used as it is
    p = FGTSCDB(
        FGTSConfig(prior_weight=3.0, correction_slope_floor=2.0, thin_offline_rows=0), np.eye(4, 12), offline=offline
    )
    sd = 1 / np.sqrt(p.moments[1])
    np.testing.assert_allclose(sd[p.fmap.i_b : p.fmap.i_c], np.maximum(3.0 * p.prior.arm_stderr, 1e-3))


def test_rival_arm_is_the_likeliest_to_beat_the_first():
    # arm 1's mean is close to arm 0's but certain; arm 2 is further below but very uncertain
    m = np.array([1.0, 0.9, 0.5, -np.inf])  # arm 3 not offered
    sq = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    first = np.array(0)
    assert rival_arm(m, sq, np.array([1e-4, 1.0]), first) == 2  # z: −10 vs −0.5
    assert rival_arm(m, sq, np.array([1.0, 1e-4]), first) == 1  # z: −0.1 vs −50
    # rival_min_prob: the rival (Φ(−0.5) = 0.31) only when it is that likely to win, else the fallback
    var = np.array([1e-4, 1.0])
    assert rival_arm(m, sq, var, first, fallback=np.array(0), min_prob=0.3) == 2
    assert rival_arm(m, sq, var, first, fallback=np.array(0), min_prob=0.32) == 0
    # never the first arm, never an arm not offered; alone, the first arm duels itself
    assert rival_arm(np.array([0.0, -np.inf]), sq[:2], np.ones(2), np.array(0)) == 0
    # over lanes: each lane's own first arm
    M = np.stack([m, m[[1, 0, 2, 3]]])
    out = rival_arm(M, np.stack([sq, sq]), np.array([[1e-4, 1.0], [1e-4, 1.0]]), np.array([0, 1]))
    assert out.tolist() == [2, 2]


@pytest.mark.parametrize("feature_map", ["hadamard_bias", "hadamard"])
def test_rival_lanes_match_lone_policies_and_never_self_duel(feature_map):
    cfg = FGTSConfig(feature_map=feature_map, second_arm="rival", batch_size=16, n_steps=5)
    lone, logs, _ = _play(G=3, T=60, cfg=cfg)
    for lane in range(3):
        assert logs[lane] == lone[lane][0]
        assert all(f != s for f, s in logs[lane])
    # with a threshold, some rounds fall back to the Thompson draw (here: self-duels), still as lone
    cfg = FGTSConfig(feature_map=feature_map, second_arm="rival", rival_min_prob=0.3, batch_size=16, n_steps=5)
    lone, logs, _ = _play(G=3, T=60, cfg=cfg)
    assert all(logs[lane] == lone[lane][0] for lane in range(3))
    assert any(f == s for lane in range(3) for f, s in logs[lane])


def test_rival_with_an_offline_prior_matches_lanes_and_respects_offered_arms():
    X, U, cats = _thin(K=4, d=12)
    offline = {"X": X, "utilities": U, "categories": cats}
    cfg = FGTSConfig(second_arm="rival", correction_slope_floor=2.0, n_steps=5, thin_offline_rows=0)
    A = np.random.default_rng(1).normal(size=(4, 12)) / np.sqrt(12)
    lone = FGTSCDB(cfg, A, seed=3, offline=offline)
    prior, _ = resolve_prior(cfg, offline)
    lanes = FGTSCDBLanes(cfg, A[None], seeds=[3], priors=[prior])
    rng = np.random.default_rng(0)
    for t in range(40):
        x = X[t % len(X)]
        duel = lone.select(x)
        f, s = lanes.select(x[None])
        assert (duel.first, duel.second) == (int(f[0]), int(s[0])) and duel.first != duel.second
        y = float(rng.random() < 0.5)
        lone.update(x, duel, y)
        lanes.update(x[None], f, s, np.array([y]))
    duel = lone.select(X[0], arms=[1, 3])
    assert {duel.first, duel.second} == {1, 3}
    duel = lone.select(X[0], arms=[2])
    assert (duel.first, duel.second) == (2, 2)


def test_thin_preset_and_the_paper_preset_leaves_the_new_fields_off():
    thin = preset("thin")
    assert (thin.correction_slope_floor, thin.shrinkage_stderr, thin.second_arm, thin.rival_min_prob) == (
        2.0,
        "marginal",
        "rival",
        0.02,
    )
    assert thin.offline_prior == "category"  # the offline-informed defaults otherwise
    paper, default = preset("paper"), FGTSConfig()
    for field in ("correction_slope_floor", "shrinkage_tau_floor", "shrinkage_stderr", "second_arm", "rival_min_prob"):
        assert getattr(paper, field) == getattr(default, field)


def test_thin_offline_data_switch_the_defaults_to_the_thin_preset():
    from ray_router.policies.fgts_cdb import PRESETS, offline_rows_per_category, resolve_config

    X, U, cats = _thin(n_per=5)
    thin_rows = {"X": X, "utilities": U, "categories": cats}
    assert offline_rows_per_category(thin_rows) == 5.0
    A = np.random.default_rng(1).normal(size=(4, 12)) / np.sqrt(12)
    policy = FGTSCDB(FGTSConfig(n_steps=2), A, seed=0, offline=thin_rows)
    for field, value in PRESETS["thin"].items():
        assert getattr(policy.config, field) == value, field
    assert "thin offline data" in policy.prior_note
    # the prior is fitted with the thin preset's shrinkage (the marginal standard error)
    assert policy.prior.same_as(fit_offline_prior(X, U, cats, marginal_stderr=True))
    assert resolve_config(policy.config, thin_rows) is policy.config  # idempotent
    # rich offline data, the switch off, or the paper's prior: the fields as given
    Xr, Ur, cr = _thin(n_per=40)
    rich = {"X": Xr, "utilities": Ur, "categories": cr}
    assert resolve_config(FGTSConfig(), rich) == FGTSConfig()
    assert resolve_config(FGTSConfig(thin_offline_rows=0), thin_rows) == FGTSConfig(thin_offline_rows=0)
    assert resolve_config(preset("paper"), thin_rows) == preset("paper")
    assert resolve_config(FGTSConfig(), None) == FGTSConfig()  # no offline data at all
    # a given prior (Serve's arm table, an operator's profile) counts its rows per category
    given = {"prior": fit_offline_prior(X, U, cats).to_dict()}
    assert offline_rows_per_category(given) == 5.0
    assert resolve_config(FGTSConfig(), given).second_arm == PRESETS["thin"]["second_arm"]
    big = fit_offline_prior(Xr, Ur, cr)
    assert resolve_config(FGTSConfig(), {"prior": big}) == FGTSConfig()


def test_lanes_of_thin_and_rich_offline_data_fall_back_to_one_policy_each():
    from ray_router.policies.base import PolicyEnv
    from ray_router.policies.fgts_cdb import _make_fgts_lanes

    A = np.random.default_rng(1).normal(size=(4, 12)) / np.sqrt(12)
    X, U, cats = _thin(n_per=5)
    Xr, Ur, cr = _thin(n_per=40)
    thin = PolicyEnv(4, A, offline={"X": X, "utilities": U, "categories": cats})
    rich = PolicyEnv(4, A, offline={"X": Xr, "utilities": Ur, "categories": cr})
    assert _make_fgts_lanes(FGTSConfig(), [thin, rich], [0, 1]) is None
    lanes = _make_fgts_lanes(FGTSConfig(), [thin, thin], [0, 1])
    assert lanes is not None and lanes.config.second_arm == "rival"
