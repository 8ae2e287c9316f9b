"""The posterior and the route decision without Ray, on the path production takes: a
:class:`PosteriorService` (the ``Posterior`` deployment's body: group-committed log, mutation
thread, background refresh) and a :class:`RouteDecider` (the ingress's decision) on a view of the
published samples. Snapshots, replay, single use, ranking."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from ray_router.errors import ConfigError, RouterError
from ray_router.serve.config import LimitsSpec
from ray_router.serve.decision import Decision, RouteDecider
from ray_router.serve.errors import DuplicateFeedback, ExpiredDecision, ForgedDecision, NotADuel
from ray_router.serve.posterior_service import PosteriorService
from ray_router.serve.ranking import SampleView, choose_best, choose_duel, normalised_prices, win_probability
from ray_router.serve.state import SNAPSHOT_FILE, PosteriorState, make_scorer
from ray_router.serve.tokens import DecisionSigner, quantise
from tests.serve.helpers import ARMS, arm_embeddings, hash_encoder, spec

KEY = "unit-test-signing-key-0123"


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Router:
    """The posterior service and the ingress's decision, on one event loop of their own."""

    def __init__(self, tmp_path, enc, clock: Clock, **overrides):
        self.loop = asyncio.new_event_loop()
        self.enc, self.clock = enc, clock
        seg = overrides.pop("segment_bytes", None)
        extra = {k: overrides.pop(k) for k in ("standby_poll_s", "metrics") if k in overrides}
        self.svc = PosteriorService(
            spec(tmp_path, **overrides),
            refresh_min_interval_s=0.0,
            clock=clock,
            segment_bytes=seg,
            signer=DecisionSigner(KEY, spec(tmp_path, **overrides).arm_ids),
            **extra,
        )
        self.run(self.svc.start())
        s = self.svc.state.spec
        view = SampleView(make_scorer(s.arm_embeddings, s.policy_config, 0, s.offline_prior), s.prices)
        self.decider = RouteDecider(s.arm_ids, view, DecisionSigner(KEY, s.arm_ids), 600.0, LimitsSpec(), clock)
        self.sync()

    @property
    def st(self) -> PosteriorState:
        return self.svc.state

    @property
    def view(self) -> SampleView:
        return self.decider.view

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def sync(self) -> None:
        """What the ingress's follower does: take the posterior's current samples."""
        s = self.run(self.svc.samples())
        self.view.update(s["version"], s["theta"], s["theta_mean"])

    def settle(self) -> None:
        """Wait until every acknowledged feedback is applied and refreshed (each refresh publishes
        new samples: the ingress's long poll), then take the samples."""
        for _ in range(100):
            st = self.st
            if st.last_applied_seq == st.journal.last_seq and st.pending_updates == 0:
                break
            self.run(self.svc.samples(self.svc.epoch, st.version, wait_s=10.0))
        else:
            raise AssertionError("the posterior did not apply and refresh the acknowledged feedback")
        self.sync()

    def route(self, text: str, offered=None, mode: str = "duel", cost_weight: float = 0.0) -> Decision:
        return self.decider.decide(self.enc.encode([text])[0], offered, mode, cost_weight)

    def feedback(self, decision_id: str, outcome: str, request_id: str = "r") -> dict:
        self.decider.feedback_claims(decision_id)  # what the ingress checks first
        return self.run(self.svc.feedback(decision_id, outcome, request_id))

    def close(self) -> None:
        if self.loop.is_closed():  # closed by the test already
            return
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.svc.close()
        self.loop.close()


@pytest.fixture
def enc():
    return hash_encoder()


@pytest.fixture
def router(tmp_path, enc):
    made: list[Router] = []

    def make(clock=None, **overrides) -> Router:
        made.append(Router(tmp_path, enc, clock or Clock(), **overrides))
        return made[-1]

    yield make
    for r in made:
        r.close()


def opened(tmp_path, clock=None, segment_bytes=None, **overrides) -> PosteriorState:
    st = PosteriorState(spec(tmp_path, **overrides), clock=clock or Clock(), segment_bytes=segment_bytes)
    st.open()
    return st


def crash(r: Router) -> None:
    """The posterior's process dies: no snapshot; the kernel releases its lock."""
    r.st.lock.release()


def teach(r: Router, n: int, winner: int = 0, loser: int = 1) -> list[dict]:
    """n duels between ``winner`` and ``loser`` on varied queries, the winner always preferred."""
    acks = []
    for i in range(n):
        d = r.route(f"query {i}", [winner, loser])
        acks.append(r.feedback(d.decision_id, "first" if d.picked[0] == winner else "second", f"req-{i}"))
    r.settle()
    return acks


