"""Linear contextual dueling bandits from the literature: MaxInP and CoLSTIM (baselines).

References:
- Saha. "Optimal Algorithms for Stochastic Contextual Preference Bandits." NeurIPS 2021
  (MaxInP, "Maximum-Informative-Pair", its Algorithm 1 for pairwise feedback).
- Bengs, Saha, Hüllermeier. "Stochastic Contextual Dueling Bandits under Linear Stochastic
  Transitivity Models." ICML 2022, arXiv 2202.04593 (CoLSTIM).

Both run on the same features as FGTS.CDB (``feature_map``, ALGORITHM.md s.1): the utility of arm k
for context x is ``<θ, φ(x, a_k)>`` and a duel (a¹, a²) is won by a¹ with probability
``σ(<θ, Δ>)``, ``Δ = φ(x, a¹) − φ(x, a²)`` (Bradley–Terry / logistic link, the "BTL" instance of a
linear stochastic transitivity model). Shared machinery (all numpy):

- **Estimate** θ̂: the ridge-regularised maximum-likelihood estimate
  ``θ̂ = argmin Σ_s ℓ(y_s, <θ, Δ_s>) + (λ/2)·||θ||²`` with the logistic loss ℓ of ALGORITHM.md s.2
  (ties y = ½ are soft labels). The papers use the unregularised MLE after a random exploration
  phase that makes it exist; the ridge λ (**our choice**, ``reg``) makes it exist from round one, and
  ``explore_rounds`` keeps the papers' random phase available (default 0). The papers recompute the
  MLE every round; we track it with ``laplace_ts.LogisticLaplace`` (η = 1, prior precision λ): an
  O(p²) online Newton step per duel and an exact refit (``map_steps`` Newton-type steps over the
  whole history) every ``max(refresh_every, refresh_fraction·n_last)`` duels (**our choice**, to
  keep a round O(p²); tested to stay within a few % of the exact MLE between refits).
- **Design matrix** ``V = λ·I + Σ_s Δ_s Δ_sᵀ`` (the papers' M_t / V_t, plus the ridge): its inverse
  is kept by Sherman–Morrison updates (O(p²) a duel) and recomputed exactly from the history at
  each refit. ``||z||_{V⁻¹}`` is the confidence width of a direction z.
- The theory's confidence radius (of order sqrt(d·log T)/κ with κ = inf σ' over the parameter set)
  is far too conservative in practice; both papers' experiments tune a constant. We use a constant
  ``alpha`` (**our choice**) multiplying ``||·||_{V⁻¹}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

from ray_router.config import config_dataclass
from ray_router.policies.base import Duel, PolicyEnv, register_policy
from ray_router.policies.common import (
    NonNegativeFinite,
    NonNegativeInt,
    PositiveFinite,
    PositiveInt,
    check_context,
    offered_mask,
)
from ray_router.policies.features import FeatureMapName
from ray_router.policies.fgts_cdb import FGTSConfig
from ray_router.policies.laplace_ts import LaplaceBacked, LogisticLaplace, RefreshFraction


# ------------------------------------------------------------------------------- configs
@config_dataclass
class MaxInPConfig:
    """Hyperparameters of MaxInP (frozen, validated once). Field names are the sweep keys."""

    reg: PositiveFinite = 1.0  # λ: ridge of the MLE and of V = λI + Σ ΔΔᵀ (**our choice**, see module doc)
    alpha: NonNegativeFinite = 1.0  # confidence width: arm i survives if θ̂ᵀ(φ_i − φ_j) + α||φ_i − φ_j||_{V⁻¹} >= 0 ∀j
    explore_rounds: NonNegativeInt = 0  # the paper's initial phase of uniformly random pairs (0: the ridge suffices)
    refresh_every: PositiveInt = 100  # exact MLE refit (and V⁻¹) at least this many duels apart...
    refresh_fraction: RefreshFraction = (
        0.1  # ...and once the history grew by this fraction since (online steps between)
    )
    map_steps: PositiveInt = 5  # full-history Newton-type steps at each refit (warm-started)
    feature_map: FeatureMapName = FGTSConfig.feature_map  # one of FEATURE_MAPS; default = FGTS.CDB's


Perturbation = Literal["gumbel", "normal", "none"]
PERTURBATIONS: tuple[str, ...] = get_args(Perturbation)


@config_dataclass
class CoLSTIMConfig:
    """Hyperparameters of CoLSTIM (frozen, validated once). Field names are the sweep keys."""

    reg: PositiveFinite = 1.0  # λ: ridge of the MLE and of V = λI + Σ ΔΔᵀ (**our choice**)
    alpha: NonNegativeFinite = 1.0  # width of the second arm's bonus α·||φ_j − φ_first||_{V⁻¹}
    perturbation: Perturbation = (
        "gumbel"  # noise of the first arm: gumbel (BTL/logistic link), normal (Thurstone), none
    )
    perturb_width: NonNegativeFinite = 1.0  # c in the first arm's noise scale min(1, c·||φ_i − φ̄||_{V⁻¹})
    explore_rounds: NonNegativeInt = 0  # the paper's initial phase τ of uniformly random pairs (0: the ridge suffices)
    refresh_every: PositiveInt = 100  # exact MLE refit (and V⁻¹) at least this many duels apart...
    refresh_fraction: RefreshFraction = (
        0.1  # ...and once the history grew by this fraction since (online steps between)
    )
    map_steps: PositiveInt = 5  # full-history Newton-type steps at each refit (warm-started)
    feature_map: FeatureMapName = FGTSConfig.feature_map  # one of FEATURE_MAPS; default = FGTS.CDB's


# ----------------------------------------------------------------------------- the policies
class _LinearLogisticDueling(LaplaceBacked):
    """State shared by MaxInP and CoLSTIM: θ̂ (ridge MLE, tracked by a LogisticLaplace), V⁻¹, an RNG."""

    config_cls: type = MaxInPConfig
    _state_key = "mle"

    def _laplace(self) -> LogisticLaplace:
        c = self.config
        return LogisticLaplace(
            self.fmap,
            eta=1.0,
            prior_precision=c.reg,
            hessian="full",
            refresh_every=c.refresh_every,
            refresh_fraction=c.refresh_fraction,
            map_steps=c.map_steps,
        )

    def _build(self, A: np.ndarray) -> None:
        super()._build(A)
        self.V_inv = np.eye(self.dim) / self.config.reg

    # ------------------------------------------------------------------ maths
    def _arm_features(self, x: np.ndarray) -> np.ndarray:
        return self.fmap.features(x[None, :])[0]  # (K, p)

    def _widths(self, Phi: np.ndarray) -> np.ndarray:
        """(K, K) matrix of ||φ_i − φ_j||_{V⁻¹}."""
        Q = Phi @ self.V_inv @ Phi.T
        q = np.diag(Q)
        return np.sqrt(np.maximum(q[:, None] + q[None, :] - 2.0 * Q, 0.0))

    def _explore(self, mask: np.ndarray) -> Duel | None:
        """The papers' initial phase: a uniformly random pair of distinct offered arms."""
        if self.n_updates >= self.config.explore_rounds:
            return None
        idx = np.flatnonzero(mask)
        a, b = self.rng.choice(idx, size=2, replace=len(idx) < 2)
        return Duel(int(a), int(b))

    # --------------------------------------------------------------- protocol
    def update(self, context: np.ndarray, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None:
        delta = self._absorb(context, duel, outcome, arms)
        if self.post.refreshed_at == self.post.n_updates:  # the MLE was just refitted: V⁻¹ exactly, too
            D = self.history.Dn
            V = D.T @ D
            V[np.diag_indices_from(V)] += self.config.reg
            L_inv = np.linalg.inv(np.linalg.cholesky(V))
            self.V_inv = L_inv.T @ L_inv
        elif delta.any():  # (a duel of an arm with itself carries no information)
            u = self.V_inv @ delta
            self.V_inv -= np.outer(u / (1.0 + float(delta @ u)), u)

    # ---------------------------------------------------------------- state
    def _extra_state(self) -> dict:
        return {"V_inv": self.V_inv.copy()}

    def _load_extra(self, snapshot: Mapping[str, Any]) -> None:
        self.V_inv = np.array(snapshot["V_inv"], dtype=np.float64)


class MaxInP(_LinearLogisticDueling):
    """MaxInP (Saha, NeurIPS 2021): play the most informative pair among the arms not yet eliminated.

    Each round, with θ̂ the (ridge) MLE and V the design matrix of played Δ's:

    1. candidates ``C = {i offered : θ̂ᵀ(φ_i − φ_j) + α·||φ_i − φ_j||_{V⁻¹} >= 0 for every offered j}``
       (arms that may still be the best; the empirical best always survives);
    2. play ``argmax_{(i, j) ∈ C×C} ||φ_i − φ_j||_{V⁻¹}`` (i ≠ j while |C| > 1; a lone survivor
       duels itself, as in the paper), the arm with the larger θ̂-utility first.

    ``best`` is the offered arm with the largest θ̂-utility. No randomness after ``explore_rounds``.
    """

    name = "maxinp"
    config_cls = MaxInPConfig

    def candidates(self, context: np.ndarray, arms: Sequence[int] | None = None) -> np.ndarray:
        """Boolean mask (K,) of the offered arms not eliminated for this context."""
        x = check_context(context, self.fmap.context_dim)
        return self._candidates(x, offered_mask(self.n_arms, arms))[0]

    def _candidates(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        Phi = self._arm_features(x)
        s = Phi @ self.theta
        W = self._widths(Phi)
        ok = (s[:, None] - s[None, :] + self.config.alpha * W >= 0) | ~mask[None, :]
        return mask & ok.all(axis=1), s, W

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel:
        x = check_context(context, self.fmap.context_dim)
        mask = offered_mask(self.n_arms, arms)
        duel = self._explore(mask)
        if duel is not None:
            return duel
        cand, s, W = self._candidates(x, mask)
        idx = np.flatnonzero(cand)
        if len(idx) == 1:
            return Duel(int(idx[0]), int(idx[0]))
        sub = W[np.ix_(idx, idx)]
        sub[np.tril_indices(len(idx))] = -np.inf  # pairs i < j only (the diagonal has width 0)
        i, j = np.unravel_index(int(sub.argmax()), sub.shape)
        a, b = int(idx[i]), int(idx[j])
        return Duel(a, b) if s[a] >= s[b] else Duel(b, a)


class CoLSTIM(_LinearLogisticDueling):
    """CoLSTIM (Bengs, Saha, Hüllermeier, ICML 2022): imitate the feedback process, then challenge.

    Each round, with θ̂ the (ridge) MLE and V the design matrix of played Δ's:

    1. first arm ``i = argmax_i θ̂ᵀφ_i + ε_i·min(1, c·||φ_i − φ̄||_{V⁻¹})`` with ε_i i.i.d. from the
       link's utility noise (Gumbel for the logistic/BTL link: the difference of two Gumbels is
       logistic); the perturbation shrinks as the arm's direction gets explored. The paper scales by
       ``||φ_i||_{M⁻¹}``; we centre φ on the mean φ̄ of the offered arms (**our choice**): duels only
       identify utilities up to a shift common to all arms, so the common part of φ_i (e.g. the
       1/K·Σ e_k part of a one-hot ``hadamard_bias`` term) never enters V and its width would keep
       the noise from ever fading;
    2. second arm ``j = argmax_j θ̂ᵀφ_j + α·||φ_j − φ_i||_{V⁻¹}`` (optimism relative to the first arm;
       j may equal i when no other arm is plausibly better, as in the paper).

    ``best`` is the offered arm with the largest θ̂-utility.
    """

    name = "colstim"
    config_cls = CoLSTIMConfig

    def _noise(self) -> np.ndarray:
        kind = self.config.perturbation
        if kind == "gumbel":
            return self.rng.gumbel(size=self.n_arms)
        if kind == "normal":  # Thurstone: each utility N(0, ½), so the difference is N(0, 1)
            return self.rng.normal(0.0, math.sqrt(0.5), size=self.n_arms)
        return np.zeros(self.n_arms)

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel:
        c = self.config
        x = check_context(context, self.fmap.context_dim)
        mask = offered_mask(self.n_arms, arms)
        duel = self._explore(mask)
        if duel is not None:
            return duel
        Phi = self._arm_features(x)
        s = Phi @ self.theta
        VPhi = Phi @ self.V_inv  # one (K, p) @ (p, p) product serves both widths
        centred = Phi - Phi[mask].mean(axis=0)  # duels only identify utilities up to a shift common to all arms
        V_centred = VPhi - VPhi[mask].mean(axis=0)
        own = np.sqrt(np.maximum(np.einsum("kp,kp->k", V_centred, centred), 0.0))  # ||φ_i − φ̄||_{V⁻¹}
        first = int(np.where(mask, s + self._noise() * np.minimum(1.0, c.perturb_width * own), -np.inf).argmax())
        width = np.sqrt(np.maximum(np.einsum("kp,kp->k", VPhi - VPhi[first], Phi - Phi[first]), 0.0))
        second = int(np.where(mask, s + c.alpha * width, -np.inf).argmax())
        return Duel(first, second)


@register_policy("maxinp", MaxInPConfig)
def _make_maxinp(config: MaxInPConfig, env: PolicyEnv, seed: int) -> MaxInP:
    """MaxInP (Saha 2021): most informative pair among non-eliminated arms, ridge logistic MLE"""
    return MaxInP(config, env.require_embeddings("maxinp"), seed=seed)


@register_policy("colstim", CoLSTIMConfig)
def _make_colstim(config: CoLSTIMConfig, env: PolicyEnv, seed: int) -> CoLSTIM:
    """CoLSTIM (Bengs, Saha, Hüllermeier 2022): perturbed-utility leader, optimistic challenger"""
    return CoLSTIM(config, env.require_embeddings("colstim"), seed=seed)
