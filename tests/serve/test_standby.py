"""The standby posterior without Ray: a second :class:`PosteriorService` started on a state directory
whose lock another one holds (a KubeRay ``NewCluster`` upgrade's new cluster beside the old one)
follows the holder's log read-only, through its compactions, and takes over when the lock frees,
with nothing lost and nothing applied twice. Both services run in this process on real files; the
lock is a real ``flock`` (two open file descriptions conflict even within one process)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from ray_router.serve.durable import LOG_DIR, FeedbackJournal
from ray_router.serve.errors import Standby
from tests.serve import test_state
from tests.serve.test_state import Clock, Router, crash

enc, router = test_state.enc, test_state.router  # the fixtures of test_state: a service on a temp state dir

POLL_S = 0.05


def wait_until(r: Router, predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Run ``r``'s event loop (its background loops: follow, lock, refresh) until ``predicate()``."""

    async def poll() -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(POLL_S)
        return bool(predicate())

    assert r.run(poll()), f"timed out after {timeout_s}s waiting for {what}"


def feed(r: Router, n: int, tag: str) -> list[dict]:
    """n acknowledged feedbacks on the writer ``r`` (varied queries, all three outcomes)."""
    acks = []
    for i in range(n):
        d = r.route(f"{tag} query {i}")
        acks.append(r.feedback(d.decision_id, ("first", "second", "tie")[i % 3], f"{tag}-{i}"))
    r.settle()
    return acks


def history(r: Router) -> dict[str, np.ndarray]:
    return r.st.policy.snapshot()["history"]


def same_learned_state(a: Router, b: Router) -> None:
    """b applied exactly a's duels, in a's order (contexts, arms, outcomes, offered sets)."""
    ha, hb = history(a), history(b)
    assert set(ha) == set(hb)
    for k in ha:
        np.testing.assert_array_equal(ha[k], hb[k], err_msg=k)
    assert b.st.policy.n_updates == a.st.policy.n_updates == a.st.last_applied_seq
    assert set(b.st.used) == set(a.st.used)


