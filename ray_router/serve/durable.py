"""Durable state of the posterior: the feedback log and the directory lock.

State directory layout::

    <state_dir>/
      LOCK                      file lock (filelock) held by the one posterior that writes here
      meta.json                 arm ids, encoder identity, dim (checked on every start)
      feedback.jsonl            append-only feedback log: one JSON object per line, with "seq"
      posterior.snapshot.npz    latest snapshot (atomic rename), see state.py
      secrets/{token,hmac_key}  generated secrets when the env vars are not set (mode 0600)

Feedback log: a record is acknowledged only after its line is written *and* fsynced. Writers group
commit: every record that arrives while one fsync runs goes into the next write + fsync, so the
cost of durability is one fsync per batch, not per request. A crash can leave a partial last line,
which was never acknowledged; opening the log cuts it off. A bad line before the last is an error
(the file was damaged by something else) and stops the start with its line number.

Decisions awaiting feedback are kept nowhere: a decision id carries its own context, signed
(:mod:`ray_router.serve.tokens`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from ray_router.errors import ConfigError, DataError

FEEDBACK_LOG = "feedback.jsonl"


def encode_vector(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()


def _dumps(record: dict) -> bytes:
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------- lock
class StateLock:
    """An exclusive lock on ``<dir>/LOCK`` (``filelock``: an ``flock`` on POSIX): one posterior
    writes a state directory.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a restarted posterior gets
    it at once; a second live replica waits ``timeout_s`` and then fails with a clear message. The
    lock is not thread-local: the posterior takes it on its mutation thread and may release it on
    another."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "LOCK"
        self._lock = FileLock(self.path, thread_local=False)

    def acquire(self, timeout_s: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=timeout_s)
        except Timeout:
            raise ConfigError(
                f"{self.path} is locked by another posterior for {timeout_s:.0f}s: one state directory "
                "takes one writer (keep the Posterior deployment at num_replicas: 1)"
            ) from None

    def release(self) -> None:
        self._lock.release(force=True)


# ------------------------------------------------------------------------ feedback log
class FeedbackJournal:
    """Append-only JSON-lines log of accepted feedback. ``seq`` numbers records 1, 2, 3, ..."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None
        self.size_bytes = 0
        self.last_seq = 0
        self.n_fsyncs = 0

    def open(self) -> None:
        """Open for appending; cut off a partial last line (never acknowledged) and learn last_seq."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        good_end, last_seq = 0, 0
        for end, rec in self._scan_fd(self.path, 0, tolerate_tail=True):
            good_end, last_seq = end, int(rec["seq"])
        size = os.fstat(fd).st_size
        if size != good_end:
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        self._fd, self.size_bytes, self.last_seq = fd, good_end, last_seq

    @staticmethod
    def _scan_fd(path: Path, offset: int, tolerate_tail: bool) -> Iterator[tuple[int, dict]]:
        """Records from byte ``offset``; a last line without its newline is a torn write (never
        acknowledged: the newline is part of every fsynced record) and is skipped."""
        if not path.exists():
            return
        with open(path, "rb") as fh:
            fh.seek(offset)
            pos = offset
            for line in fh:
                if not line.endswith(b"\n"):
                    if tolerate_tail:
                        return
                    raise DataError(f"{path}: partial record at byte {pos}")
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or "seq" not in rec:
                        raise ValueError("not a feedback record")
                except ValueError as e:
                    raise DataError(f"{path}: bad record at byte {pos}: {e}") from None
                pos += len(line)
                yield pos, rec

    def scan(self, offset: int = 0) -> Iterator[tuple[int, dict]]:
        """``(end_offset, record)`` for every complete record from byte ``offset`` on."""
        return self._scan_fd(self.path, offset, tolerate_tail=True)

    def append(self, records: list[dict]) -> list[tuple[int, int]]:
        """Assign seqs, write all records in one write, fsync; return ``(seq, end_offset)`` each.

        On an error nothing is acknowledged and the file is cut back to where it was."""
        if self._fd is None:
            raise RuntimeError("journal is not open")
        out, chunks, pos, seq = [], [], self.size_bytes, self.last_seq
        for rec in records:
            seq += 1
            rec["seq"] = seq
            line = _dumps(rec)
            chunks.append(line)
            pos += len(line)
            out.append((seq, pos))
        data = b"".join(chunks)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(self._fd)
                self.n_fsyncs += 1
        except BaseException:
            try:
                os.ftruncate(self._fd, self.size_bytes)
            finally:
                for rec in records:
                    rec.pop("seq", None)
            raise
        self.size_bytes, self.last_seq = pos, seq
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GroupCommitter:
    """Async front of a :class:`FeedbackJournal`: ``await append(record)`` returns once the record
    is durable. Records queued while a write + fsync runs go out together in the next one.

    ``on_durable(records)`` is called on the event loop, in seq order, after each batch is durable
    and before any of its callers resume: the posterior uses it to queue the updates in log order.
    """

    def __init__(self, journal: FeedbackJournal, executor: Executor, on_durable: Callable[[list[dict]], None]):
        self.journal = journal
        self.executor = executor
        self.on_durable = on_durable
        self._queue: list[tuple[dict, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.n_batches = 0

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _event(self) -> asyncio.Event:
        """The wake-up event :meth:`start` creates."""
        if self._wakeup is None:
            raise RuntimeError("the feedback log writer was never started (call start() first)")
        return self._wakeup

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def submit(self, record: dict) -> asyncio.Future:
        """Queue ``record``; the future resolves to it (with ``seq``) once it is durable."""
        if not self.alive:
            raise RuntimeError("the feedback log writer is not running")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((record, fut))
        self._event().set()
        return fut

    async def append(self, record: dict) -> dict:
        return await self.submit(record)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._event().wait()
            self._event().clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            records = [r for r, _ in batch]
            try:
                placed = await loop.run_in_executor(self.executor, self.journal.append, records)
            except Exception as e:  # noqa: BLE001 - handed to every waiter
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for rec, (_, end) in zip(records, placed):
                rec["_end"] = end
            self.n_batches += 1
            try:
                self.on_durable(records)
            finally:
                for rec, fut in batch:
                    if not fut.done():
                        fut.set_result(rec)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # its failure went to the waiters
                await self._task


def read_meta(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
