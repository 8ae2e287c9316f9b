"""Laplace-approximation Thompson sampling of the FGTS.CDB posterior: a cheaper sampler (baseline).

Not a replacement for SGLD (ALGORITHM.md s.2 asks for "a cheaper comparison sampler, named as such").
It targets the posterior of ``fgts_cdb`` with the same η, σ0 and feature map (same defaults)::

    p(θ | history) ∝ N(θ; 0, σ0² I) · exp(−η·Σ_s ℓ(y_s, <θ, Δ_s>)),   Δ_s = φ(x_s,a¹_s) − φ(x_s,a²_s)

(logistic loss with ties as soft labels) **with the feel-good term dropped** (μ = 0): the term
−μ·min(b, max_a <θ, φ(x_s,a) − φ(x_s,a^{3−j}_s)>) is piecewise linear, so it has no curvature for a
Gaussian to capture, it would give the two samplers different modes (two MAPs instead of one), and
FGTS.CDB's theory setting μ = 1/(10·e^B·√T) is ≈ 0 anyway. With μ = 0 both samplers share one
posterior, approximated by ``N(θ̂, H⁻¹)`` with θ̂ the MAP and ``H = η·Σ_s w_s Δ_s Δ_sᵀ + I/σ0²``,
``w_s = σ'(<θ̂, Δ_s>)`` its Hessian there (``LogisticLaplace``, also the ridge-MLE estimator of
MaxInP and CoLSTIM, with η = 1 and 1/σ0² = λ).

Cost (**our choices**, for p ≈ 400 features, K = 11 arms and thousands of duels; O(p²) a round,
amortised, independent of the history length n, where SGLD runs ~20 minibatch gradient steps per
sampler):

- **Each new duel** is absorbed by one online Laplace step (assumed-density filtering): the previous
  ``N(θ̂, H⁻¹)`` acts as the prior for the new duel, whose mode lies on the line θ̂ − t·H⁻¹Δ and is
  found by a scalar Newton solve of ``z + η·c·(σ(z) − y) = <θ̂, Δ>``, ``c = ΔᵀH⁻¹Δ`` (a bounded step,
  stable for any Δ). H gains ``η·w·ΔΔᵀ`` with w = σ'(z) at the new mode: a Sherman–Morrison update.
- **Every** ``max(refresh_every, refresh_fraction·n_last)`` duels (n_last: the history at the last
  refresh, so the gaps grow geometrically and the O(n·p²) work stays O(p²) a round amortised) the
  MAP is refitted on the whole history by ``map_steps`` Newton-type steps (``newton_steps``,
  preconditioned by H⁻¹, exact line search), then H is rebuilt exactly at the new MAP (fresh
  weights) with its Cholesky factor L. This removes the drift of the online steps (about 15% of
  ||θ̂|| without refreshes on a small synthetic problem, under 1% a few refreshes in with them).
  ``hessian="diag"`` keeps only diag(H) (as in Chapelle & Li 2011's logistic Thompson sampling;
  O(p) a duel, ignores correlations).
- **Draws**: two independent θ¹, θ² ~ N(θ̂, H⁻¹) per round, each playing its best arm (the second
  takes its runner-up when ``distinct_arms`` and the arms coincide, like FGTS.CDB). With H = L·Lᵀ
  (last rebuild) + Σ_pending η·w_j·Δ_jΔ_jᵀ (duels since), ``z = L·ξ0 + Σ_j sqrt(η·w_j)·Δ_j·ξ_j`` has
  covariance H, so ``θ = θ̂ + H⁻¹·z`` is an exact draw without refactorising H.
- ``best`` plays the MAP's best arm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, cast, get_args

import numpy as np
from pydantic import Field

from ray_router.config import config_dataclass, parse
from ray_router.policies.base import Duel, PolicyEnv, register_policy
from ray_router.policies.common import (
    PositiveFinite,
    PositiveInt,
    check_context,
    check_feedback,
    logistic_nll,
    offered_mask,
    rng_from_state,
    rng_state,
    second_arm,
    sigmoid,
)
from ray_router.policies.features import FeatureMap, FeatureMapName, make_feature_map
from ray_router.policies.fgts_cdb import FGTSConfig
from ray_router.policies.snapshot import PolicySnapshot, check_header

# ------------------------------------------------------------ shared linear-logistic maths
MAP_TOL = 1e-10  # stop refitting once the Newton decrement (≈ 2·(f − min f)) is below this


def newton_steps(
    D: np.ndarray,
    y: np.ndarray,
    theta: np.ndarray,
    *,
    eta: float,
    lam: float,
    solve: Callable[[np.ndarray], np.ndarray],
    n_steps: int,
    tol: float = MAP_TOL,
    z: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ``f(θ) = η·Σ_s ℓ(y_s, <θ, D_s>) + (λ/2)·||θ||²`` from ``theta``; returns (θ, Dθ).

    Each step moves along ``d = −solve(∇f)``, where ``solve`` applies an approximate inverse Hessian
    (the Laplace H⁻¹, V⁻¹ or a diagonal), by the exact Newton length along that line,
    ``s = −∇fᵀd / dᵀ∇²f·d`` (the true curvature, so a badly scaled ``solve`` costs nothing), backed
    off by halving until the Armijo condition holds. ``f(θ + s·d)`` only needs ``Dθ + s·Dd``, so a
    step costs two (n, p) mat-vecs plus ``solve``; ``z`` = Dθ for the starting θ saves one more
    (warm starts carry it). A positive-definite ``solve`` gives a descent direction every step, so
    the iteration converges to the unique minimiser (f is strictly convex for λ > 0). It stops once
    the Newton decrement ``∇fᵀ·solve(∇f)`` (≈ 2·(f − min f) for an exact Hessian) is below ``tol``.
    """
    theta = np.array(theta, dtype=np.float64)
    if len(y) == 0:
        return theta, np.zeros(0)
    z = D @ theta if z is None else np.array(z, dtype=np.float64)
    f = eta * logistic_nll(y, z).sum() + 0.5 * lam * (theta @ theta)
    for _ in range(n_steps):
        p = sigmoid(z)
        g = eta * (D.T @ (p - y)) + lam * theta
        d = -solve(g)
        slope = float(g @ d)
        if not (-slope > tol):  # converged (or not a descent direction)
            break
        Dd = D @ d
        curv = eta * float((p * (1.0 - p)) @ (Dd * Dd)) + lam * float(d @ d)
        s = -slope / curv if curv > 0 else 1.0
        while True:
            z_new = z + s * Dd
            th_new = theta + s * d
            f_new = eta * logistic_nll(y, z_new).sum() + 0.5 * lam * (th_new @ th_new)
            if f_new <= f + 1e-4 * s * slope:
                break
            s *= 0.5
            if s < 1e-12:
                return theta, z
        theta, z, f = th_new, z_new, f_new
    return theta, z


