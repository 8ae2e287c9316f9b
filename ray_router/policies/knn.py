"""Supervised kNN router trained on the offline split only (RouterBench's baseline style).

Reference: Hu et al. "RouterBench: A Benchmark for Multi-LLM Routing System." arXiv 2403.12031,
2024 (its predictive routers include a kNN regressor over query embeddings).

For a context x the predicted utility of arm k is the similarity-weighted mean of the offline
utilities of the ``k`` offline queries nearest to x by cosine similarity::

    û_k(x) = Σ_{i ∈ N_k(x)} w_i·u_{i,k} / Σ_i w_i,   w_i = max(cos(x, x_i), 0)   ("similarity")
                                                      w_i = 1                      ("uniform")

(with "similarity", if every neighbour has cos ≤ 0 the mean falls back to uniform weights).
It plays (predicted best, predicted runner-up) among the offered arms, serves the predicted best,
and does not learn online: ``update`` only validates and counts.

Training data: ``PolicyEnv.offline`` (``{"X": (n, d), "utilities": (n, K), "scores": ..., ...}``).
``target="auto"`` (default) regresses the offline ``utilities`` (score − λ·cost, the same r as the
replay) and falls back to ``scores`` when the mapping carries no utilities; "utilities" / "scores"
require that key. The snapshot carries the training data, so a restored router needs no env.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

from ray_router.config import config_dataclass, parse
from ray_router.errors import ConfigError
from ray_router.policies.base import Duel, PolicyEnv, register_policy
from ray_router.policies.common import PositiveInt, check_context, check_feedback, top_two
from ray_router.policies.snapshot import PolicySnapshot, check_header

KNNWeighting = Literal["similarity", "uniform"]
KNNTarget = Literal["auto", "utilities", "scores"]
KNN_WEIGHTINGS: tuple[str, ...] = get_args(KNNWeighting)
KNN_TARGETS: tuple[str, ...] = get_args(KNNTarget)


@config_dataclass
class KNNConfig:
    """Hyperparameters of the kNN router (frozen, validated once)."""

    k: PositiveInt = 10  # neighbours (capped at the offline size)
    weighting: KNNWeighting = "similarity"  # "similarity": cosine-weighted mean; "uniform": plain mean
    target: KNNTarget = "auto"  # which offline table to regress: auto (utilities, else scores), utilities, scores


class KNNSnapshot(PolicySnapshot):
    config: dict[str, Any]
    X: np.ndarray
    utilities: np.ndarray
    n_updates: int


def _unit_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=-1, keepdims=True)
    return X / np.maximum(norms, 1e-300)


class KNNRouter:
    """kNN regression of per-arm utility over offline query embeddings (see the module docstring)."""

    name = "knn"

    def __init__(self, config: KNNConfig, X: np.ndarray, utilities: np.ndarray):
        self.config = config
        self._set_data(X, utilities)
        self.n_updates = 0

    def _set_data(self, X: Any, utilities: Any) -> None:
        X = np.asarray(X, dtype=np.float64)
        U = np.asarray(utilities, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 1:
            raise ConfigError(f"knn: offline X must be a non-empty (n, d) array, got shape {X.shape}")
        if U.ndim != 2 or U.shape[0] != X.shape[0] or U.shape[1] < 1:
            raise ConfigError(f"knn: offline utilities must be (n, K) with n = {X.shape[0]}, got shape {U.shape}")
        if not (np.isfinite(X).all() and np.isfinite(U).all()):
            raise ConfigError("knn: offline data contain NaN or inf")
        self.X, self.U = X, U
        self.X_unit = _unit_rows(X)
        self.n_arms = U.shape[1]
        self.k = min(self.config.k, X.shape[0])

    def predict(self, context: np.ndarray) -> np.ndarray:
        """Predicted utility of every arm (K,) for one context."""
        x = check_context(context, self.X.shape[1])
        sim = self.X_unit @ _unit_rows(x)
        n, k = len(sim), self.k
        idx = np.argsort(-sim, kind="stable")[:k] if k < n else np.arange(n)
        if self.config.weighting == "similarity":
            w = np.maximum(sim[idx], 0.0)
            if not w.sum() > 0:
                w = np.ones(len(idx))
        else:
            w = np.ones(len(idx))
        return (w @ self.U[idx]) / w.sum()

    def _ranked(self, context: np.ndarray, arms: Sequence[int] | None) -> np.ndarray:
        return top_two(self.predict(context), self.n_arms, arms)

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel:
        top = self._ranked(context, arms)
        return Duel(int(top[0]), int(top[-1]))

    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int:
        return int(self._ranked(context, arms)[0])

    def update(self, context: np.ndarray, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None:
        """No online learning: validate and count."""
        check_context(context, self.X.shape[1])
        check_feedback(duel, outcome, self.n_arms, arms)
        self.n_updates += 1

    def snapshot(self) -> KNNSnapshot:
        return {
            "policy": self.name,
            "config": dataclasses.asdict(self.config),
            "X": self.X.copy(),
            "utilities": self.U.copy(),
            "n_updates": self.n_updates,
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        check_header(snapshot, self.name)
        self.config = parse(KNNConfig, snapshot["config"], where=f"{self.name} snapshot config")
        self._set_data(snapshot["X"], snapshot["utilities"])
        self.n_updates = int(snapshot["n_updates"])


def offline_targets(offline: Mapping[str, Any] | None, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(X, utilities) for the kNN router from ``PolicyEnv.offline``; ConfigError when missing."""
    if offline is None:
        raise ConfigError("knn is trained on the offline split and needs PolicyEnv.offline (X and utilities)")
    if "X" not in offline:
        raise ConfigError(f"knn: PolicyEnv.offline has no 'X' (offline query embeddings); keys: {sorted(offline)}")
    key = ("utilities" if "utilities" in offline else "scores") if target == "auto" else target
    if key not in offline:
        raise ConfigError(f"knn: PolicyEnv.offline has no {key!r}; keys: {sorted(offline)}")
    return offline["X"], offline[key]


@register_policy("knn", KNNConfig, needs_embeddings=False)
def _make_knn(config: KNNConfig, env: PolicyEnv, seed: int) -> KNNRouter:
    """supervised kNN router on the offline split (RouterBench style; no online learning)"""
    X, U = offline_targets(env.offline, config.target)
    policy = KNNRouter(config, X, U)
    if policy.n_arms != env.n_arms:
        raise ConfigError(f"knn: offline utilities have {policy.n_arms} arms, the environment {env.n_arms}")
    return policy
