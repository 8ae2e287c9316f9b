"""Shared helpers of the serve tests (no Ray here)."""

from __future__ import annotations

import numpy as np

from ray_router.embeddings import HashEncoder
from ray_router.serve.specs import PosteriorSpec

ARMS = ("alpha", "beta", "gamma", "delta")
PRICES = (0.001, 0.01, 0.0001, 0.0)


def hash_encoder(dim: int = 16) -> HashEncoder:
    return HashEncoder(dim=dim, seed=3)


def arm_embeddings(dim: int = 16, n_arms: int = len(ARMS), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n_arms, dim))
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def spec(state_dir, dim: int = 16, **overrides) -> PosteriorSpec:
    values = dict(
        arm_ids=ARMS,
        prices=PRICES,
        arm_embeddings=arm_embeddings(dim),
        encoder_identity="hash-test",
        state_dir=str(state_dir),
        policy_config={"feature_map": "hadamard_bias", "n_steps": 5},
        policy_seed=0,
        decision_ttl_s=600.0,
        snapshot_every_n=1000,
        snapshot_every_s=1e9,
        lock_timeout_s=0.2,
    )
    values.update(overrides)
    return PosteriorSpec(**values)
