"""A table of logged duels: what a deployment (or a replay) saw, in a Parquet file.

One row per duel, in log order::

    seq          int64     position in the log (increasing)
    ts           float64   seconds since the epoch when the verdict was logged
    embedding    list<f32> the query embedding the choice was made on (the decision id carried it)
    first        string    arm id of the duel's first arm
    second       string    arm id of the duel's second arm
    outcome      string    "first", "second" or "tie"
    offered      list<str> the arms offered that round (null: every arm of the table)
    source       string    who gave the verdict: "human", "judge" or "replay"
    weight       float64   its weight in the likelihood (a judge's verdict may count less)
    config_version string  the service configuration the duel was logged under ("" when unknown)
    propensity   float64   the probability with which the route played this pair (null: unknown)

The file's schema metadata carries ``ray_router.arm_ids`` (JSON list: every arm of the table the
log was written against) and ``ray_router.encoder`` (the encoder identity of the embeddings), so a
reader can refuse embeddings of another encoder. Pure: pyarrow and numpy, no Ray.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_router.errors import DataError

OUTCOMES = ("first", "second", "tie")
Y_OF = {"first": 1.0, "second": 0.0, "tie": 0.5}
COLUMNS = (
    "seq", "ts", "embedding", "first", "second", "outcome", "offered", "source", "weight", "config_version", "propensity",
)  # fmt: skip


@dataclass(frozen=True)
class DuelLog:
    """Logged duels as arrays over the arms ``arm_ids`` (indices into it)."""

    arm_ids: tuple[str, ...]
    encoder: str
    X: np.ndarray  # (n, d) float32 query embeddings
    first: np.ndarray  # (n,) int64
    second: np.ndarray  # (n,) int64
    y: np.ndarray  # (n,) 1 first better, 0 second better, 0.5 tie
    offered: list[list[int] | None]  # per duel: the offered arms, None = every arm
    weight: np.ndarray  # (n,) float64
    source: np.ndarray  # (n,) object (str)
    ts: np.ndarray  # (n,) float64
    seq: np.ndarray  # (n,) int64
    config_version: np.ndarray  # (n,) object (str)
    propensity: np.ndarray | None = None  # (n,) float64, NaN = unknown; None: the log has none

    def __len__(self) -> int:
        return len(self.y)

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    def remap(self, arm_ids: Sequence[str]) -> DuelLog:
        """The same duels over another arm table (by arm id); an error names any logged arm it lacks."""
        index = {a: i for i, a in enumerate(arm_ids)}
        used = {self.arm_ids[i] for i in np.unique(np.concatenate([self.first, self.second]))}
        used |= {self.arm_ids[i] for o in self.offered if o is not None for i in o}
        missing = sorted(used - set(index))
        if missing:
            raise DataError(f"the duel log names arms that the table does not have: {missing[:10]}")
        m = np.array([index.get(a, -1) for a in self.arm_ids], dtype=np.int64)
        offered = [None if o is None else [int(m[i]) for i in o] for o in self.offered]
        return DuelLog(
            tuple(arm_ids), self.encoder, self.X, m[self.first], m[self.second], self.y, offered,
            self.weight, self.source, self.ts, self.seq, self.config_version, self.propensity,
        )  # fmt: skip


def write_duels(log: DuelLog, path: str | Path) -> Path:
    """Write ``log`` as a Parquet file (the schema of the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = log.arm_ids
    table = pa.table(
        {
            "seq": pa.array(log.seq, pa.int64()),
            "ts": pa.array(log.ts, pa.float64()),
            "embedding": pa.array(list(np.asarray(log.X, dtype=np.float32)), pa.list_(pa.float32())),
            "first": pa.array([ids[i] for i in log.first], pa.string()),
            "second": pa.array([ids[i] for i in log.second], pa.string()),
            "outcome": pa.array([_outcome(y) for y in log.y], pa.string()),
            "offered": pa.array(
                [None if o is None else [ids[i] for i in o] for o in log.offered], pa.list_(pa.string())
            ),
            "source": pa.array([str(s) for s in log.source], pa.string()),
            "weight": pa.array(log.weight, pa.float64()),
            "config_version": pa.array([str(v) for v in log.config_version], pa.string()),
            "propensity": pa.array(
                [None] * len(log.y)
                if log.propensity is None
                else [None if np.isnan(p) else float(p) for p in log.propensity],
                pa.float64(),
            ),
        }
    )
    meta = {b"ray_router.arm_ids": json.dumps(list(ids)).encode(), b"ray_router.encoder": log.encoder.encode()}
    table = table.replace_schema_metadata(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def _outcome(y: float) -> str:
    return "first" if y == 1.0 else "second" if y == 0.0 else "tie"


def read_duels(path: str | Path) -> DuelLog:
    """Read a duel log; a :class:`DataError` that says what is wrong with a file that is not one."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no duel log at {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None
    missing = [c for c in ("embedding", "first", "second", "outcome") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: not a duel log, columns missing: {missing} (see `ray-router log export`)")
    meta = table.schema.metadata or {}
    cols = table.to_pydict()
    n = table.num_rows
    if n == 0:
        raise DataError(f"{path}: the duel log is empty")
    firsts, seconds = cols["first"], cols["second"]
    offered_col = cols.get("offered", [None] * n)
    if b"ray_router.arm_ids" in meta:
        arm_ids = tuple(json.loads(meta[b"ray_router.arm_ids"]))
    else:  # arms in order of first appearance
        seen: dict[str, None] = {}
        for a in [*firsts, *seconds, *(x for o in offered_col if o for x in o)]:
            seen.setdefault(a, None)
        arm_ids = tuple(seen)
    index = {a: i for i, a in enumerate(arm_ids)}

    def idx(a: object, what: str, row: int) -> int:
        if a not in index:
            raise DataError(f"{path}: row {row}: {what} arm {a!r} is not one of the log's arms")
        return index[a]

    bad = [(i, o) for i, o in enumerate(cols["outcome"]) if o not in Y_OF]
    if bad:
        raise DataError(f"{path}: row {bad[0][0]}: outcome {bad[0][1]!r} is not one of {list(OUTCOMES)}")
    emb = cols["embedding"]
    if any(e is None for e in emb) or len({len(e) for e in emb}) != 1:
        raise DataError(f"{path}: every row needs an embedding of the same length")
    X = np.asarray(emb, dtype=np.float32)
    if not np.isfinite(X).all():
        raise DataError(f"{path}: embeddings contain NaN or inf")
    weight = np.asarray(cols.get("weight") or [1.0] * n, dtype=np.float64)
    if not (np.isfinite(weight).all() and (weight >= 0).all()):
        raise DataError(f"{path}: weights must be finite and >= 0")
    return DuelLog(
        arm_ids=arm_ids,
        encoder=(meta.get(b"ray_router.encoder") or b"").decode(),
        X=X,
        first=np.array([idx(a, "first", i) for i, a in enumerate(firsts)], dtype=np.int64),
        second=np.array([idx(a, "second", i) for i, a in enumerate(seconds)], dtype=np.int64),
        y=np.array([Y_OF[o] for o in cols["outcome"]], dtype=np.float64),
        offered=[None if o is None else [idx(a, "offered", i) for a in o] for i, o in enumerate(offered_col)],
        weight=weight,
        source=np.array(cols.get("source") or ["unknown"] * n, dtype=object),
        ts=np.asarray(cols.get("ts") or np.arange(n, dtype=np.float64), dtype=np.float64),
        seq=np.asarray(cols.get("seq") or np.arange(1, n + 1), dtype=np.int64),
        config_version=np.array(cols.get("config_version") or [""] * n, dtype=object),
        propensity=np.array([np.nan if p is None else p for p in cols.get("propensity") or [None] * n], dtype=float),
    )
