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
SGLD with a fixed diagonal preconditioner P = diag(H)⁻¹, H = η·Σ_s ¼·Δ_s² + 1/σ0² (¼ bounds σ'(z);
Δ_s = φ(x_s,a¹_s) − φ(x_s,a²_s)), recomputed per refresh: θ ← θ − δ·P·∇U + sqrt(2δ·P)·ξ. A constant
positive-definite P leaves the stationary distribution unchanged, so this samples the same
posterior; ``preconditioner="none"`` gives plain SGLD with P = I.

Shapes of lanes (:class:`FGTSCDBLanes`): G lane groups, W members per group, C chains, p features.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Annotated, Any, Literal, get_args, overload

import numpy as np
from pydantic import Field

from ray_router.config import config_dataclass, parse
from ray_router.errors import ConfigError
from ray_router.policies.base import Duel, PolicyEnv, register_lanes, register_policy
from ray_router.policies.common import (
    Finite,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveFinite,
    PositiveInt,
    check_context,
    check_feedback,
    log_sigmoid,
    offered_mask,
    rng_from_state,
    rng_state,
    second_arm,
    sigmoid,
)
from ray_router.policies.features import FeatureMap, FeatureMapName, OfflineAugmented, make_feature_map
from ray_router.policies.offline_prior import OfflinePrior, fit_offline_prior
from ray_router.policies.snapshot import PolicySnapshot, check_header

# The choices of FGTSConfig's choice fields (the types are what the config validates against).
StepDecay = Literal["constant", "sqrt"]
Preconditioner = Literal["none", "diag_fisher"]
ComputeDtype = Literal["float32", "float64"]
OfflinePriorKind = Literal["none", "category"]
FeelGoodSchedule = Literal["constant", "inv_sqrt"]
ArmSelection = Literal["thompson", "exploit_first"]
ShrinkageStderr = Literal["conditional", "marginal"]
SecondArm = Literal["thompson", "rival"]
PRECONDITIONERS: tuple[str, ...] = get_args(Preconditioner)
OFFLINE_PRIORS: tuple[str, ...] = get_args(OfflinePriorKind)
FEEL_GOOD_SCHEDULES: tuple[str, ...] = get_args(FeelGoodSchedule)
ARM_SELECTIONS: tuple[str, ...] = get_args(ArmSelection)


@config_dataclass
class FGTSConfig:
    """Hyperparameters of FGTS.CDB (frozen, validated once). Field names are the sweep keys."""

    eta: NonNegative = 1.0  # weight of the logistic loss (FGTS.CDB theory: 0.25)
    mu: NonNegative = 0.01  # weight of the feel-good term (theory: 1/(10 e^B sqrt(T)) ≈ 0)
    feel_good_clip: Positive = 1.0  # b, clip of the feel-good term (**our choice**); inf = unclipped
    prior_sigma: PositiveFinite = 1.0  # σ0 of the Gaussian prior N(0, σ0² I) (**our choice**)
    n_steps: PositiveInt = 20  # SGLD steps per sampler per refresh
    batch_size: PositiveInt = 256  # exact gradient up to this history size, minibatch after
    step_size: PositiveFinite = 0.1  # δ0 (relative to the curvature when preconditioned)
    step_decay: StepDecay = "constant"  # "constant": δ = δ0; "sqrt": δ = δ0 / sqrt(max(1, n_seen))
    preconditioner: Preconditioner = "diag_fisher"  # "none" or "diag_fisher" (**our choice**, see SGLD notes)
    langevin_noise: NonNegative = 1.0  # scale of the sqrt(2δ)ξ term; 0 turns SGLD into gradient descent
    feature_map: FeatureMapName = "hadamard"  # the offline correction block is the per-arm term (notes)
    distinct_arms: bool = False  # True: the second arm is θ²'s best arm other than the first
    exploit_ema: Annotated[float, Field(gt=0, le=1)] = 0.1  # weight of each refresh in the running mean used by best()
    max_history: NonNegativeInt = 0  # 0 keeps every duel; N keeps the most recent N (bounded memory for serving)
    compute_dtype: ComputeDtype = "float32"  # dtype of the SGLD matrix products; θ itself is always float64
    embedding_scale: PositiveFinite | None = 1.0  # a_k is multiplied by this in φ; None = sqrt(d) (see notes)
    # --- offline-informed extension (ALGORITHM.md s.5, **our extension**; "none" = the paper's prior)
    offline_prior: OfflinePriorKind = (
        "category"  # "none": N(0, σ0² I); "category": prior feature û_k(x) and correction block
    )
    prior_weight: Finite | None = None  # prior mean w0 of û's coefficient (logit scale); None = fitted slope
    prior_weight_sigma: PositiveFinite = 1.0  # prior sd of û's coefficient
    pi_temperature: PositiveFinite | None = (
        None  # τ of π(x) = softmax(τ·cos(x, ξ_m)); None = fitted on the offline rows
    )
    correction: bool = True  # the π(x) ⊗ e_k block (a per-arm term per category)
    arm_bias: bool = (
        True  # a per-arm term shared by the categories, prior sd = correction_scale · max(w0, floor) · se(Ū_·k)
    )
    correction_scale: PositiveFinite = (
        1.0  # its prior sd = correction_scale · max(w0, correction_slope_floor) · se(Ū_mk)
    )
    # the logit slope the correction and arm-bias sds use is at least this (0.1: the slope fitted on five
    # rows per category can come out near 0 and freeze those blocks; 0/1 scores give a slope ≈ 2)
    correction_slope_floor: PositiveFinite = 0.1
    shrinkage_tau_floor: NonNegative = 0.0  # smallest between-category sd τ_k the offline shrinkage assumes
    shrinkage_stderr: ShrinkageStderr = "conditional"  # shrunk cells' se: "conditional" sqrt(1−B)·se;
    #   "marginal" adds the pooled mean's uncertainty B²·se_pooled² (a fully shrunk cell is not certain)
    query_rank: Annotated[int, Field(ge=0, le=256)] = (
        0  # r > 0 adds a per-arm linear block on the query's top-r offline principal coordinates
    )
    query_prior_sigma: PositiveFinite = 0.1  # prior sd of that block
    feel_good_schedule: FeelGoodSchedule = "inv_sqrt"  # "constant": μ per duel; "inv_sqrt": μ/sqrt(n) per duel
    arm_selection: ArmSelection = "exploit_first"  # "thompson": both arms Thompson draws (the paper); "exploit_first":
    #   a¹ = the posterior-mean best arm (what a user is served), a² = θ²'s best arm
    second_arm: SecondArm = "thompson"  # "thompson": a² = θ²'s best arm; "rival": the arm most likely to beat a¹
    #   on this query under the diagonal Laplace posterior (Serve's ranking too: serve/ranking.py)
    rival_min_prob: Annotated[float, Field(ge=0, lt=1)] = 0.0  # "rival" duels the rival only when its
    #   P(beats a¹) ≥ this; otherwise a² = θ²'s best arm (a tight posterior then self-duels at no cost)
    thin_offline_rows: NonNegativeInt = 30  # offline data this thin (median rows per category below it):
    #   the ``thin`` preset's fields replace the ones above (resolve_config); 0 = the fields as given


