"""RouterBench (Hu et al. 2024, ``withmartian/routerbench``) -> :class:`RoutingTable`.

Reads the release pickles ``routerbench_0shot.pkl`` / ``routerbench_5shot.pkl`` and the Parquet
subset ``routerbench_5shot_arc_mbpp_winogrande.parquet`` (same column names). Per row:
``sample_id`` (query id), ``prompt`` (``str(list)`` in the pickles: parsed, parts joined with a
blank line), ``eval_name`` (category), one score column per model (object dtype in the pickles,
cast to float), ``<model>|total_cost`` (USD); ``<model>|model_response`` and
``oracle_model_to_route_to`` are ignored. Arms = the score columns in file order.

Duplicated ``sample_id`` rows (14 ARC ids in the 5-shot release) are merged as the data README's
"Conversion" step 4 does: keep the row that scores the most models, take each missing score
**and its cost** from the other row. Remaining NaN scores: ``nan="drop"`` (default) or ``"zero"``.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ray_router.data.generic import (
    COST_SUFFIX,
    NanPolicy,
    RawTable,
    extract_columns,
    finish_table,
    read_frame,
)
from ray_router.data.table import RoutingTable
from ray_router.errors import DataError

REQUIRED_COLUMNS = ("sample_id", "prompt", "eval_name")
PROMPT_SEPARATOR = "\n\n"


def parse_prompt(value: str) -> str:
    """``"['a', 'b']"`` -> ``"a\\n\\nb"``; any other string is returned unchanged."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parts = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
        if isinstance(parts, list) and all(isinstance(p, str) for p in parts):
            return PROMPT_SEPARATOR.join(parts)
    return value


def merge_duplicate_ids(raw: RawTable) -> tuple[RawTable, list[str]]:
    """Merge rows sharing a query id; return the merged table and the ids that were merged.

    The row with the most non-NaN scores is kept (ties: the first); for each arm it lacks, the
    score and the cost come from the first other row of the group that has the score."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(raw.ids):
        groups.setdefault(q, []).append(i)
    dup_groups = [rows for rows in groups.values() if len(rows) > 1]
    if not dup_groups:
        return raw, []
    scores, costs = raw.scores.copy(), raw.costs.copy()
    drop: set[int] = set()
    observed = ~np.isnan(scores)
    for rows in dup_groups:
        base = max(rows, key=lambda r: (int(observed[r].sum()), -r))
        for other in rows:
            if other == base:
                continue
            fill = np.isnan(scores[base]) & observed[other]
            scores[base, fill] = scores[other, fill]
            costs[base, fill] = costs[other, fill]
            drop.add(other)
    keep = [i for i in range(len(raw.ids)) if i not in drop]
    merged = RawTable(
        ids=[raw.ids[i] for i in keep],
        texts=[raw.texts[i] for i in keep],
        categories=[raw.categories[i] for i in keep],
        arms=raw.arms,
        scores=scores[keep],
        costs=costs[keep],
        has_cost=raw.has_cost,
        meta=raw.meta,
    )
    return merged, [raw.ids[rows[0]] for rows in dup_groups]


def routerbench_arms(df: pd.DataFrame) -> list[str]:
    """Score columns in file order: every column with a ``<column>|total_cost`` companion."""
    cols = [str(c) for c in df.columns]
    return [c for c in cols if "|" not in c and f"{c}{COST_SUFFIX}" in cols]


def load_routerbench(
    path: str | Path,
    *,
    arms: Sequence[str] | None = None,
    nan: NanPolicy = "drop",
    prices: Mapping[str, float] | None = None,
    variant: str | None = None,
    name: str = "routerbench",
    strip_shared_prefix: bool = True,
) -> RoutingTable:
    """Load a RouterBench pickle, Parquet or CSV file (see module docstring).

    ``arms`` restricts/reorders the arms; ``prices`` overrides costs per arm;
    ``variant`` is stored in ``table.meta["variant"]`` (default: the file stem).
    ``strip_shared_prefix``: the query text of a row is its prompt without the few-shot examples
    that every prompt of its ``eval_name`` shares (see :func:`strip_shared_prefixes`)."""
    path = Path(path)
    df = read_frame(path)
    for column in REQUIRED_COLUMNS:
        if column not in df.columns:
            raise DataError(f"{path}: missing column {column!r} (not a RouterBench file?)")
    if arms is None:
        arms = routerbench_arms(df)
        if not arms:
            raise DataError(f"{path}: no score columns: expected '<model>' next to '<model>{COST_SUFFIX}'")
    raw = extract_columns(df, path, text_col="prompt", category_col="eval_name", id_col="sample_id", arms=arms)
    raw.texts = [parse_prompt(t) for t in raw.texts]
    n_read = len(raw.ids)
    raw, merged = merge_duplicate_ids(raw)
    stripped: dict[str, int] = {}
    if strip_shared_prefix:
        raw.texts, stripped = strip_shared_prefixes(raw.texts, raw.categories)
    return finish_table(
        raw,
        name=name,
        path=path,
        nan=nan,
        prices=prices,
        meta={
            "variant": variant or path.stem,
            "merged_duplicate_ids": merged,
            "n_rows_read": n_read,
            "stripped_prefix_chars": stripped,
        },
    )


def strip_shared_prefixes(
    texts: Sequence[str], categories: Sequence[str], min_chars: int = 200, sep: str = "\n\n"
) -> tuple[list[str], dict[str, int]]:
    """Remove the few-shot block that every prompt of a category starts with.

    RouterBench's 5-shot prompts open with the same five solved examples (ARC-Challenge: ~1,650
    characters, WinoGrande: ~1,200) before the question. A 256-token encoder sees only that shared
    block, so every query of the category would get the same embedding. Per category, the longest
    common prefix, cut back to its last ``sep`` boundary, is removed when it is at least
    ``min_chars`` long; rows that would become empty keep their text. Returns the new texts and
    ``{category: characters removed}``.
    """
    import os

    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_cat.setdefault(str(c), []).append(i)
    out = list(texts)
    removed: dict[str, int] = {}
    for cat, rows in by_cat.items():
        if len(rows) < 2:
            continue
        prefix = os.path.commonprefix([texts[i] for i in rows])  # noqa: RUF071 - a string prefix
        cut = prefix.rfind(sep)
        if cut < 0 or cut + len(sep) < min_chars:
            continue
        cut += len(sep)
        removed[cat] = cut
        for i in rows:
            rest = texts[i][cut:].strip()
            if rest:
                out[i] = rest
    return out, removed
