"""The one table type for a routing benchmark.

A :class:`RoutingTable` holds, for ``n`` queries and ``K`` arms (candidate LLMs):

- ``query_ids`` (n,), ``texts`` (n,), ``categories`` (n,): strings;
- ``scores`` (n, K) float64: the logged quality of each arm's answer (higher is better);
- ``costs`` (n, K) float64 USD, or ``None`` when the benchmark has no cost field;
- ``pairwise``: optional real pairwise judgments (e.g. MixInstruct's ChatGPT ``cmp_results``);
- ``arms``: the arm ids, exactly as users send and see them.

Rows are immutable once built; :meth:`subset` returns a new table over some rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ray_router.errors import DataError, UnknownArmError


@dataclass(frozen=True)
class PairwiseJudgments:
    """Real pairwise labels: for row ``rows[i]``, arm ``first[i]`` vs arm ``second[i]`` gave
    ``outcome[i]`` in {1.0 (first better), 0.0 (second better), 0.5 (tie)}."""

    rows: np.ndarray  # int64 (m,)
    first: np.ndarray  # int64 (m,)
    second: np.ndarray  # int64 (m,)
    outcome: np.ndarray  # float64 (m,)

    def __post_init__(self) -> None:
        m = len(self.rows)
        for name in ("first", "second", "outcome"):
            if len(getattr(self, name)) != m:
                raise DataError(f"pairwise judgments: column {name!r} has a different length")

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self) -> dict[tuple[int, int, int], float]:
        """``{(row, first, second): outcome}`` with both orientations filled in."""
        out: dict[tuple[int, int, int], float] = {}
        for r, a, b, y in zip(self.rows, self.first, self.second, self.outcome):
            out[(int(r), int(a), int(b))] = float(y)
            out[(int(r), int(b), int(a))] = 1.0 - float(y)
        return out

    def subset(self, rows: np.ndarray) -> PairwiseJudgments | None:
        rows = np.asarray(rows, dtype=np.int64)
        remap = {int(old): new for new, old in enumerate(rows)}
        keep = np.array([int(r) in remap for r in self.rows], dtype=bool)
        if not keep.any():
            return None
        return PairwiseJudgments(
            rows=np.array([remap[int(r)] for r in self.rows[keep]], dtype=np.int64),
            first=self.first[keep].copy(),
            second=self.second[keep].copy(),
            outcome=self.outcome[keep].copy(),
        )


@dataclass(frozen=True)
class RoutingTable:
    name: str
    query_ids: np.ndarray
    texts: np.ndarray
    categories: np.ndarray
    arms: tuple[str, ...]
    scores: np.ndarray
    costs: np.ndarray | None = None
    pairwise: PairwiseJudgments | None = None
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(self.query_ids)
        where = self.source or self.name
        if len(self.texts) != n or len(self.categories) != n:
            raise DataError(f"{where}: query_ids, texts and categories must have the same length")
        if len(set(self.arms)) != len(self.arms):
            raise DataError(f"{where}: duplicate arm names {self.arms}")
        if self.scores.shape != (n, len(self.arms)):
            raise DataError(f"{where}: scores has shape {self.scores.shape}, expected {(n, len(self.arms))}")
        if not np.issubdtype(self.scores.dtype, np.floating):
            raise DataError(f"{where}: scores must be floating point, got {self.scores.dtype}")
        if self.costs is not None:
            if self.costs.shape != self.scores.shape:
                raise DataError(f"{where}: costs has shape {self.costs.shape}, expected {self.scores.shape}")
            if np.isnan(self.costs).any():
                raise DataError(f"{where}: costs contain NaN")
            if (self.costs < 0).any():
                raise DataError(f"{where}: costs must be non-negative USD")
        if np.isnan(self.scores).any():
            raise DataError(f"{where}: scores contain NaN (loaders drop or fill them before building a table)")

    # ------------------------------------------------------------------ shape
    @property
    def n_queries(self) -> int:
        return len(self.query_ids)

    @property
    def n_arms(self) -> int:
        return len(self.arms)

    @property
    def has_costs(self) -> bool:
        return self.costs is not None

    @property
    def category_names(self) -> tuple[str, ...]:
        """Categories in first-seen order (stable across runs)."""
        seen: dict[str, None] = {}
        for c in self.categories:
            seen.setdefault(str(c), None)
        return tuple(seen)

    def category_index(self) -> np.ndarray:
        """Category of each row as an int index into :attr:`category_names`."""
        lookup = {c: i for i, c in enumerate(self.category_names)}
        return np.array([lookup[str(c)] for c in self.categories], dtype=np.int64)

    def arm_index(self, arm: str) -> int:
        try:
            return self.arms.index(arm)
        except ValueError:
            raise UnknownArmError(f"unknown arm {arm!r}; known arms: {list(self.arms)}") from None

    def arm_indices(self, arms: Sequence[str]) -> np.ndarray:
        return np.array([self.arm_index(a) for a in arms], dtype=np.int64)

    # -------------------------------------------------------------- utilities
    def cost_normaliser(self) -> float:
        """The largest per-arm mean cost: ``cost_norm = cost / cost_normaliser()`` (ALGORITHM.md s.3-4).

        Returns 1.0 for tables without costs (or all-zero costs)."""
        if self.costs is None:
            return 1.0
        top = float(self.costs.mean(axis=0).max()) if self.n_queries else 0.0
        return top if top > 0 else 1.0

    def normalised_costs(self, normaliser: float | None = None) -> np.ndarray:
        if self.costs is None:
            return np.zeros_like(self.scores)
        return self.costs / (normaliser if normaliser is not None else self.cost_normaliser())

    def utilities(self, cost_weight: float = 0.0, normaliser: float | None = None) -> np.ndarray:
        """Latent utility ``r(q, k) = score(q, k) - λ·cost_norm(q, k)``, shape (n, K)."""
        if cost_weight == 0.0 or self.costs is None:
            return self.scores.copy()
        return self.scores - cost_weight * self.normalised_costs(normaliser)

    # ----------------------------------------------------------------- subset
    def subset(self, rows: Sequence[int] | np.ndarray, name: str | None = None) -> RoutingTable:
        rows = np.asarray(rows, dtype=np.int64)
        return RoutingTable(
            name=name or self.name,
            query_ids=self.query_ids[rows],
            texts=self.texts[rows],
            categories=self.categories[rows],
            arms=self.arms,
            scores=self.scores[rows],
            costs=None if self.costs is None else self.costs[rows],
            pairwise=None if self.pairwise is None else self.pairwise.subset(rows),
            source=self.source,
            meta=dict(self.meta),
        )

    def describe(self) -> dict:
        """Small JSON-able summary: counts, categories, per-arm mean score and cost."""
        cats, counts = np.unique(self.categories.astype(str), return_counts=True)
        out = {
            "name": self.name,
            "source": self.source,
            "n_queries": self.n_queries,
            "n_arms": self.n_arms,
            "categories": {str(c): int(k) for c, k in zip(cats, counts)},
            "mean_score": {a: float(v) for a, v in zip(self.arms, self.scores.mean(axis=0))},
            "has_costs": self.has_costs,
            "n_pairwise": 0 if self.pairwise is None else len(self.pairwise),
        }
        if self.costs is not None:
            out["mean_cost_usd"] = {a: float(v) for a, v in zip(self.arms, self.costs.mean(axis=0))}
        return out


def make_table(
    name: str,
    query_ids: Sequence[str],
    texts: Sequence[str],
    categories: Sequence[str],
    arms: Sequence[str],
    scores: np.ndarray,
    costs: np.ndarray | None = None,
    pairwise: PairwiseJudgments | None = None,
    source: str = "",
    meta: dict | None = None,
) -> RoutingTable:
    """Build a :class:`RoutingTable` from plain sequences (copies and fixes dtypes)."""
    return RoutingTable(
        name=name,
        query_ids=np.asarray([str(q) for q in query_ids], dtype=object),
        texts=np.asarray([str(t) for t in texts], dtype=object),
        categories=np.asarray([str(c) for c in categories], dtype=object),
        arms=tuple(str(a) for a in arms),
        scores=np.asarray(scores, dtype=np.float64),
        costs=None if costs is None else np.asarray(costs, dtype=np.float64),
        pairwise=pairwise,
        source=source,
        meta=dict(meta or {}),
    )
