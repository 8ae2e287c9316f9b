"""FGTS.CDB: Feel-Good Thompson Sampling for Contextual Dueling Bandits, with an SGLD sampler.

References:
- Li, Zhao, Gu. "Feel-Good Thompson Sampling for Contextual Dueling Bandits." ICML 2024,
  arXiv 2404.06013 (the algorithm; SGLD in its experiments).
- Chiang, Ishida, Sugiyama. "LLM Routing with Dueling Feedback." arXiv 2510.00841, 2025
  (FGTS.CDB applied to LLM routing with CCFT model embeddings).

The maths is fixed in ``shared/design/ALGORITHM.md`` section 2. For each sampler j ∈ {1, 2}::

    U_j(θ) = Σ_s η·ℓ(y_s, <θ, φ(x_s,a¹_s) − φ(x_s,a²_s)>)
             − μ·Σ_s min(b, max_{a offered} <θ, φ(x_s,a) − φ(x_s,a^{3−j}_s)>)
             + ||θ||² / (2σ0²)
    ℓ(y, z) = −y·log σ(z) − (1−y)·log σ(−z)          (ties: y = ½, a soft label)

and SGLD runs ``θ ← θ − δ·∇U_j(θ) + sqrt(2δ)·ξ`` from the previous sample (warm start),
``n_steps`` times per refresh, with an exact gradient while the history fits in ``batch_size``
and an unbiased minibatch estimate rescaled by ``n / batch_size`` after that.
Each round plays a^j = argmax_a <θ^j, φ(x_t, a)>.

The two chains are kept as one (2, p) array so both samplers advance in one vectorised step.

Preconditioning (**our choice**, ``preconditioner="diag_fisher"``): the coordinates of φ live on
very different scales (x ⊙ a_k has entries of order 1/sqrt(d), a one-hot arm term has entries of 1),
so one step size is either unstable along the large ones or frozen along the small ones. We run
SGLD with a fixed diagonal preconditioner G = diag(H)⁻¹, H = η·Σ_s ¼·Δ_s² + 1/σ0² (¼ bounds σ'(z);
Δ_s = φ(x_s,a¹_s) − φ(x_s,a²_s)), recomputed per refresh: θ ← θ − δ·G·∇U + sqrt(2δ·G)·ξ. A constant
positive-definite G leaves the stationary distribution unchanged, so this samples the same
posterior; ``preconditioner="none"`` gives plain SGLD with G = I.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ray_router.errors import ConfigError
from ray_router.policies.base import (
    Duel,
    PolicyEnv,
    check_duel,
    check_outcome,
    offered_mask,
    register_policy,
    rng_from_state,
    rng_state,
)
from ray_router.policies.features import FEATURE_MAPS, FeatureMap, make_feature_map


@dataclass(frozen=True)
class FGTSConfig:
    """Hyperparameters of FGTS.CDB (frozen, validated once). Field names are the sweep keys."""

    eta: float = 1.0  # weight of the logistic loss (FGTS.CDB theory: 0.25)
    mu: float = 0.01  # weight of the feel-good term (theory: 1/(10 e^B sqrt(T)) ≈ 0)
    feel_good_clip: float = 1.0  # b, clip of the feel-good term (**our choice**); inf = unclipped
    prior_sigma: float = 1.0  # σ0 of the Gaussian prior N(0, σ0² I) (**our choice**)
    n_steps: int = 20  # SGLD steps per sampler per refresh
    batch_size: int = 256  # exact gradient up to this history size, minibatch after
    step_size: float = 0.1  # δ0 (relative to the curvature when preconditioned)
    step_decay: str = "constant"  # "constant": δ = δ0; "sqrt": δ = δ0 / sqrt(max(1, n_seen))
    preconditioner: str = "diag_fisher"  # "none" or "diag_fisher" (**our choice**, see SGLD notes)
    langevin_noise: float = 1.0  # scale of the sqrt(2δ)ξ term; 0 turns SGLD into gradient descent
    feature_map: str = "hadamard_bias"  # one of FEATURE_MAPS (why not plain hadamard: docs/ALGORITHM_NOTES.md)
    distinct_arms: bool = False  # True: the second arm is θ²'s best arm other than the first
    exploit_ema: float = 0.1  # weight of each refresh in the running mean used by best()
    max_history: int = 0  # 0 keeps every duel; N keeps the most recent N (bounded memory for serving)
    compute_dtype: str = "float32"  # dtype of the SGLD matrix products; θ itself is always float64
    embedding_scale: float | None = 1.0  # a_k is multiplied by this in φ; None = sqrt(d) (see notes)

    def __post_init__(self) -> None:
        checks = [
            (self.eta >= 0, "eta must be >= 0"),
            (self.mu >= 0, "mu must be >= 0"),
            (self.feel_good_clip > 0, "feel_good_clip must be > 0 (use inf for no clip)"),
            (self.prior_sigma > 0 and math.isfinite(self.prior_sigma), "prior_sigma must be finite and > 0"),
            (isinstance(self.n_steps, int) and self.n_steps >= 1, "n_steps must be an int >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an int >= 1"),
            (self.step_size > 0 and math.isfinite(self.step_size), "step_size must be finite and > 0"),
            (self.step_decay in ("constant", "sqrt"), "step_decay must be 'constant' or 'sqrt'"),
            (self.langevin_noise >= 0, "langevin_noise must be >= 0"),
            (self.preconditioner in PRECONDITIONERS, f"preconditioner must be one of {PRECONDITIONERS}"),
            (self.compute_dtype in ("float32", "float64"), "compute_dtype must be 'float32' or 'float64'"),
            (self.embedding_scale is None or (self.embedding_scale > 0 and math.isfinite(self.embedding_scale)),
             "embedding_scale must be None (sqrt(d)) or finite and > 0"),
            (self.feature_map in FEATURE_MAPS, f"feature_map must be one of {FEATURE_MAPS}"),
            (0 < self.exploit_ema <= 1, "exploit_ema must be in (0, 1]"),
            (isinstance(self.max_history, int) and self.max_history >= 0, "max_history must be an int >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"FGTSConfig: {msg}")


PRECONDITIONERS = ("none", "diag_fisher")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


class DuelHistory:
    """Growing (optionally bounded) buffer of duels: contexts, arms, outcomes, offered masks."""

    def __init__(self, dim: int, n_arms: int, max_len: int = 0, capacity: int = 256, dtype=np.float64):
        self.dim, self.n_arms, self.max_len, self.dtype = dim, n_arms, max_len, np.dtype(dtype)
        cap = max(1, capacity if max_len == 0 else min(capacity, max_len))
        self.X = np.empty((cap, dim), dtype=self.dtype)
        self.first = np.empty(cap, dtype=np.int64)
        self.second = np.empty(cap, dtype=np.int64)
        self.y = np.empty(cap)
        self.mask = np.empty((cap, n_arms), dtype=bool)
        self.n = 0

    def append(self, x: np.ndarray, first: int, second: int, y: float, mask: np.ndarray) -> None:
        if self.max_len and self.n == self.max_len:
            self._drop_oldest(max(1, self.max_len // 4))
        if self.n == len(self.y):
            self._grow(2 * len(self.y) if not self.max_len else min(2 * len(self.y), self.max_len))
        i = self.n
        self.X[i], self.first[i], self.second[i], self.y[i], self.mask[i] = x, first, second, y, mask
        self.n += 1

    def _grow(self, cap: int) -> None:
        for name in ("X", "first", "second", "y", "mask"):
            old = getattr(self, name)
            new = np.empty((cap,) + old.shape[1:], dtype=old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def _drop_oldest(self, k: int) -> None:
        for name in ("X", "first", "second", "y", "mask"):
            arr = getattr(self, name)
            arr[: self.n - k] = arr[k : self.n]
        self.n -= k

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "X": self.X[: self.n].copy(),
            "first": self.first[: self.n].copy(),
            "second": self.second[: self.n].copy(),
            "y": self.y[: self.n].copy(),
            "mask": self.mask[: self.n].copy(),
        }

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        n = len(arrays["y"])
        self.X = np.array(arrays["X"], dtype=self.dtype).reshape(n, self.dim)
        self.first = np.array(arrays["first"], dtype=np.int64)
        self.second = np.array(arrays["second"], dtype=np.int64)
        self.y = np.array(arrays["y"], dtype=np.float64)
        self.mask = np.array(arrays["mask"], dtype=bool).reshape(n, self.n_arms)
        self.n = n
        if n == 0:
            self._grow(16)


class FGTSCDB:
    """FGTS.CDB with two SGLD chains (one per sampler). See the module docstring for the maths."""

    name = "fgts_cdb"

    def __init__(self, config: FGTSConfig, arm_embeddings: np.ndarray, seed: int = 0):
        self.config = config
        self.arm_embeddings = np.array(arm_embeddings, dtype=np.float64)
        self.fmap: FeatureMap = self._feature_map()
        self.n_arms = self.fmap.n_arms
        self.dim = self.fmap.dim
        self.rng = np.random.default_rng(seed)
        self.history = DuelHistory(self.fmap.context_dim, self.n_arms, config.max_history, dtype=config.compute_dtype)
        self.theta = self.rng.normal(0.0, config.prior_sigma, size=(2, self.dim))
        self.theta_mean = self.theta.mean(axis=0)
        self._delta_sq = np.zeros(self.dim)  # Σ_s Δ_s² over the history, for the preconditioner
        self.n_updates = 0  # duels learned from (also counts ones dropped from a bounded history)
        self.n_refreshes = 0
        self.refreshed_at = 0  # n_updates at the last refresh
        self.sgld_seconds = 0.0  # time spent in SGLD (for benchmarks)

    def _feature_map(self) -> FeatureMap:
        A = self.arm_embeddings
        if A.ndim != 2:
            raise ConfigError(f"arm embeddings must be a (K, d) array, got shape {A.shape}")
        scale = self.config.embedding_scale or math.sqrt(A.shape[1])
        return make_feature_map(self.config.feature_map, A * scale, self.config.compute_dtype)

    # ------------------------------------------------------------------ maths
    def step_size(self) -> float:
        c = self.config
        if c.step_decay == "sqrt":
            return c.step_size / math.sqrt(max(1, self.history.n))
        return c.step_size

    def preconditioner(self) -> np.ndarray:
        """G (p,): diag(H)⁻¹ with H = η·Σ_s ¼·Δ_s² + 1/σ0², or ones (see the module docstring)."""
        c = self.config
        if c.preconditioner == "none":
            return np.ones(self.dim)
        return 1.0 / (0.25 * c.eta * self._delta_sq + 1.0 / c.prior_sigma**2)

    def _pair_sq(self, X: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Σ_s Δ_s² (p,) for duels (first_s, second_s) on contexts X (n, d)."""
        return (self.fmap.pair_features(X, first, second) ** 2).sum(axis=0)

    def potential_grad(
        self, theta: np.ndarray, X: np.ndarray, first: np.ndarray, second: np.ndarray, y: np.ndarray,
        mask: np.ndarray, scale: float = 1.0,
    ) -> np.ndarray:
        """∇U_j for a stack of chains over one batch of duels.

        ``theta`` (C, p); the batch (X (B, d), first/second/y (B,), mask (B, K)) is shared by the
        chains. Chain c is sampler ``j = 1 + (c % 2)``: even chains compare the best offered arm with
        the *second* played arm, odd chains with the first. ``scale`` = n / B rescales a minibatch.
        """
        c = self.config
        C, B, K = theta.shape[0], len(y), self.n_arms
        S = self.fmap.scores(theta.astype(self.fmap.A.dtype, copy=False), X)  # (C, B, K)
        base = (np.arange(C)[:, None] * B + np.arange(B)[None, :]) * K  # flat offset of (chain, row)
        Sf = S.reshape(-1)
        i1, i2 = base + first, base + second
        g = c.eta * (_sigmoid(Sf[i1] - Sf[i2]) - y)  # dℓ/dz, (C, B)
        idx, w = [i1, i2], [g, -g]
        if c.mu > 0:
            other = np.where((np.arange(C) % 2 == 0)[:, None], second, first)
            istar = base + np.where(mask, S, -np.inf).argmax(axis=2)
            io = base + other
            active = (Sf[istar] - Sf[io] < c.feel_good_clip) * c.mu
            idx += [istar, io]
            w += [-active, active]
        W = np.bincount(np.concatenate(idx, axis=None), np.concatenate(w, axis=None), minlength=C * B * K)
        W = W.reshape(C, B, K).astype(self.fmap.A.dtype, copy=False)
        return scale * self.fmap.weighted_grad(W, X) + theta / c.prior_sigma**2

    def potential(self, theta: np.ndarray, X, first, second, y, mask, sampler: int) -> float:
        """U_j(θ) for one chain (θ of shape (p,)) over a batch without a chain axis. For tests."""
        c = self.config
        S = self.fmap.scores(theta, X)
        rows = np.arange(len(y))
        z = S[rows, first] - S[rows, second]
        loss = -(y * _log_sigmoid(z) + (1 - y) * _log_sigmoid(-z))
        other = second if sampler == 1 else first
        best = np.where(mask, S, -np.inf).max(axis=1)
        fg = np.minimum(c.feel_good_clip, best - S[rows, other])
        return float(c.eta * loss.sum() - c.mu * fg.sum() + theta @ theta / (2 * c.prior_sigma**2))

    def refresh(self, n_steps: int | None = None) -> None:
        """Advance both SGLD chains ``n_steps`` from their current state (warm start).

        While the history fits in ``batch_size`` the gradient is exact; beyond that each step draws
        one minibatch (uniform, with replacement, shared by the two chains) and rescales it by n/B.
        """
        t0 = time.perf_counter()
        c, h = self.config, self.history
        steps = c.n_steps if n_steps is None else n_steps
        n, B = h.n, c.batch_size
        delta = self.step_size()
        G = self.preconditioner()  # (p,)
        step = delta * G
        noise_sd = np.sqrt(2.0 * step) * c.langevin_noise
        theta = self.theta
        for _ in range(steps):
            if n == 0:
                grad = theta / c.prior_sigma**2
            elif n <= B:
                grad = self.potential_grad(theta, h.X[:n], h.first[:n], h.second[:n], h.y[:n], h.mask[:n])
            else:
                i = self.rng.integers(0, n, size=B)
                grad = self.potential_grad(theta, h.X[i], h.first[i], h.second[i], h.y[i], h.mask[i], n / B)
            theta = theta - step * grad
            if c.langevin_noise:
                theta = theta + noise_sd * self.rng.standard_normal(theta.shape)
        if not np.isfinite(theta).all():
            # A diverged chain (step size too large for this history) restarts from the prior
            # rather than poisoning every later choice with NaN.
            bad = ~np.isfinite(theta).all(axis=1)
            theta[bad] = self.rng.normal(0.0, c.prior_sigma, size=(int(bad.sum()), self.dim))
        self.theta = theta
        rho = c.exploit_ema
        self.theta_mean = (1 - rho) * self.theta_mean + rho * theta.mean(axis=0)
        self.n_refreshes += 1
        self.refreshed_at = self.n_updates
        self.sgld_seconds += time.perf_counter() - t0

    # --------------------------------------------------------------- protocol
    def _context(self, context: np.ndarray) -> np.ndarray:
        x = np.asarray(context, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.fmap.context_dim:
            raise ConfigError(f"context has dim {x.shape[0]}, expected {self.fmap.context_dim}")
        if not np.isfinite(x).all():
            raise ConfigError("context contains NaN or inf")
        return x

    def arm_scores(self, context: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        """<θ, φ(x, a_k)> for each chain, (2, K), or for a given θ of shape (..., p) -> (..., K)."""
        x = self._context(context)
        th = self.theta if theta is None else np.asarray(theta, dtype=np.float64)
        return self.fmap.scores(th, x[None, :])[..., 0, :]

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None, resample: bool = True) -> Duel:
        """Draw θ¹, θ² (``resample=False`` reuses the current samples) and play each one's best arm."""
        mask = offered_mask(self.n_arms, arms)
        if resample:
            self.refresh()
        S = np.where(mask, self.arm_scores(context), -np.inf)  # (2, K)
        first = int(S[0].argmax())
        second = int(S[1].argmax())
        if self.config.distinct_arms and second == first and mask.sum() > 1:
            s2 = S[1].copy()
            s2[first] = -np.inf
            second = int(s2.argmax())
        return Duel(first, second)

    def update(self, context: np.ndarray, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None:
        """Record one duel. ``arms`` = the arms offered that round (the feel-good max ranges over them)."""
        x = self._context(context)
        y = check_outcome(outcome)
        check_duel(duel, self.n_arms)
        n_before = self.history.n
        self.history.append(x, int(duel.first), int(duel.second), y, offered_mask(self.n_arms, arms))
        if self.history.n == n_before + 1:
            self._delta_sq += self._pair_sq(x[None], np.array([duel.first]), np.array([duel.second]))
        else:  # the bounded history dropped its oldest duels: recount
            self._recount()
        self.n_updates += 1

    def _recount(self) -> None:
        h = self.history
        self._delta_sq = self._pair_sq(h.X[: h.n], h.first[: h.n], h.second[: h.n])

    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int:
        mask = offered_mask(self.n_arms, arms)
        s = np.where(mask, self.arm_scores(context, self.theta_mean), -np.inf)
        return int(s.argmax())

    # ---------------------------------------------------------------- state
    def snapshot(self) -> dict:
        return {
            "policy": self.name,
            "config": dataclasses.asdict(self.config),
            "arm_embeddings": self.arm_embeddings.copy(),
            "history": self.history.arrays(),
            "theta": self.theta.copy(),
            "theta_mean": self.theta_mean.copy(),
            "counters": {
                "n_updates": self.n_updates,
                "n_refreshes": self.n_refreshes,
                "refreshed_at": self.refreshed_at,
            },
            "rng": rng_state(self.rng),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        if snapshot.get("policy") != self.name:
            raise ConfigError(f"snapshot is of policy {snapshot.get('policy')!r}, not {self.name!r}")
        self.config = FGTSConfig(**snapshot["config"])
        self.arm_embeddings = np.array(snapshot["arm_embeddings"], dtype=np.float64)
        self.fmap = self._feature_map()
        self.n_arms, self.dim = self.fmap.n_arms, self.fmap.dim
        self.history = DuelHistory(self.fmap.context_dim, self.n_arms, self.config.max_history,
                                   dtype=self.config.compute_dtype)
        self.history.load(snapshot["history"])
        self._recount()
        self.theta = np.array(snapshot["theta"], dtype=np.float64)
        self.theta_mean = np.array(snapshot["theta_mean"], dtype=np.float64)
        counters = snapshot["counters"]
        self.n_updates = int(counters["n_updates"])
        self.n_refreshes = int(counters["n_refreshes"])
        self.refreshed_at = int(counters["refreshed_at"])
        self.rng = rng_from_state(snapshot["rng"])


@register_policy("fgts_cdb", FGTSConfig, description="FGTS.CDB with an SGLD posterior sampler (the paper's method)")
def _make_fgts(config: FGTSConfig, env: PolicyEnv, seed: int) -> FGTSCDB:
    return FGTSCDB(config, env.arm_embeddings, seed=seed)
