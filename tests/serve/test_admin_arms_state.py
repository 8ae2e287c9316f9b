"""Arms added and retired at runtime, without Ray: the posterior's side of ``/v1/admin/arms``
(:mod:`ray_router.serve.arm_changes`, :class:`PosteriorState`/:class:`PosteriorService`).

The Serve test (``test_admin_arms.py``) drives the same steps over HTTP under load; here each
property is checked on its own: what is written, what is rebuilt, what a restart and a standby see."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from ray_router.errors import ConfigError, UnknownArmError
from ray_router.policies.offline_prior import OfflinePrior, extend_with_profiles
from ray_router.serve.arm_changes import ARMS_FILE, AddArmRequest, ArmExists
from ray_router.serve.config import LimitsSpec
from ray_router.serve.decision import RouteDecider
from ray_router.serve.ranking import SampleView
from ray_router.serve.state import PosteriorState, make_scorer
from ray_router.serve.tokens import DecisionSigner
from tests.serve.helpers import ARMS, PRICES, arm_embeddings, hash_encoder, spec
from tests.serve.test_arm_changes import profile_prior
from tests.serve.test_state import KEY, Router, crash, opened, teach

NOW = 1_700_000_000.0
CODER = {"id": "coder", "price_usd": 0.002, "profile": {"code": 0.95, "default": 0.1}}


def three_arms() -> dict:
    return {
        "arm_ids": ARMS[:3],
        "prices": PRICES[:3],
        "arm_embeddings": arm_embeddings(n_arms=3),
        "offline_prior": profile_prior(n_arms=3),
    }


def adopt(r: Router) -> None:
    """What an Ingress does when the published table changes: a view and decider for it."""
    t = r.st.arm_table()
    view = SampleView(make_scorer(t["embeddings"], t["policy_config"], 0, t["offline_prior"]), t["prices"])
    r.decider = RouteDecider(t["ids"], view, DecisionSigner(KEY, t["ids"]), 600.0, LimitsSpec(), r.clock)
    r.sync()


@pytest.fixture
def r3(tmp_path):
    r = Router(tmp_path, hash_encoder(), clock=lambda: NOW, **three_arms())
    yield r
    r.close()


def test_an_added_arm_is_durable_keeps_what_was_learned_and_survives_a_restart(tmp_path, r3):
    r = r3
    teach(r, 12, winner=0, loser=1)
    old_id = r.route("before the change", [0, 1]).decision_id
    fp0 = r.run(r.svc.samples())["arms"]
    epoch0 = r.svc.epoch
    report = r.run(r.svc.add_arm(CODER))
    assert report["index"] == 3 and report["arms"] == [*ARMS[:3], "coder"]
    assert report["rebuilt_from_history"] == 12  # every duel learned so far, under the grown table
    st = r.st
    assert st.n_arms == 4 and st.policy.n_arms == 4 and st.policy.n_updates == 12
    # the same placement a config change's profile gets
    want_prior, want_A = extend_with_profiles(profile_prior(n_arms=3), arm_embeddings(n_arms=3), [CODER["profile"]])
    np.testing.assert_allclose(st.spec.arm_embeddings, want_A)
    assert OfflinePrior.from_dict(st.spec.offline_prior).same_as(OfflinePrior.from_dict(want_prior))
    # durable: the file, and a snapshot of the grown table
    saved = json.loads((tmp_path / ARMS_FILE).read_text())
    assert [a["id"] for a in saved["added"]] == ["coder"] and saved["added"][0]["profile"] == CODER["profile"]
    # published: a new epoch and the new table's fingerprint with the samples
    s = r.run(r.svc.samples())
    assert s["arms"] != fp0 and s["arms"] == st.arm_table()["fingerprint"] == report["fingerprint"]
    assert r.svc.epoch != epoch0 and s["theta"].shape == st.policy.theta.shape
    # an id issued before the change takes its feedback; a duel with the new arm too
    r.run(r.svc.feedback(old_id, "first", "old"))
    signer4 = DecisionSigner(KEY, st.arm_ids)
    x = hash_encoder().encode(["write a python function"])[0]
    new_id = signer4.issue("ab" * 12, NOW + 600, "duel", 3, 0, None, x)
    ack = r.run(r.svc.feedback(new_id, "first", "new"))
    assert ack["accepted"]
    adopt(r)
    r.settle()
    assert st.policy.n_updates == 14
    # each record names the configuration it was learned under: the arm table changed in between
    logged = [rec for _, rec in st.journal.scan()]
    versions = [rec["config_version"] for rec in logged]
    assert len(set(versions[:12])) == 1 and versions[12] == versions[13] == st.config_version != versions[0]
    fp1 = st.arms_fingerprint
    history = st.policy.history.arrays()
    r.run(r.svc.snapshot_now())
    crash(r)
    # a restart applies the changes over the config's table (the same one) and restores the snapshot
    st2 = opened(tmp_path, clock=lambda: NOW, **three_arms())
    try:
        assert st2.arm_ids == (*ARMS[:3], "coder") and st2.arms_fingerprint == fp1
        assert st2.recovery["restored_snapshot"] and st2.recovery["rebuilt_from_log"] is None
        assert st2.policy.n_updates == 14
        for k in ("first", "second", "y", "mask"):
            np.testing.assert_array_equal(st2.policy.history.arrays()[k], history[k])
    finally:
        st2.close()


def test_add_is_idempotent_and_refuses_what_it_cannot_place(tmp_path, r3):
    r = r3
    r.run(r.svc.add_arm(CODER))
    before = (tmp_path / ARMS_FILE).read_text()
    again = r.run(r.svc.add_arm(CODER))  # the same request (a retry after a lost answer)
    assert again["replayed"] is True and again["index"] == 3 and r.st.n_arms == 4
    with pytest.raises(ArmExists):
        r.run(r.svc.add_arm({**CODER, "price_usd": 0.5}))  # same id, another arm
    with pytest.raises(ArmExists):
        r.run(r.svc.add_arm({**CODER, "id": ARMS[0]}))  # a config arm
    with pytest.raises(ConfigError, match="unknown categories"):
        r.run(r.svc.add_arm({"id": "chef", "price_usd": 0.0, "profile": {"cooking": 0.9, "default": 0.1}}))
    with pytest.raises(ConfigError, match="needs its prior"):
        r.run(r.svc.add_arm({"id": "chef", "price_usd": 0.0}))
    assert (tmp_path / ARMS_FILE).read_text() == before and r.st.n_arms == 4  # nothing written
    # rows: their mean per category, the mean of all rows for the other categories
    req = AddArmRequest.model_validate(
        {
            "id": "rows-arm",
            "price_usd": 0.0,
            "rows": [
                {"category": "code", "score": 1.0},
                {"category": "code", "score": 0.0},
                {"category": "math", "score": 1.0},
            ],
        }
    )
    assert req.resolved_profile() == {"code": 0.5, "math": 1.0, "default": 2 / 3}
    report = r.run(r.svc.add_arm(req.model_dump(mode="json")))
    assert report["index"] == 4
    for bad in (
        {**CODER, "rows": [{"category": "code", "score": 1.0}]},  # both sources
        {**CODER, "profile": {"code": 1.5}},
        {**CODER, "id": "router"},
        {**CODER, "id": " padded "},
        {**CODER, "price_usd": float("nan")},
        {**CODER, "extra": 1},
    ):
        with pytest.raises(ValidationError):
            AddArmRequest.model_validate(bad)


def test_retire_and_restore_are_durable_and_published_at_once(tmp_path, r3):
    r = r3
    fp0 = r.run(r.svc.samples())["arms"]
    version = r.st.version
    out = r.run(r.svc.retire_arm(ARMS[1], True))
    assert out["admin_retired"] == [ARMS[1]]
    s = r.run(r.svc.samples())
    assert s["arms"] != fp0 and s["version"] == version  # the samples stay; the table changed
    assert r.st.arm_table()["retired"] == [ARMS[1]]
    with pytest.raises(UnknownArmError):
        r.run(r.svc.retire_arm("no-such-arm", True))
    # a restart keeps the retirement
    r.run(r.svc.snapshot_now())
    crash(r)
    st2 = opened(tmp_path, clock=lambda: NOW, **three_arms())
    try:
        assert st2.arm_table()["retired"] == [ARMS[1]]
        st2.retire_arm(ARMS[1], False)
        assert st2.arm_table()["retired"] == [] and st2.arms_fingerprint == fp0
    finally:
        st2.close()


def test_a_standby_follows_the_writers_added_arm(tmp_path, r3):
    r = r3
    teach(r, 6, winner=0, loser=2)
    standby = PosteriorState(spec(tmp_path, **three_arms()), clock=lambda: NOW)
    standby.start()
    try:
        assert standby.standby and standby.n_arms == 3
        r.run(r.svc.add_arm(CODER))
        adopt(r)
        teach(r, 3, winner=0, loser=3)
        while standby.follow() > 0:
            pass
        assert standby.arm_ids == r.st.arm_ids and standby.arms_fingerprint == r.st.arms_fingerprint
        assert standby.policy.n_updates == r.st.policy.n_updates == 9
    finally:
        standby.close()


def test_a_broken_arms_file_stops_the_start_with_what_to_do(tmp_path):
    (tmp_path / ARMS_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        PosteriorState(spec(tmp_path, **three_arms()))
    (tmp_path / ARMS_FILE).write_text(json.dumps({"version": 99}))
    with pytest.raises(ConfigError, match="not an arm-changes file"):
        PosteriorState(spec(tmp_path, **three_arms()))


def test_a_snapshot_taken_before_any_feedback_restores(tmp_path, r3):
    """(A bug this file found: the offline prior's features could not be built for zero duels, so
    a posterior whose snapshot held no duel could not open.)"""
    r3.run(r3.svc.snapshot_now())
    crash(r3)
    st = opened(tmp_path, clock=lambda: NOW, **three_arms())
    try:
        assert st.recovery["restored_snapshot"] and st.policy.n_updates == 0
    finally:
        st.close()