class Recorder:
    """Collects what the service records (the metrics object under Serve is Ray's)."""

    def __init__(self) -> None:
        self.values: list[tuple[float, dict | None]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.values.append((value, tags))

    observe = set = inc


class Metrics:
    def __init__(self) -> None:
        for name in ("feedback", "refresh", "apply_lag", "log_bytes", "version", "role"):
            setattr(self, name, Recorder())

    def role_now(self) -> str:
        last = {tags["role"]: v for v, tags in self.role.values}
        (role,) = [k for k, v in last.items() if v == 1]
        return role


@pytest.mark.parametrize("holder_stops", ["close", "crash"])
def test_a_standby_follows_the_holder_through_compaction_and_takes_over(router, holder_stops):
    clock = Clock()
    seg = 1_000  # ~6 records a segment at d = 16: compactions delete segments the standby was reading
    a = router(clock, segment_bytes=seg)
    acked = feed(a, 8, "a1")
    mb = Metrics()
    b = router(clock, segment_bytes=seg, standby_poll_s=POLL_S, metrics=mb)
    assert a.svc.role == "writer" and b.svc.role == "standby" and mb.role_now() == "standby"
    assert b.st.last_applied_seq == 8 and b.st.recovery["role"] == "standby"  # read at start
    assert b.run(b.svc.stats())["role"] == "standby" and b.run(b.svc.status())["role"] == "standby"
    assert b.run(b.svc.health())["role"] == "standby"
    same_learned_state(a, b)

    # writes are refused with a retryable 503; nothing of the refused feedback is kept anywhere
    d = b.route("refused while standby")
    with pytest.raises(Standby) as refused:
        b.feedback(d.decision_id, "first", "refused-1")
    assert refused.value.http_status == 503 and int(refused.value.headers["Retry-After"]) > 0
    for admin in (b.svc.snapshot_now(), b.svc.refresh_now()):
        with pytest.raises(Standby):
            b.run(admin)
    assert d.decision_id and not (set(b.st.used) - set(a.st.used))

    # the holder keeps writing: the standby follows and publishes new samples
    acked += feed(a, 10, "a2")
    v0 = b.st.version
    wait_until(b, lambda: b.st.last_applied_seq == a.st.journal.last_seq == 18, what="the standby to follow")
    wait_until(b, lambda: b.st.version > v0 and b.st.pending_updates == 0, what="the standby's refresh")
    same_learned_state(a, b)

    # the holder snapshots: the segments the standby was reading are deleted; it re-reads the snapshot
    acked += feed(a, 10, "a3")
    a.run(a.svc.snapshot_now())
    assert a.st.journal.first_seq > b.st.last_applied_seq + 1, "the compaction must outrun the standby"
    acked += feed(a, 5, "a4")
    reloads = b.st.reloads
    wait_until(b, lambda: b.st.last_applied_seq == a.st.journal.last_seq == 33, what="following after compaction")
    assert b.st.reloads > reloads
    same_learned_state(a, b)
    acked += feed(a, 3, "a5")  # not followed yet when the holder stops: the promotion applies it

    # the holder stops (a graceful close leaves a last snapshot and compacts; a crash just drops the lock)
    if holder_stops == "close":
        a.close()
    else:
        crash(a)
    wait_until(b, lambda: b.svc.role == "writer", what="the takeover")
    assert mb.role_now() == "writer"
    assert b.st.recovery["role"] == "writer" and b.st.lock.held
    assert b.run(b.svc.health())["role"] == "writer" and b.run(b.svc.stats())["role"] == "writer"

    # the new writer accepts feedback (the one refused above, too) and refuses a duplicate
    acked.append(b.feedback(d.decision_id, "first", "refused-1-retry"))
    acked += feed(b, 4, "b1")
    with pytest.raises(Exception, match="already recorded"):
        b.feedback(d.decision_id, "second", "another")

    # every acknowledged feedback is applied exactly once, in the log, by seq
    seqs = [ack["seq"] for ack in acked]
    assert sorted(seqs) == list(range(1, len(acked) + 1)) == list(range(1, b.st.journal.last_seq + 1))
    assert b.st.policy.n_updates == b.st.last_applied_seq == len(acked)
    logged = [rec for _, rec in FeedbackJournal(b.st.dir / LOG_DIR).scan()]
    snap_seq = logged[0]["seq"] - 1 if logged else len(acked)
    assert snap_seq <= b.st.snapshot_seq and [r["seq"] for r in logged] == seqs[snap_seq:]
    assert len({r["nonce"] for r in logged}) == len(logged)


def test_a_standby_on_an_empty_state_dir_takes_over_when_the_holder_goes(router):
    clock = Clock()
    a = router(clock)
    b = router(clock, standby_poll_s=POLL_S)
    assert b.svc.role == "standby" and b.st.last_applied_seq == 0
    acked = feed(a, 3, "a")
    wait_until(b, lambda: b.st.last_applied_seq == 3, what="following from an empty start")
    a.close()
    wait_until(b, lambda: b.svc.role == "writer", what="the takeover")
    acked += feed(b, 2, "b")
    assert [x["seq"] for x in acked] == [1, 2, 3, 4, 5] and b.st.policy.n_updates == 5


def test_apply_lag_is_observed_once_per_feedback_when_its_samples_are_published(router):
    m = Metrics()
    a = router(Clock(), metrics=m)
    t0 = time.monotonic()
    feed(a, 6, "lag")
    elapsed = time.monotonic() - t0
    lags = [v for v, _ in m.apply_lag.values]
    assert len(lags) == 6, lags  # one observation per acknowledged feedback, none twice
    assert all(0 <= x <= elapsed for x in lags)
    assert len(m.feedback.values) == 6 and m.role_now() == "writer"