# Named configurations. ``paper``: the routing paper's FGTS.CDB as ALGORITHM.md s.2 fixes it, with
# the per-arm term of ``hadamard_bias`` (plain ``hadamard`` cannot express that one arm is better,
# docs/ALGORITHM_NOTES.md): zero-mean prior, no offline feature, both arms Thompson draws, μ per duel.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        offline_prior="none",
        arm_selection="thompson",
        feel_good_schedule="constant",
        feature_map="hadamard_bias",
        distinct_arms=False,
        query_rank=0,
    ),
    # ``thin``: for an offline split of a few rows per category (docs/ALGORITHM_NOTES.md, issue 10's thin
    # regime): the per-arm blocks keep a logit-scale prior sd, fully shrunk cells stay uncertain, and the
    # second arm is the served arm's likeliest rival whenever it beats a¹ with probability >= 2%. The
    # defaults take these fields when the offline data are thin (``thin_offline_rows``); with a 20%
    # offline split they gain nothing and are not used.
    "thin": dict(
        correction_slope_floor=2.0,
        shrinkage_stderr="marginal",
        second_arm="rival",
        rival_min_prob=0.02,
    ),
}


def offline_rows_per_category(offline: Mapping[str, Any] | None) -> float | None:
    """Median offline rows per category behind the offline prior: of the offline rows'
    ``categories``, or of a given prior's ``counts``; None when ``offline`` has neither."""
    if not offline:
        return None
    given = offline.get("prior")
    if given is not None:
        counts = np.asarray(given.counts if isinstance(given, OfflinePrior) else given["counts"], dtype=np.float64)
    elif offline.get("categories") is not None:
        counts = np.unique(np.asarray([str(c) for c in offline["categories"]]), return_counts=True)[1].astype(float)
    else:
        return None
    return float(np.median(counts)) if len(counts) else None


def resolve_config(config: FGTSConfig, offline: Mapping[str, Any] | None) -> FGTSConfig:
    """The configuration a policy runs: ``config``, or the ``thin`` preset's fields over it when the
    offline data behind the prior are thin (median rows per category < ``thin_offline_rows``; five
    per category is issue 10's thin regime, a 20% split of RouterBench about 210). Idempotent."""
    if config.offline_prior == "none" or not config.thin_offline_rows:
        return config
    rows = offline_rows_per_category(offline)
    if rows is None or rows >= config.thin_offline_rows:
        return config
    thin = PRESETS["thin"]
    if all(getattr(config, k) == v for k, v in thin.items()):
        return config
    return parse(FGTSConfig, {**dataclasses.asdict(config), **thin}, where="FGTS.CDB thin offline data")


def preset(name: str, **overrides: Any) -> FGTSConfig:
    """``FGTSConfig`` of the named preset (:data:`PRESETS`) with ``overrides`` (ConfigError on a bad one)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown FGTS.CDB preset {name!r}; presets: {sorted(PRESETS)}")
    return parse(FGTSConfig, {**PRESETS[name], **overrides}, where=f"FGTS.CDB preset {name!r}")


def lanes_potential_grad(
    fmap: FeatureMap,
    c: FGTSConfig,
    theta: np.ndarray,
    X: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray | None,
    scale: float = 1.0,
    prior: Prior | None = None,
    mu: float | None = None,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """∇U_j for independent lanes, each over its own batch of duels.

    ``theta`` (G, [W,] C, p): G lane groups, optionally W members per group, C chains; X (G, B, d):
    one batch of contexts per group, shared by its members; first/second/y (G, [W,] B) and mask
    (G, [W,] B, K) of the offered arms, or None when every arm was offered. ``scale`` = n / B (a
    scalar: every lane has seen as many duels). Chain c is sampler ``j = 1 + (c % 2)``: even chains
    compare the best offered arm with the *second* played arm, odd chains with the first.
    ``prior``: the Gaussian prior's (mean, precision), each broadcastable to ``theta`` (None = N(0, σ0² I));
    ``mu``: the feel-good weight per duel (None = ``c.mu``; the ``inv_sqrt`` schedule passes μ/√n).
    ``weight``: each duel's weight, shaped like ``y`` (None = 1 for every duel): a duel of weight w
    adds w times its loss and feel-good terms to U_j (w = 0: as if absent; w = 2: as if seen twice).
    """
    mu = c.mu if mu is None else mu
    lead, C = theta.shape[:-2], theta.shape[-2]
    B, K = y.shape[-1], fmap.n_arms
    S = fmap.scores(theta.astype(fmap.A.dtype, copy=False), X)  # (*lead, C, B, K)
    base = (np.arange(math.prod(lead) * C).reshape((*lead, C, 1)) * B + np.arange(B)) * K  # flat (lane, chain, row)
    Sf = S.reshape(-1)
    i1, i2 = base + first[..., None, :], base + second[..., None, :]
    g = c.eta * (sigmoid(Sf[i1] - Sf[i2]) - y[..., None, :])  # dℓ/dz, (*lead, C, B)
    if weight is not None:
        g = g * weight[..., None, :]
    idx, w = [i1, i2], [g, -g]
    if mu > 0:
        io = np.where((np.arange(C) % 2 == 0)[:, None], i2, i1)  # the other sampler's arm
        istar = base + (S if mask is None else np.where(mask[..., None, :, :], S, -np.inf)).argmax(axis=-1)
        active = (Sf[istar] - Sf[io] < c.feel_good_clip) * mu
        if weight is not None:
            active = active * weight[..., None, :]
        idx += [istar, io]
        w += [-active, active]
    # dU/dS: each duel's loss and feel-good weights summed onto the (lane, chain, row, arm) they touch
    arm_weights = np.bincount(np.concatenate(idx, axis=None), np.concatenate(w, axis=None), minlength=S.size)
    arm_weights = arm_weights.reshape(S.shape).astype(fmap.A.dtype, copy=False)
    return scale * fmap.weighted_grad(arm_weights, X) + prior_grad(c, theta, prior)


Prior = tuple[np.ndarray, np.ndarray]  # (mean, precision) of the Gaussian prior, arrays broadcastable to θ
# (X, first, second, y, mask or None) of :func:`sgld_lanes`
LaneHistory = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


def prior_grad(c: FGTSConfig, theta: np.ndarray, prior: Prior | None) -> np.ndarray:
    """∇ of −log p0(θ): θ/σ0² for the paper's N(0, σ0² I), else (θ − m)·precision."""
    if prior is None:
        return theta / c.prior_sigma**2
    mean, prec = prior
    return (theta - mean) * prec


