"""The feedback log (append, fsync, torn tails, group commit) and the pending-decision store."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from ray_router.errors import DataError
from ray_router.serve.durable import FeedbackJournal, GroupCommitter, StateLock


def test_append_assigns_seqs_and_offsets(tmp_path):
    j = FeedbackJournal(tmp_path / "log.jsonl")
    j.open()
    placed = j.append([{"nonce": "a"}, {"nonce": "b"}])
    assert [s for s, _ in placed] == [1, 2] and placed[-1][1] == j.size_bytes
    assert j.n_fsyncs == 1  # one fsync per batch
    j.append([{"nonce": "c"}])
    recs = list(j.scan())
    assert [r["seq"] for _, r in recs] == [1, 2, 3]
    # scanning from an offset returns only what follows it
    assert [r["nonce"] for _, r in j.scan(placed[0][1])] == ["b", "c"]
    j.close()
    j2 = FeedbackJournal(tmp_path / "log.jsonl")
    j2.open()
    assert j2.last_seq == 3 and j2.append([{"nonce": "d"}])[0][0] == 4


def test_fsync_happens_before_append_returns(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    j = FeedbackJournal(tmp_path / "log.jsonl")
    j.open()
    calls.clear()
    j.append([{"nonce": "a"}])
    assert len(calls) == 1


def test_torn_tail_is_cut_but_a_damaged_middle_is_an_error(tmp_path):
    p = tmp_path / "log.jsonl"
    j = FeedbackJournal(p)
    j.open()
    j.append([{"nonce": "a"}, {"nonce": "b"}])
    j.close()
    good = p.read_bytes()
    p.write_bytes(good + b'{"seq":3,"non')
    j = FeedbackJournal(p)
    j.open()
    assert j.last_seq == 2 and p.read_bytes() == good
    j.close()
    p.write_bytes(b"garbage\n" + good)
    with pytest.raises(DataError, match="bad record at byte 0"):
        FeedbackJournal(p).open()


def test_a_failed_write_is_rolled_back(tmp_path, monkeypatch):
    j = FeedbackJournal(tmp_path / "log.jsonl")
    j.open()
    j.append([{"nonce": "a"}])
    size = j.size_bytes

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        j.append([{"nonce": "b"}])
    monkeypatch.undo()
    assert j.size_bytes == size and os.path.getsize(j.path) == size and j.last_seq == 1


def test_group_commit_batches_and_reports_in_order(tmp_path):
    j = FeedbackJournal(tmp_path / "log.jsonl")
    j.open()
    seen: list[int] = []

    async def main():
        gc = GroupCommitter(j, ThreadPoolExecutor(1), lambda recs: seen.extend(r["seq"] for r in recs))
        gc.start()
        out = await asyncio.gather(*(gc.append({"nonce": str(i)}) for i in range(50)))
        await gc.stop()
        return out, gc.n_batches

    out, n_batches = asyncio.run(main())
    assert sorted(r["seq"] for r in out) == list(range(1, 51))
    assert seen == list(range(1, 51))  # on_durable sees the log order
    assert n_batches < 50 and j.n_fsyncs == n_batches
    assert all("_end" in r for r in out)


def test_group_commit_failure_reaches_every_waiter(tmp_path, monkeypatch):
    j = FeedbackJournal(tmp_path / "log.jsonl")
    j.open()

    async def main():
        gc = GroupCommitter(j, ThreadPoolExecutor(1), lambda recs: None)
        gc.start()
        monkeypatch.setattr(j, "append", lambda recs: (_ for _ in ()).throw(OSError("disk gone")))
        res = await asyncio.gather(*(gc.append({"nonce": str(i)}) for i in range(3)), return_exceptions=True)
        await gc.stop()
        return res

    assert all(isinstance(r, OSError) for r in asyncio.run(main()))


def test_state_lock_is_exclusive_and_released(tmp_path):
    from ray_router.errors import ConfigError

    a, b = StateLock(tmp_path), StateLock(tmp_path)
    a.acquire(1)
    with pytest.raises(ConfigError, match="locked by another posterior"):
        b.acquire(0.1)
    a.release()
    b.acquire(0.1)
    b.release()
