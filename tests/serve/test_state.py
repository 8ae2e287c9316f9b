"""The posterior's state machine without Ray, driven the way the ingress drives it: choose arms
from a SampleView, sign the decision, verify it, record feedback. Snapshots, replay, single use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_router.errors import ConfigError
from ray_router.serve.errors import DuplicateFeedback, ExpiredDecision, NotADuel
from ray_router.serve.ranking import SampleView, choose_best, choose_duel, normalised_prices, win_probability
from ray_router.serve.state import SNAPSHOT_FILE, PosteriorState, make_scorer
from ray_router.serve.tokens import DecisionSigner, new_nonce, quantise
from tests.serve.helpers import ARMS, PRICES, arm_embeddings, hash_encoder, spec

KEY = "unit-test-signing-key-0123"


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Router:
    """The ingress's part without Ray: sample view, decision ids, verification."""

    def __init__(self, st: PosteriorState, enc, clock: Clock):
        self.st, self.enc, self.clock = st, enc, clock
        self.view = SampleView(make_scorer(st.spec.arm_embeddings, st.spec.policy_config), PRICES)
        self.signer = DecisionSigner(KEY, ARMS)
        self.sync()

    def sync(self) -> None:
        v = self.st.view()
        self.view.update(v["version"], v["theta"], v["theta_mean"])

    def route(self, text: str, offered=None, mode: str = "duel", cost_weight: float = 0.0):
        x = quantise(self.enc.encode([text])[0])
        first, second, _ = self.view.choose(x, offered, mode, cost_weight)
        tok = self.signer.issue(new_nonce(), self.clock() + 600, mode, first, second, offered,
                                x if mode == "duel" else None)
        return tok, first, second

    def feedback(self, tok: str, outcome: str, request_id: str = "r") -> dict:
        return self.st.record_feedback(self.signer.verify(tok, self.clock()), outcome, request_id)


@pytest.fixture
def enc():
    return hash_encoder()


def opened(tmp_path, clock=None, **overrides) -> PosteriorState:
    st = PosteriorState(spec(tmp_path, **overrides), clock=clock or Clock())
    st.open()
    return st


def router(tmp_path, enc, clock=None, **overrides) -> Router:
    clock = clock or Clock()
    return Router(opened(tmp_path, clock, **overrides), enc, clock)


def teach(r: Router, n: int, winner: int = 0, loser: int = 1) -> list[dict]:
    """n duels between ``winner`` and ``loser`` on varied queries, the winner always preferred."""
    acks = []
    for i in range(n):
        tok, first, _ = r.route(f"query {i}", [winner, loser])
        acks.append(r.feedback(tok, "first" if first == winner else "second", f"req-{i}"))
    return acks


def test_route_then_feedback_advances_the_posterior(tmp_path, enc):
    r = router(tmp_path, enc)
    v0 = r.st.version
    tok, first, second = r.route("hello")
    assert first != second  # distinct_arms is the service default
    ack = r.feedback(tok, "first", "r1")
    assert ack == {"accepted": True, "seq": 1, "outcome": "first", "replayed": False}
    assert r.st.policy.n_updates == 1 and r.st.pending_updates == 1
    r.st.refresh()
    assert r.st.version == v0 + 1 and r.st.pending_updates == 0
    r.sync()
    assert r.view.version == r.st.version


def test_learning_changes_the_exploit_choice(tmp_path, enc):
    r = router(tmp_path, enc)
    _, before, _ = r.route("probe", [0, 1], "single")
    winner, loser = 1 - before, before
    teach(r, 40, winner, loser)
    for _ in range(60):
        r.st.refresh()
    r.sync()
    assert r.route("probe", [0, 1], "single")[1] == winner


def test_feedback_is_single_use_and_idempotent_per_request(tmp_path, enc):
    r = router(tmp_path, enc)
    tok, _, _ = r.route("q")
    r.feedback(tok, "tie", "req-a")
    # the same request (a retry after a crash) gets its acknowledgement back
    again = r.feedback(tok, "tie", "req-a")
    assert again["replayed"] is True and again["seq"] == 1
    with pytest.raises(DuplicateFeedback):
        r.feedback(tok, "first", "req-b")
    assert r.st.policy.n_updates == 1


def test_single_and_expired_decisions(tmp_path, enc):
    clock = Clock()
    r = router(tmp_path, enc, clock)
    tok, _, second = r.route("q", mode="single")
    assert second is None and len(tok) < 100  # a single decision carries no embedding
    with pytest.raises(NotADuel):
        r.feedback(tok, "first")
    tok, _, _ = r.route("q2")
    claims = r.signer.verify(tok, clock())
    clock.t += 601
    with pytest.raises(ExpiredDecision):
        r.st.record_feedback(claims, "first", "r")  # the posterior checks expiry too
    assert r.st.policy.n_updates == 0