def rival_arm(
    mean_scores: np.ndarray,
    pair_sq: np.ndarray,
    var: np.ndarray,
    first: np.ndarray,
    fallback: np.ndarray | None = None,
    min_prob: float = 0.0,
) -> np.ndarray:
    """The arm most likely to beat ``first`` (``second_arm="rival"``): argmax over k ≠ first of
    z_k = (m_k − m_first) / sqrt(Σ_i Δ_ki²·v_i), the Gaussian approximation of P(s_k(x) > s_first(x))
    under the posterior mean m and the diagonal Laplace variance v = 1/(η·Σ_s ¼·Δ_s² + prior precision).

    ``mean_scores`` (..., K) (−inf on arms not offered), ``pair_sq`` (..., K, p) the squared
    φ(x, a_k) − φ(x, a_first), ``var`` (..., p), ``first`` (...). With one arm offered, returns it.
    ``fallback`` (...) is returned where the rival's Φ(z) is below ``min_prob`` (``rival_min_prob``)."""
    sd = np.sqrt(np.maximum((pair_sq * var[..., None, :]).sum(axis=-1), 1e-24))
    z = (mean_scores - np.take_along_axis(mean_scores, first[..., None], axis=-1)) / sd
    z = np.where(np.isfinite(mean_scores), z, -np.inf)
    np.put_along_axis(z, first[..., None], -np.inf, axis=-1)
    out = z.argmax(axis=-1)
    zmax = np.take_along_axis(z, out[..., None], axis=-1)[..., 0]
    out = np.where(np.isfinite(zmax), out, first)
    if fallback is not None and min_prob > 0:
        out = np.where(zmax >= NormalDist().inv_cdf(min_prob), out, fallback)
    return out


def feel_good_weight(c: FGTSConfig, n: int) -> float:
    """μ per duel at history size n: constant, or μ/√n (``feel_good_schedule="inv_sqrt"``)."""
    return c.mu / math.sqrt(max(1, n)) if c.feel_good_schedule == "inv_sqrt" else c.mu


