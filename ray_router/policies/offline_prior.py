"""What the offline split knows, as a prior for online routing (ALGORITHM.md s.5, **our extension**).

From offline rows (query embeddings X, per-arm utilities U = score − λ·cost_norm, a category per
row) we keep a compact, serialisable summary:

- ``centroids`` ξ_m (M, d): the mean offline embedding of each category;
- ``utility`` Ū (M, K): the mean offline utility of arm k on category m, and ``stderr`` se(Ū_mk),
  shrunk towards a prior variance so that five identical rows do not claim certainty;
- ``temperature`` τ of the soft category assignment π(x) = softmax_m(τ·cos(x, ξ_m)), fitted by
  maximum likelihood of the offline rows' own categories (leave-one-out centroids);
- ``slope`` w0: the logit-scale coefficient of û in a Bradley–Terry model of offline pseudo-duels
  (every pair of arms on every offline row; the better utility wins, equal utilities tie), fitted
  with leave-one-out category means. With 0/1 scores P(j beats k) ≈ ½ + Δp/2 whatever the judge's
  sharpness, so w0 comes out near 2–3.5, not κ;
- optionally ``basis`` (r, d) and ``center`` (d,): the top-r principal directions of the offline
  embeddings, for a per-arm linear block on the projected query.

The offline utility estimate is ``û_k(x) = Σ_m π_m(x)·Ū_mk``. A prior can also be given by an
operator for a model pool no benchmark covers (:meth:`OfflinePrior.from_profile`): centroids of a
few example queries per category, a per-category score per arm and how many rows each rests on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_router.errors import ConfigError
from ray_router.policies.common import sigmoid

# Shrinkage of the per-cell variance: ``n0`` pseudo-rows of variance ``v0`` (a Bernoulli(½) score).
_PRIOR_VAR, _PRIOR_ROWS = 0.25, 1.0
_MIN_STDERR = 1e-3


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def _softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=-1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class OfflinePrior:
    """A fitted offline summary (see the module docstring). Arrays are float64."""

    centroids: np.ndarray  # (M, d)
    utility: np.ndarray  # (M, K)
    stderr: np.ndarray  # (M, K)
    counts: np.ndarray  # (M,)
    category_names: tuple[str, ...]
    temperature: float
    slope: float
    basis: np.ndarray | None = None  # (r, d)
    center: np.ndarray | None = None  # (d,)
    arm_stderr: np.ndarray | None = None  # (K,) se of each arm's mean over all offline rows (pooled)

    def __post_init__(self) -> None:
        M, K = np.shape(self.utility)
        if np.shape(self.centroids)[0] != M or np.shape(self.stderr) != (M, K) or len(self.counts) != M:
            raise ConfigError("offline prior: centroids (M, d), utility and stderr (M, K), counts (M,) disagree")
        if len(self.category_names) != M:
            raise ConfigError("offline prior: one category name per centroid")
        for name in ("centroids", "utility", "stderr"):
            if not np.isfinite(getattr(self, name)).all():
                raise ConfigError(f"offline prior: {name} contains NaN or inf")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError("offline prior: temperature must be finite and > 0")
        if not math.isfinite(self.slope):
            raise ConfigError("offline prior: slope must be finite")

    # ------------------------------------------------------------------ shapes
    @property
    def n_categories(self) -> int:
        return int(self.utility.shape[0])

    @property
    def n_arms(self) -> int:
        return int(self.utility.shape[1])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def rank(self) -> int:
        return 0 if self.basis is None else int(self.basis.shape[0])

    # ---------------------------------------------------------------- features
    def assignment(self, X: np.ndarray) -> np.ndarray:
        """π(x) (n, M): soft category assignment of rows of X (n, d)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        return _softmax(self.temperature * (_unit(X) @ _unit(self.centroids).T))

    def estimate(self, X: np.ndarray) -> np.ndarray:
        """û(x) (n, K) = π(x) @ Ū."""
        return self.assignment(X) @ self.utility

    def projection(self, X: np.ndarray) -> np.ndarray:
        """z(x) (n, r): the query on the offline principal directions (unit variance offline)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if self.basis is None:
            return np.zeros((len(X), 0))
        return (X - self.center) @ self.basis.T

    # ------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = {
            "centroids": self.centroids.copy(),
            "utility": self.utility.copy(),
            "stderr": self.stderr.copy(),
            "counts": np.asarray(self.counts, dtype=np.float64).copy(),
            "category_names": list(self.category_names),
            "temperature": float(self.temperature),
            "slope": float(self.slope),
        }
        if self.basis is not None:
            if self.center is None:
                raise ConfigError("offline prior: a basis needs its center")
            d["basis"], d["center"] = self.basis.copy(), self.center.copy()
        if self.arm_stderr is not None:
            d["arm_stderr"] = self.arm_stderr.copy()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OfflinePrior:
        try:
            basis = d.get("basis")
            return cls(
                centroids=np.asarray(d["centroids"], dtype=np.float64),
                utility=np.asarray(d["utility"], dtype=np.float64),
                stderr=np.asarray(d["stderr"], dtype=np.float64),
                counts=np.asarray(d["counts"], dtype=np.float64),
                category_names=tuple(str(c) for c in d["category_names"]),
                temperature=float(d["temperature"]),
                slope=float(d["slope"]),
                basis=None if basis is None else np.asarray(basis, dtype=np.float64),
                center=None if basis is None else np.asarray(d["center"], dtype=np.float64),
                arm_stderr=None if d.get("arm_stderr") is None else np.asarray(d["arm_stderr"], dtype=np.float64),
            )
        except KeyError as e:
            raise ConfigError(f"offline prior: missing field {e.args[0]!r}") from None

    def same_as(self, other: OfflinePrior | None) -> bool:
        if other is None:
            return False
        a, b = self.to_dict(), other.to_dict()
        return a.keys() == b.keys() and all(
            (a[k] == b[k]) if not isinstance(a[k], np.ndarray) else np.array_equal(a[k], b[k]) for k in a
        )

    # ------------------------------------------------------------------- builders
    @classmethod
    def from_profile(
        cls,
        centroids: np.ndarray,
        utility: np.ndarray,
        counts: Sequence[float] | np.ndarray,
        category_names: Sequence[str],
        temperature: float = 20.0,
        slope: float = 2.5,
    ) -> OfflinePrior:
        """An operator's prior: category centroids (M, d) of a few example queries, a per-category
        utility (score) per arm (M, K), and how many rows each category's scores rest on (M,)."""
        U = np.asarray(utility, dtype=np.float64)
        n = np.asarray(counts, dtype=np.float64)
        if U.ndim != 2 or n.shape != (U.shape[0],) or (n <= 0).any():
            raise ConfigError("profile: utility must be (M, K) and counts M positive numbers")
        var = np.full(U.shape, _PRIOR_VAR)
        se = np.maximum(np.sqrt(var / n[:, None]), _MIN_STDERR)
        arm_se = np.maximum(np.sqrt(_PRIOR_VAR / n.sum()), _MIN_STDERR) * np.ones(U.shape[1])
        return cls(
            np.asarray(centroids, dtype=np.float64),
            U,
            se,
            n,
            tuple(map(str, category_names)),
            float(temperature),
            float(slope),
            arm_stderr=arm_se,
        )


