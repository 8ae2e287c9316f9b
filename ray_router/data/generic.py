"""Loader for any per-query score table (Parquet, CSV or a pickled DataFrame).

One row per query: a text column, a category column, one numeric score column per arm and,
optionally, one ``<arm>|total_cost`` column per arm (RouterBench's naming) and an id column.

**Which columns are arms** (first rule that applies):

1. ``arms=[...]`` given explicitly (``--arms a,b,c`` on the command line);
2. a summary JSON with a ``"models"`` list: ``summary=`` or, if present, the sibling file
   ``<stem>.summary.json`` (RouterDC's and the RouterBench subset's layout);
3. every column ``X`` that has a matching ``X|total_cost`` column, in file order.

Otherwise the file is rejected with a :class:`~ray_router.errors.DataError` that says so.

**Costs**: ``<arm>|total_cost`` columns where present; ``prices={arm: usd_per_query}`` sets a
constant cost for those arms (overriding a cost column). If some arms have costs and others have
neither a column nor a price, the load fails. With no cost at all, ``table.costs`` is ``None``.

**NaN** scores or costs: ``nan="drop"`` (default) drops the row and counts it in
``table.meta["dropped_nan_rows"]``; ``nan="zero"`` fills 0 and counts the cells in
``table.meta["filled_nan_cells"]``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd

from ray_router.data.table import PairwiseJudgments, RoutingTable, make_table
from ray_router.errors import ConfigError, DataError

COST_SUFFIX = "|total_cost"
NanPolicy = Literal["drop", "zero"]

# Defaults tried in order when a column is not named explicitly.
TEXT_COLUMNS = ("prompt", "question", "query", "text", "instruction")
CATEGORY_COLUMNS = ("eval_name", "task", "category", "source")
ID_COLUMNS = ("sample_id", "row_id", "query_id", "id")


# --------------------------------------------------------------------------- reading files
def read_frame(path: Path) -> pd.DataFrame:
    """Read a Parquet, CSV or pickled-DataFrame file; any failure is a DataError naming the file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix == ".csv":
            df = pd.read_csv(path)
        elif suffix in (".pkl", ".pickle"):
            df = read_pickle_restricted(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .parquet, .csv or .pkl)")
    except DataError:
        raise
    except Exception as exc:  # pyarrow / parser errors come in many types
        raise DataError(f"{path}: cannot read file: {exc}") from exc
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{path}: expected a pandas DataFrame, got {type(df).__name__}")
    return df


_SAFE_BUILTINS = frozenset(
    {
        "list",
        "dict",
        "tuple",
        "set",
        "frozenset",
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "bool",
        "slice",
        "range",
        "object",
    }
)
_SAFE_GLOBALS = frozenset({("copyreg", "_reconstructor"), ("_codecs", "encode"), ("collections", "OrderedDict")})
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol <= 2 names
_PYARROW_HELPERS = frozenset({"py_buffer", "type_for_alias", "chunked_array", "field", "schema"})
_NUMPY_HELPERS = frozenset({"_reconstruct", "scalar", "_frombuffer"})
_BLOCKED_PANDAS = ("pandas.io", "pandas.core.computation", "pandas.util", "pandas.testing", "pandas.plotting")


def _is_data_type(obj: Any) -> bool:
    """numpy/pandas array, frame, dtype and scalar classes (never np.memmap, which opens files)."""
    from pandas.api.extensions import ExtensionArray, ExtensionDtype

    bases = (
        np.ndarray,
        np.dtype,
        np.generic,
        pd.DataFrame,
        pd.Series,
        pd.Index,
        ExtensionArray,
        ExtensionDtype,
        pd.Timestamp,
        pd.Timedelta,
        pd.Period,
        pd.Interval,
        pd.offsets.BaseOffset,
    )
    return isinstance(obj, type) and issubclass(obj, bases) and not issubclass(obj, np.memmap)


