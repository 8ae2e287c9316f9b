"""Policy snapshots on disk: arrays in one ``.npz``, everything else as JSON inside it.

A snapshot (``policy.snapshot()``) is a nested dict of JSON values and numpy arrays. ``save_snapshot``
writes it atomically (temp file + rename) so a crash never leaves a half-written snapshot behind.

Every snapshot starts with the header :class:`PolicySnapshot` (the policy's registered name); each
policy declares the rest of its fields as a ``TypedDict`` that extends it, and checks the header
with :func:`check_header` before it restores anything.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from ray_router.errors import ConfigError


class PolicySnapshot(TypedDict):
    """The header of every policy snapshot: which policy wrote it. A plain dict at run time."""

    policy: str


def check_header(snapshot: Mapping[str, Any], name: str) -> None:
    """ConfigError unless ``snapshot`` is a snapshot of the policy ``name``."""
    if not isinstance(snapshot, Mapping):
        raise ConfigError(f"a policy snapshot is a mapping, got {type(snapshot).__name__}")
    if snapshot.get("policy") != name:
        raise ConfigError(f"snapshot is of policy {snapshot.get('policy')!r}, not {name!r}")


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
    # dict[str, Any]: numpy's stubs cannot tell that no key is savez's keyword ``allow_pickle``
    named: dict[str, Any] = {f"a{i}": a for i, a in enumerate(arrays)}
    np.savez(buf, __meta__=np.frombuffer(meta, dtype=np.uint8), **named)
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