class PairHistory:
    """Growing buffer of duels: contexts, arms, outcomes, pair features Δ_s and Hessian weights w_s.

    Δ_s = φ(x_s, a¹_s) − φ(x_s, a²_s) is stored (n, p) so that every likelihood pass is one
    mat-vec. A snapshot holds (X, first, second, y, w); Δ is rebuilt on restore by the same
    elementwise operations, so it is bit-identical.
    """

    _FLOATS = ("y", "w")
    y: np.ndarray  # (capacity,) outcomes; _alloc sets the _FLOATS buffers by name
    w: np.ndarray  # (capacity,) Hessian weights

    def __init__(self, fmap: FeatureMap, capacity: int = 256):
        self.fmap = fmap
        self.n = 0
        self._alloc(capacity)

    def _alloc(self, cap: int) -> None:
        self.X = np.empty((cap, self.fmap.context_dim))
        self.first = np.empty(cap, dtype=np.int64)
        self.second = np.empty(cap, dtype=np.int64)
        for k in self._FLOATS:
            setattr(self, k, np.empty(cap))
        self.D = np.empty((cap, self.fmap.dim))

    def _grow(self) -> None:
        names = ("X", "first", "second", "D", *self._FLOATS)
        old = {k: getattr(self, k) for k in names}
        self._alloc(2 * len(self.y))
        for k, arr in old.items():
            getattr(self, k)[: self.n] = arr[: self.n]

    def append(self, x: np.ndarray, first: int, second: int, y: float) -> np.ndarray:
        """Record a duel; returns its Δ row."""
        if self.n == len(self.y):
            self._grow()
        i = self.n
        self.X[i], self.first[i], self.second[i], self.y[i], self.w[i] = x, first, second, y, 0.0
        self.D[i] = self.fmap.pair_features(x[None, :], np.array([first]), np.array([second]))[0]
        self.n += 1
        return self.D[i]

    @property
    def Dn(self) -> np.ndarray:
        return self.D[: self.n]

    @property
    def yn(self) -> np.ndarray:
        return self.y[: self.n]

    @property
    def wn(self) -> np.ndarray:
        return self.w[: self.n]

    def arrays(self) -> dict[str, np.ndarray]:
        n = self.n
        return {k: getattr(self, k)[:n].copy() for k in ("X", "first", "second", *self._FLOATS)}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        n = len(arrays["y"])
        self.n = 0
        self._alloc(max(16, n))
        self.X[:n] = np.asarray(arrays["X"], dtype=np.float64).reshape(n, self.fmap.context_dim)
        self.first[:n] = np.asarray(arrays["first"], dtype=np.int64)
        self.second[:n] = np.asarray(arrays["second"], dtype=np.int64)
        for k in self._FLOATS:
            getattr(self, k)[:n] = np.asarray(arrays[k], dtype=np.float64)
        if n:
            self.D[:n] = self.fmap.pair_features(self.X[:n], self.first[:n], self.second[:n])
        self.n = n


