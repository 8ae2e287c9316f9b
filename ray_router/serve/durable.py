"""Durable state of the posterior: the segmented feedback log, the directory lock, fsync helpers.

State directory layout::

    <state_dir>/
      LOCK                          file lock (filelock) held by the one posterior that writes here
      LOCK.owner                    host and pid of the last posterior that took it (for operators)
      meta.json                     arm ids, encoder identity, dim (checked on every start)
      feedback/                     the feedback log, in segments
        seg-00000000000000000001.log    records 1 .. (the next segment's first seq - 1)
        seg-00000000000000019873.log    the active (last) segment: appends go here
      posterior.snapshot.npz        latest snapshot (atomic rename), see state.py
      feedback.jsonl.migrated       an old JSON-lines log after its migration (kept; delete it at will)
      secrets/{token,hmac_key}      generated secrets when the env vars are not set (mode 0600)

Segment file: a 16-byte header (``SEGMENT_MAGIC``, then the first seq as u64) and frames, one per
record, little-endian::

    u32 FRAME_MAGIC | u32 payload length | u32 crc32(length field + payload) | payload

    payload: u8 version (1 to 4), u64 seq, f64 ts, i64 expires_at, u8 outcome (0 first, 1 second, 2 tie),
             u16 first, u16 second, u16 n_offered (0xFFFF: every arm), u16 dim,
             u16 |nonce|, u32 |request_id|, u16 |first_id|, u16 |second_id|,
             [versions 2 to 4: u8 source (0 human, 1 judge), f64 weight] [versions 3 and 4: f64 propensity
             (version 4: NaN when unknown)] [version 4: u16 |config_version|]
             n_offered x u16, dim x f32 (the embedding, raw), then the four strings (UTF-8)
             [version 4: and the config version's]

A record's ``source`` says who gave the verdict (``human``: ``POST /v1/feedback``; ``judge``: the
router's shadow duels, :mod:`ray_router.serve.judge`) and ``weight`` how much it counts in the
posterior's likelihood, and ``propensity`` the probability with which the route played that pair
(its decision id's count out of the sample pool, see ``serve_configs/README.md``, *Propensities*).
A human verdict of weight 1 without a propensity is written as version 1 (readable by the versions
before judges), one without a propensity as version 2, one with as version 3; a record that names
the service configuration it was logged under (``config_version``, what the posterior writes since
runtime arm changes) as version 4. Version-1 records read as ``source: human, weight: 1``; versions 1
and 2 as ``propensity: None``; versions 1 to 3 as ``config_version: ""``.

About 1.7 kB a record at d = 384 (the JSON line was ~2.3 kB). Seqs are 1, 2, 3, ... without gaps
across segments; a segment's name and header carry its first seq.

Appends: a record is acknowledged only after its frame is written *and* fsynced. Writers group
commit: every record that arrives while one fsync runs goes into the next write + fsync, so the
cost of durability is one fsync per batch, not per request. Before an append, a segment that has
reached ``segment_bytes`` (or ``segment_records``) is closed and a new one created (temp file,
fsync, rename, directory fsync).

A crash can leave a torn last frame, which was never acknowledged: opening the log finds the first
frame that is short or fails its checksum in the last segment, checks that no valid frame follows
it (else the file was damaged by something else: an error naming the segment and byte) and cuts
it off. Any bad frame in an earlier segment is an error.

Compaction (:meth:`FeedbackJournal.compact`): after a snapshot that covers seq S is durably written
(file fsync, rename, directory fsync), every segment whose records all have seq <= S is deleted,
oldest first, then the directory is fsynced. The active segment is never deleted. A crash between
any two of these steps loses nothing (the records a deleted segment held are in a durable
snapshot) and applies nothing twice (a restart skips records with seq <= the snapshot's).

Followers (:meth:`FeedbackJournal.tail`): a standby posterior reads the log while another process
holds the lock and appends. It never writes, cuts or deletes anything; it reads from its position
to the first frame that is incomplete (the writer may be writing it: read again next poll), and
raises :class:`LogCompacted` when the records it still needs were compacted away (then it re-reads
the newest snapshot, which covers them).

Decisions awaiting feedback are kept nowhere: a decision id carries its own context, signed
(:mod:`ray_router.serve.tokens`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from ray_router.errors import ConfigError, DataError

LOG_DIR = "feedback"
LEGACY_LOG = "feedback.jsonl"  # the JSON-lines log of earlier versions: migrated on start
SEGMENT_BYTES = 32 << 20  # roll to a new segment once the active one holds this many bytes
OUTCOMES = {"first": 1.0, "second": 0.0, "tie": 0.5}  # outcome label -> y of the duel

SEGMENT_MAGIC = b"RRFLOG\x00\x01"
_HEADER = struct.Struct("<8sQ")
FRAME_MAGIC = 0x31465252  # b"RRF1"
_FRAME = struct.Struct("<III")
_REC = struct.Struct("<BQdqBHHHHHIHH")
_REC_V2 = struct.Struct("<BQdqBHHHHHIHHBd")  # version 2: _REC, then source and weight
_REC_V3 = struct.Struct("<BQdqBHHHHHIHHBdd")  # version 3: _REC_V2, then the decision's propensity
# version 4: _REC_V3 (propensity NaN: unknown), then the length of the config version's string
_REC_V4 = struct.Struct("<BQdqBHHHHHIHHBddH")
_VERSION = 1
_VERSION_SOURCES = 2
_VERSION_PROPENSITY = 3
_VERSION_CONFIG = 4
SOURCES = ("human", "judge")  # who gave a verdict (the record's source byte is the index)
_ALL_ARMS = 0xFFFF
_LABELS = tuple(OUTCOMES)
_SEGMENT_NAME = re.compile(r"^seg-(\d{20})\.log$")

Position = tuple[int, int]  # (first seq of a segment, byte offset in it): where a record ends


def encode_vector(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a create, rename or delete in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ record codec
def encode_record(rec: dict) -> bytes:
    """One frame (header + payload) for a feedback record (see the module docstring)."""
    try:
        x = rec["x"]
        if isinstance(x, str):  # a record of the JSON log (base64)
            x = decode_vector(x)
        xb = np.ascontiguousarray(x, dtype="<f4").reshape(-1)
        offered = rec["offered"]
        strings = [str(rec[k]).encode("utf-8") for k in ("nonce", "request_id", "first_id", "second_id")]
        source, weight = rec.get("source", "human"), float(rec.get("weight", 1.0))
        propensity = rec.get("propensity")
        config = str(rec.get("config_version") or "").encode("utf-8")
        plain = source == "human" and weight == 1.0 and propensity is None
        extra: tuple[float, ...]
        if config:
            strings.append(config)
            prop = float("nan") if propensity is None else float(propensity)
            fmt, version, extra = _REC_V4, _VERSION_CONFIG, (SOURCES.index(source), weight, prop, len(config))
        elif plain:
            fmt, version, extra = _REC, _VERSION, ()
        elif propensity is None:
            fmt, version, extra = _REC_V2, _VERSION_SOURCES, (SOURCES.index(source), weight)
        else:
            fmt, version, extra = _REC_V3, _VERSION_PROPENSITY, (SOURCES.index(source), weight, float(propensity))
        head = fmt.pack(
            version,
            int(rec["seq"]),
            float(rec["ts"]),
            int(rec["expires_at"]),
            _LABELS.index(rec["outcome"]),
            int(rec["first"]),
            int(rec["second"]),
            _ALL_ARMS if offered is None else len(offered),
            xb.shape[0],
            *(len(s) for s in strings[:4]),
            *extra,
        )
    except (KeyError, ValueError, TypeError, struct.error) as e:
        raise DataError(f"cannot encode feedback record {rec.get('seq')}: {e!r}") from None
    parts = [head]
    if offered is not None:
        parts.append(np.asarray(offered, dtype="<u2").tobytes())
    parts.append(xb.tobytes())
    parts.extend(strings)
    payload = b"".join(parts)
    length = struct.pack("<I", len(payload))
    crc = zlib.crc32(payload, zlib.crc32(length))
    return _FRAME.pack(FRAME_MAGIC, len(payload), crc) + payload


def decode_record(payload: bytes | memoryview) -> dict:
    """The record of one frame's payload (checksum already checked)."""
    version = payload[0]
    if version == _VERSION:
        (_, seq, ts, expires, outcome, first, second, n_off, dim, *lens) = _REC.unpack_from(payload, 0)
        source, weight, pos, propensity = "human", 1.0, _REC.size, None
    elif version in (_VERSION_SOURCES, _VERSION_PROPENSITY, _VERSION_CONFIG):
        fmt = {_VERSION_SOURCES: _REC_V2, _VERSION_PROPENSITY: _REC_V3, _VERSION_CONFIG: _REC_V4}[version]
        fields = fmt.unpack_from(payload, 0)
        (_, seq, ts, expires, outcome, first, second, n_off, dim, *lens) = fields[:13]
        src, weight = fields[13], fields[14]
        if src >= len(SOURCES):
            raise DataError(f"feedback record {seq} has an unknown source {src}")
        source, pos = SOURCES[src], fmt.size
        propensity = float(fields[15]) if len(fields) > 15 and not math.isnan(fields[15]) else None
        if len(fields) > 16:
            lens.append(fields[16])
    else:
        seq = _seq_of_payload(memoryview(payload))
        raise DataError(f"feedback record {seq} has format version {version}; this version reads 1 to 4")
    offered = None
    if n_off != _ALL_ARMS:
        offered = np.frombuffer(payload, dtype="<u2", count=n_off, offset=pos).tolist()
        pos += 2 * n_off
    x = np.frombuffer(payload, dtype="<f4", count=dim, offset=pos).copy()
    pos += 4 * dim
    strings = []
    for n in lens:
        strings.append(bytes(payload[pos : pos + n]).decode("utf-8"))
        pos += n
    label = _LABELS[outcome]
    return {
        "seq": seq,
        "nonce": strings[0],
        "request_id": strings[1],
        "outcome": label,
        "y": OUTCOMES[label],
        "first": first,
        "second": second,
        "first_id": strings[2],
        "second_id": strings[3],
        "offered": offered,
        "x": x,
        "expires_at": expires,
        "ts": ts,
        "source": source,
        "weight": float(weight),
        "propensity": propensity,
        "config_version": strings[4] if len(strings) > 4 else "",
    }