def test_route_then_feedback_advances_the_posterior(router):
    r = router()
    v0 = r.st.version
    d = r.route("hello")
    assert len(d.picked) == 2 and d.picked[0] != d.picked[1]  # distinct_arms is the service default
    assert d.arms == tuple(ARMS[i] for i in d.picked) and d.posterior_version == v0
    ack = r.feedback(d.decision_id, "first", "r1")
    assert ack == {
        "accepted": True,
        "seq": 1,
        "outcome": "first",
        "replayed": False,
        "posterior_version": ack["posterior_version"],
    }
    assert r.st.journal.last_seq == 1  # durable before the acknowledgement
    r.settle()  # applied on the mutation thread, then one background refresh
    assert r.st.policy.n_updates == 1 and r.st.pending_updates == 0
    assert r.st.version == v0 + 1 and r.view.version == r.st.version


def test_learning_changes_the_exploit_choice(router):
    r = router()
    before = r.route("probe", [0, 1], "single").picked[0]
    winner, loser = 1 - before, before
    teach(r, 40, winner, loser)
    r.run(r.svc.refresh_now(times=60))  # what POST /v1/admin/refresh does
    r.sync()
    assert r.route("probe", [0, 1], "single").picked == (winner,)


def test_feedback_is_single_use_and_idempotent_per_request(router):
    r = router()
    d = r.route("q")
    r.feedback(d.decision_id, "tie", "req-a")
    # the same request (a retry after a crash) gets its acknowledgement back
    again = r.feedback(d.decision_id, "tie", "req-a")
    assert again["replayed"] is True and again["seq"] == 1
    with pytest.raises(DuplicateFeedback):
        r.feedback(d.decision_id, "first", "req-b")
    r.settle()
    assert r.st.policy.n_updates == 1 and r.st.journal.last_seq == 1


def test_single_and_expired_decisions(router):
    clock = Clock()
    r = router(clock)
    single = r.route("q", mode="single")
    assert len(single.picked) == 1 and len(single.decision_id) < 100  # a single decision carries no embedding
    with pytest.raises(NotADuel):
        r.feedback(single.decision_id, "first")
    d = r.route("q2")
    clock.t += 601
    with pytest.raises(ExpiredDecision):
        r.decider.feedback_claims(d.decision_id)  # the ingress refuses it
    with pytest.raises(ExpiredDecision):
        r.run(r.svc.feedback(d.decision_id, "first", "r"))  # and the posterior checks expiry too
    assert r.st.journal.last_seq == 0 and r.st.policy.n_updates == 0


def test_replay_after_crash_loses_nothing(tmp_path, router):
    """A 'crash' = the service vanishes without a snapshot; a new state replays the log."""
    r = router()
    teach(r, 25)
    hist = r.st.policy.history.arrays()
    crash(r)
    st2 = opened(tmp_path)
    assert st2.recovery["replayed"] == 25 and not st2.recovery["restored_snapshot"]
    assert st2.policy.n_updates == 25
    for k, v in hist.items():
        np.testing.assert_array_equal(st2.policy.history.arrays()[k], v)


def test_snapshot_plus_tail(tmp_path, router):
    r = router()
    teach(r, 10)
    assert r.run(r.svc.snapshot_now())["seq"] == 10
    teach(r, 7)
    crash(r)
    st2 = opened(tmp_path)
    assert st2.recovery == {**st2.recovery, "restored_snapshot": True, "snapshot_seq": 10, "replayed": 7}
    assert st2.policy.n_updates == 17 and st2.last_applied_seq == 17
    assert len(st2.used) == 17  # the used nonces survive too (from the snapshot and from the tail)


def test_used_nonces_survive_a_restart(router):
    clock = Clock()
    r = router(clock)
    d = r.route("q")
    r.feedback(d.decision_id, "first", "a")
    fresh = r.route("issued before the restart")
    r.settle()
    r.run(r.svc.snapshot_now())
    crash(r)
    r2 = router(clock)  # a restarted posterior (and ingress) on the same state directory
    with pytest.raises(DuplicateFeedback):
        r2.feedback(d.decision_id, "first", "b")
    assert r2.feedback(fresh.decision_id, "second", "c")["seq"] == 2  # decisions live in their ids, not in memory


def test_a_graceful_stop_leaves_a_snapshot(tmp_path, router):
    r = router()
    teach(r, 4)
    r.svc.close()  # what the Posterior deployment does when Serve stops it
    st2 = opened(tmp_path)
    assert st2.recovery["restored_snapshot"] and st2.recovery["replayed"] == 0 and st2.policy.n_updates == 4


