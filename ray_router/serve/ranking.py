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

``second_arm: rival`` (the policy's :func:`~ray_router.policies.fgts_cdb.rival_arm`): a duel's second
arm is the arm most likely to beat its first arm a¹ (the exploit arm under ``exploit_first``, else the
drawn sample's), from the posterior mean's utilities m and the diagonal Laplace variance v the
posterior publishes with its samples; where the rival's Φ(z) < ``rival_min_prob`` it is θ²'s arm (the
drawn sample's, as ``second_arm: thompson`` picks it). With a cost weight the rival maximises

    z_k = ((m_k − m_a¹) − (pen_k − pen_a¹)/s) / sd_k,    s = max(p_a¹·(1 − p_a¹), 10⁻³),
    pen = λ·price_norm,    sd_k² = Σ_i (φ(x, a_k) − φ(x, a¹))_i²·v_i,

p = ``win_probability`` under the mean: the penalty, in win probability, turned into logits at the
first arm's local slope dp/du = p(1 − p), so the rival is judged on the scale the ranking ranks by. At
λ = 0 this is the policy's z, and the choice is ``select(..., resample=False)``'s to the last bit. A
posterior that publishes no variance (an older one) leaves the second arm θ²'s.
"""

from __future__ import annotations

import numpy as np

from ray_router.policies.common import second_arm, sigmoid
from ray_router.policies.fgts_cdb import rival_arm


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
        self.rival = getattr(scorer.config, "second_arm", "thompson") == "rival"
        self.rival_min_prob = float(getattr(scorer.config, "rival_min_prob", 0.0))
        self.price_norm = normalised_prices(prices)
        self.version = -1
        self.theta: np.ndarray | None = None
        self.theta_mean: np.ndarray | None = None
        self.pool: np.ndarray | None = None  # (M, 2, p) published samples; None: just ``theta`` (M = 1)
        self.variance: np.ndarray | None = None  # (p,) the diagonal Laplace variance (``second_arm: rival``)

    @property
    def ready(self) -> bool:
        return self.theta is not None

    def update(
        self,
        version: int,
        theta: np.ndarray,
        theta_mean: np.ndarray,
        pool: np.ndarray | None = None,
        variance: np.ndarray | None = None,
    ) -> None:
        """New samples: ``theta`` (2, p) of the last refresh, ``theta_mean``, and optionally ``pool``
        (M, 2, p), the last M refreshes' samples (``theta`` among them), which duel routes draw from,
        and ``variance`` (p,), the posterior's diagonal variance at that refresh (``second_arm:
        rival``; None: θ²'s second arm)."""
        want = getattr(self.scorer, "dim", None)
        if want is not None and np.shape(theta)[-1] != want:
            # a posterior of another arm table (arms added: during the rolling update, the old
            # ingress meets the new posterior or the other way round): keep the samples it has
            raise SampleMismatch(
                f"samples of dimension {np.shape(theta)[-1]}; this ingress's arm table needs {want} (an arm table "
                "change is rolling out)"
            )
        pool = None if pool is None or len(pool) <= 1 else np.asarray(pool)
        variance = None if variance is None else np.asarray(variance, dtype=np.float64)
        if variance is not None and variance.shape != np.shape(theta_mean):
            raise SampleMismatch(f"a variance of shape {variance.shape} for samples of shape {np.shape(theta_mean)}")
        self.theta, self.theta_mean, self.pool, self.variance, self.version = (
            np.asarray(theta),
            np.asarray(theta_mean),
            pool,
            variance,
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
        variance = self.variance
        mask, penalty = self.mask_penalty(offered, cost_weight)
        xs = self.scorer.scoring_context(x)  # extended once for every θ below
        u_mean = self.scorer.arm_scores(xs, theta_mean, extended=True)
        if mode == "single":
            return choose_best(u_mean, mask, penalty), None, version, (1, 1)
        first = choose_best(u_mean, mask, penalty) if self.exploit_first else None
        if pool is None:
            pair = choose_duel(self.scorer.arm_scores(xs, theta, extended=True), mask, penalty, self.distinct, first)
            firsts, seconds = np.array([pair[0]]), np.array([pair[1]])
        else:
            # every pool sample's pair at once: scores (M, 2, K) in one product, as choose_duel per sample
            obj = _objective(self.scorer.arm_scores(xs, pool, extended=True), mask, penalty)
            firsts = np.full(len(pool), first) if first is not None else obj[:, 0].argmax(axis=-1)
            seconds = second_arm(obj[:, 1], firsts, self.distinct, int(mask.sum()))
        if self.rival and variance is not None:
            seconds = self._rivals(xs, u_mean, mask, penalty, variance, firsts, seconds)
        M = len(firsts)
        m = int(self.rng.integers(M)) if M > 1 else 0
        pick = (int(firsts[m]), int(seconds[m]))
        count = int(((firsts == pick[0]) & (seconds == pick[1])).sum())
        return pick[0], pick[1], version, (count, M)

    def second_for(self, x: np.ndarray, first: int, mask: np.ndarray, penalty: np.ndarray | None) -> int:
        """The second arm of a duel whose first arm is ``first`` (the shadow judge's duel of a
        single route's arm): θ²'s best offered arm other than it, or under ``second_arm: rival`` the
        rival, θ²'s arm its fallback. ``mask`` must offer ``first`` and one other arm."""
        theta, theta_mean, variance = self.theta, self.theta_mean, self.variance
        xs = self.scorer.scoring_context(x)  # extended once for both θ
        second = choose_duel(self.scorer.arm_scores(xs, theta, extended=True), mask, penalty, True, first)[1]
        if not (self.rival and variance is not None):
            return second
        u_mean = self.scorer.arm_scores(xs, theta_mean, extended=True)
        return int(self._rivals(xs, u_mean, mask, penalty, variance, np.array([first]), np.array([second]))[0])

    def _rivals(
        self,
        xs: np.ndarray,
        u_mean: np.ndarray,
        mask: np.ndarray,
        penalty: np.ndarray | None,
        variance: np.ndarray,
        firsts: np.ndarray,
        fallback: np.ndarray,
    ) -> np.ndarray:
        """``second_arm: rival``: each sample's second arm given its first (``firsts`` (M,)) and θ²'s
        arm (``fallback`` (M,)), by the policy's ``rival_arm`` on the shapes ``FGTSCDB.select`` uses
        (so λ = 0 is its choice to the last bit); one rival per distinct first arm (the rival depends
        on the first arm and the mean only, the fallback on each sample). ``xs``: the query as the
        scorer's ``scoring_context`` extends it."""
        K = self.n_arms
        xe = np.asarray(xs, dtype=np.float64).reshape(1, -1)  # (1, d_ext)
        m = np.where(mask, u_mean, -np.inf)
        p = win_probability(u_mean, mask)
        out = np.array(fallback, copy=True)
        for f in np.unique(firsts):
            rows = firsts == f
            sq = self.scorer.fmap.pair_features(xe, np.arange(K), np.full(K, f)) ** 2
            mf = m
            if penalty is not None:  # the penalty in logits at the first arm's slope (module docstring)
                mf = m - penalty / max(float(p[f] * (1.0 - p[f])), 1e-3)
            out[rows] = rival_arm(mf, sq, variance, np.array(f), fallback[rows], self.rival_min_prob)
        return out

    def ranked(self, x: np.ndarray, offered, mode: str, cost_weight: float = 0.0, slot: int = 0) -> list[int]:
        """The offered arms from best to worst as slot ``slot`` of a ``mode`` decision ranks them now:
        ``single`` (and a duel's first slot under ``exploit_first``) by the posterior mean, a duel's
        slots otherwise by their own sample θ¹, θ². The order a failed arm's fallback is taken from.
        Under ``second_arm: rival`` the second slot too keeps θ²'s order: the rival is one arm (the
        likeliest to beat the first), not an order, and its replacement is the arm θ² prefers, as the
        rival rule itself falls back to θ²'s arm."""
        theta, theta_mean = self.theta, self.theta_mean
        mask, penalty = self.mask_penalty(offered, cost_weight)
        if mode == "single" or (slot == 0 and self.exploit_first):
            return rank(self.scorer.arm_scores(x, theta_mean), mask, penalty)
        return rank(self.scorer.arm_scores(x, theta)[1 if slot else 0], mask, penalty)
