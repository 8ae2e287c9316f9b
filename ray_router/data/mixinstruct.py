"""MixInstruct (Jiang et al. 2023, ``llm-blender/mix-instruct``) -> :class:`RoutingTable`.

The release files ``{train,val,test}_data_prepared.jsonl`` hold one JSON record per line (a
``.json`` file holding one JSON array of records is read too)::

    {"id": "unified_chip2/69962", "instruction": "...", "input": "...", "output": "...",
     "candidates": [{"decoding_method": "...", "model": "alpaca-native", "text": "...",
                     "scores": {"logprobs": .., "rougeL": .., "rouge2": .., "rougeLsum": ..,
                                "rouge1": .., "bleu": .., "bertscore": .., "bleurt": ..,
                                "bartscore": ..}}, ...],          # 11 candidates
     "cmp_results": "{\\"alpaca-native,chatglm-6b\\": \\"A is better\\", ...}"}  # test only

- query text: ``instruction`` and ``input`` joined by a blank line (empty parts skipped);
- category: the first path component of ``id`` (``dolly_15k/open_qa/12`` -> ``dolly_15k``);
- score of arm k: ``candidates[model == k].scores[metric]`` (default ``bartscore``);
- arms: the candidate models in first-seen order (or ``arms=[...]``);
- a record without some arm: ``missing="error"`` (default) raises a DataError naming the file, line,
  record id and model; ``missing="drop"`` drops the record (``meta["dropped_missing_candidate_rows"]``);
- ``cmp_results`` (a JSON string, or ``"null"``/None/absent) -> :class:`PairwiseJudgments` with
  "A is better" = 1.0, "B is better" = 0.0, "Same good" / "Same bad" = 0.5.

There is no cost field; ``prices={arm: usd_per_query}`` adds constant per-arm costs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ray_router.data.generic import NanPolicy, RawTable, finish_table
from ray_router.data.table import PairwiseJudgments, RoutingTable
from ray_router.errors import ConfigError, DataError

METRICS = ("logprobs", "rougeL", "rouge2", "rougeLsum", "rouge1", "bleu", "bertscore", "bleurt", "bartscore")
CMP_OUTCOMES = {"A is better": 1.0, "B is better": 0.0, "Same good": 0.5, "Same bad": 0.5}
SPLIT_FILES = {
    "train": "train_data_prepared.jsonl",
    "val": "val_data_prepared.jsonl",
    "test": "test_data_prepared.jsonl",
}


def split_file(split: str) -> str:
    """File name of a split; accepts ``validation`` for ``val``."""
    key = "val" if split == "validation" else split
    if key not in SPLIT_FILES:
        raise ConfigError(f"unknown MixInstruct split {split!r}; choose one of {list(SPLIT_FILES)}")
    return SPLIT_FILES[key]


# --------------------------------------------------------------------------- reading records
def iter_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)``: ``"line N"`` for JSON lines, ``"record N"`` for a JSON array
    (a ``.json`` file, or any non-``.jsonl`` file, whose first character is ``[``)."""
    try:
        fh = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc}") from exc
    with fh:
        head = fh.read(1)
        while head and head.isspace():
            head = fh.read(1)
        fh.seek(0)
        if head == "[" and path.suffix.lower() != ".jsonl":
            try:
                records = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from exc
            for i, rec in enumerate(records):
                yield f"record {i}", rec
            return
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: malformed JSON ({exc.msg})") from exc
            yield f"line {lineno}", rec


@dataclass
class _Record:
    where: str
    id: str
    text: str
    category: str
    scores: dict[str, float]
    cmp: list[tuple[str, str, float]]