def test_torn_last_record_is_cut_and_earlier_ones_kept(tmp_path, router):
    r = router()
    teach(r, 3)
    active = r.st.journal.path_of(r.st.journal.segments[-1])
    size = active.stat().st_size
    with open(active, "ab") as fh:
        fh.write(b"RRF1\x40\x06\x00\x00\x12\x34")  # a frame cut by SIGKILL: never acknowledged
    crash(r)
    st2 = opened(tmp_path)
    assert st2.policy.n_updates == 3 and st2.journal.last_seq == 3
    assert active.stat().st_size == size


def test_a_second_writer_is_refused(tmp_path):
    first = opened(tmp_path)
    with pytest.raises(ConfigError, match="num_replicas: 1"):
        opened(tmp_path)
    first.close()
    opened(tmp_path).close()  # the lock is free once its holder closes


def test_state_of_another_arm_table_or_encoder_is_refused(tmp_path, router):
    r = router()
    teach(r, 2)
    r.run(r.svc.snapshot_now())
    crash(r)
    with pytest.raises(ConfigError, match="another configuration"):
        opened(tmp_path, arm_ids=("a", "b", "c", "e"))
    with pytest.raises(ConfigError, match="another configuration"):
        opened(tmp_path, encoder_identity="another-encoder")
    opened(tmp_path).close()  # a refused start left the lock free


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"policy_config": {"feature_map": "hadamard_bias", "n_steps": 5, "eta": 4.0}}, "policy config changed (eta)"),
        ({"arm_embeddings": arm_embeddings(seed=1)}, "arm embeddings changed"),
    ],
)
def test_a_changed_config_rebuilds_the_posterior_from_the_log(tmp_path, router, change, reason):
    r = router(segment_bytes=1_000)  # small segments: the snapshot deletes the ones it covers
    teach(r, 12)
    r.run(r.svc.snapshot_now())
    teach(r, 3)
    hist = r.st.policy.history.arrays()
    assert r.st.journal.first_seq > 1  # the log no longer holds the whole history
    crash(r)
    st2 = opened(tmp_path, **change)
    assert st2.recovery["rebuilt_from_log"] == reason and not st2.recovery["restored_snapshot"]
    # the duels of the snapshot's history, then the log's tail
    assert st2.recovery["rebuilt_from_history"] == 12 and st2.recovery["replayed"] == 3
    assert st2.policy.n_updates == 15 and len(st2.used) == 15 and st2.last_applied_seq == 15
    np.testing.assert_array_equal(st2.policy.history.arrays()["first"], hist["first"])
    np.testing.assert_array_equal(st2.policy.history.arrays()["X"][:, :16], hist["X"][:, :16])
    if "policy_config" in change:
        assert st2.policy.config.eta == 4.0


def test_feedback_log_records_are_self_contained(router, enc):
    r = router()
    teach(r, 2)
    recs = [rec for _, rec in r.st.journal.scan()]
    assert [x["seq"] for x in recs] == [1, 2]
    np.testing.assert_array_equal(recs[1]["x"], quantise(enc.encode(["query 1"])[0]))
    for x in recs:
        assert {"nonce", "request_id", "x", "first", "second", "offered", "y", "first_id", "second_id"} <= set(x)
        assert x["first_id"] == ARMS[x["first"]] and x["offered"] == [0, 1]


def test_snapshot_is_atomic_file(tmp_path, router):
    r = router()
    teach(r, 3)
    r.run(r.svc.snapshot_now())
    assert (tmp_path / SNAPSHOT_FILE).is_file()
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- ranking
def test_zero_cost_weight_ranks_like_the_policy(router, enc):
    r = router()
    teach(r, 10, 2, 3)
    pol = r.st.policy
    for i in range(20):
        x = quantise(enc.encode([f"probe {i}"])[0])
        duel = pol.select(x, resample=False)
        assert r.view.choose(x, None, "duel")[:2] == (duel.first, duel.second)
        assert r.view.choose(x, None, "duel", 0.0)[:2] == (duel.first, duel.second)
        assert r.view.choose(x, None, "single")[0] == pol.best(x)
        sub = [1, 2]
        assert r.view.choose(x, sub, "single")[0] == pol.best(x, sub)