def _adf_mode(z0: float, a: float, y: float) -> float:
    """The root z of ``z + a·(σ(z) − y) = z0`` (a ≥ 0): strictly increasing, so bracketed Newton."""
    lo, hi = z0 - a * (1.0 - y), z0 + a * y  # σ(z) − y lies in (−y, 1 − y)
    z = min(max(z0, lo), hi)
    for _ in range(60):
        s = sigmoid(z)
        g = z + a * (s - y) - z0
        if g > 0:
            hi = z
        else:
            lo = z
        if abs(g) <= 1e-12 * (1.0 + abs(z0)) or hi - lo <= 1e-15 * (1.0 + abs(z)):
            break
        z_new = z - g / (1.0 + a * s * (1.0 - s))
        z = z_new if lo < z_new < hi else 0.5 * (lo + hi)
    return z


Hessian = Literal["full", "diag"]
HESSIANS: tuple[str, ...] = get_args(Hessian)


class LogisticLaplace:
    """Laplace approximation N(θ̂, H⁻¹) of ``p(θ) ∝ exp(−η·Σ_s ℓ(y_s, <θ, Δ_s>) − (λ/2)·||θ||²)``.

    Kept up to date duel by duel in O(p²) with periodic exact refreshes (module docstring). θ̂ is
    the MAP (for MaxInP/CoLSTIM: the ridge MLE, η = 1). Not a policy: the policies below own one.
    """

    def __init__(
        self,
        fmap: FeatureMap,
        *,
        eta: float,
        prior_precision: float,
        hessian: Hessian = "full",
        refresh_every: int = 100,
        refresh_fraction: float = 0.1,
        map_steps: int = 5,
    ):
        self.fmap, self.dim = fmap, fmap.dim
        self.eta, self.lam, self.hessian = float(eta), float(prior_precision), hessian
        self.refresh_every, self.refresh_fraction, self.map_steps = refresh_every, refresh_fraction, map_steps
        self.history = PairHistory(fmap)  # its w column: the weight w_s each duel has in H
        self.theta = np.zeros(self.dim)
        if hessian == "full":
            self.H_inv = np.eye(self.dim) / self.lam
            self.chol = np.eye(self.dim) * math.sqrt(self.lam)  # L with L·Lᵀ = H at the last rebuild
        else:
            self.h = np.full(self.dim, self.lam)
        self.n_updates = 0
        self.refreshed_at = 0  # n_updates at the last refresh
        self.rebuilt_rows = 0  # history rows in the last rebuilt H (later rows: pending rank-one terms)

    def solve(self, g: np.ndarray) -> np.ndarray:
        """H⁻¹·g."""
        return self.H_inv @ g if self.hessian == "full" else g / self.h

    def absorb(self, x: np.ndarray, first: int, second: int, y: float) -> np.ndarray:
        """One online Laplace step for a new duel (refreshing on schedule); returns its Δ."""
        h, eta = self.history, self.eta
        delta = h.append(x, first, second, y)
        w = 0.25
        if delta.any():  # a duel of an arm with itself carries no information
            u = self.solve(delta)  # H⁻¹Δ
            curv = float(delta @ u)
            z = _adf_mode(float(delta @ self.theta), eta * curv, y)
            s = sigmoid(z)
            self.theta = self.theta - eta * (s - y) * u
            w = s * (1.0 - s)
            if self.hessian == "full":
                self.H_inv -= np.outer(u * (eta * w / (1.0 + eta * w * curv)), u)
            else:
                self.h += eta * w * delta**2
        h.w[h.n - 1] = w
        self.n_updates += 1
        gap = max(self.refresh_every, math.ceil(self.refresh_fraction * self.refreshed_at))
        if self.n_updates - self.refreshed_at >= gap:
            self.refresh()
        return delta

    def refit(self, n_steps: int | None = None, tol: float | None = None) -> np.ndarray:
        """Refit the MAP on the whole history (warm start; ``map_steps`` steps unless given)."""
        h = self.history
        self.theta, _ = newton_steps(
            h.Dn,
            h.yn,
            self.theta,
            eta=self.eta,
            lam=self.lam,
            solve=self.solve,
            n_steps=self.map_steps if n_steps is None else n_steps,
            tol=MAP_TOL if tol is None else tol,
        )
        return self.theta

    def rebuild(self) -> None:
        """Rebuild H = η·Σ w_s Δ_s Δ_sᵀ + λ·I exactly at the current θ̂ (fresh weights w_s)."""
        h = self.history
        D = h.Dn
        p = sigmoid(D @ self.theta)
        w = p * (1.0 - p)
        h.w[: h.n] = w
        if self.hessian == "full":
            H = self.eta * (D.T @ (D * w[:, None]))
            H[np.diag_indices_from(H)] += self.lam
            self.chol = np.linalg.cholesky(H)
            L_inv = np.linalg.inv(self.chol)
            self.H_inv = L_inv.T @ L_inv
        else:
            self.h = self.eta * (w @ (D * D)) + self.lam
        self.rebuilt_rows = h.n

    def refresh(self) -> None:
        """Refit the MAP on the whole history, then rebuild H there."""
        self.refit()
        self.rebuild()
        self.refreshed_at = self.n_updates

    def covariance(self) -> np.ndarray:
        """The Laplace covariance H⁻¹ (p, p) (a diagonal matrix for ``hessian="diag"``)."""
        return self.H_inv.copy() if self.hessian == "full" else np.diag(1.0 / self.h)

    def sample(self, rng: np.random.Generator, n_samples: int = 2) -> np.ndarray:
        """``n_samples`` independent draws (n_samples, p) from N(θ̂, H⁻¹)."""
        h = self.history
        if self.hessian == "diag":
            return self.theta + rng.standard_normal((n_samples, self.dim)) / np.sqrt(self.h)
        z = self.chol @ rng.standard_normal((self.dim, n_samples))
        lo = self.rebuilt_rows
        if h.n > lo:  # duels since the last rebuild: their rank-one terms of H
            xi = rng.standard_normal((h.n - lo, n_samples)) * np.sqrt(self.eta * h.w[lo : h.n])[:, None]
            z += h.D[lo : h.n].T @ xi
        return self.theta + (self.H_inv @ z).T

    def state(self) -> dict:
        full = self.hessian == "full"
        return {
            "history": self.history.arrays(),
            "theta": self.theta.copy(),
            "hessian": self.H_inv.copy() if full else self.h.copy(),  # H⁻¹ (full) or diag(H)
            "chol": self.chol.copy() if full else np.zeros(0),
            "counters": {
                "n_updates": self.n_updates,
                "refreshed_at": self.refreshed_at,
                "rebuilt_rows": self.rebuilt_rows,
            },
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.history.load(state["history"])
        self.theta = np.array(state["theta"], dtype=np.float64)
        if self.hessian == "full":
            self.H_inv = np.array(state["hessian"], dtype=np.float64)
            self.chol = np.array(state["chol"], dtype=np.float64)
        else:
            self.h = np.array(state["hessian"], dtype=np.float64)
        counters = state["counters"]
        self.n_updates = int(counters["n_updates"])
        self.refreshed_at = int(counters["refreshed_at"])
        self.rebuilt_rows = int(counters["rebuilt_rows"])


# ----------------------------------------------------------------------------------- policy
# The refresh schedule of every config that owns a LogisticLaplace (LaplaceTS, MaxInP, CoLSTIM)
RefreshFraction = Annotated[float, Field(ge=0, le=10)]


@config_dataclass
class LaplaceTSConfig:
    """Hyperparameters of the Laplace sampler (frozen, validated once). η, σ0, feature_map and
    distinct_arms mean what they mean in FGTSConfig, with its defaults, so both sample one posterior."""

    eta: PositiveFinite = FGTSConfig.eta  # weight of the logistic loss (default = FGTS.CDB's)
    prior_sigma: PositiveFinite = FGTSConfig.prior_sigma  # σ0 of the Gaussian prior (default = FGTS.CDB's)
    hessian: Hessian = "full"  # "full": H⁻¹ and a Cholesky factor; "diag": diag(H) only
    refresh_every: PositiveInt = 100  # refit the MAP and rebuild H at least this many duels apart...
    refresh_fraction: RefreshFraction = 0.1  # ...and once the history grew by this fraction since (amortised O(p²))
    map_steps: PositiveInt = 5  # full-history Newton-type steps at each refresh (warm-started)
    feature_map: FeatureMapName = FGTSConfig.feature_map  # one of FEATURE_MAPS (default = FGTS.CDB's)
    distinct_arms: bool = FGTSConfig.distinct_arms  # True: the second arm is θ²'s best other than the first


class LaplaceSnapshot(PolicySnapshot, total=False):
    """LaplaceTS keeps its Laplace state under ``posterior``; MaxInP and CoLSTIM under ``mle``, with ``V_inv``."""

    config: dict[str, Any]
    arm_embeddings: np.ndarray
    posterior: dict[str, Any]
    mle: dict[str, Any]
    V_inv: np.ndarray
    rng: dict[str, Any]


class LaplaceBacked:
    """What LaplaceTS, MaxInP and CoLSTIM share: a :class:`LogisticLaplace` over their feature map
    (``self.post``: θ̂, the history, the refresh schedule), an RNG, the exploit arm, a validated
    update, and snapshot/restore. A subclass says how to build its Laplace state (``_laplace``) and
    what else it keeps (``_extra_state`` / ``_load_extra``)."""

    name = ""
    config_cls: type
    _state_key = "posterior"  # the snapshot's key for ``self.post.state()``

    def __init__(self, config: Any, arm_embeddings: np.ndarray, seed: int = 0):
        self.config = config
        self._build(np.asarray(arm_embeddings, dtype=np.float64))
        self.rng = np.random.default_rng(seed)

    def _build(self, A: np.ndarray) -> None:
        self.fmap: FeatureMap = make_feature_map(self.config.feature_map, A)
        self.n_arms, self.dim = self.fmap.n_arms, self.fmap.dim
        self.post = self._laplace()

    def _laplace(self) -> LogisticLaplace:
        raise NotImplementedError

    # views and maths (delegated to the Laplace approximation)
    @property
    def theta(self) -> np.ndarray:
        return self.post.theta

    @property
    def history(self) -> PairHistory:
        return self.post.history

    @property
    def n_updates(self) -> int:
        return self.post.n_updates

    def refit(self, n_steps: int | None = None, tol: float | None = None) -> np.ndarray:
        """Refit θ̂ on the whole history now (``map_steps`` steps unless given)."""
        return self.post.refit(n_steps, tol)

    # --------------------------------------------------------------- protocol
    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int:
        """Exploit: the offered arm with the largest estimated utility <θ̂, φ(x, a)>."""
        x = check_context(context, self.fmap.context_dim)
        mask = offered_mask(self.n_arms, arms)
        s = self.fmap.scores(self.theta, x[None, :])[0]
        return int(np.where(mask, s, -np.inf).argmax())

    def _absorb(self, context: np.ndarray, duel: Duel, outcome: float, arms: Sequence[int] | None) -> np.ndarray:
        """Validate one duel and absorb it into the Laplace state; returns its Δ = φ(x,a¹) − φ(x,a²)."""
        x = check_context(context, self.fmap.context_dim)
        y = check_feedback(duel, outcome, self.n_arms, arms)
        return self.post.absorb(x, int(duel.first), int(duel.second), y)

    # ---------------------------------------------------------------- state
    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, snapshot: Mapping[str, Any]) -> None:
        pass

    def snapshot(self) -> LaplaceSnapshot:
        return cast(
            LaplaceSnapshot,
            {
                "policy": self.name,
                "config": dataclasses.asdict(self.config),
                "arm_embeddings": self.fmap.A.copy(),
                self._state_key: self.post.state(),
                **self._extra_state(),
                "rng": rng_state(self.rng),
            },
        )

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        check_header(snapshot, self.name)
        self.config = parse(self.config_cls, snapshot["config"], where=f"{self.name} snapshot config")
        self._build(np.asarray(snapshot["arm_embeddings"], dtype=np.float64))
        self.post.load(snapshot[self._state_key])
        self._load_extra(snapshot)
        self.rng = rng_from_state(snapshot["rng"])


