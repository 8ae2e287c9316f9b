"""Adding and retiring arms without starting cold (issue 15), without Ray: the arm table may grow
at its end (the posterior is rebuilt from its duels, decision ids of the smaller table stay valid,
a new arm enters with its profile's prior), a retired arm leaves every offered set but keeps its
terms and duels, and anything else is refused with a message that says what to do."""

from __future__ import annotations

import numpy as np
import pytest

from ray_router.errors import ConfigError
from ray_router.policies.offline_prior import OfflinePrior, extend_with_profiles
from ray_router.serve.config import AppArgs, LimitsSpec
from ray_router.serve.decision import RouteDecider
from ray_router.serve.errors import InvalidRequest, StaleDecision
from ray_router.serve.ranking import SampleMismatch, SampleView
from ray_router.serve.state import arms_added, make_scorer
from ray_router.serve.tokens import DecisionSigner, new_nonce
from tests.serve.helpers import ARMS, PRICES, arm_embeddings, hash_encoder
from tests.serve.test_state import KEY as STATE_KEY
from tests.serve.test_state import Router, crash, opened, teach

KEY = "arm-change-test-key-0123456789"
NOW = 1_700_000_000.0


def profile_prior(n_arms: int = 4, dim: int = 16) -> dict:
    rng = np.random.default_rng(5)
    C = rng.normal(size=(3, dim))
    U = rng.uniform(0.2, 0.6, size=(3, n_arms))
    return OfflinePrior.from_profile(C, U, [10, 10, 10], ["math", "code", "chat"]).to_dict()


def test_ids_of_the_smaller_table_stay_valid_after_arms_are_added():
    old, new = DecisionSigner(KEY, ARMS[:3]), DecisionSigner(KEY, ARMS)
    x = np.zeros(16, np.float32)
    tok = old.issue(new_nonce(), NOW + 60, "duel", 0, 2, None, x)
    c = new.verify(tok, NOW)
    assert (c.first, c.second) == (0, 2) and c.offered == (0, 1, 2)  # "every arm" then: not the new one
    # another table (a renamed arm, another order) is still refused
    other = DecisionSigner(KEY, ("alpha", "gamma", "beta", "delta"))
    with pytest.raises(StaleDecision):
        other.verify(tok, NOW)
    with pytest.raises(StaleDecision):  # nor does a smaller table accept a larger table's ids
        old.verify(new.issue(new_nonce(), NOW + 60, "duel", 0, 3, None, x), NOW)


def test_arms_added_only_at_the_end():
    assert arms_added(["a", "b"], ["a", "b"], "s") == [] and arms_added(["a", "b"], ["a", "b", "c"], "s") == ["c"]
    with pytest.raises(ConfigError, match=r"arms \['b'\] are missing: keep them in the config with retired: true"):
        arms_added(["a", "b"], ["a", "c"], "s")
    with pytest.raises(ConfigError, match="can only be appended"):
        arms_added(["a", "b"], ["b", "a"], "s")


def test_a_retired_arm_is_never_offered():
    scorer = make_scorer(arm_embeddings(), {"feature_map": "hadamard_bias"})
    view = SampleView(scorer, PRICES)
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(2, scorer.dim))
    view.update(1, theta, theta[0])
    decider = RouteDecider(ARMS, view, DecisionSigner(KEY, ARMS), 600.0, LimitsSpec(), clock=lambda: NOW, retired={1})
    assert decider.offered(None, "duel") == [0, 2, 3]
    assert decider.offered(None, "single", restrict=[1, 2]) == [2]
    with pytest.raises(InvalidRequest, match="'beta' is retired"):
        decider.offered(["alpha", "beta"], "duel")
    enc = hash_encoder()
    for i in range(200):
        dec = decider.decide(enc.encode([f"query {i}"])[0], decider.offered(None, "duel"), "duel", 0.0)
        assert 1 not in dec.picked
    with pytest.raises(InvalidRequest, match="at least two"):
        RouteDecider(ARMS[:2], view, DecisionSigner(KEY, ARMS[:2]), 600.0, LimitsSpec(), retired={0}).offered(
            None, "duel"
        )
    with pytest.raises(ValueError, match="every arm is retired"):
        arms = [{"id": a, "price_usd": 0, "retired": True} for a in ("a", "b")]
        AppArgs.model_validate({"arms": arms, "arm_embeddings": {"cold_start": True}})


