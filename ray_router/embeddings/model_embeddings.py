"""Model embeddings a_k from category statistics (ALGORITHM.md s.3, steps 2-4). Pure numpy.

Pipeline::

    P, C = category_stats(table, offline_rows, names)      # (K, M) mean score and mean cost
    C = normalise_costs(C)                                  # divide by the largest entry
    Xi = category_centroids(X_offline, cat_idx, M)          # (M, d) mean embedding per category
    S = weighting_scores(P, C, config)                      # (K, M) one of the four weightings
    A = arm_embeddings(Xi, S, config.beta)                  # a_k = Xi^T softmax(beta * s_k)

or in one call ``model_embeddings(X_offline, cat_idx, P, C, config)``.

Our choices (the paper is silent):

- "top tau" ranks arms per category by ``P - lambda*C`` (the utility the router optimises; with
  lambda = 0 that is the score). Ties are inclusive: arm k is in the top tau of category m when fewer
  than tau arms are strictly better there (values within 1e-12 count as equal), so a category can
  have more than tau excelling arms.
- A category without offline rows has no centroid and no scores: a :class:`ConfigError`, never a
  silent fallback. Pass only the categories present in the offline rows.
- Centroids are plain means (not re-normalised), as in ALGORITHM.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal, get_args

import numpy as np
from pydantic import Field

from ray_router.config import config_dataclass
from ray_router.data.table import RoutingTable
from ray_router.errors import ConfigError

WeightingName = Literal["perf", "perf_cost", "excel_perf_cost", "excel_mask"]
WEIGHTINGS: tuple[str, ...] = get_args(WeightingName)  # the one list of the weightings (ALGORITHM.md s.3)
CostNormaliser = Literal["shared", "category_max"]
COST_NORMALISERS: tuple[str, ...] = get_args(CostNormaliser)  # see :func:`offline_arm_embeddings`
_TIE_ATOL = 1e-12
_NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]


@config_dataclass
class WeightingConfig:
    """How category scores become model embeddings.

    ``name``: one of :data:`WEIGHTINGS`; ``cost_weight`` (lambda >= 0): weight of the normalised cost;
    ``top_tau`` (tau >= 1): how many top arms per category count as excelling; ``beta`` (>= 0): softmax
    sharpness (0 = uniform over the allowed categories). Numbers are finite.
    """

    name: WeightingName = "perf"
    cost_weight: _NonNegativeFinite = 0.0
    top_tau: Annotated[int, Field(ge=1)] = 3
    beta: _NonNegativeFinite = 10.0


def category_order(categories: Sequence[str] | np.ndarray) -> tuple[str, ...]:
    """Distinct categories in first-seen order."""
    return tuple(dict.fromkeys(str(c) for c in categories))


def category_stats(
    data: RoutingTable | tuple[np.ndarray, np.ndarray | None, Sequence[str]],
    rows: Sequence[int] | np.ndarray | None = None,
    category_names: Sequence[str] | None = None,
    prices: Mapping[str, float] | Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``P`` (K, M): mean score of arm k on category m, and ``C`` (K, M): its mean raw cost, over ``rows``.

    ``data``: a :class:`RoutingTable` or ``(scores (n, K), costs (n, K) or None, categories (n,))``.
    ``rows``: the offline rows (None = all). ``category_names``: the M categories in order (None =
    first-seen order in ``rows``, see :func:`category_order`); every selected row must belong to one
    and every one must have rows. Costs: ``prices`` (per arm, a sequence or ``{arm: price}`` for a
    table) give ``C[k, m] = price_k``; else the data's costs; else zeros.
    """
    categories: Sequence[str] | np.ndarray  # given as either; an object array from here on
    if isinstance(data, RoutingTable):
        scores, costs, categories, arms = data.scores, data.costs, data.categories, data.arms
    else:
        scores, costs, categories = data
        arms = None
    scores = np.asarray(scores, dtype=np.float64)
    categories = np.asarray([str(c) for c in categories], dtype=object)
    if scores.ndim != 2 or len(categories) != len(scores):
        raise ConfigError(f"scores must be (n, K) with one category per row; got {scores.shape}, {len(categories)}")
    if costs is not None:
        costs = np.asarray(costs, dtype=np.float64)
        if costs.shape != scores.shape:
            raise ConfigError(f"costs has shape {costs.shape}, scores {scores.shape}")
    sel = np.arange(len(scores)) if rows is None else np.asarray(rows, dtype=np.int64)
    names = tuple(category_order(categories[sel])) if category_names is None else tuple(map(str, category_names))
    lookup = {c: m for m, c in enumerate(names)}
    unknown = sorted({c for c in categories[sel] if c not in lookup})
    if unknown:
        raise ConfigError(f"rows belong to categories missing from category_names: {unknown}")
    idx = np.array([lookup[c] for c in categories[sel]], dtype=np.int64)
    counts = np.bincount(idx, minlength=len(names))
    empty = [names[m] for m in np.flatnonzero(counts == 0)]
    if empty:
        raise ConfigError(f"categories without offline rows: {empty}")

    onehot = np.zeros((len(sel), len(names)))
    onehot[np.arange(len(sel)), idx] = 1.0
    P = (scores[sel].T @ onehot) / counts
    K = scores.shape[1]
    if prices is not None:
        if isinstance(prices, Mapping):
            if arms is None:
                raise ConfigError("a {arm: price} table needs a RoutingTable; pass a per-arm sequence instead")
            missing = [a for a in arms if a not in prices]
            if missing:
                raise ConfigError(f"price table lacks arms {missing}")
            prices = [prices[a] for a in arms]
        p = np.asarray(prices, dtype=np.float64)
        if p.shape != (K,) or not np.isfinite(p).all() or (p < 0).any():
            raise ConfigError(f"prices must be {K} finite non-negative numbers, got {prices!r}")
        C = np.repeat(p[:, None], len(names), axis=1)
    elif costs is not None:
        C = (costs[sel].T @ onehot) / counts
    else:
        C = np.zeros_like(P)
    return P, C


