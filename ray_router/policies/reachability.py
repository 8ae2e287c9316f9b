"""Which arms a configuration can never choose (ALGORITHM.md s.5, point 2).

Under a feature map without a per-arm term (``hadamard``, ``concat``) an arm's score is linear in its
embedding: ``<θ, x ⊙ a_k> = <v, a_k>`` with ``v = θ ⊙ x`` (and ``concat`` adds ``<θ', a_k>``). Arm k
can then be the unique argmax for some θ and x only if some direction ``v`` separates ``a_k`` from
every other arm strictly: ``<v, a_k − a_j> > 0`` for all j ≠ k. An arm whose embedding lies in the
convex hull of the others' is never chosen, whatever the duels teach (e.g. gpt-4 under the "excel"
weightings at λ = 0 on the RouterBench subset). We decide it with one linear programme per arm:

    max t  s.t.  <v, a_k − a_j> ≥ t  (j ≠ k),  −1 ≤ v ≤ 1;   k reachable  ⇔  t* > tol.

A map with a per-arm term (``hadamard_bias``, the offline extension's correction or query blocks)
reaches every arm. With the offline feature û alone (no correction), the offline profile Ū_{:,k} is
appended to a_k (a slight over-estimate of what is reachable: π(x) only ranges over the simplex).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PER_ARM_TERM_MAPS = ("hadamard_bias",)


def separable(points: np.ndarray, k: int, tol: float = 1e-9) -> bool:
    """True when some direction v makes ``points[k]`` strictly the highest (see the module docstring)."""
    from scipy.optimize import linprog

    P = np.asarray(points, dtype=np.float64)
    others = np.delete(P, k, axis=0)
    if len(others) == 0:
        return True
    D = P[k] - others  # (K-1, d)
    scale = float(np.abs(D).max())
    if scale == 0:
        return False  # identical to another arm: ties, decided by index order only
    D = D / scale
    n, d = D.shape
    # variables [v (d), t]; minimise −t; constraints  t − D v ≤ 0
    c = np.zeros(d + 1)
    c[-1] = -1.0
    A_ub = np.hstack([-D, np.ones((n, 1))])
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(n), bounds=[(-1, 1)] * d + [(None, 1.0)], method="highs")
    return bool(res.status == 0 and -res.fun > tol)


def unreachable_arms(
    config: Any, arm_embeddings: np.ndarray, prior: Any = None, arm_ids: Sequence[str] | None = None
) -> list:
    """Arms (indices, or ids when ``arm_ids`` is given) that ``config`` (an FGTSConfig) can never choose.

    ``prior``: the :class:`~ray_router.policies.offline_prior.OfflinePrior` in use, or None."""
    A = np.asarray(arm_embeddings, dtype=np.float64)
    K = A.shape[0]
    has_prior = prior is not None and getattr(config, "offline_prior", "none") != "none"
    if config.feature_map in PER_ARM_TERM_MAPS:
        return []
    if has_prior and (
        getattr(config, "correction", False)
        or getattr(config, "arm_bias", False)
        or getattr(config, "query_rank", 0) > 0
    ):
        return []
    points = A
    if has_prior:
        points = np.hstack([A, np.asarray(prior.utility, dtype=np.float64).T])
    out = [k for k in range(K) if not separable(points, k)]
    return [arm_ids[k] for k in out] if arm_ids is not None else out