def test_cost_weight_moves_choices_to_cheaper_arms():
    u = np.array([2.0, 1.9, 0.0, -1.0])
    mask = np.ones(4, dtype=bool)
    price_norm = normalised_prices([10.0, 1.0, 0.0, 0.0])
    assert choose_best(u, mask) == 0
    assert choose_best(u, mask, 0.5 * price_norm) == 1  # 1.9 nearly as good, a tenth of the price
    assert choose_best(u, mask, 100.0 * price_norm) == 2  # only free arms remain competitive
    p = win_probability(u, mask)
    assert np.all((p > 0) & (p < 1)) and np.argmax(p) == 0
    S = np.stack([u, u[::-1]])
    assert choose_duel(S, mask, None, distinct=True) == (0, 3)
    assert choose_duel(np.stack([u, u]), mask, None, distinct=True) == (0, 1)


def test_candidates_restrict_the_choice(router):
    r = router()
    for i in range(10):
        d = r.route(f"q{i}", [1, 3], "duel", cost_weight=0.3)
        assert set(d.picked) == {1, 3}
        assert r.route(f"q{i}", [2], "single").picked == (2,)


def test_feedback_arms_match_the_policy_update(router, enc):
    r = router()
    d = r.route("q")
    r.feedback(d.decision_id, "second")
    r.settle()
    h = r.st.policy.history.arrays()
    assert (h["first"][0], h["second"][0], h["y"][0]) == (*d.picked, 0.0)
    np.testing.assert_array_equal(h["X"][0], quantise(enc.encode(["q"])[0]))


# ----------------------------------------------------------------- segments, compaction
def segment_reads(monkeypatch) -> list[int]:
    """The segments the log reads (their first seqs), as they are read."""
    from ray_router.serve.durable import FeedbackJournal

    seen: list[int] = []
    real = FeedbackJournal._read

    def read(self, first):
        seen.append(first)
        return real(self, first)

    monkeypatch.setattr(FeedbackJournal, "_read", read)
    return seen


def test_a_snapshot_deletes_the_segments_it_covers_and_a_restart_reads_only_the_tail(tmp_path, router, monkeypatch):
    clock = Clock()
    r = router(clock, segment_bytes=1_000)  # ~6 records a segment at d = 16
    acks = teach(r, 20)
    old_decision = r.route("answered before the snapshot")
    r.feedback(old_decision.decision_id, "tie", "old")
    r.settle()
    n_segments = len(r.st.journal.segments)
    assert n_segments >= 3
    r.run(r.svc.snapshot_now())
    # every segment but the active one held only covered records: gone from the disk
    assert r.st.journal.segments == [r.st.journal.first_seq] and r.st.journal.first_seq > 1
    assert sorted(p.name for p in (tmp_path / "feedback").iterdir()) == [f"seg-{r.st.journal.first_seq:020d}.log"]
    teach(r, 9)
    tail_segments = r.st.journal.segments
    crash(r)
    reads = segment_reads(monkeypatch)
    r2 = router(clock, segment_bytes=1_000)
    assert r2.st.recovery == {**r2.st.recovery, "restored_snapshot": True, "snapshot_seq": 21, "replayed": 9}
    assert r2.st.policy.n_updates == 30 and r2.st.last_applied_seq == 30 and len(r2.st.used) == 30
    assert set(reads) <= set(tail_segments)  # the snapshot and the tail after it, nothing older
    assert [a["seq"] for a in acks] == list(range(1, 21))
    # the single-use check still knows decisions whose log records were deleted (the snapshot has them)
    with pytest.raises(DuplicateFeedback):
        r2.feedback(old_decision.decision_id, "first", "again")
    assert r2.feedback(old_decision.decision_id, "tie", "old")["replayed"] is True