def sgld_lanes(
    fmap: FeatureMap,
    c: FGTSConfig,
    theta: np.ndarray,
    history: LaneHistory,
    n: int,
    delta: float,
    precond: np.ndarray,
    rngs: Sequence[np.random.Generator],
    n_steps: int,
    prior: Prior | None = None,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """Advance every lane's chains ``n_steps`` SGLD steps; returns the new θ, shaped like ``theta``.

    ``theta`` (G, [W,] C, p) as in :func:`lanes_potential_grad`; ``history`` = (X (G, ≥n, d),
    first, second, y (G, [W,] ≥n), mask (G, [W,] ≥n, K) or None when every duel offered every arm):
    the first ``n`` duels of each lane, the contexts shared by a group's members. ``precond`` (G, [W,] p)
    is each lane's preconditioner P, ``delta`` the step size, ``rngs[g]`` group g's generator. While
    n ≤ ``batch_size`` the gradient is exact; beyond that each step uses one minibatch per group
    (uniform, with replacement, shared by its members and chains) rescaled by n/B. A group draws all
    of a refresh's minibatch rows, then all its noise, so each member's chains are exactly those of
    a lone :class:`FGTSCDB` seeded like the group's generator. ``prior``: (mean, precision) shaped
    (G, [W,] 1, p), or None for the paper's N(0, σ0² I). ``weight``: each duel's weight, shaped like
    ``y`` (None: every duel weighs 1; see :func:`lanes_potential_grad`).
    """
    X, first, second, y, mask = history
    if mask is not None and mask[..., :n, :].all():
        mask = None  # every arm offered in every duel: skip the masked argmax
    if weight is not None and (weight[..., :n] == 1.0).all():
        weight = None  # every duel weighs 1: the unweighted gradient
    n_groups, (C, p), B = theta.shape[0], theta.shape[-2:], c.batch_size
    step = delta * precond[..., None, :]  # (G, [W,] 1, p)
    noise_sd = np.sqrt(2.0 * step) * c.langevin_noise
    members = (1,) * (theta.ndim - 3)  # the member axis of the noise, broadcast over a group
    minibatch = n > B
    if minibatch:
        cap = X.shape[1]
        rows = np.stack([r.integers(0, n, size=(n_steps, B)) for r in rngs])  # (G, steps, B)
        Xf = X.reshape(n_groups * cap, -1)
        flat = rows + (np.arange(n_groups) * cap)[:, None, None]  # row in Xf
        # every step's duels at once (small arrays), each step's contexts when it needs them (large)
        i = rows.reshape((n_groups, *members, n_steps * B))
        first, second, y = (np.take_along_axis(a, i, -1) for a in (first, second, y))
        if weight is not None:
            weight = np.take_along_axis(weight, i, -1)
        if mask is not None:
            mask = np.take_along_axis(mask, i[..., None], -2)
    xi = None
    if c.langevin_noise:
        xi = np.stack([r.standard_normal((n_steps, C, p)) for r in rngs]).reshape((n_groups, *members, n_steps, C, p))
    start = theta
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging chain is handled below
        theta = _sgld_steps(
            fmap,
            c,
            theta,
            X,
            first,
            second,
            y,
            mask,
            n,
            n_steps,
            step,
            noise_sd,
            xi,
            Xf if minibatch else None,
            flat if minibatch else None,
            prior,
            weight,
        )
    bad = ~np.isfinite(theta).all(axis=-1, keepdims=True)
    if bad.any():
        # A chain that diverged (step size too large for this history) keeps its previous sample:
        # the refresh is rejected for it rather than poisoning every later choice with NaN. No
        # random draw, so a group's generator stays in step with its members' lone twins.
        theta = np.where(bad, start, theta)
    return theta


def _sgld_steps(fmap, c, theta, X, first, second, y, mask, n, n_steps, step, noise_sd, xi, Xf, flat, prior, weight):
    """The SGLD loop of :func:`sgld_lanes`; ``Xf``/``flat`` (flat contexts, rows per step) or None
    for the exact gradient; ``weight`` per duel or None."""
    B = c.batch_size
    mu = feel_good_weight(c, n)
    for t in range(n_steps):
        if n == 0:
            grad = prior_grad(c, theta, prior)
        elif Xf is None:
            grad = lanes_potential_grad(
                fmap,
                c,
                theta,
                X[:, :n],
                first[..., :n],
                second[..., :n],
                y[..., :n],
                None if mask is None else mask[..., :n, :],
                prior=prior,
                mu=mu,
                weight=None if weight is None else weight[..., :n],
            )
        else:
            b = slice(t * B, (t + 1) * B)
            grad = lanes_potential_grad(
                fmap,
                c,
                theta,
                np.take(Xf, flat[:, t], axis=0),
                first[..., b],
                second[..., b],
                y[..., b],
                None if mask is None else mask[..., b, :],
                n / B,
                prior=prior,
                mu=mu,
                weight=None if weight is None else weight[..., b],
            )
        theta = theta - step * grad
        if xi is not None:
            theta = theta + noise_sd * xi[..., t, :, :]
    return theta


_HISTORY_FIELDS = ("X", "first", "second", "y", "mask", "w")


class DuelHistory:
    """Growing (optionally bounded) buffer of duels: contexts, arms, outcomes, offered masks and
    weights (``w``: 1 for a plain duel; e.g. a judge's verdict may weigh less than a human's)."""

    def __init__(self, dim: int, n_arms: int, max_len: int = 0, capacity: int = 256, dtype=np.float64):
        self.dim, self.n_arms, self.max_len, self.dtype = dim, n_arms, max_len, np.dtype(dtype)
        self.n = 0
        # A bounded history (serving) reserves all of its memory now, pages touched: the process's
        # footprint is its steady state from the start, not after max_len duels (a soak, or an
        # operator sizing a pod, sees the real number at once). An unbounded one grows by doubling.
        self._allocate(max(1, max_len or capacity), touch=bool(max_len))

    def _allocate(self, cap: int, touch: bool = False) -> None:
        make = np.zeros if touch else np.empty
        self.X = make((cap, self.dim), dtype=self.dtype)
        self.first = make(cap, dtype=np.int64)
        self.second = make(cap, dtype=np.int64)
        self.y = make(cap)
        self.mask = make((cap, self.n_arms), dtype=bool)
        self.w = make(cap)
        if touch:  # np.zeros maps lazily zeroed pages: write them so they are resident now
            for arr in (self.X, self.first, self.second, self.y, self.mask, self.w):
                arr.fill(0)

    def append(self, x: np.ndarray, first: int, second: int, y: float, mask: np.ndarray, weight: float = 1.0) -> None:
        if self.max_len and self.n == self.max_len:
            self._drop_oldest(max(1, self.max_len // 4))
        if self.n == len(self.y):
            self._grow(2 * len(self.y))
        i = self.n
        self.X[i], self.first[i], self.second[i], self.y[i], self.mask[i] = x, first, second, y, mask
        self.w[i] = weight
        self.n += 1

    @property
    def weighted(self) -> bool:
        """Whether any duel held weighs other than 1."""
        return bool((self.w[: self.n] != 1.0).any())

    def _grow(self, cap: int) -> None:
        for name in _HISTORY_FIELDS:
            old = getattr(self, name)
            new = np.empty((cap, *old.shape[1:]), dtype=old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def _drop_oldest(self, k: int) -> None:
        for name in _HISTORY_FIELDS:
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
            "w": self.w[: self.n].copy(),
        }

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the contents by ``arrays`` (as :meth:`arrays` returns them). A bounded history
        keeps its reserved buffer and, when given more than ``max_len`` duels (a snapshot taken
        under a larger bound), the most recent ``max_len``. Arrays without ``w`` (snapshots of
        earlier versions) load with every duel weighing 1."""
        n = len(arrays["y"])
        X = np.asarray(arrays["X"], dtype=self.dtype).reshape(n, self.dim)
        mask = np.asarray(arrays["mask"], dtype=bool).reshape(n, self.n_arms)
        keep = slice(max(0, n - self.max_len), n) if self.max_len else slice(0, n)
        n = keep.stop - keep.start
        if not self.max_len:
            self._allocate(max(16, n))
        for name, src in (
            ("X", X),
            ("first", arrays["first"]),
            ("second", arrays["second"]),
            ("y", arrays["y"]),
            ("mask", mask),
            ("w", arrays["w"] if "w" in arrays else np.ones(len(arrays["y"]))),
        ):
            getattr(self, name)[:n] = np.asarray(src)[keep]
        self.n = n


def resolve_prior(config: FGTSConfig, offline: Mapping[str, Any] | None) -> tuple[OfflinePrior | None, str]:
    """The offline prior a configuration asks for, from ``PolicyEnv.offline``, and a one-line note.

    ``offline`` may carry a fitted ``"prior"`` (an :class:`OfflinePrior` or its dict, e.g. an
    operator's per-category profile) or the offline rows (``X``, ``utilities``, ``categories``), from
    which one is fitted. Without either, the extension is off and the note says why."""
    if config.offline_prior == "none":
        return None, "offline prior: none (the paper's N(0, σ0² I))"
    thin = resolve_config(config, offline)
    thin_note = "" if thin is config else f"; thin offline data (preset thin's fields: {sorted(PRESETS['thin'])})"
    config = thin
    offline = offline or {}
    given = offline.get("prior")
    if given is not None:
        prior = given if isinstance(given, OfflinePrior) else OfflinePrior.from_dict(given)
        return prior, f"offline prior: given ({prior.n_categories} categories){thin_note}"
    if not all(k in offline for k in ("X", "utilities", "categories")):
        return None, "offline prior: OFF, no offline rows or profile were given (the paper's prior is used)"
    prior = fit_offline_prior(
        offline["X"],
        offline["utilities"],
        offline["categories"],
        temperature=config.pi_temperature,
        rank=config.query_rank,
        tau_floor=config.shrinkage_tau_floor,
        marginal_stderr=config.shrinkage_stderr == "marginal",
    )
    return prior, (
        f"offline prior: fitted on {len(offline['X'])} offline rows, {prior.n_categories} categories, "
        f"τ = {prior.temperature:.3g}, slope w0 = {prior.slope:.3g}{thin_note}"
    )


def build_feature_map(config: FGTSConfig, A: np.ndarray, n_categories: int | None = None, rank: int = 0) -> FeatureMap:
    """φ of ``config`` over arm embeddings A ((K, d) or lanes'), extended by the offline blocks when
    ``n_categories`` is given (:class:`~ray_router.policies.features.OfflineAugmented`)."""
    scale = config.embedding_scale or math.sqrt(A.shape[-1])
    base = make_feature_map(config.feature_map, A * scale, config.compute_dtype)
    if n_categories is None:
        return base
    return OfflineAugmented(base, n_categories, rank, config.correction, config.arm_bias)


@overload
def prior_moments(config: FGTSConfig, fmap: FeatureMap, prior: OfflinePrior) -> Prior: ...
@overload
def prior_moments(config: FGTSConfig, fmap: FeatureMap, prior: None) -> None: ...
@overload
def prior_moments(config: FGTSConfig, fmap: FeatureMap, prior: OfflinePrior | None) -> Prior | None: ...
def prior_moments(config: FGTSConfig, fmap: FeatureMap, prior: OfflinePrior | None) -> Prior | None:
    """(mean (p,), precision (p,)) of the Gaussian prior over θ; None = the paper's N(0, σ0² I).

    Base coordinates keep N(0, σ0²); û's coefficient w ~ N(w0, prior_weight_sigma²); the correction
    (m, k) ~ N(0, (correction_scale·w0·se_mk)²), tight where Ū_mk rests on many offline rows; the
    query block ~ N(0, query_prior_sigma²)."""
    if prior is None:
        return None
    assert isinstance(fmap, OfflineAugmented)
    c = config
    p = fmap.dim
    mean = np.zeros(p)
    sd = np.full(p, c.prior_sigma)
    w0 = prior.slope if c.prior_weight is None else float(c.prior_weight)
    mean[fmap.i_w] = w0
    sd[fmap.i_w] = c.prior_weight_sigma
    scale = c.correction_scale * max(abs(w0), c.correction_slope_floor)
    if fmap.arm_bias:
        arm_se = prior.arm_stderr if prior.arm_stderr is not None else prior.stderr.mean(axis=0)
        sd[fmap.i_b : fmap.i_c] = np.maximum(scale * arm_se, 1e-3)
    if fmap.correction:
        sd[fmap.i_c : fmap.i_q] = np.maximum(scale * prior.stderr, 1e-3).reshape(-1)
    if fmap.r:
        sd[fmap.i_q :] = c.query_prior_sigma
    return mean, 1.0 / sd**2


def extend_contexts(prior: OfflinePrior | None, X: np.ndarray) -> np.ndarray:
    """Rows of X (n, d) extended to [x | û(x) | π(x) | z(x)] (the offline blocks' contexts)."""
    if prior is None:
        return X
    pi = prior.assignment(X)
    return np.concatenate([X, pi @ prior.utility, pi, prior.projection(X)], axis=1)


class FGTSSnapshot(PolicySnapshot):
    """What :meth:`FGTSCDB.snapshot` holds (Serve persists it through ``policies/snapshot.py``)."""

    config: dict[str, Any]  # the FGTSConfig's fields
    arm_embeddings: np.ndarray  # (K, d)
    history: dict[str, np.ndarray]  # DuelHistory.arrays(): X, first, second, y, mask, w (absent before weights)
    theta: np.ndarray  # (2, p) the two chains
    theta_mean: np.ndarray  # (p,) the running mean best() plays
    counters: dict[str, int]  # n_updates, n_refreshes, refreshed_at
    rng: dict[str, Any]  # the generator's bit-generator state
    offline_prior: dict[str, Any] | None  # OfflinePrior.to_dict(), or None under the paper's prior
    prior_note: str


class FGTSCDB:
    """FGTS.CDB with two SGLD chains (one per sampler). See the module docstring for the maths.

    ``offline``: ``PolicyEnv.offline`` (offline rows or a fitted prior) for the offline-informed
    extension (``config.offline_prior``); ignored under the paper's prior."""

    name = "fgts_cdb"

    def __init__(
        self, config: FGTSConfig, arm_embeddings: np.ndarray, seed: int = 0, offline: Mapping[str, Any] | None = None
    ):
        self.config = resolve_config(config, offline)  # thin offline data: the thin preset's fields
        self.arm_embeddings = np.array(arm_embeddings, dtype=np.float64)
        self.prior, self.prior_note = resolve_prior(config, offline)  # resolves it alike, and says so
        self._setup()
        self.rng = np.random.default_rng(seed)
        self.history = DuelHistory(self.fmap.context_dim, self.n_arms, config.max_history, dtype=config.compute_dtype)
        if self.moments is None:
            self.theta = self.rng.normal(0.0, config.prior_sigma, size=(2, self.dim))
            self.theta_mean = np.zeros(self.dim)
        else:
            mean, prec = self.moments
            self.theta = mean + self.rng.standard_normal((2, self.dim)) / np.sqrt(prec)
            self.theta_mean = mean.copy()
        self._delta_sq = np.zeros(self.dim)  # Σ_s w_s·Δ_s² over the history, for the preconditioner
        self.n_updates = 0  # duels learned from (also counts ones dropped from a bounded history)
        self.n_refreshes = 0
        self.refreshed_at = 0  # n_updates at the last refresh
        self.sgld_seconds = 0.0  # time spent in SGLD (for benchmarks)

    def _setup(self) -> None:
        A = self.arm_embeddings
        if A.ndim != 2:
            raise ConfigError(f"arm embeddings must be a (K, d) array, got shape {A.shape}")
        pr = self.prior
        if pr is not None and (pr.n_arms != A.shape[0] or pr.dim != A.shape[1]):
            raise ConfigError(f"offline prior is over {pr.n_arms} arms in dim {pr.dim}; arm embeddings are {A.shape}")
        self.fmap: FeatureMap = build_feature_map(
            self.config, A, None if pr is None else pr.n_categories, 0 if pr is None else pr.rank
        )
        self.n_arms, self.dim = self.fmap.n_arms, self.fmap.dim
        self.x_dim = int(A.shape[1])
        self.moments = prior_moments(self.config, self.fmap, pr)

    def _prior_lanes(self) -> Prior | None:
        return None if self.moments is None else (self.moments[0][None, None], self.moments[1][None, None])

    # ------------------------------------------------------------------ maths
    def step_size(self) -> float:
        c = self.config
        if c.step_decay == "sqrt":
            return c.step_size / math.sqrt(max(1, self.history.n))
        return c.step_size

    def preconditioner(self) -> np.ndarray:
        """P (p,): diag(H)⁻¹ with H = η·Σ_s ¼·w_s·Δ_s² + 1/σ0², or ones (see the module docstring)."""
        c = self.config
        if c.preconditioner == "none":
            return np.ones(self.dim)
        return self.posterior_variance()

    def posterior_variance(self) -> np.ndarray:
        """(p,) the diagonal Laplace variance 1/(η·Σ_s ¼·w_s·Δ_s² + prior precision) (¼ bounds σ')."""
        prec = 1.0 / self.config.prior_sigma**2 if self.moments is None else self.moments[1]
        return 1.0 / (0.25 * self.config.eta * self._delta_sq + prec)

    def _pair_sq(
        self, X: np.ndarray, first: np.ndarray, second: np.ndarray, weight: np.ndarray | None = None
    ) -> np.ndarray:
        """Σ_s w_s·Δ_s² (p,) for duels (first_s, second_s) on contexts X (n, d), weights w (None: 1)."""
        sq = self.fmap.pair_features(X, first, second) ** 2
        return (sq if weight is None else sq * np.asarray(weight)[:, None]).sum(axis=0)

    def potential_grad(
        self,
        theta: np.ndarray,
        X: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        y: np.ndarray,
        mask: np.ndarray,
        scale: float = 1.0,
        weight: np.ndarray | None = None,
    ) -> np.ndarray:
        """∇U_j for a stack of chains over one batch of duels.

        ``theta`` (C, p); the batch (X (B, d), first/second/y (B,), mask (B, K)) is shared by the
        chains. Chain c is sampler ``j = 1 + (c % 2)``: even chains compare the best offered arm with
        the *second* played arm, odd chains with the first. ``scale`` = n / B rescales a minibatch.
        ``weight`` (B,): each duel's weight (None: 1).
        """
        return lanes_potential_grad(
            self.fmap,
            self.config,
            theta[None],
            X[None],
            first[None],
            second[None],
            y[None],
            mask[None],
            scale,
            prior=self._prior_lanes(),
            mu=feel_good_weight(self.config, self.history.n),
            weight=None if weight is None else np.asarray(weight, dtype=np.float64)[None],
        )[0]

    def potential(self, theta: np.ndarray, X, first, second, y, mask, sampler: int, weight=None) -> float:
        """U_j(θ) for one chain (θ of shape (p,)) over a batch without a chain axis (``weight``
        (B,): each duel's weight, None: 1). For tests."""
        c = self.config
        S = self.fmap.scores(theta, X)
        rows = np.arange(len(y))
        z = S[rows, first] - S[rows, second]
        loss = -(y * log_sigmoid(z) + (1 - y) * log_sigmoid(-z))
        other = second if sampler == 1 else first
        best = np.where(mask, S, -np.inf).max(axis=1)
        fg = np.minimum(c.feel_good_clip, best - S[rows, other])
        if weight is not None:
            w = np.asarray(weight, dtype=np.float64)
            loss, fg = w * loss, w * fg
        if self.moments is None:
            log_prior = theta @ theta / (2 * c.prior_sigma**2)
        else:
            log_prior = float(((theta - self.moments[0]) ** 2 * self.moments[1]).sum() / 2)
        return float(c.eta * loss.sum() - feel_good_weight(c, self.history.n) * fg.sum() + log_prior)

    def refresh(self, n_steps: int | None = None) -> None:
        """Advance both SGLD chains ``n_steps`` from their current state (warm start).

        While the history fits in ``batch_size`` the gradient is exact; beyond that each step draws
        one minibatch (uniform, with replacement, shared by the two chains) and rescales it by n/B.
        """
        t0 = time.perf_counter()
        c, h = self.config, self.history
        n = h.n
        theta = sgld_lanes(
            self.fmap,
            c,
            self.theta[None],
            (h.X[None], h.first[None], h.second[None], h.y[None], h.mask[None]),
            n,
            self.step_size(),
            self.preconditioner()[None],
            [self.rng],
            c.n_steps if n_steps is None else n_steps,
            self._prior_lanes(),
            h.w[None] if h.weighted else None,
        )[0]
        self.theta = theta
        rho = c.exploit_ema
        self.theta_mean = (1 - rho) * self.theta_mean + rho * theta.mean(axis=0)
        self.n_refreshes += 1
        self.refreshed_at = self.n_updates
        self.sgld_seconds += time.perf_counter() - t0

    # --------------------------------------------------------------- protocol
    def scoring_context(self, context: np.ndarray) -> np.ndarray:
        """The query embedding (d,) as the policy scores it: checked, extended by the offline blocks'
        columns when on. Pass it to :meth:`arm_scores` with ``extended=True`` to score several θ for
        one query without extending it each time."""
        x = check_context(context, self.x_dim)
        return extend_contexts(self.prior, x[None])[0]

    def arm_scores(self, context: np.ndarray, theta: np.ndarray | None = None, extended: bool = False) -> np.ndarray:
        """<θ, φ(x, a_k)> for each chain, (2, K), or for a given θ of shape (..., p) -> (..., K).
        ``extended``: ``context`` is already :meth:`scoring_context`'s."""
        x = np.asarray(context, dtype=np.float64) if extended else self.scoring_context(context)
        th = self.theta if theta is None else np.asarray(theta, dtype=np.float64)
        if th.ndim == 2:  # the lanes' code path with one lane, so a lane decides exactly like a policy
            return self.fmap.scores(th[None], x[None, None, :])[0, :, 0, :]
        if th.ndim == 1:  # one θ (the posterior mean): the lanes' path too
            return self.fmap.scores(th[None, None], x[None, None, :])[0, 0, 0, :]
        # a stack of θ (a pool of samples: equal up to rounding to scoring each one)
        return self.fmap.stack_scores(th.reshape(-1, th.shape[-1]), x).reshape(*th.shape[:-1], -1)

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None, resample: bool = True) -> Duel:
        """Draw θ¹, θ² (``resample=False`` reuses the current samples) and play each one's best arm."""
        mask = offered_mask(self.n_arms, arms)
        if resample:
            self.refresh()
        x = self.scoring_context(context)  # extended once for every θ below
        S = np.where(mask, self.arm_scores(x, extended=True), -np.inf)  # (2, K)
        exploit, rival = self.config.arm_selection == "exploit_first", self.config.second_arm == "rival"
        # the posterior mean's scores (what best() ranks by), where the first arm or the rival needs them
        m = np.where(mask, self.arm_scores(x, self.theta_mean, extended=True), -np.inf) if exploit or rival else S[0]
        first = int(m.argmax()) if exploit else int(S[0].argmax())
        if rival:
            K = self.n_arms
            sq = self.fmap.pair_features(x[None], np.arange(K), np.full(K, first)) ** 2
            ts = second_arm(S[1], first, self.config.distinct_arms, int(mask.sum()))
            var = self.posterior_variance()
            return Duel(first, int(rival_arm(m, sq, var, np.array(first), ts, self.config.rival_min_prob)))
        return Duel(first, int(second_arm(S[1], first, self.config.distinct_arms, int(mask.sum()))))

    def update(
        self,
        context: np.ndarray,
        duel: Duel,
        outcome: float,
        arms: Sequence[int] | None = None,
        weight: float = 1.0,
    ) -> None:
        """Record one duel. ``arms`` = the arms offered that round (the feel-good max ranges over them).
        ``weight``: how much this duel counts in the likelihood (and the feel-good term and the
        preconditioner) relative to a plain one: 0 is as if it were absent, 2 as if it were seen twice.
        Counters and schedules (``n_updates``, the history size behind ``step_decay: sqrt`` and
        ``feel_good_schedule: inv_sqrt``) count duels, not weights."""
        x = self.scoring_context(context)
        y = check_feedback(duel, outcome, self.n_arms)
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"a duel's weight must be a finite number >= 0, got {weight!r}")
        n_before = self.history.n
        self.history.append(x, int(duel.first), int(duel.second), y, offered_mask(self.n_arms, arms), w)
        if self.history.n == n_before + 1:
            self._delta_sq += w * self._pair_sq(x[None], np.array([duel.first]), np.array([duel.second]))
        else:  # the bounded history dropped its oldest duels: recount
            self._recount()
        self.n_updates += 1

    def _recount(self) -> None:
        h = self.history
        self._delta_sq = self._pair_sq(h.X[: h.n], h.first[: h.n], h.second[: h.n], h.w[: h.n])

    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int:
        mask = offered_mask(self.n_arms, arms)
        s = np.where(mask, self.arm_scores(context, self.theta_mean), -np.inf)
        return int(s.argmax())

    # ---------------------------------------------------------------- state
    def snapshot(self) -> FGTSSnapshot:
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
            "offline_prior": None if self.prior is None else self.prior.to_dict(),
            "prior_note": self.prior_note,
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        check_header(snapshot, self.name)
        self.config = parse(FGTSConfig, snapshot["config"], where=f"{self.name} snapshot config")
        self.arm_embeddings = np.array(snapshot["arm_embeddings"], dtype=np.float64)
        prior = snapshot.get("offline_prior")
        self.prior = None if prior is None else OfflinePrior.from_dict(prior)
        self.prior_note = str(snapshot.get("prior_note", ""))
        self._setup()
        self.history = DuelHistory(
            self.fmap.context_dim, self.n_arms, self.config.max_history, dtype=self.config.compute_dtype
        )
        self.history.load(snapshot["history"])
        self._recount()
        self.theta = np.array(snapshot["theta"], dtype=np.float64)
        self.theta_mean = np.array(snapshot["theta_mean"], dtype=np.float64)
        counters = snapshot["counters"]
        self.n_updates = int(counters["n_updates"])
        self.n_refreshes = int(counters["n_refreshes"])
        self.refreshed_at = int(counters["refreshed_at"])
        self.rng = rng_from_state(snapshot["rng"])


def _make_fgts(config: FGTSConfig, env: PolicyEnv, seed: int) -> FGTSCDB:
    return FGTSCDB(config, env.require_embeddings("FGTS.CDB"), seed=seed, offline=env.offline)


register_policy(
    "fgts_cdb",
    FGTSConfig,
    description="FGTS.CDB with an SGLD posterior sampler, offline-informed "
    "(ALGORITHM.md s.5; fgts_cdb_paper is the paper's exact configuration)",
)(_make_fgts)
register_policy(
    "fgts_cdb_paper",
    FGTSConfig,
    defaults=PRESETS["paper"],
    description="FGTS.CDB exactly as the paper (preset 'paper': zero-mean prior, both arms Thompson draws)",
)(_make_fgts)


class FGTSCDBLanes:
    """Independent FGTS.CDB policies advanced in lockstep, one array program for all of them.

    Lane l behaves exactly like ``FGTSCDB(config, arm_embeddings[l], seed=seeds[l])`` fed the same
    contexts and outcomes: same initial θ, same minibatches, same noise, and the same GEMM kernels a
    lone policy calls (``tests/test_fgts_lanes.py`` checks the choices match). The replay evaluator
    runs its seeds as lanes: one SGLD step for many seeds costs one pass of Python and numpy dispatch.

    ``group_size`` W > 1 groups consecutive lanes (l = g·W + w) that share a seed and see the same
    context in every round, e.g. one seed's stream under W weightings: their minibatches are then
    the same rows, so a group's products are one GEMM W times wider (``bench/replay_speed.py``).
    Their arm embeddings, choices, outcomes and posteriors stay their own.

    Every lane sees one duel per round, so every history has the same length; lanes offer every arm
    in every round and keep every duel (``max_history`` must be 0).
    """

    name = "fgts_cdb"

    def __init__(
        self,
        config: FGTSConfig,
        arm_embeddings: np.ndarray,
        seeds: Sequence[int],
        group_size: int = 1,
        priors: Sequence[OfflinePrior | None] | None = None,
    ):
        A = np.asarray(arm_embeddings, dtype=np.float64)
        L, W = len(seeds), int(group_size)
        if A.ndim != 3 or A.shape[0] != L or L < 1:
            raise ConfigError(f"lanes need (L, K, d) arm embeddings and L seeds, got {A.shape} and {L}")
        if W < 1 or L % W:
            raise ConfigError(f"group_size {W} must divide the number of lanes {L}")
        groups = np.asarray(seeds, dtype=np.int64).reshape(L // W, W)
        if (groups != groups[:, :1]).any():
            raise ConfigError("the lanes of one group must share their seed")
        if config.max_history:
            raise ConfigError("FGTSCDBLanes keeps every duel: max_history must be 0")
        priors = list(priors) if priors is not None else [None] * L
        if len(priors) != L:
            raise ConfigError(f"lanes need one offline prior (or None) per lane, got {len(priors)} for {L}")
        if any(p is None for p in priors) and any(p is not None for p in priors):
            raise ConfigError("lanes need an offline prior for every lane or for none")
        pr0 = priors[0]
        given = [p for p in priors if p is not None]  # every lane's prior, or none (checked above)
        if pr0 is not None and any((p.n_categories, p.rank) != (pr0.n_categories, pr0.rank) for p in given):
            raise ConfigError("the lanes' offline priors must share their number of categories and rank")
        for g in range(L // W):
            if pr0 is not None and not all(given[g * W].same_as(given[g * W + w]) for w in range(1, W)):
                raise ConfigError("the lanes of one group must share their offline prior")
        self.config = config
        self.n_lanes, self.group_size, self.n_groups = L, W, L // W
        self.priors = priors
        self.fmap: FeatureMap = build_feature_map(
            config,
            A.reshape((self.n_groups, W, *A.shape[1:])),
            None if pr0 is None else pr0.n_categories,
            0 if pr0 is None else pr0.rank,
        )
        self.n_arms, self.dim = self.fmap.n_arms, self.fmap.dim
        self.x_dim = int(A.shape[2])
        self.rngs = [np.random.default_rng(int(g[0])) for g in groups]  # one per group
        self.prior: Prior | None
        if pr0 is None:
            self.prior = None
            theta0 = np.stack([r.normal(0.0, config.prior_sigma, size=(2, self.dim)) for r in self.rngs])
            mean0 = np.zeros((self.n_groups, self.dim))
        else:
            moments = [prior_moments(config, self.fmap, given[g * W]) for g in range(self.n_groups)]
            mean0 = np.stack([m[0] for m in moments])
            prec = np.stack([m[1] for m in moments])
            theta0 = np.stack(
                [m + r.standard_normal((2, self.dim)) / np.sqrt(q)[None] for r, m, q in zip(self.rngs, mean0, prec)]
            )
            # (mean, precision) per lane, shaped (G, W, 1, p) to broadcast over the chains
            self.prior = (np.repeat(mean0[:, None, None], W, axis=1), np.repeat(prec[:, None, None], W, axis=1))
        self.theta = np.repeat(theta0[:, None], W, axis=1)  # (G, W, 2, p)
        self.theta_mean = np.repeat(mean0[:, None], W, axis=1)  # (G, W, p)
        cap, dtype = 256, np.dtype(config.compute_dtype)
        self._X = np.empty((self.n_groups, cap, self.fmap.context_dim), dtype=dtype)  # shared by a group
        self._duels = {
            "first": np.empty((self.n_groups, W, cap), dtype=np.int64),
            "second": np.empty((self.n_groups, W, cap), dtype=np.int64),
            "y": np.empty((self.n_groups, W, cap)),
        }
        self.n = 0
        self._delta_sq = np.zeros((self.n_groups, W, self.dim))
        self.sgld_seconds = 0.0
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (raw X, extended X per group) of this round

    def step_size(self) -> float:
        c = self.config
        return c.step_size / math.sqrt(max(1, self.n)) if c.step_decay == "sqrt" else c.step_size

    def preconditioner(self) -> np.ndarray:
        """(G, W, p), each lane's P (see :meth:`FGTSCDB.preconditioner`)."""
        c = self.config
        if c.preconditioner == "none":
            return np.ones_like(self._delta_sq)
        return self.posterior_variance()

    def posterior_variance(self) -> np.ndarray:
        """(G, W, p), each lane's diagonal Laplace variance (see :meth:`FGTSCDB.posterior_variance`)."""
        c = self.config
        prec = 1.0 / c.prior_sigma**2 if self.prior is None else self.prior[1][:, :, 0]
        return 1.0 / (0.25 * c.eta * self._delta_sq + prec)

    def refresh(self) -> None:
        t0 = time.perf_counter()
        c, h = self.config, self._duels
        self.theta = sgld_lanes(
            self.fmap,
            c,
            self.theta,
            (self._X, h["first"], h["second"], h["y"], None),
            self.n,
            self.step_size(),
            self.preconditioner(),
            self.rngs,
            c.n_steps,
            self.prior,
        )
        rho = c.exploit_ema
        self.theta_mean = (1 - rho) * self.theta_mean + rho * self.theta.mean(axis=2)
        self.sgld_seconds += time.perf_counter() - t0

    def _contexts(self, X: np.ndarray) -> np.ndarray:
        """(L, d) per-lane query embeddings -> (G, d_ext) contexts (extended by each group's offline
        prior), checking that a group's lanes got the same one."""
        X = np.asarray(X, dtype=np.float64)
        if self._last is not None and self._last[0].shape == X.shape and np.array_equal(self._last[0], X):
            return self._last[1]  # select() and update() of one round see the same X
        if X.shape != (self.n_lanes, self.x_dim):
            raise ConfigError(f"contexts must be ({self.n_lanes}, {self.x_dim}), got {X.shape}")
        Xg = X.reshape(self.n_groups, self.group_size, -1)
        if self.group_size > 1 and not (Xg == Xg[:, :1]).all():
            raise ConfigError("the lanes of one group must see the same context in every round")
        Xg = Xg[:, 0]
        if self.prior is not None:
            W = self.group_size
            Xg = np.concatenate([extend_contexts(self.priors[g * W], Xg[g : g + 1]) for g in range(self.n_groups)])
        self._last = (X.copy(), Xg)
        return Xg

    def best(self, X: np.ndarray) -> np.ndarray:
        """Each lane's exploit arm under its posterior-mean estimate: (L,)."""
        Xg = self._contexts(X)
        S = self.fmap.scores(self.theta_mean[:, :, None, :], Xg[:, None, :])[..., 0, 0, :]
        return S.reshape(self.n_lanes, self.n_arms).argmax(axis=1)

    def select(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refresh every lane's two samples and play each one's best arm: (first (L,), second (L,))."""
        Xg = self._contexts(X)
        self.refresh()
        S = self.fmap.scores(self.theta, Xg[:, None, :])[..., 0, :].reshape(self.n_lanes, 2, self.n_arms)
        if self.config.arm_selection == "exploit_first":
            first = self.best(X)
        else:
            first = S[:, 0].argmax(axis=1)
        if self.config.second_arm == "rival":
            G, W, K = self.n_groups, self.group_size, self.n_arms
            m = self.fmap.scores(self.theta_mean[:, :, None, :], Xg[:, None, :])[..., 0, 0, :]  # (G, W, K)
            f = first.reshape(G, W)
            pair = self.fmap.pair_features(
                Xg[:, None, None, :], np.broadcast_to(np.arange(K), (G, W, K)), np.broadcast_to(f[..., None], (G, W, K))
            )
            ts = second_arm(S[:, 1], first, self.config.distinct_arms, self.n_arms).reshape(G, W)
            second = rival_arm(m, pair**2, self.posterior_variance(), f, ts, self.config.rival_min_prob)
            return first, second.reshape(self.n_lanes)
        return first, second_arm(S[:, 1], first, self.config.distinct_arms, self.n_arms)

    def update(self, X: np.ndarray, first: np.ndarray, second: np.ndarray, y: np.ndarray) -> None:
        """Record one duel per lane: lane l played (first[l], second[l]) on X[l] with outcome y[l]."""
        Xg = self._contexts(X)
        shape = (self.n_groups, self.group_size)
        first = np.asarray(first, dtype=np.int64).reshape(shape)
        second = np.asarray(second, dtype=np.int64).reshape(shape)
        y = np.asarray(y, dtype=np.float64).reshape(shape)
        if ((first < 0) | (first >= self.n_arms) | (second < 0) | (second >= self.n_arms)).any():
            raise ConfigError(f"arm index out of range [0, {self.n_arms})")
        if not np.isfinite(y).all() or ((y < 0) | (y > 1)).any():
            raise ConfigError("outcomes must be in [0, 1]")
        h = self._duels
        if self.n == self._X.shape[1]:
            self._X = _grown(self._X, self.n, axis=1)
            for k in h:
                h[k] = _grown(h[k], self.n, axis=2)
        i = self.n
        self._X[:, i] = Xg
        h["first"][..., i], h["second"][..., i], h["y"][..., i] = first, second, y
        self.n += 1
        pair = self.fmap.pair_features(Xg[:, None, None, :], first[..., None], second[..., None])  # (G, W, 1, p)
        self._delta_sq += pair[..., 0, :] ** 2


def _grown(arr: np.ndarray, n: int, axis: int) -> np.ndarray:
    """``arr`` with twice the capacity along ``axis``, its first ``n`` entries kept."""
    shape = list(arr.shape)
    shape[axis] *= 2
    new = np.empty(shape, dtype=arr.dtype)
    index = (slice(None),) * axis + (slice(0, n),)
    new[index] = arr[index]
    return new


@register_lanes("fgts_cdb_paper")
@register_lanes("fgts_cdb")
def _make_fgts_lanes(
    config: FGTSConfig, envs: Sequence[PolicyEnv], seeds: Sequence[int], group_size: int = 1
) -> FGTSCDBLanes | None:
    if config.max_history:
        return None  # lanes keep every duel
    configs = {resolve_config(config, e.offline) for e in envs}
    if len(configs) > 1:
        return None  # thin and rich offline data among the lanes: one policy each
    config = configs.pop()
    resolved = [resolve_prior(config, e.offline)[0] for e in envs]
    if any(p is None for p in resolved) and any(p is not None for p in resolved):
        return None
    given = [p for p in resolved if p is not None]  # every env's prior, or none (checked above)
    W = int(group_size)
    if (
        resolved[0] is not None
        and W > 1
        and not all(given[g].same_as(given[g + w]) for g in range(0, len(given), W) for w in range(1, W))
    ):
        W = 1  # members of a seed differ in their offline prior (e.g. a λ grid): ungrouped lanes
    A = np.stack([e.require_embeddings("fgts_cdb") for e in envs])
    return FGTSCDBLanes(config, A, [int(s) for s in seeds], W, priors=resolved)
