"""``ray-router log export STATE_DIR --out duels.parquet``: a service's feedback log as a duel table.

Reads the state directory the Posterior writes (:mod:`ray_router.serve.durable`): ``meta.json`` for
the arm ids and the encoder identity, and every complete record of the segmented feedback log, in
seq order. It only reads (the follower's read path: a torn or half-written last frame is left alone,
nothing is cut, no lock is taken), so it runs beside a live service without blocking it; what it
exports is the log up to the last record complete when it read it.

Records that a compaction removed are not in the log any more (their duels live on in the
posterior's snapshot): the export says how many, from the first seq the log still holds.

Each record becomes one row of the duel-log format of :mod:`ray_router.evaluation.duels`: the
query embedding the decision id carried, both arms, the verdict, the offered arms, the verdict's
source (``human`` for a client's ``/v1/feedback``, ``judge`` for a shadow duel; records written
before sources existed are ``human``), its weight, the time it was logged and the service's
config version when the record has one. No Ray is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_router.errors import DataError
from ray_router.evaluation.duels import DuelLog, write_duels
from ray_router.serve.durable import LOG_DIR, FeedbackJournal, read_meta

CHUNK = 8192


@dataclass(frozen=True)
class ExportResult:
    path: Path
    n_duels: int
    first_seq: int  # of the first exported record (0: none)
    last_seq: int
    compacted: int  # records before ``first_seq`` that compaction removed


def read_log(state_dir: str | Path) -> tuple[DuelLog, int]:
    """The duels of ``state_dir``'s feedback log and the number of records compacted away before them."""
    root = Path(state_dir)
    if not root.is_dir():
        raise DataError(f"no state directory at {root}")
    try:
        meta = read_meta(root / "meta.json")
    except ValueError as e:
        raise DataError(f"{root / 'meta.json'} is not valid JSON: {e}") from None
    if meta is None:
        raise DataError(f"{root} has no meta.json: not a ray-router state directory (or no posterior ever started)")
    arm_ids = tuple(str(a) for a in meta["arm_ids"])
    journal = FeedbackJournal(root / LOG_DIR, fsync=False)
    segments = journal._list()
    first_held = segments[0] if segments else 1
    records: list[dict] = []
    after, position = first_held - 1, None
    while True:
        chunk = journal.tail(after, position, limit=CHUNK)
        if not chunk:
            break
        records.extend(rec for _, rec in chunk)
        position, after = chunk[-1][0], int(chunk[-1][1]["seq"])
    n = len(records)
    dim = int(meta.get("dim") or (len(records[0]["x"]) if records else 0))
    X = np.stack([np.asarray(r["x"], dtype=np.float32) for r in records]) if n else np.zeros((0, dim), np.float32)
    log = DuelLog(
        arm_ids=arm_ids,
        encoder=str(meta.get("encoder_identity", "")),
        X=X,
        first=np.array([int(r["first"]) for r in records], dtype=np.int64),
        second=np.array([int(r["second"]) for r in records], dtype=np.int64),
        y=np.array([float(r["y"]) for r in records], dtype=np.float64),
        offered=[None if r["offered"] is None else [int(i) for i in r["offered"]] for r in records],
        weight=np.array([float(r.get("weight", 1.0)) for r in records], dtype=np.float64),
        source=np.array([str(r.get("source") or "human") for r in records], dtype=object),
        ts=np.array([float(r["ts"]) for r in records], dtype=np.float64),
        seq=np.array([int(r["seq"]) for r in records], dtype=np.int64),
        config_version=np.array([str(r.get("config_version", "")) for r in records], dtype=object),
        propensity=np.array([np.nan if r.get("propensity") is None else float(r["propensity"]) for r in records]),
    )
    bad = [i for i in (*log.first, *log.second) if not 0 <= i < len(arm_ids)]
    if bad:
        raise DataError(f"{root}: a record names arm index {bad[0]}; meta.json lists {len(arm_ids)} arms")
    return log, first_held - 1


def export(state_dir: str | Path, out: str | Path) -> ExportResult:
    """Write ``state_dir``'s duels to the Parquet file ``out``."""
    log, compacted = read_log(state_dir)
    if len(log) == 0:
        raise DataError(
            f"{state_dir}: the feedback log holds no duels"
            + (f" ({compacted} were compacted away into the snapshot)" if compacted else "")
        )
    path = write_duels(log, out)
    return ExportResult(path, len(log), int(log.seq[0]), int(log.seq[-1]), compacted)