def fit_offline_prior(
    X: np.ndarray,
    utilities: np.ndarray,
    categories: Sequence[str] | np.ndarray,
    temperature: float | None = None,
    slope: float | None = None,
    rank: int = 0,
    max_pseudo_duels: int = 200_000,
    seed: int = 0,
    shrink: bool = True,
    tau_floor: float = 0.0,
    marginal_stderr: bool = False,
) -> OfflinePrior:
    """Fit an :class:`OfflinePrior` from offline rows. ``temperature``/``slope`` None = fitted.

    ``shrink``: empirical-Bayes shrinkage of each cell mean Ū_mk towards the arm's pooled mean Ū_·k,
    by B = se²/(se² + τ_k²) with τ_k² the between-category variance of arm k's means beyond their
    noise: negligible with hundreds of rows per category, large with five. The shrunk cell's standard
    error is the conditional one, sqrt(1 − B)·se, which goes to 0 as B → 1.

    ``tau_floor``: the smallest τ_k the shrinkage assumes (0: 1e-3). With five rows per category the
    moment estimate of τ_k² is often ≤ 0, which claims the arm is equally good on every category and
    (with the conditional standard error) freezes its per-category correction at the pooled mean.
    ``marginal_stderr``: the shrunk cell's standard error also carries the pooled mean's own
    uncertainty, sqrt((1 − B)·se² + B²·se_pooled²), so a fully shrunk cell is as uncertain as the
    arm's pooled mean (15 rows at 5 per category), not certain."""
    X = np.asarray(X, dtype=np.float64)
    U = np.asarray(utilities, dtype=np.float64)
    cats = np.asarray([str(c) for c in categories], dtype=object)
    if X.ndim != 2 or U.ndim != 2 or len(X) != len(U) or len(cats) != len(X) or len(X) == 0:
        raise ConfigError(
            f"offline prior: X (n, d), utilities (n, K) and n categories needed; got {X.shape}, {U.shape}, {len(cats)}"
        )
    if not (np.isfinite(X).all() and np.isfinite(U).all()):
        raise ConfigError("offline prior: offline data contain NaN or inf")
    names = tuple(dict.fromkeys(cats.tolist()))
    idx = np.array([names.index(c) for c in cats], dtype=np.int64)
    M, K = len(names), U.shape[1]
    counts = np.bincount(idx, minlength=M).astype(np.float64)
    onehot = np.zeros((len(X), M))
    onehot[np.arange(len(X)), idx] = 1.0
    sums_x = onehot.T @ X
    centroids = sums_x / counts[:, None]
    sums_u = onehot.T @ U
    Ubar = sums_u / counts[:, None]
    ss = onehot.T @ (U - Ubar[idx]) ** 2
    var = (ss + _PRIOR_ROWS * _PRIOR_VAR) / (counts[:, None] - 1 + _PRIOR_ROWS)
    se = np.maximum(np.sqrt(var / counts[:, None]), _MIN_STDERR)
    pooled = U.mean(axis=0)
    pooled_var = (((U - pooled) ** 2).sum(axis=0) + _PRIOR_ROWS * _PRIOR_VAR) / (len(U) - 1 + _PRIOR_ROWS)
    arm_se = np.maximum(np.sqrt(pooled_var / len(U)), _MIN_STDERR)
    if shrink and M > 1:
        tau2 = np.maximum(Ubar.var(axis=0, ddof=1) - (se**2).mean(axis=0), max(1e-6, float(tau_floor) ** 2))  # (K,)
        B = se**2 / (se**2 + tau2)
        Ubar = (1 - B) * Ubar + B * pooled
        var = (1 - B) * se**2 + (B**2 * arm_se**2 if marginal_stderr else 0.0)
        se = np.maximum(np.sqrt(var), _MIN_STDERR)

    # leave-one-out centroids and means: a row never predicts itself
    loo_n = np.maximum(counts[idx] - 1, 1)[:, None]
    own_loo = np.where(counts[idx][:, None] > 1, (sums_x[idx] - X) / loo_n, centroids[idx])
    sims = _unit(X) @ _unit(centroids).T  # cos(x_i, ξ_m), the row's own centroid without it
    sims[np.arange(len(X)), idx] = np.sum(_unit(X) * _unit(own_loo), axis=1)
    if temperature is None:
        temperature = _fit_temperature(sims, idx) if M > 1 else 20.0
    if slope is None:
        pi = _softmax(float(temperature) * sims)
        Ubar_loo = np.broadcast_to(Ubar, (len(X), M, K)).copy()
        own_u = np.where(counts[idx][:, None] > 1, (sums_u[idx] - U) / loo_n, Ubar[idx])
        Ubar_loo[np.arange(len(X)), idx] = own_u
        uhat = np.einsum("nm,nmk->nk", pi, Ubar_loo)
        slope = _fit_slope(uhat, U, max_pseudo_duels, seed)
    basis = center = None
    if rank:
        center = X.mean(axis=0)
        _, s, Vt = np.linalg.svd(X - center, full_matrices=False)
        r = min(int(rank), len(s))
        scale = s[:r] / math.sqrt(max(1, len(X) - 1))
        basis = Vt[:r] / np.maximum(scale, 1e-12)[:, None]  # unit variance on the offline rows
    return OfflinePrior(centroids, Ubar, se, counts, names, float(temperature), float(slope), basis, center, arm_se)


