"""Shared helpers of the serve tests (no Ray here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ray_router.embeddings import HashEncoder
from ray_router.serve.specs import PosteriorSpec

ARMS = ("alpha", "beta", "gamma", "delta")
QUERIES = (  # a few queries of different kinds, for load in the integration tests
    "What is the derivative of x squared?",
    "Translate 'good morning' into French.",
    "Write a Python function that reverses a string.",
    "Which planet is closest to the sun?",
    "Explain the difference between TCP and UDP.",
    "Name three prime numbers greater than 50.",
)
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


def write_synthetic_arm_table(directory: Path, arm_ids: list[str], encoder: str = "hash", seed: int = 0) -> Path:
    """An ``arm_embeddings.file`` that needs no data: seeded random unit embeddings of ``arm_ids`` in
    ``encoder``'s space and a 3-category profile (the offline prior), with the arm ids and encoder
    identity. (Also used by ``bench/soak.py``.)"""
    from ray_router.embeddings import get_encoder
    from ray_router.serve.arms import save_arm_embeddings

    enc = get_encoder(encoder, cache_dir=False)  # identity and dim, without loading a model
    rng = np.random.default_rng(seed)

    def unit(n: int) -> np.ndarray:
        A = rng.normal(size=(n, enc.dim))
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    profile: dict[str, Any] = {
        "centroids": unit(3),
        "utility": rng.uniform(0.2, 0.8, size=(3, len(arm_ids))),
        "counts": np.full(3, 20.0),
        "categories": ["code", "math", "chat"],
    }
    out = Path(directory) / f"arms-{encoder}.npz"
    return save_arm_embeddings(out, list(arm_ids), unit(len(arm_ids)), enc.identity, profile=profile)


def error_code(body: Any) -> str:
    """The machine-readable code of an error answer's body: ``error.code`` of OpenAI's shape
    ``{"error": {"message", "type", "code", "param"}}`` (the old flat ``{"error": code}`` read too)."""
    err = body["error"]
    return err["code"] if isinstance(err, dict) else err


def error_message(body: Any) -> str:
    """The message of an error answer's body (``error.message``; the old flat ``message`` too)."""
    err = body["error"]
    return err["message"] if isinstance(err, dict) else body["message"]
