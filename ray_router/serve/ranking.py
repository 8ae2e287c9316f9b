"""Cost-aware choice of arms from the posterior's utilities (pure numpy).

Learned utility and price live on different scales: the posterior's utility ``u_k = <θ, φ(x, a_k)>``
is in logits of the Bradley-Terry preference model (``P(k beats j) = σ(u_k − u_j)``), a price is
in USD. A request's ``cost_weight`` λ ranks the offered arms by

    p_k − λ · price_norm_k,    p_k = σ(u_k − mean_{j offered} u_j),    price_norm_k = price_k / max_j price_j

``p_k`` is the modelled probability that arm k's answer is preferred to that of an average offered
arm, so it lies in [0, 1] like a benchmark score; ``price_norm`` is in [0, 1] like the offline
evaluation's ``cost_norm`` (the largest price of the arm table is 1). λ therefore means what it
means in ``utility = score − λ·cost_norm`` offline: λ = 0.1 gives up to 0.1 of win probability for
moving from the most expensive arm to a free one. σ is monotone, so λ = 0 ranks exactly like the
policy's own argmax (``select(..., resample=False)`` / ``best``).
"""

from __future__ import annotations

import numpy as np

from ray_router.policies.common import second_arm, sigmoid


def normalised_prices(prices) -> np.ndarray:
    """``price / max(price)``; all zeros stay zeros."""
    p = np.asarray(prices, dtype=np.float64)
    top = float(p.max()) if p.size else 0.0
    return p / top if top > 0 else np.zeros_like(p)


