"""Feature maps φ(x, a_k) for the linear utility r(x, k) = <θ, φ(x, a_k)> (ALGORITHM.md s.1).

Every map here is linear in θ, so a policy only ever needs two operations on a batch of contexts
X (n, d), never the (n, K, p) feature tensor itself:

- ``scores(theta, X) -> (..., n, K)``: <θ, φ(x_s, a_k)> for every row and arm;
- ``weighted_grad(weights, X) -> (..., p)``: ∇_θ Σ_s Σ_k weights[s, k]·<θ, φ(x_s, a_k)>.

Leading axes (``...``) are independent chains: θ (..., p), weights (..., n, K); X is (n, d), shared by
the chains, or (..., n, d).

*Lanes* run independent policies (e.g. one per evaluation seed) in one array program: the arm
embeddings are then (G, K, d) or (G, W, K, d), θ (G, [W,] C, p), X (G, n, d) and weights (G, [W,] C, n, K):
G groups of lanes, each with its own contexts X, and optionally W members per group that share
those contexts (the same stream and minibatch) but not their arm embeddings. Each group's products
are one GEMM, (n, d) @ (d, W·C·K): wider, so faster per lane, when members share a group
(``FGTSCDBLanes``).

A loss over duels is a sum of such terms with weights +c at one arm and −c at another, so the
SGLD gradient costs one (n, K) @ (K, d) product. ``features(X)`` materialises φ for tests.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from numpy.typing import DTypeLike

from ray_router.errors import ConfigError

FeatureMapName = Literal["hadamard", "hadamard_bias", "concat"]  # the type of a config's ``feature_map``
FEATURE_MAPS: tuple[str, ...] = get_args(FeatureMapName)


def _flat2(V: np.ndarray) -> np.ndarray:
    """``V`` (..., a, b) as (..., a·b); explicit sizes, so an empty batch (no duels yet) works too
    (``reshape(..., -1)`` cannot infer a size from zero rows)."""
    return V.reshape((*V.shape[:-2], V.shape[-2] * V.shape[-1]))


class FeatureMap:
    """φ(x, a_k) over fixed arm embeddings A (K, d)."""

    name: str = ""
    n_arms: int  # K, set from the arm embeddings' shape
    context_dim: int  # d

    def __init__(self, arm_embeddings: np.ndarray, dtype: DTypeLike = np.float64):
        A = np.asarray(arm_embeddings, dtype=dtype)
        if A.ndim not in (2, 3, 4) or A.shape[-2] < 1:
            raise ConfigError(
                f"arm embeddings must be (K, d), or lanes' (G, K, d) or (G, W, K, d), got shape {A.shape}"
            )
        if not np.isfinite(A).all():
            raise ConfigError("arm embeddings contain NaN or inf")
        self.A = A
        self.n_arms, self.context_dim = A.shape[-2:]
        # A broadcast against (..., C, K, d) products: lanes get a chain axis
        self._A_chains = A[..., None, :, :] if A.ndim > 2 else A

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def scores(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def weighted_grad(self, weights: np.ndarray, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def stack_scores(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Scores (n, K) of one context ``x`` (d,) under a stack of θ (n, p): what ``scores(theta,
        x[None])[:, 0]`` gives (equal up to rounding), for serving a pool of posterior samples."""
        return self.scores(theta, x[None, :])[:, 0, :]

    def features(self, X: np.ndarray) -> np.ndarray:
        """(n, K, p) feature tensor; for tests and small problems only."""
        raise NotImplementedError

    def pair_features(self, X: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(n, p) rows Δ_s = φ(x_s, a_first) − φ(x_s, a_second); lanes: X (S, n, d), arms (S, n)."""
        raise NotImplementedError

    def arm_rows(self, idx: np.ndarray) -> np.ndarray:
        """a_idx: (n, d) for arm indices (n,), or per lane (*lanes, n, d) for (*lanes, n)."""
        if self.A.ndim == 2:
            return self.A[idx]
        return np.take_along_axis(self.A, idx[..., None], axis=-2)


class Hadamard(FeatureMap):
    """φ = x ⊙ a_k (default; **our choice**, the paper's exact map is not public)."""

    name = "hadamard"

    @property
    def dim(self) -> int:
        return self.context_dim

    def scores(self, theta, X):
        # <θ, x ⊙ a_k> = <x, θ ⊙ a_k>: with X shared by the chains, one (n, d) @ (d, C·K) GEMM
        M = theta[..., None, : self.context_dim] * self._A_chains  # (..., K, d)
        if X.ndim == 2 and M.ndim == 3:
            C, K, d = M.shape
            return (X @ M.reshape(C * K, d).T).reshape(len(X), C, K).transpose(1, 0, 2)
        if X.ndim == 3 and M.ndim >= 4:  # lanes: one (n, d) @ (d, [W·]C·K) GEMM per group
            G, n, d = X.shape
            out = (X @ M.reshape(G, -1, d).transpose(0, 2, 1)).reshape((G, n, *M.shape[1:-1]))
            return np.moveaxis(out, 1, -2)
        return X @ np.swapaxes(M, -1, -2)

    def stack_scores(self, theta, x):
        if self.A.ndim != 2:  # lanes' arm tables: the general path
            return super().stack_scores(theta, x)
        # <θ, x ⊙ a_k> = <θ ⊙ x, a_k>: an (n, d) product and one (n, d) @ (d, K) GEMM, no (n, K, d) tensor
        d = self.context_dim
        S = (theta[:, :d] * x[:d]) @ self.A.T
        extra = self._stack_extra(theta)
        return S if extra is None else S + extra

    def _stack_extra(self, theta):
        """The scores (n, K) of θ's coordinates past the context's (a subclass's own block), or None."""
        return None

    def weighted_grad(self, weights, X):
        # Σ_s Σ_k w_sk x_s ⊙ a_k = Σ_k a_k ⊙ (Σ_s w_sk x_s)
        if X.ndim == 2 and weights.ndim == 3:
            C, n, K = weights.shape
            per_arm = (weights.transpose(1, 0, 2).reshape(n, C * K).T @ X).reshape(C, K, -1)
        elif X.ndim == 3 and weights.ndim >= 4:  # lanes: one ([W·]C·K, n) @ (n, d) GEMM per group
            n = X.shape[1]
            by_row = np.moveaxis(weights, -2, 1)  # (G, n, [W,] C, K)
            per_arm = (by_row.reshape(len(X), n, -1).transpose(0, 2, 1) @ X).reshape(
                by_row.shape[:1] + by_row.shape[2:] + (-1,)
            )
        else:
            per_arm = np.swapaxes(weights, -1, -2) @ X
        return (per_arm * self._A_chains).sum(axis=-2)

    def features(self, X):
        return X[:, None, :] * self.A[None, :, :]

    def pair_features(self, X, first, second):
        return X * (self.arm_rows(first) - self.arm_rows(second))


class HadamardBias(Hadamard):
    """φ = [x ⊙ a_k ; e_k]: adds a learnable per-arm term (e_k one-hot)."""

    name = "hadamard_bias"

    @property
    def dim(self) -> int:
        return self.context_dim + self.n_arms

    def scores(self, theta, X):
        return super().scores(theta, X) + theta[..., None, self.context_dim :]

    def _stack_extra(self, theta):
        return theta[:, self.context_dim :]

    def weighted_grad(self, weights, X):
        return np.concatenate([super().weighted_grad(weights, X), weights.sum(axis=-2)], axis=-1)

    def features(self, X):
        eye = np.broadcast_to(np.eye(self.n_arms), (X.shape[0], self.n_arms, self.n_arms))
        return np.concatenate([super().features(X), eye], axis=2)

    def pair_features(self, X, first, second):
        eye = np.eye(self.n_arms)
        return np.concatenate([super().pair_features(X, first, second), eye[first] - eye[second]], axis=-1)


class Concat(Hadamard):
    """φ = [x ⊙ a_k ; a_k]: adds a context-free linear term in the model embedding."""

    name = "concat"

    @property
    def dim(self) -> int:
        return 2 * self.context_dim

    def scores(self, theta, X):
        return super().scores(theta, X) + (theta[..., self.context_dim :] @ np.swapaxes(self.A, -1, -2))[..., None, :]

    def _stack_extra(self, theta):
        return theta[:, self.context_dim :] @ self.A.T

    def weighted_grad(self, weights, X):
        return np.concatenate([super().weighted_grad(weights, X), weights.sum(axis=-2) @ self.A], axis=-1)

    def features(self, X):
        arm = np.broadcast_to(self.A, (X.shape[0], *self.A.shape))
        return np.concatenate([super().features(X), arm], axis=2)

    def pair_features(self, X, first, second):
        return np.concatenate(
            [super().pair_features(X, first, second), self.arm_rows(first) - self.arm_rows(second)], axis=-1
        )


_MAPS = {cls.name: cls for cls in (Hadamard, HadamardBias, Concat)}


def make_feature_map(name: str, arm_embeddings: np.ndarray, dtype: DTypeLike = np.float64) -> FeatureMap:
    """The feature map ``name`` over arm embeddings (K, d), computing in ``dtype``."""
    try:
        cls = _MAPS[name]
    except KeyError:
        raise ConfigError(f"unknown feature map {name!r}; choose one of {list(FEATURE_MAPS)}") from None
    return cls(arm_embeddings, dtype)


class OfflineAugmented(FeatureMap):
    """φ⁺(x, a_k) = [φ_base(x, a_k) ; û_k(x) ; π(x) ⊗ e_k ; z(x) ⊗ e_k] (ALGORITHM.md s.5, our extension).

    The policy extends each query embedding once, when it arrives, to the context
    ``[x (d) | û(x) (K) | π(x) (M) | z(x) (r)]`` (:class:`~ray_router.policies.offline_prior.OfflinePrior`),
    so the history stores extended rows and this map only reads columns. Coordinates of θ:
    ``[base (p0) | w (1) | arm bias (K, optional) | correction (M·K, category-major) | query (r·K, rank-major)]``:

    - ``w``: the weight of the offline utility estimate û_k(x) (its prior mean is the fitted slope);
    - the arm bias e_k: a per-arm term shared by all categories (pools the duels of every category);
    - the correction block π(x) ⊗ e_k: one coordinate per (category, arm), a per-arm term that can
      differ by category (Σ_m π_m = 1, so it contains a per-arm bias);
    - the query block z(x) ⊗ e_k: a per-arm linear term on the query's top-r principal coordinates.
    """

    name = "offline_augmented"

    def __init__(
        self, base: FeatureMap, n_categories: int, rank: int = 0, correction: bool = True, arm_bias: bool = False
    ):
        self.base = base
        self.A = base.A
        self.n_arms, self.x_dim = base.n_arms, base.context_dim
        self.M, self.r, self.correction = int(n_categories), int(rank), bool(correction)
        self.arm_bias = bool(arm_bias)
        self.context_dim = self.x_dim + self.n_arms + self.M + self.r
        self.p0 = base.dim
        self.i_w = self.p0
        self.i_b = self.p0 + 1  # the pooled per-arm term e_k (when arm_bias)
        self.i_c = self.i_b + (self.n_arms if self.arm_bias else 0)
        self.i_q = self.i_c + (self.M * self.n_arms if self.correction else 0)

    @property
    def dim(self) -> int:
        return self.i_q + self.r * self.n_arms

    # column views of extended contexts
    def _cols(self, X):
        d, K, M = self.x_dim, self.n_arms, self.M
        return X[..., :d], X[..., d : d + K], X[..., d + K : d + K + M], X[..., d + K + M :]

    @staticmethod
    def _lane_axes(V, theta_ndim, X_ndim):
        """Per-row quantity V (G, n, ·) of lanes' contexts broadcast against (G, [W,] C, n, ·)."""
        if X_ndim == 3 and theta_ndim >= 3:
            return V.reshape(V.shape[:1] + (1,) * (theta_ndim - 2) + V.shape[1:])
        return V

    def scores(self, theta, X):
        x, u, pi, z = self._cols(X)
        S = self.base.scores(theta[..., : self.p0], x)
        K = self.n_arms
        S = S + theta[..., self.i_w][..., None, None] * self._lane_axes(u, theta.ndim, X.ndim)
        if self.arm_bias:
            S = S + theta[..., None, self.i_b : self.i_c]
        if self.correction:
            Tc = theta[..., self.i_c : self.i_q].reshape((*theta.shape[:-1], self.M, K))
            S = S + self._lane_axes(pi, theta.ndim, X.ndim) @ Tc
        if self.r:
            Tq = theta[..., self.i_q :].reshape((*theta.shape[:-1], self.r, K))
            S = S + self._lane_axes(z, theta.ndim, X.ndim) @ Tq
        return S

    def stack_scores(self, theta, x):
        d, K = self.x_dim, self.n_arms
        xb, u, pi, z = x[:d], x[d : d + K], x[d + K : d + K + self.M], x[d + K + self.M :]
        S = self.base.stack_scores(theta[:, : self.p0], xb) + theta[:, self.i_w, None] * u
        if self.arm_bias:
            S = S + theta[:, self.i_b : self.i_c]
        if self.correction:
            S = S + pi @ theta[:, self.i_c : self.i_q].reshape(len(theta), self.M, K)
        if self.r:
            S = S + z @ theta[:, self.i_q :].reshape(len(theta), self.r, K)
        return S

    def weighted_grad(self, weights, X):
        x, u, pi, z = self._cols(X)
        parts = [self.base.weighted_grad(weights, x)]
        ub = self._lane_axes(u, weights.ndim - 1, X.ndim)
        parts.append((weights * ub).sum(axis=(-2, -1))[..., None])
        if self.arm_bias:
            parts.append(weights.sum(axis=-2))
        if self.correction:
            pib = self._lane_axes(pi, weights.ndim - 1, X.ndim)
            parts.append(_flat2(np.swapaxes(pib, -1, -2) @ weights))
        if self.r:
            zb = self._lane_axes(z, weights.ndim - 1, X.ndim)
            parts.append(_flat2(np.swapaxes(zb, -1, -2) @ weights))
        return np.concatenate([np.broadcast_to(p, parts[0].shape[:-1] + p.shape[-1:]) for p in parts], axis=-1)

    def features(self, X):
        x, u, pi, z = self._cols(X)
        n, K = X.shape[0], self.n_arms
        eye = np.eye(K)
        parts = [self.base.features(x), u[:, :, None]]
        if self.arm_bias:
            parts.append(np.broadcast_to(eye, (n, K, K)))
        if self.correction:
            parts.append((pi[:, None, :, None] * eye[None, :, None, :]).reshape(n, K, self.M * K))
        if self.r:
            parts.append((z[:, None, :, None] * eye[None, :, None, :]).reshape(n, K, self.r * K))
        return np.concatenate(parts, axis=2)

    def pair_features(self, X, first, second):
        x, u, pi, z = self._cols(X)
        eye = np.eye(self.n_arms)
        E = eye[first] - eye[second]  # (..., K)
        base = self.base.pair_features(x, first, second)
        parts = [base, (u * E).sum(axis=-1, keepdims=True)]
        if self.arm_bias:
            parts.append(E)
        if self.correction:
            parts.append(_flat2(pi[..., :, None] * E[..., None, :]))
        if self.r:
            parts.append(_flat2(z[..., :, None] * E[..., None, :]))
        shape = np.broadcast_shapes(*[p.shape[:-1] for p in parts])
        return np.concatenate([np.broadcast_to(p, shape + p.shape[-1:]) for p in parts], axis=-1)
