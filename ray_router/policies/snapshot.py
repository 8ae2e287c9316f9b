"""Policy snapshots on disk: arrays in one ``.npz``, everything else as JSON inside it.

A snapshot (``policy.snapshot()``) is a nested dict of JSON values and numpy arrays. ``save_snapshot``
writes it atomically (temp file + rename) so a crash never leaves a half-written snapshot behind.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

_ARRAY = "__ndarray__"
_FLOAT = "__float__"  # non-finite floats, which JSON cannot hold


def _split(obj: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        arrays.append(obj)
        return {_ARRAY: len(arrays) - 1}
    if isinstance(obj, Mapping):
        return {str(k): _split(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return {_FLOAT: repr(obj)}
    return obj


def _join(obj: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return arrays[obj[_ARRAY]]
        if set(obj) == {_FLOAT}:
            return float(obj[_FLOAT])
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def snapshot_to_bytes(snapshot: Mapping[str, Any]) -> bytes:
    arrays: list[np.ndarray] = []
    meta = json.dumps(_split(snapshot, arrays)).encode()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta, dtype=np.uint8), **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def snapshot_from_bytes(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["__meta__"].tobytes())
        arrays = [z[f"a{i}"] for i in range(len(z.files) - 1)]
    return _join(meta, arrays)


def save_snapshot(snapshot: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(snapshot_to_bytes(snapshot))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_snapshot(path: str | os.PathLike[str]) -> dict:
    return snapshot_from_bytes(Path(path).read_bytes())