def fail_on_call(n: int, real=None):
    """A stand-in that raises (a crash at that point) on its n-th call, else calls ``real``."""
    calls = {"n": 0}

    def stand_in(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("crash here")
        return real(*args, **kwargs) if real else None

    return stand_in


@pytest.mark.parametrize("step", ["before the rename", "before the directory fsync", "before the delete", "mid-delete"])
def test_a_crash_at_any_step_of_snapshot_then_delete_loses_nothing(tmp_path, router, monkeypatch, step):
    import os
    from pathlib import Path

    from ray_router.serve import durable

    r = router(segment_bytes=1_000)
    teach(r, 6)
    r.run(r.svc.snapshot_now())
    teach(r, 14)
    hist = r.st.policy.history.arrays()
    n_before = len(r.st.journal.segments)
    assert n_before >= 3
    with monkeypatch.context() as m:
        if step == "before the rename":
            m.setattr(os, "replace", fail_on_call(1))
        elif step == "before the directory fsync":
            m.setattr(durable, "fsync_dir", fail_on_call(1))
        elif step == "before the delete":
            m.setattr(r.st.journal, "compact", fail_on_call(1))
        else:
            m.setattr(Path, "unlink", fail_on_call(2, Path.unlink))  # the second segment's delete
        with pytest.raises(KeyboardInterrupt):
            r.run(r.svc.snapshot_now())
    crash(r)
    st2 = opened(tmp_path, segment_bytes=1_000)
    durable_snapshot = 6 if step == "before the rename" else 20
    assert st2.recovery["snapshot_seq"] == durable_snapshot and st2.recovery["replayed"] == 20 - durable_snapshot
    assert st2.policy.n_updates == 20 and st2.last_applied_seq == 20 and len(st2.used) == 20
    for k, v in st2.policy.history.arrays().items():  # each duel exactly once, in log order
        np.testing.assert_array_equal(v, hist[k])
    # the restart finished the interrupted compaction: only segments with records after the snapshot
    assert st2.journal.segments[0] <= durable_snapshot + 1 < (st2.journal.segments[1:] or [10**9])[0]


def test_an_old_json_log_state_dir_is_migrated_on_start(tmp_path, router):
    """A state directory of the JSON-lines version: feedback.jsonl, and a snapshot with a byte
    offset into it and the used nonces as a dict."""
    from ray_router.policies.snapshot import load_snapshot, save_snapshot
    from ray_router.serve.durable import encode_vector

    r = router()
    teach(r, 6)
    r.run(r.svc.snapshot_now())
    teach(r, 4)
    hist = r.st.policy.history.arrays()
    recs = [rec for _, rec in r.st.journal.scan()]
    crash(r)
    lines = [json.dumps({**rec, "x": encode_vector(rec["x"])}, separators=(",", ":")) + "\n" for rec in recs]
    (tmp_path / "feedback.jsonl").write_text("".join(lines) + '{"seq":11,"nonce":"torn')
    snap = load_snapshot(tmp_path / SNAPSHOT_FILE)
    meta = snap["meta"]
    cols = meta.pop("used")
    meta.pop("log_position")
    meta["log_offset"] = sum(len(x.encode()) for x in lines[:6])
    meta["used"] = {n: {"r": q, "s": s, "y": y, "e": e} for n, q, s, y, e in zip(*(cols[k].tolist() for k in cols))}
    save_snapshot(snap, tmp_path / SNAPSHOT_FILE)
    import shutil

    shutil.rmtree(tmp_path / "feedback")
    st2 = opened(tmp_path)
    rec = st2.recovery
    assert rec["migrated_json_log"] == 10 and rec["restored_snapshot"] and rec["replayed"] == 4
    assert st2.policy.n_updates == 10 and len(st2.used) == 10
    for k, v in st2.policy.history.arrays().items():
        np.testing.assert_array_equal(v, hist[k])
    assert not (tmp_path / "feedback.jsonl").exists() and (tmp_path / "feedback.jsonl.migrated").exists()
    assert [x["seq"] for _, x in st2.journal.scan()] == list(range(1, 11))
    st2.close()
    assert opened(tmp_path).recovery["migrated_json_log"] is None  # once


def test_a_snapshot_without_its_log_refuses_to_start(tmp_path, router):
    import shutil

    r = router()
    teach(r, 3)
    r.run(r.svc.snapshot_now())
    crash(r)
    shutil.rmtree(tmp_path / "feedback")
    with pytest.raises(ConfigError, match="restore the log directory from a backup"):
        opened(tmp_path)


def test_the_posterior_verifies_each_decision_id_itself(router):
    """Defence in depth: a caller that reaches the posterior directly (skipping the ingress) still
    cannot record feedback for a forged, tampered or single-mode decision id."""
    r = router()
    d = r.route("q")
    forger = DecisionSigner("not-the-service-key-0123456789", r.st.spec.arm_ids)
    forged = RouteDecider(r.st.spec.arm_ids, r.view, forger, 600.0, LimitsSpec(), r.clock).decide(
        r.enc.encode(["q"])[0], None, "duel", 0.0
    )
    head, payload, sig = d.decision_id.split(".")
    tampered = f"{head}.{payload[:-2]}AA.{sig}"
    single = r.route("q", mode="single")
    for bad, err in ((forged.decision_id, ForgedDecision), (tampered, RouterError), (single.decision_id, NotADuel)):
        with pytest.raises(err):
            r.run(r.svc.feedback(bad, "first", "direct"))
    assert r.st.journal.last_seq == 0 and r.st.policy.n_updates == 0
    assert r.run(r.svc.feedback(d.decision_id, "first", "ok"))["seq"] == 1  # the genuine one still counts