def _frame_at(buf: memoryview, pos: int) -> int | None:
    """End of the valid frame that starts at ``pos``, or None (short, bad magic, bad checksum)."""
    if pos + _FRAME.size > len(buf):
        return None
    magic, length, crc = _FRAME.unpack_from(buf, pos)
    end = pos + _FRAME.size + length
    if magic != FRAME_MAGIC or length < _REC.size or end > len(buf):
        return None
    if zlib.crc32(buf[pos + _FRAME.size : end], zlib.crc32(buf[pos + 4 : pos + 8])) != crc:
        return None
    return end


def _valid_frame_after(buf: memoryview, pos: int) -> int | None:
    """Where a valid frame starts after ``pos`` (damage, not a torn tail, if there is one)."""
    magic = struct.pack("<I", FRAME_MAGIC)
    data = buf.obj if isinstance(buf.obj, bytes) else bytes(buf)
    i = data.find(magic, pos + 1)
    while i != -1:
        if _frame_at(buf, i) is not None:
            return i
        i = data.find(magic, i + 1)
    return None


class LogCompacted(Exception):
    """The records a follower needs next are gone from the log (a snapshot covers them)."""


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
        self.owner_path = Path(directory) / "LOCK.owner"  # who holds it: information for operators only
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
        self._write_owner()

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting: True when it is ours now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        self._write_owner()
        return True

    def _write_owner(self) -> None:
        """``LOCK.owner``: the holder's host (a pod's name) and pid, for a standby to report. Not the
        lock itself (the ``flock`` is): a stale file after a crash only misnames a past holder."""
        tmp = self.owner_path.with_name(f".{self.owner_path.name}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
            os.replace(tmp, self.owner_path)

    def owner(self) -> dict[str, Any] | None:
        """What the last holder wrote into ``LOCK.owner`` (None: nothing readable)."""
        try:
            out = json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            return None
        return out if isinstance(out, dict) else None

    @property
    def held(self) -> bool:
        return bool(self._lock.is_locked)

    def release(self) -> None:
        self._lock.release(force=True)  # a no-op when this object does not hold it


# ------------------------------------------------------------------------ feedback log
def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


class FeedbackJournal:
    """The segmented, append-only feedback log in ``directory``. ``seq`` numbers records 1, 2, 3, ...

    Positions (where a record ends) are ``(first seq of its segment, byte offset)``: a snapshot
    keeps the position of its last record, and a restart reads from there."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fsync: bool = True,
        segment_bytes: int = SEGMENT_BYTES,
        segment_records: int = 0,
    ):
        self.dir = Path(directory)
        self.fsync = fsync
        self.segment_bytes = int(segment_bytes)
        self.segment_records = int(segment_records)  # 0: no record limit
        self._fd: int | None = None
        self._sizes: dict[int, int] = {}  # first seq of each live segment -> its size in bytes
        self._active = 0  # first seq of the active segment
        self._active_records = 0
        self._lock = threading.Lock()  # the segment table: appends (roll) vs compaction
        self.last_seq = 0
        self.n_fsyncs = 0
        self.n_rolls = 0
        self.n_deleted = 0

    # ---------------------------------------------------------------- layout
    def path_of(self, first_seq: int) -> Path:
        return self.dir / segment_name(first_seq)

    def _list(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for n in os.listdir(self.dir) if (m := _SEGMENT_NAME.match(n)))

    @property
    def segments(self) -> list[int]:
        """First seqs of the live segments, oldest first."""
        with self._lock:
            return sorted(self._sizes)

    @property
    def size_bytes(self) -> int:
        """Bytes of every live segment."""
        with self._lock:
            return sum(self._sizes.values())

    @property
    def first_seq(self) -> int:
        """The first seq the log holds (records before it were compacted away)."""
        segments = self.segments
        return segments[0] if segments else self.last_seq + 1

    def _read(self, first: int) -> bytes:
        path = self.path_of(first)
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            raise DataError(f"{path}: shorter than a segment header ({len(data)} bytes)")
        magic, head_first = _HEADER.unpack_from(data)
        if magic != SEGMENT_MAGIC:
            raise DataError(f"{path} is not a feedback log segment of this version (header {magic!r})")
        if head_first != first:
            raise DataError(f"{path}: its header says first seq {head_first}, its name {first}")
        return data

    def _frames(self, first: int, data: bytes, start: int, last: bool) -> Iterator[tuple[int, memoryview]]:
        """``(frame end, payload)`` of each frame from byte ``start``. In the last segment a bad
        frame with no valid frame after it is a torn write (never acknowledged) and ends the scan;
        any other bad frame is damage."""
        buf = memoryview(data)
        pos = start
        while pos < len(buf):
            end = _frame_at(buf, pos)
            if end is None:
                if last and _valid_frame_after(buf, pos) is None:
                    return
                follows = " (valid records follow it)" if last else ""
                raise DataError(f"{self.path_of(first)}: damaged record at byte {pos}{follows}")
            yield end, buf[pos + _FRAME.size : end]
            pos = end

    def _create(self, first: int) -> None:
        """A new empty segment: temp file, header, fsync, rename, directory fsync."""
        tmp = self.dir / f".{segment_name(first)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(_HEADER.pack(SEGMENT_MAGIC, first))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path_of(first))
        fsync_dir(self.dir)

    # ------------------------------------------------------------------ open
    def open(self, start_seq: int = 1) -> None:
        """Open for appending: cut a torn last frame, learn ``last_seq``. An empty directory gets
        its first segment, starting at ``start_seq``."""
        created = not self.dir.is_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(self.dir.parent)
        for stray in self.dir.glob(".seg-*.tmp"):  # a segment being created when a crash came
            stray.unlink()
        firsts = self._list()
        if not firsts:
            self._create(start_seq)
            firsts = [start_seq]
        sizes = {f: self.path_of(f).stat().st_size for f in firsts}
        last = firsts[-1]
        data = self._read(last)
        good_end, seq, count = _HEADER.size, last - 1, 0
        for end, payload in self._frames(last, data, _HEADER.size, last=True):
            s = _seq_of_payload(payload)
            if s != seq + 1:
                raise DataError(f"{self.path_of(last)}: record seq {s} follows seq {seq}")
            good_end, seq, count = end, s, count + 1
        fd = os.open(self.path_of(last), os.O_RDWR | os.O_APPEND)
        if len(data) != good_end:
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        sizes[last] = good_end
        with self._lock:
            self._sizes = sizes
        self._fd, self._active, self._active_records, self.last_seq = fd, last, count, seq

    # ------------------------------------------------------------------ read
    def start_for(self, seq: int, hint: Position | None = None) -> Position:
        """Where to read from to find the records after ``seq``: ``hint`` (a snapshot's position)
        when its segment still exists, else the start of the segment that holds ``seq + 1``."""
        firsts = self._list()
        if hint is not None and hint[0] in firsts:
            return int(hint[0]), int(hint[1])
        holding = [f for f in firsts if f <= seq + 1]
        return (holding[-1] if holding else (firsts[0] if firsts else seq + 1)), _HEADER.size

    def scan(self, start: Position | None = None) -> Iterator[tuple[Position, dict]]:
        """``(position after it, record)`` for every complete record from ``start`` on (default:
        the oldest record), across segments; seqs must run without gaps."""
        firsts = self._list()
        if not firsts:
            return
        seg, offset = start if start is not None else (firsts[0], _HEADER.size)
        expect: int | None = None
        for f in firsts:
            if f < seg:
                continue
            data = self._read(f)
            pos = offset if f == seg else _HEADER.size
            if pos > len(data):
                raise DataError(f"{self.path_of(f)}: position {pos} is past its end ({len(data)} bytes)")
            if pos == _HEADER.size:
                if expect is not None and expect != f:
                    raise DataError(f"{self.path_of(f)} starts at seq {f}, the segment before it ends at {expect - 1}")
                expect = f
            for end, payload in self._frames(f, data, pos, last=f == firsts[-1]):
                rec = decode_record(payload)
                if expect is not None and rec["seq"] != expect:
                    raise DataError(f"{self.path_of(f)}: record seq {rec['seq']} where seq {expect} was due")
                expect = rec["seq"] + 1
                yield (f, end), rec

    def tail(self, after_seq: int, position: Position | None, limit: int = 4096) -> list[tuple[Position, dict]]:
        """Read-only, for a follower while another process appends: up to ``limit`` complete records
        after seq ``after_seq``, read from ``position`` (where that record ends) when its segment
        still exists, each with the position after it. Stops at the first frame that is not complete
        yet (never cuts it). Refreshes the segment table and ``last_seq`` that :meth:`open` would
        learn (the stats of a follower). Raises :class:`LogCompacted` when the records after
        ``after_seq`` were deleted by a compaction."""
        firsts = self._list()
        sizes: dict[int, int] = {}
        for f in firsts:
            with contextlib.suppress(FileNotFoundError):
                sizes[f] = self.path_of(f).stat().st_size
        with self._lock:
            self._sizes = sizes
        if not firsts:
            return []
        if position is not None and position[0] in firsts:
            seg, offset = int(position[0]), int(position[1])
        else:
            holding = [f for f in firsts if f <= after_seq + 1]
            if not holding:
                raise LogCompacted(f"{self.dir} starts at seq {firsts[0]}; records after {after_seq} were compacted")
            seg, offset = holding[-1], _HEADER.size
        out: list[tuple[Position, dict]] = []
        expect = after_seq + 1
        for f in firsts:
            if f < seg:
                continue
            start = offset if f == seg else _HEADER.size
            try:
                with open(self.path_of(f), "rb") as fh:
                    head = fh.read(_HEADER.size)
                    fh.seek(start)
                    data = fh.read()
            except FileNotFoundError:
                raise LogCompacted(f"{self.path_of(f)} was deleted while it was read") from None
            if len(head) < _HEADER.size:
                return out  # being created (the writer renames a complete header into place; be safe)
            magic, head_first = _HEADER.unpack_from(head)
            if magic != SEGMENT_MAGIC or head_first != f:
                raise DataError(
                    f"{self.path_of(f)} is not a feedback log segment (header {magic!r}, first {head_first})"
                )
            if start == _HEADER.size and f > expect:
                raise DataError(f"{self.path_of(f)} starts at seq {f}, the segment before it ends at {expect - 1}")
            buf = memoryview(data)
            pos = 0
            while pos < len(buf):
                end = _frame_at(buf, pos)
                if end is None:  # not complete yet: the writer may be writing it
                    return out
                rec = decode_record(buf[pos + _FRAME.size : end])
                seq = int(rec["seq"])
                if seq < expect:  # before after_seq: a segment read from its start
                    pos = end
                    continue
                if seq != expect:
                    raise DataError(f"{self.path_of(f)}: record seq {seq} where seq {expect} was due")
                out.append(((f, start + end), rec))
                self.last_seq = max(self.last_seq, seq)
                expect, pos = seq + 1, end
                if len(out) >= limit:
                    return out
        return out

    # ----------------------------------------------------------------- write
    def append(self, records: list[dict]) -> list[tuple[int, Position]]:
        """Assign seqs, write all records in one write, fsync; return ``(seq, position)`` each.

        On an error nothing is acknowledged and the segment is cut back to where it was."""
        return self._write(records, assign=True)

    def append_existing(self, records: list[dict]) -> list[tuple[int, Position]]:
        """Append records that carry their seq already (a migration): they must continue the log."""
        return self._write(records, assign=False)

    def _write(self, records: list[dict], assign: bool) -> list[tuple[int, Position]]:
        if self._fd is None:
            raise RuntimeError("journal is not open")
        if self._due_to_roll():
            self._roll()
        fd, active, start = self._fd, self._active, self._sizes[self._active]
        out, chunks, pos, seq = [], [], start, self.last_seq
        try:
            for rec in records:
                seq += 1
                if assign:
                    rec["seq"] = seq
                elif int(rec.get("seq", -1)) != seq:
                    raise DataError(f"record seq {rec.get('seq')} does not continue the log at seq {seq}")
                frame = encode_record(rec)
                chunks.append(frame)
                pos += len(frame)
                out.append((seq, (active, pos)))
            view = memoryview(b"".join(chunks))
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(fd)
                self.n_fsyncs += 1
        except BaseException:
            try:
                os.ftruncate(fd, start)
            finally:
                if assign:
                    for rec in records:
                        rec.pop("seq", None)
            raise
        with self._lock:
            self._sizes[active] = pos
        self.last_seq = seq
        self._active_records += len(records)
        return out

    def _due_to_roll(self) -> bool:
        if self._active_records == 0:
            return False
        full = self._sizes[self._active] >= self.segment_bytes
        return full or (self.segment_records > 0 and self._active_records >= self.segment_records)

    def _roll(self) -> None:
        """Close the active segment (durable already: every append fsyncs) and start the next."""
        assert self._fd is not None
        first = self.last_seq + 1
        self._create(first)
        fd = os.open(self.path_of(first), os.O_RDWR | os.O_APPEND)
        old, self._fd = self._fd, fd
        os.close(old)
        with self._lock:
            self._sizes[first] = _HEADER.size
        self._active, self._active_records = first, 0
        self.n_rolls += 1

    def compact(self, upto_seq: int) -> list[int]:
        """Delete every segment whose records all have seq <= ``upto_seq`` (a durable snapshot
        covers them), oldest first, then fsync the directory. Never the active segment. Returns
        the first seqs of the deleted segments."""
        with self._lock:
            firsts = sorted(self._sizes)
            doomed = [f for f, nxt in itertools.pairwise(firsts) if nxt - 1 <= upto_seq and f != self._active]
            try:
                for f in doomed:
                    self.path_of(f).unlink()
                    del self._sizes[f]
                    self.n_deleted += 1
            finally:
                if doomed:
                    fsync_dir(self.dir)
        return doomed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _seq_of_payload(payload: memoryview) -> int:
    return int(struct.unpack_from("<Q", payload, 1)[0])


# ------------------------------------------------------------------- the JSON-lines log
def read_json_log(path: Path) -> Iterator[dict]:
    """Records of an old JSON-lines feedback log. A last line without its newline is a torn write
    (never acknowledged) and is skipped; a bad line before it is an error."""
    with open(path, "rb") as fh:
        pos = 0
        for line in fh:
            if not line.endswith(b"\n"):
                return
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "seq" not in rec:
                    raise ValueError("not a feedback record")
            except ValueError as e:
                raise DataError(f"{path}: bad record at byte {pos}: {e}") from None
            pos += len(line)
            yield rec


def migrate_json_log(
    legacy: Path, directory: Path, segment_bytes: int = SEGMENT_BYTES, batch: int = 4096
) -> int | None:
    """Convert an old JSON-lines log (``legacy``) into a segmented log in ``directory``, then
    rename it to ``<name>.migrated`` (kept for the operator to delete). Returns the number of
    records converted, or None when there is no old log.

    Crash-safe: the segments are written (and fsynced) in a temporary directory that is renamed to
    ``directory`` (then the parent directory is fsynced): that rename is the commit. An old log
    found next to an existing ``directory`` was therefore migrated already and is only renamed."""
    if not legacy.exists():
        return None
    parent = legacy.parent
    done = legacy.with_name(legacy.name + ".migrated")
    if directory.exists():
        os.replace(legacy, done)
        fsync_dir(parent)
        return 0
    tmp = directory.with_name(f".{directory.name}.migrating")
    if tmp.exists():
        shutil.rmtree(tmp)
    journal: FeedbackJournal | None = None
    n = 0
    pending: list[dict] = []
    for rec in read_json_log(legacy):
        if journal is None:
            journal = FeedbackJournal(tmp, fsync=True, segment_bytes=segment_bytes)
            journal.open(start_seq=int(rec["seq"]))
        pending.append(rec)
        if len(pending) >= batch:
            n += len(journal.append_existing(pending))
            pending = []
    if journal is None:  # an empty old log
        journal = FeedbackJournal(tmp, fsync=True, segment_bytes=segment_bytes)
        journal.open()
    if pending:
        n += len(journal.append_existing(pending))
    journal.close()
    fsync_dir(tmp)
    os.replace(tmp, directory)
    fsync_dir(parent)
    os.replace(legacy, done)
    fsync_dir(parent)
    return n


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
    fsync_dir(path.parent)
