"""Query texts kept beside the feedback log (``state.keep_queries: true``), so that a change of
encoder can rebuild the posterior: the log and the snapshots hold each duel's query *embedding*,
not its text, and an embedding of one encoder means nothing to another.

Each Ingress replica appends ``{"k": key, "t": text}`` lines to a file of its own under
``<state dir>/queries/`` for every decision that can take feedback (duel routes, chat requests),
where ``key`` is :func:`query_key` of the quantised embedding the decision id carries: the very
vector the log record and the snapshot's history hold, so a duel finds its text by its own
embedding, with no change to decision ids, records or snapshots. Writes are buffered (flushed every
second and every ``max_buffer`` lines) and not fsynced: a text lost in a crash only means that its
duel cannot be re-embedded (the rebuild counts it as missing). Identical queries share one key.

On an encoder change the posterior (:class:`~ray_router.serve.state.PosteriorState`) reads the
texts, encodes the ones its duels need with the new encoder (through the embedding cache), and
rebuilds from the snapshot's history and the log with the new embeddings.

Privacy: this stores what users asked, in clear, for as long as the files are kept; it is off by
default. Deleting ``queries/`` is safe at any time (a later encoder change then re-embeds nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from pathlib import Path

import numpy as np

logger = logging.getLogger("ray.serve")

QUERIES_DIR = "queries"


def query_key(x: np.ndarray) -> str:
    """The key of a query embedding: a hash of its float16 bytes (what a decision id carries;
    float16 -> float32 -> float16 is exact, so the log's and the history's float32 copies give the
    same key)."""
    return hashlib.blake2b(np.asarray(x, dtype="<f2").tobytes(), digest_size=12).hexdigest()


class QueryWriter:
    """One replica's append-only file of query texts."""

    def __init__(self, state_dir: str | Path, max_buffer: int = 256):
        self.dir = Path(state_dir) / QUERIES_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.path = self.dir / name
        self.max_buffer = max_buffer
        self._buf: list[str] = []
        self._seen: set[str] = set()  # keys this replica wrote (a repeated query is written once)
        self.written = 0

    def add(self, x: np.ndarray | None, text: str) -> None:
        if x is None:
            return
        key = query_key(x)
        if key in self._seen:
            return
        self._seen.add(key)
        if len(self._seen) > 1_000_000:  # bound the memory of the de-duplication, not the file
            self._seen.clear()
        self._buf.append(json.dumps({"k": key, "t": text}, ensure_ascii=False))
        if len(self._buf) >= self.max_buffer:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        lines, self._buf = self._buf, []
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
            self.written += len(lines)
        except OSError as e:  # best effort: a full disk must not fail routes
            logger.warning(f"query store: could not write {len(lines)} texts to {self.path}: {e!r}")


def load_queries(state_dir: str | Path, keys: set[str] | None = None) -> dict[str, str]:
    """``key -> text`` from every replica's file (only ``keys`` when given). A torn last line (a
    crash mid-write) or any unreadable line is skipped."""
    out: dict[str, str] = {}
    folder = Path(state_dir) / QUERIES_DIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    k, t = rec["k"], rec["t"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(k, str) and isinstance(t, str) and (keys is None or k in keys):
                    out[k] = t
    return out
