"""Per-duel weights of FGTS.CDB (a judge's verdict may count less than a human's): weight 0 is the
duel absent, weight 2 is the duel seen twice, in the potential, its gradient, the preconditioner and
a whole refresh; snapshots keep the weights and read the snapshots of earlier versions."""

import numpy as np
import pytest

from ray_router.errors import ConfigError
from ray_router.policies import FGTSCDB
from ray_router.policies.base import Duel
from ray_router.policies.fgts_cdb import preset

D, K = 6, 4


def cfg(**kw):
    # constant schedules: what depends on the number of duels (not their weights) stays put
    base = dict(eta=1.3, mu=0.3, feel_good_clip=0.5, compute_dtype="float64", embedding_scale=1.0, n_steps=15)
    return preset("paper", feel_good_schedule="constant", step_decay="constant", **{**base, **kw})


def duels(seed: int, n: int):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D))
    first, second = rng.integers(0, K, n), rng.integers(0, K, n)
    second = np.where(second == first, (first + 1) % K, second)
    y = rng.choice([0.0, 0.5, 1.0], n)
    mask = rng.random((n, K)) < 0.7
    mask[np.arange(n), first] = mask[np.arange(n), second] = True
    return X, first, second, y, mask


def pick(batch, rows):
    return tuple(np.asarray(a)[rows] for a in batch)


def policy(seed: int = 0) -> FGTSCDB:
    return FGTSCDB(cfg(), np.random.default_rng(42).normal(size=(K, D)), seed=seed)


def test_potential_and_gradient_weight_zero_is_absent_and_two_is_twice():
    p = policy()
    batch = duels(1, 12)
    rest, last = list(range(11)), 11
    theta = np.random.default_rng(2).normal(size=(2, p.dim))
    w0 = np.r_[np.ones(11), 0.0]
    w2 = np.r_[np.ones(11), 2.0]
    absent, twice = pick(batch, rest), pick(batch, [*rest, last, last])
    for j in (1, 2):
        assert p.potential(theta[j - 1], *batch, sampler=j, weight=w0) == pytest.approx(
            p.potential(theta[j - 1], *absent, sampler=j), rel=1e-12
        )
        assert p.potential(theta[j - 1], *batch, sampler=j, weight=w2) == pytest.approx(
            p.potential(theta[j - 1], *twice, sampler=j), rel=1e-12
        )
    np.testing.assert_allclose(p.potential_grad(theta, *batch, weight=w0), p.potential_grad(theta, *absent), atol=1e-12)
    np.testing.assert_allclose(p.potential_grad(theta, *batch, weight=w2), p.potential_grad(theta, *twice), atol=1e-12)
    # and the weighted gradient is the gradient of the weighted potential (finite differences)
    w = np.random.default_rng(3).uniform(0, 3, 12)
    grad = p.potential_grad(theta, *batch, weight=w)
    h = 1e-6
    num = np.array(
        [
            (
                p.potential(theta[0] + e, *batch, sampler=1, weight=w)
                - p.potential(theta[0] - e, *batch, sampler=1, weight=w)
            )
            / (2 * h)
            for e in np.eye(p.dim) * h
        ]
    )
    np.testing.assert_allclose(grad[0], num, rtol=1e-5, atol=1e-6)


def feed(p: FGTSCDB, batch, rows, weights=None) -> None:
    X, first, second, y, mask = batch
    for i, r in enumerate(rows):
        offered = np.flatnonzero(mask[r]).tolist()
        w = 1.0 if weights is None else weights[i]
        p.update(X[r], Duel(int(first[r]), int(second[r])), float(y[r]), offered, weight=w)


def test_a_refresh_with_weight_zero_equals_the_duel_absent_and_two_equals_twice():
    batch = duels(4, 20)
    base = list(range(19))
    with_zero, without = policy(), policy()
    feed(with_zero, batch, [*base, 19], [*([1.0] * 19), 0.0])
    feed(without, batch, base)
    # the duel of weight 0 is held but adds nothing: same preconditioner, same chains
    np.testing.assert_allclose(with_zero.preconditioner(), without.preconditioner(), rtol=1e-12)
    with_zero.refresh()
    without.refresh()
    np.testing.assert_allclose(with_zero.theta, without.theta, rtol=1e-9, atol=1e-12)

    weighted, doubled = policy(), policy()
    feed(weighted, batch, [*base, 19], [*([1.0] * 19), 2.0])
    feed(doubled, batch, [*base, 19, 19])
    np.testing.assert_allclose(weighted.preconditioner(), doubled.preconditioner(), rtol=1e-12)
    weighted.refresh()
    doubled.refresh()
    np.testing.assert_allclose(weighted.theta, doubled.theta, rtol=1e-9, atol=1e-12)
    # a weight that is not 1 changes the chains (the check above can fail)
    plain = policy()
    feed(plain, batch, [*base, 19])
    plain.refresh()
    assert not np.allclose(plain.theta, weighted.theta)


def test_weights_survive_a_snapshot_and_old_snapshots_weigh_one():
    batch = duels(5, 8)
    p = policy()
    feed(p, batch, range(8), [1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 1.0, 0.25])
    snap = p.snapshot()
    np.testing.assert_array_equal(snap["history"]["w"], [1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 1.0, 0.25])
    q = policy(seed=9)
    q.restore(snap)
    np.testing.assert_array_equal(q.history.arrays()["w"], snap["history"]["w"])
    np.testing.assert_allclose(q.preconditioner(), p.preconditioner(), rtol=1e-12)
    # a snapshot of an earlier version has no weights: every duel weighs 1
    old = dict(snap)
    old["history"] = {k: v for k, v in snap["history"].items() if k != "w"}
    r = policy(seed=9)
    r.restore(old)
    np.testing.assert_array_equal(r.history.arrays()["w"], np.ones(8))
    assert not r.history.weighted


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_weight_is_refused(bad):
    p = policy()
    with pytest.raises(ConfigError, match="weight"):
        p.update(np.ones(D), Duel(0, 1), 1.0, weight=bad)
    assert p.history.n == 0