def _field(
    rec: dict, key: str, kind: type | tuple[type, ...], path: Path, where: str, rid: str, optional: bool = False
) -> Any:
    if key not in rec:
        if optional:
            return None
        raise DataError(f"{path}: {where} (id {rid!r}): missing field {key!r}")
    value = rec[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        raise DataError(f"{path}: {where} (id {rid!r}): field {key!r} has type {type(value).__name__}")
    return value


def _parse_cmp(value: Any, path: Path, where: str, rid: str) -> list[tuple[str, str, float]]:
    """``cmp_results`` -> ``[(model_a, model_b, outcome)]``; empty when absent (None/"null")."""
    if value is None:
        return []
    if isinstance(value, str):
        if value.strip() in ("", "null"):
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: {where} (id {rid!r}): field 'cmp_results' is malformed JSON ({exc.msg})") from exc
        if value is None:
            return []
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where} (id {rid!r}): field 'cmp_results' must encode an object")
    out = []
    for key, verdict in value.items():
        pair = str(key).split(",")
        if len(pair) != 2 or not all(pair):
            raise DataError(f"{path}: {where} (id {rid!r}): field 'cmp_results' has bad key {key!r}")
        if verdict not in CMP_OUTCOMES:
            raise DataError(
                f"{path}: {where} (id {rid!r}): field 'cmp_results' has unknown verdict {verdict!r} "
                f"for {key!r}; expected one of {list(CMP_OUTCOMES)}"
            )
        out.append((pair[0], pair[1], CMP_OUTCOMES[verdict]))
    return out


def _parse_record(rec: Any, metric: str, path: Path, where: str) -> _Record:
    if not isinstance(rec, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(rec).__name__}")
    rid = _field(rec, "id", str, path, where, "?")
    category = rid.split("/", 1)[0]
    if not category:
        raise DataError(f"{path}: {where}: field 'id' is empty or starts with '/': {rid!r}")
    instruction = _field(rec, "instruction", str, path, where, rid, optional=True) or ""
    inp = _field(rec, "input", str, path, where, rid, optional=True) or ""
    text = "\n\n".join(p for p in (instruction, inp) if p.strip())
    scores: dict[str, float] = {}
    for i, cand in enumerate(_field(rec, "candidates", list, path, where, rid)):
        field_name = f"candidates[{i}]"
        if not isinstance(cand, dict) or not isinstance(cand.get("model"), str):
            raise DataError(f"{path}: {where} (id {rid!r}): field '{field_name}.model' missing or not a string")
        cand_scores = cand.get("scores")
        if not isinstance(cand_scores, dict) or metric not in cand_scores:
            raise DataError(f"{path}: {where} (id {rid!r}): field '{field_name}.scores.{metric}' is missing")
        value = cand_scores[metric]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(
                f"{path}: {where} (id {rid!r}): field '{field_name}.scores.{metric}' must be a number, got {value!r}"
            )
        if cand["model"] in scores:
            raise DataError(f"{path}: {where} (id {rid!r}): model {cand['model']!r} appears twice in 'candidates'")
        scores[cand["model"]] = np.nan if value is None else float(value)
    cmp = _parse_cmp(rec.get("cmp_results"), path, where, rid)
    return _Record(where=where, id=rid, text=text, category=category, scores=scores, cmp=cmp)


# --------------------------------------------------------------------------- loader
def load_mixinstruct(
    path: str | Path,
    *,
    metric: str = "bartscore",
    arms: Sequence[str] | None = None,
    missing: Literal["error", "drop"] = "error",
    nan: NanPolicy = "drop",
    prices: Mapping[str, float] | None = None,
    split: str | None = None,
    name: str = "mixinstruct",
) -> RoutingTable:
    """Load a MixInstruct JSON-lines (or JSON array) file (see module docstring).

    ``table.meta`` records ``split`` (default: guessed from the file name), ``metric``,
    ``n_with_cmp_results`` and the drop counts."""
    path = Path(path)
    _check_arguments(path, metric, missing)
    records = [_parse_record(rec, metric, path, where) for where, rec in iter_records(path)]
    known = {m for r in records for m in r.scores}
    arm_list = _choose_arms(records, arms, known, path)
    kept = _complete_records(records, arm_list, missing, path)
    pairwise = _pairwise(kept, arm_list, known if arms is not None else None, path)
    meta = {
        "split": split or _guess_split(path),
        "metric": metric,
        "n_records": len(records),
        "n_with_cmp_results": sum(1 for r in kept if r.cmp),
        "dropped_missing_candidate_rows": len(records) - len(kept),
    }
    return finish_table(
        _raw_table(kept, arm_list), name=name, path=path, nan=nan, prices=prices, pairwise=pairwise, meta=meta
    )


