"""Replay environment over a logged benchmark (ALGORITHM.md section 4).

The latent utility of arm k on query q is the logged ``r(q, k) = score(q, k) − λ·cost_norm(q, k)``.
A duel (a¹, a²) is judged by

- real pairwise labels where the data has them for that query and pair (MixInstruct's ChatGPT
  ``cmp_results``), else
- a Bradley–Terry judge: y ~ Bernoulli(σ(κ·(r(q,a¹) − r(q,a²)))), or, with κ = inf, a noiseless judge
  (the better answer wins; equal utilities are a fair coin).

A duel of an arm with itself is a tie (y = ½): both answers are the same.
Regret of a round: r(q, k*) − (r(q, a¹) + r(q, a²)) / 2 with k* = argmax over the offered arms.
"""

from __future__ import annotations

import math

import numpy as np

from ray_router.errors import ConfigError
from ray_router.policies.base import Duel
from ray_router.policies.common import sigmoid


class ReplayEnvironment:
    def __init__(
        self,
        utilities: np.ndarray,
        kappa: float = 10.0,
        pairwise: dict[tuple[int, int, int], float] | None = None,
    ):
        """``utilities`` (n, K) over the rows of the stream; ``pairwise`` maps (row, a, b) -> y."""
        self.utilities = np.asarray(utilities, dtype=np.float64)
        if self.utilities.ndim != 2:
            raise ConfigError(f"utilities must be (n, K), got shape {self.utilities.shape}")
        if not (kappa > 0):
            raise ConfigError(f"kappa must be > 0 (inf for a noiseless judge), got {kappa}")
        self.kappa = float(kappa)
        self.pairwise = pairwise or {}
        self.n_rows, self.n_arms = self.utilities.shape
        self.n_real_labels = 0

    def feedback(self, row: int, duel: Duel, rng: np.random.Generator) -> float:
        a, b = int(duel.first), int(duel.second)
        if a == b:
            return 0.5
        label = self.pairwise.get((row, a, b))
        if label is not None:
            self.n_real_labels += 1
            return label
        gap = self.utilities[row, a] - self.utilities[row, b]
        if math.isinf(self.kappa):
            if gap == 0:
                return float(rng.random() < 0.5)
            return 1.0 if gap > 0 else 0.0
        p = sigmoid(self.kappa * gap)
        return float(rng.random() < p)

    def regret(self, row: int, duel: Duel, mask: np.ndarray | None = None) -> float:
        u = self.utilities[row]
        best = u.max() if mask is None else u[mask].max()
        return float(best - 0.5 * (u[duel.first] + u[duel.second]))