class LaplaceTS(LaplaceBacked):
    """Thompson sampling from the Laplace approximation N(θ̂, H⁻¹) of FGTS.CDB's μ = 0 posterior."""

    name = "laplace_ts"
    config_cls = LaplaceTSConfig

    def _laplace(self) -> LogisticLaplace:
        c = self.config
        return LogisticLaplace(
            self.fmap,
            eta=c.eta,
            prior_precision=1.0 / c.prior_sigma**2,
            hessian=c.hessian,
            refresh_every=c.refresh_every,
            refresh_fraction=c.refresh_fraction,
            map_steps=c.map_steps,
        )

    def rebuild(self) -> None:
        self.post.rebuild()

    def covariance(self) -> np.ndarray:
        return self.post.covariance()

    def sample(self, n_samples: int = 2) -> np.ndarray:
        return self.post.sample(self.rng, n_samples)

    # --------------------------------------------------------------- protocol
    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel:
        x = check_context(context, self.fmap.context_dim)
        mask = offered_mask(self.n_arms, arms)
        S = np.where(mask, self.fmap.scores(self.sample(2), x[None, :])[:, 0, :], -np.inf)  # (2, K)
        first = int(S[0].argmax())
        return Duel(first, int(second_arm(S[1], first, self.config.distinct_arms, int(mask.sum()))))

    def update(self, context: np.ndarray, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None:
        """Absorb one duel by an online Laplace step (O(p²)); refresh on schedule (module docstring)."""
        self._absorb(context, duel, outcome, arms)


@register_policy("laplace_ts", LaplaceTSConfig)
def _make_laplace_ts(config: LaplaceTSConfig, env: PolicyEnv, seed: int) -> LaplaceTS:
    """Thompson sampling from a Laplace approximation of FGTS.CDB's posterior (mu = 0; a cheaper sampler than SGLD)"""
    return LaplaceTS(config, env.require_embeddings("laplace_ts"), seed=seed)
