"""The feedback log on real files: binary records, segments (roll, compaction), torn tails and
damage, directory fsyncs, group commit, migration of the old JSON-lines log, the directory lock."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ray_router.errors import ConfigError, DataError
from ray_router.serve import durable
from ray_router.serve.durable import (
    FeedbackJournal,
    GroupCommitter,
    StateLock,
    decode_record,
    encode_record,
    encode_vector,
    migrate_json_log,
    segment_name,
    write_meta,
)

DIM = 384


def record(i: int, dim: int = DIM, offered: list[int] | None = None) -> dict:
    """A feedback record as ``PosteriorState.begin_feedback`` builds it (without its seq)."""
    rng = np.random.default_rng(i)
    return {
        "nonce": f"{i:024x}",
        "request_id": f"req-{i}-é",  # any text: the request id is the caller's
        "outcome": ("first", "second", "tie")[i % 3],
        "y": (1.0, 0.0, 0.5)[i % 3],
        "first": i % 11,
        "second": (i + 1) % 11,
        "first_id": f"arm/{i % 11}",
        "second_id": f"arm/{(i + 1) % 11}",
        "offered": offered,
        "x": rng.normal(size=dim).astype(np.float32),
        "expires_at": 2_000_000_000 + i,
        "ts": 1_700_000_000.25 + i,
        "source": "human",
        "weight": 1.0,
        "propensity": None,
        "config_version": f"cfg-{i % 3}" if i % 2 else "",  # version 4 when named, else 1
    }


def records(start: int, n: int, **kw) -> list[dict]:
    return [record(i, **kw) for i in range(start, start + n)]


def same(a: dict, b: dict) -> bool:
    keys = set(a) - {"x"}
    return {k: a[k] for k in keys} == {k: b[k] for k in keys} and np.array_equal(a["x"], b["x"])


def opened(path: Path, **kw) -> FeedbackJournal:
    j = FeedbackJournal(path, **kw)
    j.open()
    return j


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------ records
def test_a_record_round_trips_in_a_compact_frame():
    for rec in (record(7), record(8, offered=[0, 3, 10])):
        rec["seq"] = 123_456_789_012
        frame = encode_record(rec)
        back = decode_record(frame[12:])
        assert same(back, rec) and back["x"].dtype == np.float32
        # the embedding as raw float32 bytes: ~1.7 kB at d = 384, where the JSON line took ~2.3 kB
        assert 4 * DIM < len(frame) < 4 * DIM + 200
    # version 4 (a config version) with and without a propensity, with a judge's source and weight
    for prop in (None, 0.25):
        rec = dict(record(11), seq=5, propensity=prop, source="judge", weight=0.5, config_version="abc123")
        back = decode_record(encode_record(rec)[12:])
        assert same(back, rec) and encode_record(rec)[12] == 4
    legacy = dict(record(9), seq=1, x=encode_vector(record(9)["x"]))  # a record of the JSON log
    assert np.array_equal(decode_record(encode_record(legacy)[12:])["x"], record(9)["x"])
    with pytest.raises(DataError, match="cannot encode feedback record 1"):
        encode_record({**legacy, "outcome": "draw"})


def test_append_assigns_seqs_and_positions_and_reopen_continues(tmp_path):
    j = opened(tmp_path / "log")
    placed = j.append(records(0, 2))
    assert [s for s, _ in placed] == [1, 2] and placed[-1][1] == (1, j.size_bytes)
    assert j.n_fsyncs == 1  # one fsync per batch
    j.append(records(2, 1, offered=[1, 2]))
    got = list(j.scan())
    assert [r["seq"] for _, r in got] == [1, 2, 3]
    assert all(
        same(r, dict(w, seq=i + 1))
        for i, ((_, r), w) in enumerate(zip(got, records(0, 2) + records(2, 1, offered=[1, 2])))
    )
    # scanning from a position returns only what follows it
    assert [r["seq"] for _, r in j.scan(placed[0][1])] == [2, 3]
    j.close()
    j2 = opened(tmp_path / "log")
    assert j2.last_seq == 3 and j2.append(records(3, 1))[0][0] == 4


def test_fsync_happens_before_append_returns(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    j = opened(tmp_path / "log")
    calls.clear()
    j.append(records(0, 1))
    assert len(calls) == 1


def test_a_failed_write_is_rolled_back(tmp_path, monkeypatch):
    j = opened(tmp_path / "log")
    j.append(records(0, 1))
    size = j.size_bytes

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    batch = records(1, 1)
    with pytest.raises(OSError):
        j.append(batch)
    monkeypatch.undo()
    assert j.size_bytes == size and os.path.getsize(j.path_of(1)) == size and j.last_seq == 1
    assert "seq" not in batch[0]  # nothing was acknowledged
    assert j.append(records(1, 1))[0][0] == 2


# ----------------------------------------------------------------------------- segments
def test_segments_roll_at_the_size_threshold(tmp_path):
    j = opened(tmp_path / "log", segment_bytes=4_000)  # 16-byte header + frames of 1,634 bytes
    for i in range(10):
        j.append(records(i, 1))
    # a full segment is closed before the next append: segments of 3 records (the third crosses)
    assert j.segments == [1, 4, 7, 10] and j.n_rolls == 3
    assert segment_files(tmp_path / "log") == [segment_name(f) for f in (1, 4, 7, 10)]
    assert [r["seq"] for _, r in j.scan()] == list(range(1, 11))
    assert [r["seq"] for _, r in j.scan((4, 16))] == list(range(4, 11))
    j.close()
    j = opened(tmp_path / "log", segment_bytes=4_000)
    assert j.last_seq == 10 and j.segments == [1, 4, 7, 10]
    placed = j.append(records(10, 1))
    assert placed == [(11, (10, os.path.getsize(j.path_of(10))))]


def test_segments_roll_at_the_record_threshold(tmp_path):
    j = opened(tmp_path / "log", segment_records=4)
    j.append(records(0, 3))
    j.append(records(3, 3))  # 6 records: the first segment was not full before this batch
    j.append(records(6, 1))
    assert j.segments == [1, 7]


def test_compaction_deletes_only_segments_a_snapshot_covers(tmp_path):
    j = opened(tmp_path / "log", segment_records=3)
    for i in range(0, 10, 1):
        j.append(records(i, 1))
    assert j.segments == [1, 4, 7, 10]
    assert j.compact(5) == [1]  # segment 4 holds 4..6: seq 6 is not covered
    assert j.compact(6) == [4]
    assert j.compact(100) == [7]  # never the active segment
    assert j.segments == [10] and j.first_seq == 10 and j.n_deleted == 3
    assert segment_files(tmp_path / "log") == [segment_name(10)]
    assert j.start_for(9) == (10, 16) and [r["seq"] for _, r in j.scan(j.start_for(9))] == [10]
    j.close()
    j = opened(tmp_path / "log", segment_records=3)
    assert (j.first_seq, j.last_seq) == (10, 10)


def test_a_gap_between_segments_is_an_error(tmp_path):
    j = opened(tmp_path / "log", segment_records=2)
    for i in range(6):
        j.append(records(i, 1))
    j.close()
    (tmp_path / "log" / segment_name(3)).unlink()  # damage from outside
    with pytest.raises(DataError, match="starts at seq 5, the segment before it ends at 2"):
        list(FeedbackJournal(tmp_path / "log").scan())


# -------------------------------------------------------------------- torn tails, damage
def test_a_torn_last_frame_is_cut(tmp_path):
    j = opened(tmp_path / "log")
    j.append(records(0, 3))
    j.close()
    path = j.path_of(1)
    good = path.read_bytes()
    rec = dict(record(3), seq=4)
    frame = encode_record(rec)
    for torn in (frame[:7], frame[:-1], frame[:-10] + b"\0" * 10, b"\0" * 4096):  # cut, or zero-filled by the fs
        path.write_bytes(good + torn)
        assert [r["seq"] for _, r in FeedbackJournal(tmp_path / "log").scan()] == [1, 2, 3]  # a reader skips it
        j = opened(tmp_path / "log")
        assert j.last_seq == 3 and path.read_bytes() == good  # the writer cuts it off
        j.close()


def test_a_damaged_frame_before_valid_ones_is_an_error(tmp_path):
    j = opened(tmp_path / "log", segment_records=3)
    for i in range(5):
        j.append(records(i, 1))
    j.close()
    last = tmp_path / "log" / segment_name(4)
    data = bytearray(last.read_bytes())
    data[16 + 100] ^= 0xFF  # inside the first frame of the last segment (seq 4); seq 5 follows
    last.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"seg-0+4\.log: damaged record at byte 16 \(valid records follow it\)"):
        opened(tmp_path / "log")
    last.write_bytes(bytes(data[: 16 + 100]))  # ... but cut there, it is a torn tail
    assert opened(tmp_path / "log").last_seq == 3
    first = tmp_path / "log" / segment_name(1)
    data = bytearray(first.read_bytes())
    data[-5] ^= 0xFF  # the last frame of a closed segment: never torn (closed segments were fsynced)
    first.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"seg-0+1\.log: damaged record"):
        list(FeedbackJournal(tmp_path / "log").scan())


def test_a_stray_temp_segment_from_a_crash_is_removed(tmp_path):
    j = opened(tmp_path / "log", segment_records=1)
    j.append(records(0, 1))
    j.close()
    stray = tmp_path / "log" / f".{segment_name(2)}.tmp"  # a roll cut before its rename
    stray.write_bytes(b"RRFLOG")
    j = opened(tmp_path / "log", segment_records=1)
    assert not stray.exists() and j.segments == [1] and j.append(records(1, 1))[0][0] == 2


# ------------------------------------------------------------------------ directory fsync
class DirFsyncs:
    """Records the directories that ``os.fsync`` is called on (the real call still happens)."""

    def __init__(self, monkeypatch):
        self.dirs: list[str] = []
        real = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                self.dirs.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def take(self) -> list[str]:
        out, self.dirs = self.dirs, []
        return out


def test_the_directory_is_fsynced_after_create_rename_and_delete(tmp_path, monkeypatch):
    fs = DirFsyncs(monkeypatch)
    log = tmp_path / "state" / "log"
    log.parent.mkdir()
    j = opened(log, segment_records=2)
    # the log directory's creation (in its parent), then the first segment's (in the log directory)
    assert fs.take() == [str(log.parent), str(log)]
    j.append(records(0, 2))
    assert fs.take() == []  # an append fsyncs the file, not the directory
    j.append(records(2, 1))  # a roll: a new segment, renamed into place
    assert fs.take() == [str(log)]
    j.compact(2)  # a delete
    assert fs.take() == [str(log)] and j.segments == [3]
    write_meta(tmp_path / "state" / "meta.json", {"a": 1})  # a rename of meta.json
    assert fs.take() == [str(tmp_path / "state")]


# ------------------------------------------------------------------------- group commit
def test_group_commit_batches_and_reports_in_order(tmp_path):
    j = opened(tmp_path / "log")
    seen: list[int] = []

    async def main():
        gc = GroupCommitter(j, ThreadPoolExecutor(1), lambda recs: seen.extend(r["seq"] for r in recs))
        gc.start()
        out = await asyncio.gather(*(gc.append(record(i)) for i in range(50)))
        await gc.stop()
        return out, gc.n_batches

    out, n_batches = asyncio.run(main())
    assert sorted(r["seq"] for r in out) == list(range(1, 51))
    assert seen == list(range(1, 51))  # on_durable sees the log order
    assert n_batches < 50 and j.n_fsyncs == n_batches
    assert all(r["_end"][0] == 1 for r in out)


def test_group_commit_failure_reaches_every_waiter(tmp_path, monkeypatch):
    j = opened(tmp_path / "log")

    async def main():
        gc = GroupCommitter(j, ThreadPoolExecutor(1), lambda recs: None)
        gc.start()
        monkeypatch.setattr(j, "append", lambda recs: (_ for _ in ()).throw(OSError("disk gone")))
        res = await asyncio.gather(*(gc.append(record(i)) for i in range(3)), return_exceptions=True)
        await gc.stop()
        return res

    assert all(isinstance(r, OSError) for r in asyncio.run(main()))


# ---------------------------------------------------------------------------- migration
def json_log(path: Path, n: int, torn: bool = False) -> list[dict]:
    """An old-format log: one JSON object per line, the embedding in base64."""
    recs = [dict(record(i), seq=i + 1) for i in range(n)]
    lines = [json.dumps({**r, "x": encode_vector(r["x"])}, separators=(",", ":")) + "\n" for r in recs]
    path.write_text("".join(lines) + ('{"seq":99,"nonce":"ab' if torn else ""))
    return recs


def test_an_old_json_log_is_migrated_into_segments(tmp_path):
    old = tmp_path / "feedback.jsonl"
    want = json_log(old, 9, torn=True)
    assert migrate_json_log(old, tmp_path / "feedback", segment_bytes=4_000, batch=2) == 9
    assert not old.exists() and (tmp_path / "feedback.jsonl.migrated").exists()  # kept for the operator
    j = opened(tmp_path / "feedback")
    got = [r for _, r in j.scan()]
    assert len(got) == 9 and all(same(a, b) for a, b in zip(got, want))
    assert len(j.segments) > 1 and j.last_seq == 9
    assert migrate_json_log(old, tmp_path / "feedback") is None  # nothing left to migrate


def test_migration_resumes_after_a_crash_at_any_step(tmp_path):
    old = tmp_path / "feedback.jsonl"
    json_log(old, 5)
    # cut while converting: a half-written temporary directory is thrown away and the work redone
    (tmp_path / ".feedback.migrating").mkdir()
    (tmp_path / ".feedback.migrating" / segment_name(1)).write_bytes(b"RRFLOG\0\1junk")
    assert migrate_json_log(old, tmp_path / "feedback") == 5
    assert not (tmp_path / ".feedback.migrating").exists()
    # cut after the commit (the directory rename) but before the old log was renamed aside
    os.replace(tmp_path / "feedback.jsonl.migrated", old)
    assert migrate_json_log(old, tmp_path / "feedback") == 0 and not old.exists()
    assert [r["seq"] for _, r in FeedbackJournal(tmp_path / "feedback").scan()] == [1, 2, 3, 4, 5]


def test_a_damaged_old_log_stops_the_migration_with_its_byte(tmp_path):
    old = tmp_path / "feedback.jsonl"
    json_log(old, 2)
    old.write_bytes(b"garbage\n" + old.read_bytes())
    with pytest.raises(DataError, match="bad record at byte 0"):
        migrate_json_log(old, tmp_path / "feedback")
    assert old.exists() and not (tmp_path / "feedback").exists()


# --------------------------------------------------------------------------------- lock
def test_state_lock_is_exclusive_and_released(tmp_path):
    a, b = StateLock(tmp_path), StateLock(tmp_path)
    a.acquire(1)
    with pytest.raises(ConfigError, match="locked by another posterior"):
        b.acquire(0.1)
    a.release()
    b.acquire(0.1)
    b.release()


def test_fsync_dir_is_a_real_directory_fsync(tmp_path, monkeypatch):
    fs = DirFsyncs(monkeypatch)
    durable.fsync_dir(tmp_path)
    assert fs.take() == [str(tmp_path)]


# ------------------------------------------------------------------ a follower (a standby)
def test_try_acquire_never_waits_and_says_whether_the_lock_is_ours(tmp_path):
    a, b = StateLock(tmp_path), StateLock(tmp_path)
    assert a.try_acquire() and a.held
    assert not b.try_acquire() and not b.held
    b.release()  # not held: nothing happens, a keeps it
    assert not StateLock(tmp_path).try_acquire()
    a.release()
    assert b.try_acquire() and b.held
    b.release()


def test_a_follower_reads_new_records_and_stops_at_a_frame_being_written_without_cutting_it(tmp_path):
    writer = opened(tmp_path / "log", segment_bytes=4_000)
    writer.append(records(0, 3))
    follower = FeedbackJournal(tmp_path / "log")  # never opened: it holds no descriptor to write with
    got = follower.tail(0, None)
    assert [r["seq"] for _, r in got] == [1, 2, 3] and follower.last_seq == 3
    seq, pos = 3, got[-1][0]
    path = writer.path_of(writer.segments[-1])
    frame = encode_record(dict(record(3), seq=4))
    with open(path, "ab") as fh:  # half a frame: the writer is writing it
        fh.write(frame[:100])
    size = path.stat().st_size
    assert follower.tail(seq, pos) == [] and path.stat().st_size == size  # waits; cuts nothing
    with open(path, "ab") as fh:
        fh.write(frame[100:])
    (end, rec), *_ = follower.tail(seq, pos)
    assert rec["seq"] == 4 and same(rec, dict(record(3), seq=4))
    writer.close()
    writer = opened(tmp_path / "log", segment_bytes=4_000)  # continues after the completed frame
    placed = writer.append(records(4, 6))  # rolls into new segments
    assert len(writer.segments) > 1
    got = follower.tail(4, end, limit=4)  # across segments, at most `limit` a call
    assert [r["seq"] for _, r in got] == [5, 6, 7, 8]
    assert [p for p, _ in got] == [p for _, p in placed[:4]]
    assert [r["seq"] for _, r in follower.tail(8, got[-1][0])] == [9, 10]
    assert follower.segments == writer.segments  # the follower's stats see the writer's segments
    writer.close()


def test_a_follower_learns_when_the_records_it_needs_were_compacted_away(tmp_path):
    writer = opened(tmp_path / "log", segment_records=2)
    writer.append(records(0, 2))
    writer.append(records(2, 2))
    writer.append(records(4, 2))  # segments 1-2, 3-4, 5-6
    follower = FeedbackJournal(tmp_path / "log")
    (pos, _), *_ = follower.tail(0, None, limit=1)  # it has read seq 1, in segment 1
    assert writer.compact(4) == [1, 3]
    with pytest.raises(durable.LogCompacted):
        follower.tail(1, pos)  # its position's segment is gone, and with it seqs 2..4
    assert [r["seq"] for _, r in follower.tail(4, None)] == [5, 6]  # after a snapshot covering 4
    writer.close()
