"""`ray-router log export`: a state directory's feedback log as a duel table (read-only, beside a live writer)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ray_router.errors import DataError
from ray_router.evaluation.duels import read_duels
from ray_router.serve.durable import LOG_DIR, FeedbackJournal, write_meta
from ray_router.serve.log_export import export, read_log
from tests.serve.test_durable import DIM, records
from tests.test_cli import run_cli

ARMS = [f"arm/{k}" for k in range(11)]


def state_dir(tmp_path, n: int, **journal_kw):
    root = tmp_path / "state"
    root.mkdir()
    write_meta(root / "meta.json", {"arm_ids": ARMS, "encoder_identity": "enc:test", "dim": DIM})
    j = FeedbackJournal(root / LOG_DIR, **journal_kw)
    j.open()
    if n:
        j.append(records(0, n, offered=[0, 1, 2, 3]))
    return root, j


def test_export_round_trips_every_record(tmp_path):
    root, j = state_dir(tmp_path, 50)
    res = export(root, tmp_path / "d.parquet")
    assert (res.n_duels, res.first_seq, res.last_seq, res.compacted) == (50, 1, 50, 0)
    log = read_duels(res.path)
    want = records(0, 50, offered=[0, 1, 2, 3])
    assert log.arm_ids == tuple(ARMS) and log.encoder == "enc:test"
    assert [log.arm_ids[i] for i in log.first] == [r["first_id"] for r in want]
    assert [log.arm_ids[i] for i in log.second] == [r["second_id"] for r in want]
    np.testing.assert_array_equal(log.y, [r["y"] for r in want])
    np.testing.assert_array_equal(log.X, np.stack([r["x"] for r in want]))
    np.testing.assert_array_equal(log.ts, [r["ts"] for r in want])
    assert log.offered == [[0, 1, 2, 3]] * 50 and set(log.source) == {"human"} and (log.weight == 1).all()
    j.close()


def test_export_after_compaction_says_what_is_gone(tmp_path):
    root, j = state_dir(tmp_path, 0, segment_records=10)
    for k in range(4):
        j.append(records(10 * k, 10))
    j.compact(20)  # a snapshot covers seq 1..20
    log, compacted = read_log(root)
    assert compacted == 20 and list(log.seq) == list(range(21, 41))
    out = run_cli("log", "export", str(root), "--out", str(tmp_path / "d.parquet"))
    assert out.returncode == 0, out.stderr
    assert "20 duels" in out.stdout and "20 earlier records were compacted" in out.stdout
    j.close()


def test_export_reads_beside_a_live_writer_and_never_cuts(tmp_path):
    root, j = state_dir(tmp_path, 30)
    seg = root / LOG_DIR / sorted(p.name for p in (root / LOG_DIR).iterdir())[-1]
    stop = threading.Event()

    def writer():
        i = 30
        while not stop.is_set():
            j.append(records(i, 5))
            i += 5

    t = threading.Thread(target=writer)
    t.start()
    try:
        sizes = [read_log(root)[0] for _ in range(5)]
    finally:
        stop.set()
        t.join()
    counts = [len(s) for s in sizes]
    assert counts == sorted(counts) and counts[0] >= 30
    for log in sizes:  # every export is a gapless prefix of the log
        assert list(log.seq) == list(range(1, len(log) + 1))
    # a half-written last frame (a writer mid-append) is not exported and not cut
    with open(seg, "ab") as fh:
        fh.write(b"RRF1\x10\x00")
    before = seg.stat().st_size
    log, _ = read_log(root)
    assert len(log) == j.last_seq and seg.stat().st_size == before
    j.close()


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no state directory"):
        read_log(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no meta\.json"):
        read_log(tmp_path / "empty")
    root, j = state_dir(tmp_path, 0)
    with pytest.raises(DataError, match="holds no duels"):
        export(root, tmp_path / "d.parquet")
    out = run_cli("log", "export", str(tmp_path / "missing"), "--out", str(tmp_path / "d.parquet"))
    assert out.returncode == 2 and "no state directory" in out.stderr and "Traceback" not in out.stderr
    j.close()