def _fit_temperature(sims: np.ndarray, idx: np.ndarray) -> float:
    """τ maximising Σ_i log π_{m_i}(x_i), π = softmax(τ·sims) with leave-one-out own centroids
    (``sims`` (n, M)); searched on a log grid."""
    grid = np.exp(np.linspace(math.log(1.0), math.log(500.0), 60))
    best, best_ll = 20.0, -np.inf
    for tau in grid:
        Z = tau * sims
        ll = (Z[np.arange(len(Z)), idx] - np.logaddexp.reduce(Z, axis=1)).sum()
        if ll > best_ll:
            best, best_ll = float(tau), ll
    return best


def _fit_slope(uhat: np.ndarray, U: np.ndarray, max_duels: int, seed: int) -> float:
    """Bradley–Terry slope w of P(j beats k) = σ(w·(û_j − û_k)) on offline pseudo-duels.

    Every pair (j < k) on every offline row (subsampled to ``max_duels``): outcome 1 if u_j > u_k,
    0 if below, ½ if equal. One-parameter logistic regression by Newton's method from w = 1."""
    K = U.shape[1]
    if K < 2:
        return 1.0
    j, k = np.triu_indices(K, 1)
    z = (uhat[:, j] - uhat[:, k]).reshape(-1)
    y = np.sign(U[:, j] - U[:, k]).reshape(-1) * 0.5 + 0.5
    if len(z) > max_duels:
        pick = np.random.default_rng(seed).choice(len(z), size=max_duels, replace=False)
        z, y = z[pick], y[pick]
    keep = np.abs(z) > 0
    z, y = z[keep], y[keep]
    if len(z) == 0:
        return 1.0
    w = 1.0
    for _ in range(50):
        p = sigmoid(w * z)
        g = ((p - y) * z).sum() + 1e-3 * w  # a whisper of ridge keeps w finite on separable data
        h = (p * (1 - p) * z * z).sum() + 1e-3
        step = g / h
        w -= step
        if abs(step) < 1e-8:
            break
    return float(np.clip(w, 0.0, 100.0))


