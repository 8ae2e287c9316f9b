"""Seeded offline/online splits of a routing table (ALGORITHM.md section 4).

The offline (calibration) part feeds CCFT and the per-category arm scores; the online part is the
bandit's query stream. Every split takes the per-row category labels and a seed, and returns a
:class:`Split` of sorted, disjoint row indices that together cover all rows. Categories are visited
in sorted order with one ``numpy.random.default_rng(seed)``, so the same inputs and seed give the
same split on every platform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ray_router.errors import ConfigError

if TYPE_CHECKING:
    from ray_router.data.table import RoutingTable


@dataclass(frozen=True, eq=False)
class Split:
    """Row indices of the offline and online parts (sorted, disjoint, int64)."""

    offline: np.ndarray
    online: np.ndarray
    name: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in ("offline", "online"):
            rows = np.asarray(getattr(self, part), dtype=np.int64)
            if rows.ndim != 1 or (rows.size > 1 and not (np.diff(rows) > 0).all()):
                raise ValueError(f"Split.{part} must be strictly increasing row indices")
            object.__setattr__(self, part, rows)
        if np.intersect1d(self.offline, self.online).size:
            raise ValueError("Split.offline and Split.online overlap")

    def tables(self, table: RoutingTable) -> tuple[RoutingTable, RoutingTable]:
        """``(offline_table, online_table)`` of ``table``."""
        return table.subset(self.offline), table.subset(self.online)


def _labels(categories: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray([str(c) for c in categories], dtype=object)


def _rows_by_category(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {c: np.flatnonzero(labels == c) for c in sorted(set(labels.tolist()))}


def _n_offline(n_rows: int, fraction: float) -> int:
    """round(fraction · n) half up; at least 1 and (for fraction < 1) at most n-1 when n >= 2."""
    k = int(np.floor(fraction * n_rows + 0.5))
    if n_rows >= 2 and fraction > 0:
        k = max(k, 1)
        if fraction < 1:
            k = min(k, n_rows - 1)
    return min(k, n_rows)


def _check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"offline_fraction must be in [0, 1], got {fraction}")
    return fraction


def _make_split(labels: np.ndarray, offline: list[np.ndarray], name: str, meta: dict) -> Split:
    off = np.sort(np.concatenate(offline)) if offline else np.zeros(0, dtype=np.int64)
    mask = np.zeros(len(labels), dtype=bool)
    mask[off] = True
    counts = {c: int(mask[labels == c].sum()) for c in sorted(set(labels.tolist()))}
    return Split(offline=off, online=np.flatnonzero(~mask), name=name, meta={**meta, "offline_per_category": counts})


def stratified_split(categories: Sequence[str] | np.ndarray, offline_fraction: float = 0.2, seed: int = 0) -> Split:
    """Send ``offline_fraction`` of each category's rows (rounded, at least one when the category
    has two or more rows, and at least one left online) to the offline part."""
    fraction = _check_fraction(offline_fraction)
    labels = _labels(categories)
    rng = np.random.default_rng(seed)
    offline = [rng.permutation(rows)[: _n_offline(len(rows), fraction)] for rows in _rows_by_category(labels).values()]
    return _make_split(labels, offline, f"stratified-{fraction:g}", {"seed": seed, "offline_fraction": fraction})


def k_per_category(categories: Sequence[str] | np.ndarray, k: int, seed: int = 0) -> Split:
    """``k`` random offline rows per category (all of a category's rows if it has fewer), rest online.

    ``meta["short_categories"]`` lists categories with at most ``k`` rows (no online rows left)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}")
    labels = _labels(categories)
    rng = np.random.default_rng(seed)
    groups = _rows_by_category(labels)
    offline = [rng.permutation(rows)[:k] for rows in groups.values()]
    short = [c for c, rows in groups.items() if len(rows) <= k]
    return _make_split(labels, offline, f"k{k}-per-category", {"seed": seed, "k": int(k), "short_categories": short})


def hold_out_category(
    categories: Sequence[str] | np.ndarray,
    held_out: str | Sequence[str],
    offline_fraction: float = 0.2,
    seed: int = 0,
    k: int | None = None,
) -> Split:
    """Robustness split ("unseen benchmark"): the offline part never contains ``held_out``
    categories; it takes ``offline_fraction`` (or, if ``k`` is given, ``k`` rows) of every other
    category. All remaining rows, including every held-out row, are online."""
    labels = _labels(categories)
    held = [held_out] if isinstance(held_out, str) else [str(h) for h in held_out]
    known = set(labels.tolist())
    unknown = [h for h in held if h not in known]
    if unknown:
        raise ConfigError(f"held-out categories {unknown} not in the data; known: {sorted(known)}")
    rest = np.flatnonzero(~np.isin(labels, held))
    if k is None:
        inner = stratified_split(labels[rest], offline_fraction, seed)
    else:
        inner = k_per_category(labels[rest], k, seed)
    offline = [rest[inner.offline]]
    meta = {**inner.meta, "held_out": held}
    meta.pop("offline_per_category", None)
    return _make_split(labels, offline, f"holdout-{'+'.join(held)}", meta)
