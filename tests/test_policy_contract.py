"""Every registered policy keeps the same contract (river-style check suite)."""

import numpy as np
import pytest

from ray_router.policies import PolicyEnv, get_entry, make_policy, policy_names
from ray_router.policies.base import Duel
from ray_router.policies.snapshot import load_snapshot, save_snapshot

K, D = 6, 8


def _env(rng):
    A = rng.normal(size=(K, D))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    scores = rng.random((40, K))
    offline = {
        "X": rng.normal(size=(40, D)),
        "scores": scores,
        "costs": rng.random((40, K)),
        "utilities": scores,
        "categories": np.array(["a", "b", "c", "d"] * 10),
    }
    return PolicyEnv(n_arms=K, arm_embeddings=A, hindsight_utility=rng.random(K), offline=offline)


def _contexts(rng, n):
    X = rng.normal(size=(n, D))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _play(policy, contexts, outcomes, arms=None):
    duels = []
    for x, y in zip(contexts, outcomes):
        duel = policy.select(x, arms)
        duels.append((duel.first, duel.second, policy.best(x, arms)))
        policy.update(x, duel, y, arms)
    return duels


@pytest.fixture(
    params=[n for n in policy_names() if get_entry(n).reference is None]
)  # routers, not hindsight references
def name(request):
    return request.param


def test_registry_holds_the_core_policies():
    assert {"fgts_cdb", "fgts_cdb_paper", "offline_static", "uniform", "best_fixed"} <= set(policy_names())
    assert {"best_per_category", "oracle"} <= {n for n in policy_names() if get_entry(n).reference is not None}


def test_only_offered_arms_are_chosen(name):
    rng = np.random.default_rng(0)
    policy = make_policy(name, _env(rng), seed=1)
    offered = [1, 3, 4]
    for first, second, best in _play(policy, _contexts(rng, 150), rng.choice([0.0, 0.5, 1.0], 150), offered):
        assert {first, second, best} <= set(offered)
    for x in _contexts(rng, 20):
        assert policy.best(x, [5]) == 5
        assert policy.select(x, [2]) == Duel(2, 2)


def test_same_seed_gives_the_same_duels(name):
    rng = np.random.default_rng(1)
    env = _env(rng)
    xs, ys = _contexts(rng, 120), rng.choice([0.0, 1.0], 120)
    a = _play(make_policy(name, env, seed=7), xs, ys)
    b = _play(make_policy(name, env, seed=7), xs, ys)
    assert a == b


def test_snapshot_round_trips_through_disk(name, tmp_path):
    rng = np.random.default_rng(2)
    env = _env(rng)
    policy = make_policy(name, env, seed=3)
    _play(policy, _contexts(rng, 80), rng.choice([0.0, 0.5, 1.0], 80))
    path = save_snapshot(policy.snapshot(), tmp_path / "policy.npz")
    clone = make_policy(name, env, seed=99)  # a different seed: everything must come from the snapshot
    clone.restore(load_snapshot(path))
    xs, ys = _contexts(rng, 60), rng.choice([0.0, 1.0], 60)
    assert _play(policy, xs, ys) == _play(clone, xs, ys)


def test_no_nan_after_thousands_of_extreme_updates(name):
    rng = np.random.default_rng(4)
    policy = make_policy(name, _env(rng), seed=5)
    big = rng.normal(size=(3000, D)) * 1e3  # far outside the unit sphere the encoder produces
    for i, x in enumerate(big):
        policy.update(x, Duel(i % K, (i + 1) % K), float(i % 2 == 0))
    for x in _contexts(rng, 50):
        duel = policy.select(x)
        assert 0 <= duel.first < K and 0 <= duel.second < K
        assert 0 <= policy.best(x) < K
    for value in _leaves(policy.snapshot()):
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all()


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    else:
        yield obj