def normalise_costs(C: np.ndarray) -> np.ndarray:
    """``C / max(C)``; all zeros stay zeros. Idempotent."""
    C = np.asarray(C, dtype=np.float64)
    if not np.isfinite(C).all() or (C < 0).any():
        raise ConfigError("costs must be finite and non-negative")
    top = float(C.max()) if C.size else 0.0
    return C / top if top > 0 else C.copy()


def category_centroids(X: np.ndarray, category_idx: Sequence[int] | np.ndarray, n_categories: int) -> np.ndarray:
    """``(M, d)`` mean of the rows of X per category; a category without rows is a ConfigError."""
    X = np.asarray(X, dtype=np.float64)
    idx = np.asarray(category_idx)
    if X.ndim != 2 or idx.shape != (len(X),):
        raise ConfigError(f"X must be (n, d) with one category index per row; got {X.shape}, {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer) and len(idx):
        raise ConfigError(f"category_idx must hold ints, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n_categories):
        raise ConfigError(f"category_idx must lie in [0, {n_categories})")
    counts = np.bincount(idx, minlength=n_categories)
    if (counts == 0).any():
        raise ConfigError(f"categories without offline rows (no centroid): {np.flatnonzero(counts == 0).tolist()}")
    sums = np.zeros((n_categories, X.shape[1]))
    np.add.at(sums, idx, X)
    return sums / counts[:, None]


def top_tau_mask(U: np.ndarray, tau: int) -> np.ndarray:
    """``(K, M)`` bool: arm k is in the top tau of category m (fewer than tau arms strictly better)."""
    U = np.asarray(U, dtype=np.float64)
    better = (U[None, :, :] > U[:, None, :] + _TIE_ATOL).sum(axis=1)  # [k, m] = #arms j with U[j,m] > U[k,m]
    return better < tau


def weighting_scores(P: np.ndarray, C: np.ndarray, config: WeightingConfig) -> np.ndarray:
    """``S`` (K, M) of the configured weighting (ALGORITHM.md s.3 step 4); ``C`` is the normalised cost.

    - ``perf``: ``P`` (lambda is ignored);
    - ``perf_cost``: ``U = P - lambda*C``;
    - ``excel_perf_cost``: ``U`` where arm k is in the top tau of category m, else 0;
    - ``excel_mask``: ``U`` where arm k is in the top tau, else ``-inf`` (masked out of the softmax);
      an arm in the top tau nowhere gets its ``perf_cost`` row.
    """
    P = np.asarray(P, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    if P.ndim != 2 or C.shape != P.shape:
        raise ConfigError(f"P and C must be (K, M) arrays of one shape, got {P.shape} and {C.shape}")
    if not (np.isfinite(P).all() and np.isfinite(C).all()):
        raise ConfigError("P and C must be finite")
    if config.name == "perf":
        return P.copy()
    U = P - config.cost_weight * C
    if config.name == "perf_cost":
        return U
    mask = top_tau_mask(U, config.top_tau)
    if config.name == "excel_perf_cost":
        return np.where(mask, U, 0.0)
    S = np.where(mask, U, -np.inf)
    nowhere = ~mask.any(axis=1)
    S[nowhere] = U[nowhere]
    return S


def category_weights(S: np.ndarray, beta: float) -> np.ndarray:
    """Row-wise ``softmax(beta * s_k)`` (K, M), stable; ``-inf`` entries get weight 0."""
    S = np.asarray(S, dtype=np.float64)
    if np.isnan(S).any() or np.isposinf(S).any():
        raise ConfigError("weighting scores must not hold NaN or +inf")
    finite = np.isfinite(S)
    if not finite.any(axis=1).all():
        raise ConfigError("every arm needs at least one category with a finite score")
    Z = np.where(finite, beta * np.where(finite, S, 0.0), -np.inf)
    Z = Z - Z.max(axis=1, keepdims=True)
    W = np.exp(Z)
    return W / W.sum(axis=1, keepdims=True)


def arm_embeddings(centroids: np.ndarray, S: np.ndarray, beta: float) -> np.ndarray:
    """``(K, d)``: ``a_k = sum_m softmax(beta * s_k)_m * xi_m`` for centroids ``xi`` (M, d)."""
    centroids = np.asarray(centroids, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    if centroids.ndim != 2 or S.ndim != 2 or S.shape[1] != centroids.shape[0]:
        raise ConfigError(f"S (K, M) and centroids (M, d) disagree: {S.shape} vs {centroids.shape}")
    return category_weights(S, beta) @ centroids


def model_embeddings(
    X_offline: np.ndarray,
    categories_offline: Sequence[int] | Sequence[str] | np.ndarray,
    P: np.ndarray,
    C: np.ndarray,
    config: WeightingConfig,
    category_names: Sequence[str] | None = None,
) -> np.ndarray:
    """``(K, d)`` model embeddings from offline query embeddings and category statistics.

    ``categories_offline``: per row, an int index into the M columns of P, or a name when
    ``category_names`` gives the column order. ``C``: normalised costs (:func:`normalise_costs`)."""
    M = np.asarray(P).shape[1] if np.asarray(P).ndim == 2 else 0
    if category_names is not None:
        lookup = {str(c): m for m, c in enumerate(category_names)}
        if len(lookup) != M:
            raise ConfigError(f"category_names has {len(lookup)} distinct names, P has {M} columns")
        try:
            idx = np.array([lookup[str(c)] for c in categories_offline], dtype=np.int64)
        except KeyError as e:
            raise ConfigError(f"offline row of unknown category {e.args[0]!r}") from None
    else:
        idx = np.asarray(categories_offline)
    centroids = category_centroids(X_offline, idx, M)
    return arm_embeddings(centroids, weighting_scores(P, C, config), config.beta)


def offline_arm_embeddings(
    table: RoutingTable,
    X_offline: np.ndarray,
    offline_rows: np.ndarray,
    config: WeightingConfig,
    cost_normaliser: CostNormaliser = "shared",
    columns: np.ndarray | None = None,
) -> np.ndarray:
    """Model embeddings a_k (K, d) of ``table``'s arms (or of its ``columns``) from its offline rows.

    ``X_offline`` are the embeddings of ``table``'s rows ``offline_rows``. ``cost_normaliser``:
    ``shared`` divides costs by the table's own normaliser (the environment's scale, one scale
    everywhere); ``category_max`` by the largest category-mean cost of the offline rows."""
    if cost_normaliser not in COST_NORMALISERS:
        raise ConfigError(f"cost_normaliser must be one of {COST_NORMALISERS}, got {cost_normaliser!r}")
    cats = table.categories[offline_rows]
    names = category_order(cats)
    P, C = category_stats(table, offline_rows, names)
    if columns is not None:
        P, C = P[columns], C[columns]
    C = normalise_costs(C) if cost_normaliser == "category_max" else C / table.cost_normaliser()
    return model_embeddings(X_offline, cats, P, C, config, category_names=names)