PROFILE_ROWS = 5.0  # what an operator's per-category score of a new arm is worth, in offline rows
PROFILE_BETA = 10.0  # sharpness of the category weights of a new arm's embedding


def extend_with_profiles(
    prior: Mapping[str, Any],
    embeddings: np.ndarray,
    profiles: Sequence[Mapping[str, float]],
    rows: float = PROFILE_ROWS,
) -> tuple[dict[str, Any], np.ndarray]:
    """The prior (``OfflinePrior.to_dict()``) and arm embeddings (K, d) with one arm appended per
    profile (an operator's expected score per category of the prior; ``default`` for the others).

    A new arm's prior utility in category m is its profile score, with the standard error of a
    score resting on ``rows`` offline rows; its embedding is the category centroids weighted by
    ``softmax(PROFILE_BETA · score)`` (the ``perf`` weighting of ALGORITHM.md s.3 over categories
    instead of rows), scaled to the mean norm of the known arms' embeddings."""
    p = OfflinePrior.from_dict(prior)
    names = list(p.category_names)
    cols = []
    for prof in profiles:
        missing = [c for c in names if c not in prof and "default" not in prof]
        if missing:
            raise ConfigError(
                f"profile: no score for categories {missing} (give them, or a 'default'); the prior's are {names}"
            )
        unknown = sorted(set(prof) - set(names) - {"default"})
        if unknown:
            raise ConfigError(f"profile: unknown categories {unknown}; the prior's are {names}")
        cols.append([float(prof.get(c, prof.get("default", 0.0))) for c in names])
    U_new = np.asarray(cols, dtype=np.float64).T  # (M, n_new)
    se_new = np.full(U_new.shape, max(math.sqrt(_PRIOR_VAR / rows), _MIN_STDERR))
    d = p.to_dict()
    d["utility"] = np.concatenate([p.utility, U_new], axis=1)
    d["stderr"] = np.concatenate([p.stderr, se_new], axis=1)
    if p.arm_stderr is not None:
        arm_se = max(math.sqrt(_PRIOR_VAR / (rows * len(names))), _MIN_STDERR)
        d["arm_stderr"] = np.concatenate([p.arm_stderr, np.full(U_new.shape[1], arm_se)])
    A = np.asarray(embeddings, dtype=np.float64)
    scale = float(np.linalg.norm(A, axis=1).mean()) if len(A) else 1.0
    W = _softmax(PROFILE_BETA * U_new.T)  # (n_new, M)
    A_new = W @ _unit(p.centroids)
    A_new = A_new / np.maximum(np.linalg.norm(A_new, axis=1, keepdims=True), 1e-12) * scale
    return OfflinePrior.from_dict(d).to_dict(), np.concatenate([A, A_new], axis=0)