def _restricted_find_class(find_class: Any, module: str, name: str) -> Any:
    """Resolve a pickle global only if a pickled DataFrame can need it: builtin containers,
    numpy/pandas data types and constants, pandas' private unpickle helpers (never I/O or eval)."""
    module = _PY2_MODULES.get(module, module)
    top = module.split(".")[0]
    if (module == "builtins" and name in _SAFE_BUILTINS) or (module, name) in _SAFE_GLOBALS:
        return find_class(module, name)
    if module == "datetime" and name in ("datetime", "date", "time", "timedelta", "timezone"):
        return find_class(module, name)
    if module == "pyarrow.lib" and (name in _PYARROW_HELPERS or name.startswith(("_restore", "_reconstruct"))):
        return find_class(module, name)
    if top == "numpy" or (top == "pandas" and not module.startswith(_BLOCKED_PANDAS)):
        obj = find_class(module, name)
        internal = top == "pandas" and module != "pandas" and (isinstance(obj, type) or name.startswith("_"))
        if _is_data_type(obj) or not callable(obj) or name in _NUMPY_HELPERS or internal:
            return obj
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a pandas/numpy data type)")


def read_pickle_restricted(path: Path) -> Any:
    """Unpickle a DataFrame, refusing any global that is not a numpy/pandas data type.

    A pickle can run arbitrary code; this keeps the release pickles loadable while a tampered
    file fails with a DataError. Falls back to pandas' compat unpickler for older pickles."""
    from pandas.compat import pickle_compat

    remap = pickle_compat._class_locations_map

    class _Fast(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = remap.get((module, name), (module, name))
            return _restricted_find_class(super().find_class, module, name)

    class _Compat(pickle_compat.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = remap.get((module, name), (module, name))
            return _restricted_find_class(super().find_class, module, name)

    first: Exception
    try:
        with path.open("rb") as fh:
            return _Fast(fh).load()
    except pickle.UnpicklingError as exc:
        if "refusing" in str(exc):
            raise DataError(f"{path}: {exc}") from exc
        first = exc
    except Exception as exc:  # noqa: BLE001 - version skew: retry with pandas' compatibility shims
        first = exc
    try:
        with path.open("rb") as fh:
            return _Compat(fh).load()
    except Exception as exc:
        raise DataError(f"{path}: cannot unpickle ({first}; compat retry: {exc})") from exc


def read_summary_models(path: Path) -> list[str] | None:
    """The ``models`` list of a summary JSON, or None if the file has no such key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read summary JSON: {exc}") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if models is None:
        return None
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise DataError(f"{path}: field 'models' must be a list of strings")
    return models


def sibling_summary(path: Path) -> Path:
    """``data/x.parquet`` -> ``data/x.summary.json``."""
    return path.with_name(path.stem + ".summary.json")


# --------------------------------------------------------------------------- raw columns
@dataclass
class RawTable:
    """Columns pulled out of a file, before NaN handling and prices (internal to the loaders).

    ``costs`` holds NaN for arms that have no cost column (``has_cost[k]`` False)."""

    ids: list[str]
    texts: list[str]
    categories: list[str]
    arms: list[str]
    scores: np.ndarray
    costs: np.ndarray
    has_cost: np.ndarray
    meta: dict = field(default_factory=dict)


# How a caller names each column: (command-line flag, load_generic keyword).
COLUMN_OPTIONS = {
    "text": ("--text-column", "text_col"),
    "category": ("--category-column", "category_col"),
    "id": ("--id-column", "id_col"),
}
_MAX_LISTED_COLUMNS = 60


def available_columns(df: pd.DataFrame) -> str:
    """``columns: ['a', 'b', ...]`` for error messages (long lists are cut, with a count)."""
    cols = [str(c) for c in df.columns]
    if len(cols) > _MAX_LISTED_COLUMNS:
        return f"columns: {cols[:_MAX_LISTED_COLUMNS]} and {len(cols) - _MAX_LISTED_COLUMNS} more"
    return f"columns: {cols}"


@overload
def pick_column(
    df: pd.DataFrame,
    explicit: str | None,
    defaults: Sequence[str],
    what: str,
    path: Path,
    required: Literal[True] = True,
) -> str: ...
@overload
def pick_column(
    df: pd.DataFrame, explicit: str | None, defaults: Sequence[str], what: str, path: Path, required: bool
) -> str | None: ...
def pick_column(
    df: pd.DataFrame, explicit: str | None, defaults: Sequence[str], what: str, path: Path, required: bool = True
) -> str | None:
    """An explicitly named column (must exist) or the first default present."""
    if explicit is not None:
        if explicit not in df.columns:
            raise DataError(f"{path}: missing {what} column {explicit!r}; available {available_columns(df)}")
        return explicit
    for name in defaults:
        if name in df.columns:
            return name
    if required:
        flag, keyword = COLUMN_OPTIONS.get(what, ("", ""))
        how = f"pass {flag} NAME (Python: {keyword}=...)" if flag else "name it explicitly"
        raise DataError(
            f"{path}: no {what} column found (tried {list(defaults)}); {how}; available {available_columns(df)}"
        )
    return None


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def float_column(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """A column as float64 (object dtype cast); non-numeric values are a DataError."""
    values = df[column]
    try:
        if values.dtype == object:
            return np.array([np.nan if _is_missing(v) else float(v) for v in values], dtype=np.float64)
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: column {column!r} must be numeric ({exc})") from exc


def string_column(df: pd.DataFrame, column: str, path: Path, strict: bool) -> list[str]:
    """A column as a list of str. ``strict``: every value must already be a string."""
    values = df[column].tolist()
    for i, v in enumerate(values):
        if _is_missing(v):
            raise DataError(f"{path}: column {column!r} has a missing value in row {i}")
        if strict and not isinstance(v, str):
            raise DataError(f"{path}: column {column!r} must hold strings, row {i} has {type(v).__name__}")
    return [str(v) for v in values]


def detect_arms(df: pd.DataFrame, path: Path, arms: Sequence[str] | None, summary: str | Path | None) -> list[str]:
    """Apply the module's arm-detection rule and check every arm is a column."""
    source = "arms=/--arms"
    if arms is None and summary is not None:
        arms, source = read_summary_models(Path(summary)), f"summary {summary}"
        if arms is None:
            raise DataError(f"{summary}: summary JSON has no 'models' list")
    if arms is None and sibling_summary(path).is_file():
        arms, source = read_summary_models(sibling_summary(path)), f"summary {sibling_summary(path)}"
    if arms is None:
        arms = [c for c in df.columns if not str(c).endswith(COST_SUFFIX) and f"{c}{COST_SUFFIX}" in df.columns]
        source = f"'<arm>{COST_SUFFIX}' columns"
        if not arms:
            raise DataError(
                f"{path}: cannot tell which columns are arms: pass --arms a,b,c (Python: arms=[...]), "
                f'or add {sibling_summary(path).name} with a "models" list, or name cost columns '
                f"'<arm>{COST_SUFFIX}'; available {available_columns(df)}"
            )
    arms = [str(a) for a in arms]
    if not arms:
        raise DataError(f"{path}: no arms (from {source})")
    if len(set(arms)) != len(arms):
        raise DataError(f"{path}: duplicate arms in {arms}")
    unknown = [arm for arm in arms if arm not in df.columns]
    if unknown:
        what = f"unknown arm {unknown[0]!r}" if len(unknown) == 1 else f"unknown arms {unknown}"
        raise DataError(f"{path}: {what} (from {source}): no such column; available {available_columns(df)}")
    return arms


def extract_columns(
    df: pd.DataFrame,
    path: Path,
    *,
    text_col: str | None,
    category_col: str | None,
    id_col: str | None,
    arms: Sequence[str] | None,
    summary: str | Path | None = None,
) -> RawTable:
    """Pull ids, texts, categories, scores and costs out of a DataFrame (see module docstring)."""
    text_name = pick_column(df, text_col, TEXT_COLUMNS, "text", path)
    cat_name = pick_column(df, category_col, CATEGORY_COLUMNS, "category", path)
    id_name = pick_column(df, id_col, ID_COLUMNS, "id", path, required=False)
    arm_list = detect_arms(df, path, arms, summary)
    n = len(df)
    scores = np.column_stack([float_column(df, a, path) for a in arm_list]).reshape(n, len(arm_list))
    costs = np.full((n, len(arm_list)), np.nan)
    has_cost = np.zeros(len(arm_list), dtype=bool)
    for k, arm in enumerate(arm_list):
        if f"{arm}{COST_SUFFIX}" in df.columns:
            costs[:, k] = float_column(df, f"{arm}{COST_SUFFIX}", path)
            has_cost[k] = True
    ids = string_column(df, id_name, path, strict=False) if id_name else [str(i) for i in range(n)]
    return RawTable(
        ids=ids,
        texts=string_column(df, text_name, path, strict=True),
        categories=string_column(df, cat_name, path, strict=False),
        arms=arm_list,
        scores=scores,
        costs=costs,
        has_cost=has_cost,
        meta={"text_column": text_name, "category_column": cat_name, "id_column": id_name},
    )


# --------------------------------------------------------------------------- finishing
def apply_prices(raw: RawTable, prices: Mapping[str, float] | None, path: Path) -> RawTable:
    """Fill constant per-arm costs from ``prices``; check costs are all-or-nothing."""
    costs, has_cost = raw.costs.copy(), raw.has_cost.copy()
    for arm, price in (prices or {}).items():
        if arm not in raw.arms:
            raise ConfigError(f"prices: unknown arm {arm!r}; arms of {path.name}: {raw.arms}")
        try:
            price = float(price)
        except (TypeError, ValueError):
            raise ConfigError(f"prices[{arm!r}] must be a number, got {price!r}") from None
        if not np.isfinite(price) or price < 0:
            raise ConfigError(f"prices[{arm!r}] must be a finite non-negative USD amount, got {price}")
        k = raw.arms.index(arm)
        costs[:, k], has_cost[k] = price, True
    if has_cost.any() and not has_cost.all():
        missing = [a for a, h in zip(raw.arms, has_cost) if not h]
        raise DataError(
            f"{path}: no cost column '<arm>{COST_SUFFIX}' and no price for arms {missing}; "
            "add the columns or pass prices={arm: usd_per_query}"
        )
    return replace(raw, costs=costs, has_cost=has_cost)


def nan_keep_mask(raw: RawTable, nan: NanPolicy) -> tuple[np.ndarray, dict]:
    """Apply the NaN policy in place (``zero``) and return the rows to keep plus meta counts."""
    if nan not in ("drop", "zero"):
        raise ConfigError(f"nan must be 'drop' or 'zero', got {nan!r}")
    bad = np.isnan(raw.scores)
    if raw.has_cost.all():
        bad = bad | np.isnan(raw.costs)
    if nan == "zero":
        n_cells = int(bad.sum())
        raw.scores[np.isnan(raw.scores)] = 0.0
        raw.costs[np.isnan(raw.costs) & raw.has_cost[None, :]] = 0.0
        return np.ones(len(raw.ids), dtype=bool), {"filled_nan_cells": n_cells, "dropped_nan_rows": 0}
    keep = ~bad.any(axis=1)
    return keep, {"dropped_nan_rows": int((~keep).sum())}


def finish_table(
    raw: RawTable,
    *,
    name: str,
    path: Path,
    nan: NanPolicy = "drop",
    prices: Mapping[str, float] | None = None,
    pairwise: PairwiseJudgments | None = None,
    meta: dict | None = None,
) -> RoutingTable:
    """Prices, NaN policy, then a :class:`RoutingTable` (pairwise rows are remapped to kept rows)."""
    raw = apply_prices(raw, prices, path)
    keep, nan_meta = nan_keep_mask(raw, nan)
    rows = np.flatnonzero(keep)
    if pairwise is not None:
        pairwise = pairwise.subset(rows)
    return make_table(
        name=name,
        query_ids=[raw.ids[i] for i in rows],
        texts=[raw.texts[i] for i in rows],
        categories=[raw.categories[i] for i in rows],
        arms=raw.arms,
        scores=raw.scores[rows],
        costs=raw.costs[rows] if raw.has_cost.all() else None,
        pairwise=pairwise,
        source=str(path),
        meta={**raw.meta, "n_rows_read": len(raw.ids), **nan_meta, **(meta or {})},
    )


def check_unique_ids(ids: Sequence[str], path: Path, column: str | None) -> None:
    seen: set[str] = set()
    for q in ids:
        if q in seen:
            raise DataError(f"{path}: id column {column!r} has duplicate value {q!r}")
        seen.add(q)


# --------------------------------------------------------------------------- public loader
def load_generic(
    path: str | Path,
    *,
    text_col: str | None = None,
    category_col: str | None = None,
    id_col: str | None = None,
    arms: Sequence[str] | None = None,
    summary: str | Path | None = None,
    prices: Mapping[str, float] | None = None,
    nan: NanPolicy = "drop",
    name: str | None = None,
) -> RoutingTable:
    """Load a Parquet/CSV/pickle score table (rules in the module docstring).

    Unnamed columns default to the first present of: text ``prompt, question, query, text,
    instruction``; category ``eval_name, task, category, source``; id ``sample_id, row_id,
    query_id, id`` (else the row number). Ids must be unique."""
    path = Path(path)
    df = read_frame(path)
    raw = extract_columns(
        df, path, text_col=text_col, category_col=category_col, id_col=id_col, arms=arms, summary=summary
    )
    if raw.meta["id_column"] is not None:
        check_unique_ids(raw.ids, path, raw.meta["id_column"])
    return finish_table(raw, name=name or path.stem, path=path, nan=nan, prices=prices)