def test_replay_after_crash_loses_nothing(tmp_path, enc):
    """A 'crash' = the state object vanishes without a snapshot; a new one replays the log."""
    r = router(tmp_path, enc)
    teach(r, 25)
    hist = r.st.policy.history.arrays()
    r.st.lock.release()  # the kernel does this when the process dies
    st2 = opened(tmp_path)
    assert st2.recovery["replayed"] == 25 and not st2.recovery["restored_snapshot"]
    assert st2.policy.n_updates == 25
    for k, v in hist.items():
        np.testing.assert_array_equal(st2.policy.history.arrays()[k], v)


def test_snapshot_plus_tail(tmp_path, enc):
    r = router(tmp_path, enc)
    teach(r, 10)
    r.st.take_snapshot()
    teach(r, 7)
    r.st.lock.release()
    st2 = opened(tmp_path)
    assert st2.recovery == {**st2.recovery, "restored_snapshot": True, "snapshot_seq": 10, "replayed": 7}
    assert st2.policy.n_updates == 17 and st2.last_applied_seq == 17
    assert len(st2.used) == 17  # the used nonces survive too (from the snapshot and from the tail)


def test_used_nonces_survive_a_restart(tmp_path, enc):
    clock = Clock()
    r = router(tmp_path, enc, clock)
    tok, _, _ = r.route("q")
    r.feedback(tok, "first", "a")
    fresh, _, _ = r.route("issued before the restart")
    r.st.take_snapshot()
    r.st.lock.release()
    r2 = Router(opened(tmp_path, clock), enc, clock)
    with pytest.raises(DuplicateFeedback):
        r2.feedback(tok, "first", "b")
    assert r2.feedback(fresh, "second", "c")["seq"] == 2  # decisions live in their ids, not in memory


def test_torn_last_record_is_cut_and_earlier_ones_kept(tmp_path, enc):
    r = router(tmp_path, enc)
    teach(r, 3)
    with open(r.st.journal.path, "ab") as fh:
        fh.write(b'{"seq":4,"nonce":"abc","outc')  # a write cut by SIGKILL: never acknowledged
    r.st.lock.release()
    st2 = opened(tmp_path)
    assert st2.policy.n_updates == 3 and st2.journal.last_seq == 3
    assert st2.journal.path.read_bytes().endswith(b"\n")


def test_a_second_writer_is_refused(tmp_path):
    opened(tmp_path)
    with pytest.raises(ConfigError, match="num_replicas: 1"):
        opened(tmp_path)


def test_state_of_another_arm_table_or_encoder_is_refused(tmp_path, enc):
    r = router(tmp_path, enc)
    teach(r, 2)
    r.st.take_snapshot()
    r.st.lock.release()
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
def test_a_changed_config_rebuilds_the_posterior_from_the_log(tmp_path, enc, change, reason):
    r = router(tmp_path, enc)
    teach(r, 12)
    r.st.take_snapshot()
    teach(r, 3)
    r.st.lock.release()
    st2 = opened(tmp_path, **change)
    assert st2.recovery["rebuilt_from_log"] == reason and not st2.recovery["restored_snapshot"]
    assert st2.recovery["replayed"] == 15 and st2.policy.n_updates == 15 and len(st2.used) == 15
    if "policy_config" in change:
        assert st2.policy.config.eta == 4.0


def test_feedback_log_records_are_self_contained(tmp_path, enc):
    r = router(tmp_path, enc)
    teach(r, 2)
    recs = [json.loads(line) for line in r.st.journal.path.read_text().splitlines()]
    assert [x["seq"] for x in recs] == [1, 2]
    for x in recs:
        assert {"nonce", "request_id", "x", "first", "second", "offered", "y", "first_id", "second_id"} <= set(x)
        assert x["first_id"] == ARMS[x["first"]] and x["offered"] == [0, 1]


def test_snapshot_is_atomic_file(tmp_path, enc):
    r = router(tmp_path, enc)
    teach(r, 3)
    r.st.take_snapshot()
    assert (tmp_path / SNAPSHOT_FILE).is_file()
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- ranking
def test_zero_cost_weight_ranks_like_the_policy(tmp_path, enc):
    r = router(tmp_path, enc)
    teach(r, 10, 2, 3)
    r.st.refresh()
    r.sync()
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


def test_candidates_restrict_the_choice(tmp_path, enc):
    r = router(tmp_path, enc)
    for i in range(10):
        _, first, second = r.route(f"q{i}", [1, 3], "duel", cost_weight=0.3)
        assert {first, second} == {1, 3}
        assert r.route(f"q{i}", [2], "single")[1] == 2


def test_feedback_arms_match_the_policy_update(tmp_path, enc):
    r = router(tmp_path, enc)
    tok, first, second = r.route("q")
    r.feedback(tok, "second")
    h = r.st.policy.history.arrays()
    assert (h["first"][0], h["second"][0], h["y"][0]) == (first, second, 0.0)
    np.testing.assert_array_equal(h["X"][0], quantise(enc.encode(["q"])[0]))
