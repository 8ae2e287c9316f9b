"""A synthetic linear dueling bandit with known θ*, shared by the policy tests."""

import numpy as np

from ray_router.evaluation.replay import ReplayResult, ReplayStream, run_replay
from ray_router.policies import PolicyEnv, make_policy


def synthetic(seed, d=8, K=6, n=500, scale=4.0):
    """Arm embeddings A (K, d), unit contexts X (n, d) and utilities r(x, k) = <θ*, x ⊙ a_k>."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(K, d))
    X = rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    theta_star = rng.normal(size=d) * scale
    return A, X, (X * theta_star) @ A.T


def replay(policy_name, seed, T=1500, config=None) -> ReplayResult:
    """``T`` rounds of a registered policy on the synthetic bandit of ``seed`` (BTL judge, κ = 10)."""
    A, X, U = synthetic(seed)
    order = np.random.default_rng(100 + seed).integers(0, len(X), T)
    stream = ReplayStream(X, U, U, np.zeros_like(U), order)
    policy = make_policy(policy_name, PolicyEnv(len(A), A), seed=seed, config=config)
    return run_replay(policy, stream, kappa=10.0, rng=np.random.default_rng(seed))
