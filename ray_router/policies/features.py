"""Feature maps φ(x, a_k) for the linear utility r(x, k) = <θ, φ(x, a_k)> (ALGORITHM.md s.1).

Every map here is linear in θ, so a policy only ever needs two operations on a batch of contexts
X (n, d), never the (n, K, p) feature tensor itself:

- ``scores(theta, X) -> (..., n, K)``: <θ, φ(x_s, a_k)> for every row and arm;
- ``weighted_grad(W, X) -> (..., p)``: ∇_θ Σ_s Σ_k W[s, k]·<θ, φ(x_s, a_k)>.

Leading axes (``...``) are independent chains: θ (..., p), W (..., n, K); X is (n, d), shared by
the chains, or (..., n, d).

*Lanes* run independent policies (e.g. one per evaluation seed) in one array program: the arm
embeddings are then (G, K, d) or (G, W, K, d), θ (G, [W,] C, p), X (G, n, d) and W (G, [W,] C, n, K):
G groups of lanes, each with its own contexts X, and optionally W members per group that share
those contexts (the same stream and minibatch) but not their arm embeddings. Each group's products
are one GEMM, (n, d) @ (d, W·C·K): wider, so faster per lane, when members share a group
(``FGTSCDBLanes``).

A loss over duels is a sum of such terms with W holding +c at one arm and −c at another, so the
SGLD gradient costs one (n, K) @ (K, d) product. ``features(X)`` materialises φ for tests.
"""

from __future__ import annotations

import numpy as np

from ray_router.errors import ConfigError

FEATURE_MAPS = ("hadamard", "hadamard_bias", "concat")


class FeatureMap:
    """φ(x, a_k) over fixed arm embeddings A (K, d)."""

    name: str = ""

    def __init__(self, arm_embeddings: np.ndarray, dtype: str | np.dtype = np.float64):
        A = np.asarray(arm_embeddings, dtype=dtype)
        if A.ndim not in (2, 3, 4) or A.shape[-2] < 1:
            raise ConfigError(f"arm embeddings must be (K, d), or lanes' (G, K, d) or (G, W, K, d), got shape {A.shape}")
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

    def weighted_grad(self, W: np.ndarray, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

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
            out = (X @ M.reshape(G, -1, d).transpose(0, 2, 1)).reshape((G, n) + M.shape[1:-1])
            return np.moveaxis(out, 1, -2)
        return X @ np.swapaxes(M, -1, -2)

    def weighted_grad(self, W, X):
        # Σ_s Σ_k W_sk x_s ⊙ a_k = Σ_k a_k ⊙ (Σ_s W_sk x_s)
        if X.ndim == 2 and W.ndim == 3:
            C, n, K = W.shape
            G = (W.transpose(1, 0, 2).reshape(n, C * K).T @ X).reshape(C, K, -1)
        elif X.ndim == 3 and W.ndim >= 4:  # lanes: one ([W·]C·K, n) @ (n, d) GEMM per group
            n = X.shape[1]
            Wn = np.moveaxis(W, -2, 1)  # (G, n, [W,] C, K)
            G = (Wn.reshape(len(X), n, -1).transpose(0, 2, 1) @ X).reshape(Wn.shape[:1] + Wn.shape[2:] + (-1,))
        else:
            G = np.swapaxes(W, -1, -2) @ X
        return (G * self._A_chains).sum(axis=-2)

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

    def weighted_grad(self, W, X):
        return np.concatenate([super().weighted_grad(W, X), W.sum(axis=-2)], axis=-1)

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

    def weighted_grad(self, W, X):
        return np.concatenate([super().weighted_grad(W, X), W.sum(axis=-2) @ self.A], axis=-1)

    def features(self, X):
        arm = np.broadcast_to(self.A, (X.shape[0],) + self.A.shape)
        return np.concatenate([super().features(X), arm], axis=2)

    def pair_features(self, X, first, second):
        return np.concatenate(
            [super().pair_features(X, first, second), self.arm_rows(first) - self.arm_rows(second)], axis=-1)


_MAPS = {cls.name: cls for cls in (Hadamard, HadamardBias, Concat)}


def make_feature_map(name: str, arm_embeddings: np.ndarray, dtype: str | np.dtype = np.float64) -> FeatureMap:
    """The feature map ``name`` over arm embeddings (K, d), computing in ``dtype``."""
    try:
        cls = _MAPS[name]
    except KeyError:
        raise ConfigError(f"unknown feature map {name!r}; choose one of {list(FEATURE_MAPS)}") from None
    return cls(arm_embeddings, dtype)