def win_probability(u: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``σ(u_k − mean over offered u)`` along the last axis (offered = ``mask``)."""
    u = np.asarray(u, dtype=np.float64)
    centre = (np.where(mask, u, 0.0).sum(axis=-1, keepdims=True)) / max(int(mask.sum()), 1)
    return sigmoid(u - centre)


def _objective(u: np.ndarray, mask: np.ndarray, penalty: np.ndarray | None) -> np.ndarray:
    if penalty is None:
        obj = np.asarray(u, dtype=np.float64)
    else:
        obj = win_probability(u, mask) - penalty
    return np.where(mask, obj, -np.inf)


def choose_duel(
    S: np.ndarray,
    mask: np.ndarray,
    penalty: np.ndarray | None = None,
    distinct: bool = True,
    first: int | None = None,
) -> tuple[int, int]:
    """Arms of the two samplers: ``S`` (2, K) utilities of θ¹, θ²; ``penalty`` (K,) = λ·price_norm
    or None; ``distinct``: the second arm is θ²'s best other than the first (when two are offered);
    ``first``: the first arm already chosen (``arm_selection: exploit_first``: the exploit arm)."""
    obj = _objective(S, mask, penalty)
    first = int(obj[0].argmax()) if first is None else int(first)
    return first, int(second_arm(obj[1], first, distinct, int(mask.sum())))


def rank(u: np.ndarray, mask: np.ndarray, penalty: np.ndarray | None = None) -> list[int]:
    """The offered arms (``mask``) from best to worst under utilities ``u`` (K,) (ties: lower index first)."""
    obj = _objective(u, mask, penalty)
    order = np.argsort(-obj, kind="stable")
    return [int(i) for i in order if mask[i]]


def choose_best(u: np.ndarray, mask: np.ndarray, penalty: np.ndarray | None = None) -> int:
    """The exploit arm: ``u`` (K,) utilities under the posterior mean."""
    return int(_objective(u, mask, penalty).argmax())


class SampleMismatch(ValueError):
    """Published samples that do not fit this view's arm table."""


class SampleView:
    """A read-only copy of the posterior's current samples, enough to choose arms.

    The ingress keeps one per replica and replaces the samples whenever the posterior publishes a
    refresh, so a route needs no call to the posterior. ``scorer`` is a policy built with the
    posterior's config and arm embeddings; only its public ``arm_scores(x, theta)`` is used, with
    the published θ, so the scores are the posterior's own to the last bit."""

    def __init__(self, scorer, prices, seed: int | None = None) -> None:
        self.scorer = scorer
        self.rng = np.random.default_rng(seed)  # draws a pool member per duel route
        self.n_arms = int(scorer.n_arms)
        self.distinct = bool(scorer.config.distinct_arms)
        self.exploit_first = getattr(scorer.config, "arm_selection", "thompson") == "exploit_first"
        self.price_norm = normalised_prices(prices)
        self.version = -1
        self.theta: np.ndarray | None = None
        self.theta_mean: np.ndarray | None = None
        self.pool: np.ndarray | None = None  # (M, 2, p) published samples; None: just ``theta`` (M = 1)

    @property
    def ready(self) -> bool:
        return self.theta is not None

    def update(self, version: int, theta: np.ndarray, theta_mean: np.ndarray, pool: np.ndarray | None = None) -> None:
        """New samples: ``theta`` (2, p) of the last refresh, ``theta_mean``, and optionally ``pool``
        (M, 2, p), the last M refreshes' samples (``theta`` among them), which duel routes draw from."""
        want = getattr(self.scorer, "dim", None)
        if want is not None and np.shape(theta)[-1] != want:
            # a posterior of another arm table (arms added: during the rolling update, the old
            # ingress meets the new posterior or the other way round): keep the samples it has
            raise SampleMismatch(
                f"samples of dimension {np.shape(theta)[-1]}; this ingress's arm table needs {want} (an arm table "
                "change is rolling out)"
            )
        pool = None if pool is None or len(pool) <= 1 else np.asarray(pool)
        self.theta, self.theta_mean, self.pool, self.version = (
            np.asarray(theta),
            np.asarray(theta_mean),
            pool,
            int(version),
        )

    def mask_penalty(self, offered, cost_weight: float) -> tuple[np.ndarray, np.ndarray | None]:
        """The offered arms (None: all) as a mask, and λ·price_norm (None at λ = 0)."""
        mask = np.zeros(self.n_arms, dtype=bool)
        if offered is None:
            mask[:] = True
        else:
            mask[list(offered)] = True
        return mask, (float(cost_weight) * self.price_norm if cost_weight else None)

    def choose(self, x: np.ndarray, offered, mode: str, cost_weight: float = 0.0) -> tuple[int, int | None, int]:
        """``(first, second or None, version)`` for context ``x`` among ``offered`` (None = all)."""
        first, second, version, _ = self.choose_with_propensity(x, offered, mode, cost_weight)
        return first, second, version

    def choose_with_propensity(
        self, x: np.ndarray, offered, mode: str, cost_weight: float = 0.0
    ) -> tuple[int, int | None, int, tuple[int, int]]:
        """:meth:`choose` and the propensity of the choice as ``(count, M)``: a duel draws one of the
        pool's M samples uniformly and plays its arms, so the pair it plays had probability
        ``count / M``, ``count`` = how many of the M samples choose that same pair for ``x``. The
        exploit arm (a single route; a duel's first arm under ``exploit_first``) comes from the
        posterior mean, the same for every draw. Without a pool (M = 1) the choice is that of
        ``theta`` and its propensity 1 given the published samples."""
        theta, theta_mean, pool, version = self.theta, self.theta_mean, self.pool, self.version  # one read
        mask, penalty = self.mask_penalty(offered, cost_weight)
        if mode == "single":
            return choose_best(self.scorer.arm_scores(x, theta_mean), mask, penalty), None, version, (1, 1)
        first = choose_best(self.scorer.arm_scores(x, theta_mean), mask, penalty) if self.exploit_first else None
        if pool is None:
            pair = choose_duel(self.scorer.arm_scores(x, theta), mask, penalty, self.distinct, first)
            return pair[0], pair[1], version, (1, 1)
        # every pool sample's pair at once: scores (M, 2, K) in one product, as choose_duel per sample
        obj = _objective(self.scorer.arm_scores(x, pool), mask, penalty)
        M = len(pool)
        firsts = np.full(M, first) if first is not None else obj[:, 0].argmax(axis=-1)
        seconds = second_arm(obj[:, 1], firsts, self.distinct, int(mask.sum()))
        m = int(self.rng.integers(M))
        pick = (int(firsts[m]), int(seconds[m]))
        count = int(((firsts == pick[0]) & (seconds == pick[1])).sum())
        return pick[0], pick[1], version, (count, M)

    def ranked(self, x: np.ndarray, offered, mode: str, cost_weight: float = 0.0, slot: int = 0) -> list[int]:
        """The offered arms from best to worst as slot ``slot`` of a ``mode`` decision ranks them now:
        ``single`` (and a duel's first slot under ``exploit_first``) by the posterior mean, a duel's
        slots otherwise by their own sample θ¹, θ². The order a failed arm's fallback is taken from."""
        theta, theta_mean = self.theta, self.theta_mean
        mask, penalty = self.mask_penalty(offered, cost_weight)
        if mode == "single" or (slot == 0 and self.exploit_first):
            return rank(self.scorer.arm_scores(x, theta_mean), mask, penalty)
        return rank(self.scorer.arm_scores(x, theta)[1 if slot else 0], mask, penalty)
