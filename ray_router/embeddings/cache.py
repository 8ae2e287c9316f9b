"""Persistent on-disk embedding cache, safe for several processes writing at once.

Layout: one directory per encoder identity under the root, holding ``identity.json`` and
append-only shard files ``shard-<time_ns>-<pid>-<rand>.npz`` (``keys``: (n, 32) uint8 sha256 of the
UTF-8 text; ``vectors``: (n, dim) float32). A writer saves a shard under a temporary name and
renames it atomically, so readers never see a partial shard and writers never touch each other's
files. Opening loads every shard; a miss first looks for shards written since (by other processes).
When a directory holds more than ``max_shards`` shards the smaller half is merged into one (size-tiered,
so big shards are rarely rewritten): the merged shard is written first and only shards already loaded
are deleted, so a concurrent reader can at worst miss an entry and re-encode it, never read a wrong
vector. Unreadable shards are skipped with a warning and dropped at the next merge.

Default root: ``$RAY_ROUTER_CACHE_DIR/embeddings``, else ``~/.cache/ray-router/embeddings``.
A root passed explicitly is used as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np

from ray_router.embeddings.base import Encoder
from ray_router.errors import DataError

SHARD_GLOB = "shard-*.npz"


def default_cache_dir() -> Path:
    """``$RAY_ROUTER_CACHE_DIR/embeddings``, else ``~/.cache/ray-router/embeddings``."""
    base = os.environ.get("RAY_ROUTER_CACHE_DIR") or "~/.cache/ray-router"
    return Path(base).expanduser() / "embeddings"


def text_key(text: str) -> bytes:
    """Cache key of a text: sha256 of its UTF-8 bytes (32 bytes)."""
    return hashlib.sha256(str(text).encode("utf-8")).digest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}{path.suffix}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Store:
    """Entries of one encoder identity: an in-memory index over the shards of its directory."""

    def __init__(self, directory: Path, identity: str, dim: int, max_shards: int):
        self.directory, self.identity, self.dim, self.max_shards = directory, identity, dim, max_shards
        self.entries: dict[bytes, np.ndarray] = {}
        self.shards: dict[str, list[bytes]] = {}  # shard file name -> its keys ([] if unreadable)
        self.lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        meta_path = directory / "identity.json"
        meta = {"identity": identity, "dim": dim}
        if not meta_path.exists():
            _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))
        else:
            found = json.loads(meta_path.read_text(encoding="utf-8"))
            if found != meta:
                raise DataError(f"{meta_path}: holds {found}, expected {meta} (cache directory name clash)")
        self.refresh()
        self._maybe_compact()

    def refresh(self) -> int:
        """Load shards not yet seen; returns the number of entries added."""
        before = len(self.entries)
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            if path.name in self.shards:
                continue
            self.shards[path.name] = []
            try:
                with np.load(path, allow_pickle=False) as z:
                    keys, vectors = z["keys"], z["vectors"]
            except FileNotFoundError:  # merged away by another process meanwhile
                del self.shards[path.name]
                continue
            except Exception as e:  # noqa: BLE001 - any unreadable shard is skipped, never trusted
                warnings.warn(f"embedding cache: skipping unreadable shard {path}: {e}", stacklevel=2)
                continue
            n = len(keys)
            if (
                keys.shape != (n, 32)
                or keys.dtype != np.uint8
                or vectors.shape != (n, self.dim)
                or vectors.dtype != np.float32
                or not np.isfinite(vectors).all()
            ):
                warnings.warn(f"embedding cache: skipping malformed shard {path}", stacklevel=2)
                continue
            names = [k.tobytes() for k in keys]
            self.shards[path.name] = names
            self.entries.update(zip(names, vectors))
        return len(self.entries) - before

    def put(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if keys:
            self._write_shard(keys, vectors)
            self.entries.update(zip(keys, vectors))
            self._maybe_compact()

    def _write_shard(self, keys: list[bytes], vectors: np.ndarray) -> None:
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 32)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        _atomic_write(self.directory / name, lambda f: np.savez(f, keys=key_array, vectors=vectors))
        self.shards[name] = list(keys)

    def _live_shards(self) -> list[str]:
        return [n for n in self.shards if (self.directory / n).exists()]

    def _maybe_compact(self) -> None:
        if len(self._live_shards()) > self.max_shards:
            self.compact(full=False)

    def compact(self, full: bool = True) -> None:
        """Merge loaded shards into one new shard, then delete the merged ones (unreadable shards
        are dropped). ``full=False`` merges only the smaller half, so big shards are rewritten rarely."""
        self.refresh()
        live = sorted(self._live_shards(), key=lambda n: len(self.shards[n]))
        victims = live if full else live[: max(2, len(live) // 2)]
        if len(victims) < 2:
            return
        keys = list(dict.fromkeys(k for n in victims for k in self.shards[n]))
        if keys:
            self._write_shard(keys, np.stack([self.entries[k] for k in keys]))
        for n in victims:
            (self.directory / n).unlink(missing_ok=True)
            del self.shards[n]


class EmbeddingCache:
    """Vectors keyed by (encoder identity, sha256 of the text), persisted under ``root``."""

    def __init__(self, root: str | os.PathLike[str] | None = None, max_shards: int = 64):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_shards = max_shards
        self._stores: dict[str, _Store] = {}
        self._lock = threading.Lock()

    def directory(self, identity: str) -> Path:
        """The directory of one identity: a readable slug plus a hash of the full identity."""
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", identity)[:80]
        return self.root / f"{slug}-{hashlib.sha256(identity.encode('utf-8')).hexdigest()[:12]}"

    def _store(self, identity: str, dim: int) -> _Store:
        with self._lock:
            store = self._stores.get(identity)
            if store is None:
                store = _Store(self.directory(identity), identity, dim, self.max_shards)
                self._stores[identity] = store
            elif store.dim != dim:
                raise DataError(f"embedding cache: identity {identity!r} has dim {store.dim}, not {dim}")
            return store

    def get(self, identity: str, dim: int, keys: Sequence[bytes], refresh: bool = False) -> list[np.ndarray | None]:
        """Cached vector of each key, or None; ``refresh`` first loads shards written since opening."""
        store = self._store(identity, dim)
        with store.lock:
            if refresh:
                store.refresh()
            return [store.entries.get(k) for k in keys]

    def put(self, identity: str, dim: int, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Persist new vectors (one shard per call)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), dim):
            raise DataError(f"embedding cache: vectors of shape {vectors.shape}, expected {(len(keys), dim)}")
        store = self._store(identity, dim)
        with store.lock:
            store.put(list(keys), vectors)

    def compact(self, identity: str, dim: int) -> None:
        """Merge all shards of one identity into one."""
        store = self._store(identity, dim)
        with store.lock:
            store.compact()

    def n_entries(self, identity: str, dim: int) -> int:
        return len(self._store(identity, dim).entries)


class CachedEncoder:
    """An :class:`Encoder` that answers from the on-disk cache and encodes only unseen texts.

    Same ``identity`` and ``dim`` as the wrapped encoder. Counters: ``n_encoded`` counts texts sent to
    the wrapped encoder (each distinct text at most once per cache), ``n_hits`` counts requested texts
    answered without encoding (repeats inside one call included), so every requested text adds one to
    exactly one of them. New texts are encoded and saved ``chunk_size`` at a time, so an interrupted
    long encode keeps its progress.
    """

    def __init__(
        self,
        encoder: Encoder,
        cache_dir: str | os.PathLike[str] | EmbeddingCache | None = None,
        chunk_size: int = 4096,
    ):
        self.encoder = encoder
        self.chunk_size = chunk_size
        self.cache = cache_dir if isinstance(cache_dir, EmbeddingCache) else EmbeddingCache(cache_dir)
        self.identity: str = encoder.identity
        self.n_encoded = 0
        self.n_hits = 0

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        texts = [str(t) for t in texts]
        dim = self.dim
        keys = [text_key(t) for t in texts]
        found = self.cache.get(self.identity, dim, keys)
        missing = {k: t for k, t, v in zip(keys, texts, found) if v is None}  # dedupes, keeps order
        if missing:  # another process may have written them since we opened the cache
            again = self.cache.get(self.identity, dim, list(missing), refresh=True)
            missing = {k: t for (k, t), v in zip(missing.items(), again) if v is None}
        items = list(missing.items())
        for start in range(0, len(items), self.chunk_size):  # persist progress of long encodes
            chunk = items[start : start + self.chunk_size]
            todo = [t for _, t in chunk]
            new = self.encoder.encode(todo) if batch_size is None else self.encoder.encode(todo, batch_size=batch_size)
            new = np.asarray(new, dtype=np.float32)
            if new.shape != (len(todo), dim):
                raise DataError(f"encoder {self.identity!r} returned shape {new.shape}, expected {(len(todo), dim)}")
            self.cache.put(self.identity, dim, [k for k, _ in chunk], new)
            self.n_encoded += len(todo)
        self.n_hits += len(texts) - len(missing)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        rows = cast("list[np.ndarray]", self.cache.get(self.identity, dim, keys))  # every miss was just stored
        return np.stack(rows).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"CachedEncoder({self.encoder!r}, root={str(self.cache.root)!r})"
