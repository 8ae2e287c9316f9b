"""The route decision as the ingress makes it, without HTTP or Ray: request checks (query,
candidates, mode, cost weight), the choice on the published samples and the signed decision id."""

from __future__ import annotations

import numpy as np
import pytest

from ray_router.errors import UnknownArmError
from ray_router.serve.config import LimitsSpec
from ray_router.serve.decision import RouteDecider
from ray_router.serve.errors import ExpiredDecision, ForgedDecision, InvalidRequest, NotADuel, PayloadTooLarge
from ray_router.serve.ranking import SampleView
from ray_router.serve.state import make_scorer
from ray_router.serve.tokens import DecisionSigner, quantise
from tests.serve.helpers import ARMS, PRICES, arm_embeddings, hash_encoder

KEY = "decision-test-key-0123456789"
NOW = 1_700_000_000.0
CONFIG = {"feature_map": "hadamard_bias", "n_steps": 5, "distinct_arms": True}


@pytest.fixture
def decider() -> RouteDecider:
    scorer = make_scorer(arm_embeddings(), CONFIG)
    view = SampleView(scorer, PRICES)
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(2, scorer.theta_mean.shape[-1]))
    view.update(7, theta, theta[0] * 0.5)
    return RouteDecider(
        ARMS,
        view,
        DecisionSigner(KEY, ARMS),
        600.0,
        LimitsSpec(max_query_chars=50, max_cost_weight=10.0),
        clock=lambda: NOW,
    )


def x_of(text: str) -> np.ndarray:
    return hash_encoder().encode([text])[0]


def test_query_limits(decider):
    assert decider.check_query("hello") == "hello"
    for blank in ("", "  \n "):
        with pytest.raises(InvalidRequest, match="empty"):
            decider.check_query(blank)
    with pytest.raises(PayloadTooLarge, match="51 characters; the limit is 50"):
        decider.check_query("a" * 51)


def test_offered_arms(decider):
    assert decider.offered(None, "duel") is None
    assert decider.offered(["gamma", "alpha"], "duel") == [2, 0]
    assert decider.offered(["beta"], "single") == [1]
    with pytest.raises(InvalidRequest, match="duplicate"):
        decider.offered(["beta", "beta"], "duel")
    with pytest.raises(UnknownArmError, match="unknown arm 'omega'") as e:
        decider.offered(["beta", "omega"], "duel")
    assert (e.value.http_status, e.value.code) == (404, "unknown_arm")
    with pytest.raises(InvalidRequest, match="at least two"):
        decider.offered(["beta"], "duel")
    with pytest.raises(InvalidRequest, match="mode must be one of"):
        decider.offered(None, "both")


def test_offered_within_the_chat_arms(decider):
    chat = [1, 3]
    assert decider.offered(None, "duel", restrict=chat) == [1, 3]
    assert decider.offered(["alpha", "delta", "beta"], "duel", restrict=chat) == [3, 1]
    with pytest.raises(InvalidRequest, match="none of the candidates has an upstream"):
        decider.offered(["alpha", "gamma"], "single", restrict=chat)
    with pytest.raises(InvalidRequest, match="at least two"):
        decider.offered(["alpha", "delta"], "duel", restrict=chat)


@pytest.mark.parametrize("bad", [-0.1, 10.5, float("nan"), float("inf")])
def test_cost_weight_must_be_finite_and_within_the_limit(decider, bad):
    with pytest.raises(InvalidRequest, match=r"cost_weight must be a finite number in \[0, 10.0\]"):
        decider.cost_weight(bad)


def test_cost_weight_in_range(decider):
    assert decider.cost_weight(0) == 0.0 and decider.cost_weight(10) == 10.0


def test_duel_decision_is_the_views_choice_signed_with_its_context(decider):
    x = x_of("write a sort function")
    d = decider.decide(x, [0, 1, 3], "duel", 0.0)
    first, second, version = decider.view.choose(quantise(x), [0, 1, 3], "duel", 0.0)
    assert d.picked == (first, second) and first != second and {first, second} <= {0, 1, 3}
    assert d.arms == (ARMS[first], ARMS[second]) and d.slots == (("first", ARMS[first]), ("second", ARMS[second]))
    assert d.posterior_version == version == 7 and d.expires_at == int(NOW + 600)
    claims = decider.feedback_claims(d.decision_id)
    assert (claims.first, claims.second, claims.offered, claims.mode) == (first, second, (0, 1, 3), "duel")
    np.testing.assert_array_equal(claims.x, quantise(x))  # the id carries what the choice was made on


def test_single_decision_and_its_feedback(decider):
    d = decider.decide(x_of("hi"), None, "single", 0.0)
    assert len(d.picked) == 1 and d.slots == (("single", d.arms[0]),)
    with pytest.raises(NotADuel):
        decider.feedback_claims(d.decision_id)


def test_a_huge_cost_weight_picks_the_free_arm(decider):
    for q in ("a", "b", "c"):
        assert decider.decide(x_of(q), None, "single", 10.0).arms == ("delta",)  # delta's price is 0


def test_feedback_claims_refuse_forged_and_expired_ids(decider):
    d = decider.decide(x_of("q"), None, "duel", 0.0)
    other = RouteDecider(
        ARMS, decider.view, DecisionSigner("another-key-0123456789", ARMS), 600.0, decider.limits, clock=lambda: NOW
    )
    with pytest.raises(ForgedDecision):
        other.feedback_claims(d.decision_id)
    later = RouteDecider(ARMS, decider.view, decider.signer, 600.0, decider.limits, clock=lambda: NOW + 601)
    with pytest.raises(ExpiredDecision):
        later.feedback_claims(d.decision_id)