def test_samples_of_another_arm_table_are_refused_by_the_view():
    small = make_scorer(arm_embeddings(n_arms=3), {"feature_map": "hadamard_bias"})
    big = make_scorer(arm_embeddings(), {"feature_map": "hadamard_bias"})
    view = SampleView(small, PRICES[:3])
    with pytest.raises(SampleMismatch, match="arm table change is rolling out"):
        view.update(1, big.theta, big.theta_mean)
    assert not view.ready


def test_a_profile_places_a_new_arm():
    prior = profile_prior(n_arms=3)
    A = arm_embeddings(n_arms=3)
    p2, A2 = extend_with_profiles(prior, A, [{"code": 0.95, "default": 0.1}])
    new = OfflinePrior.from_dict(p2)
    assert new.n_arms == 4 and A2.shape == (4, 16)
    np.testing.assert_array_equal(new.utility[:, :3], OfflinePrior.from_dict(prior).utility)
    np.testing.assert_array_equal(new.utility[:, 3], [0.1, 0.95, 0.1])
    # its embedding leans to the category it is good at, at the known arms' scale
    unit = new.centroids / np.linalg.norm(new.centroids, axis=1, keepdims=True)
    cos = unit @ (A2[3] / np.linalg.norm(A2[3]))
    assert cos.argmax() == 1 and np.isclose(np.linalg.norm(A2[3]), np.linalg.norm(A, axis=1).mean())
    # the prior estimate ranks it first on a code-like query, not on the others
    est = new.estimate(new.centroids)
    assert est[1].argmax() == 3 and est[0].argmax() != 3 and est[2].argmax() != 3
    with pytest.raises(ConfigError, match="no score for categories"):
        extend_with_profiles(prior, A, [{"code": 0.9}])
    with pytest.raises(ConfigError, match="unknown categories"):
        extend_with_profiles(prior, A, [{"cooking": 0.9, "default": 0.1}])


def test_the_posterior_grows_with_the_arm_table_and_keeps_what_it_learned(tmp_path):
    enc = hash_encoder()
    prior3 = profile_prior(n_arms=3)
    spec3 = {
        "arm_ids": ARMS[:3],
        "prices": PRICES[:3],
        "arm_embeddings": arm_embeddings(n_arms=3),
        "offline_prior": prior3,
    }
    r = Router(tmp_path, enc, clock=lambda: NOW, **spec3)
    try:
        teach(r, 12, winner=0, loser=1)
        r.run(r.svc.snapshot_now())
        teach(r, 4, winner=2, loser=1)  # in the log after the snapshot
        old_ids = [r.route(f"late {i}", [0, 1]).decision_id for i in range(2)]
        hist = r.st.policy.history.arrays()
        crash(r)
    finally:
        r.close()
    prior4, A4 = extend_with_profiles(prior3, arm_embeddings(n_arms=3), [{"code": 0.95, "default": 0.1}])
    st = opened(tmp_path, clock=lambda: NOW, prices=PRICES, arm_embeddings=A4, offline_prior=prior4)
    try:
        assert st.recovery["rebuilt_from_log"] == "arms added (delta)"
        # the duels of the last snapshot (closing ones included) and the log tail after it
        assert st.recovery["rebuilt_from_history"] + st.recovery["replayed"] == 16
        assert st.policy.n_arms == 4 and st.policy.n_updates == 16
        np.testing.assert_array_equal(st.policy.history.arrays()["first"], np.concatenate([hist["first"]]))
        # the old duels were not between all four arms: the new arm was not offered then
        assert not st.policy.history.arrays()["mask"][:, 3].any()
        assert st.policy.prior.n_arms == 4
        from ray_router.serve.durable import read_meta

        assert read_meta(tmp_path / "meta.json")["arm_ids"] == list(ARMS)
        # a decision issued before the change still takes its feedback
        signer = DecisionSigner(STATE_KEY, ARMS)
        claims = signer.verify(old_ids[0], NOW)
        rec = st.begin_feedback(claims, "first", "late-req")
        assert rec["offered"] == [0, 1] and rec["second_id"] in ARMS[:3]
    finally:
        st.close()
    # removing an arm instead of retiring it is refused, with what to do
    with pytest.raises(ConfigError, match="retired: true"):
        opened(
            tmp_path,
            clock=lambda: NOW,
            arm_ids=("alpha", "beta", "delta"),
            prices=PRICES[:3],
            arm_embeddings=arm_embeddings(n_arms=3),
        )