def _check_arguments(path: Path, metric: str, missing: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown MixInstruct metric {metric!r}; choose one of {list(METRICS)}")
    if missing not in ("error", "drop"):
        raise ConfigError(f"missing must be 'error' or 'drop', got {missing!r}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def _choose_arms(records: list[_Record], arms: Sequence[str] | None, known: set[str], path: Path) -> list[str]:
    """``arms``, else every candidate model in first-seen order; each must be a candidate somewhere."""
    if arms is None:
        arms = list(dict.fromkeys(model for r in records for model in r.scores))
    chosen = [str(a) for a in arms]
    if not chosen:
        raise DataError(f"{path}: no candidate models found (field 'candidates' empty or no records)")
    for arm in chosen:
        if arm not in known:
            raise DataError(f"{path}: unknown arm {arm!r}: no candidate has model {arm!r}")
    return chosen


def _complete_records(records: list[_Record], arms: list[str], missing: str, path: Path) -> list[_Record]:
    """The records with a candidate for every arm (``missing="error"``: a DataError on the first other)."""
    kept: list[_Record] = []
    for r in records:
        absent = [a for a in arms if a not in r.scores]
        if absent and missing == "error":
            raise DataError(
                f"{path}: {r.where} (id {r.id!r}): no candidate for model {absent[0]!r} in field 'candidates' "
                "(pass missing='drop' to skip such records)"
            )
        if not absent:
            kept.append(r)
    return kept


def _pairwise(
    kept: list[_Record], arms: list[str], left_out_from: set[str] | None, path: Path
) -> PairwiseJudgments | None:
    """The ``cmp_results`` of the kept records over ``arms`` (None when there are none). A pair naming a
    model outside ``arms`` is an error, unless the caller chose the arms and the model is one of the
    file's candidates (``left_out_from``)."""
    arm_index = {a: k for k, a in enumerate(arms)}
    rows, first, second, outcome = [], [], [], []
    for row, r in enumerate(kept):
        for a, b, result in r.cmp:
            if a not in arm_index or b not in arm_index:
                if left_out_from is not None and a in left_out_from and b in left_out_from:
                    continue  # a pair involving an arm the caller left out
                bad = a if a not in arm_index else b
                raise DataError(f"{path}: {r.where} (id {r.id!r}): field 'cmp_results' names unknown model {bad!r}")
            if a == b:
                continue
            rows.append(row)
            first.append(arm_index[a])
            second.append(arm_index[b])
            outcome.append(result)
    if not rows:
        return None
    return PairwiseJudgments(
        rows=np.asarray(rows, dtype=np.int64),
        first=np.asarray(first, dtype=np.int64),
        second=np.asarray(second, dtype=np.int64),
        outcome=np.asarray(outcome, dtype=np.float64),
    )


def _raw_table(kept: list[_Record], arms: list[str]) -> RawTable:
    scores = np.array([[r.scores[a] for a in arms] for r in kept], dtype=np.float64).reshape(len(kept), len(arms))
    return RawTable(
        ids=[r.id for r in kept],
        texts=[r.text for r in kept],
        categories=[r.category for r in kept],
        arms=arms,
        scores=scores,
        costs=np.full(scores.shape, np.nan),
        has_cost=np.zeros(len(arms), dtype=bool),
    )


def _guess_split(path: Path) -> str | None:
    for split, filename in SPLIT_FILES.items():
        if path.name.startswith(filename.split("_", 1)[0] + "_"):
            return split
    return None
