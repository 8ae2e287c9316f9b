"""Propensities (issue 15): a duel route draws one of the posterior's published samples uniformly,
so the probability of the pair it served is a count out of the pool's size, carried in the signed
decision id. No Ray: the pure view, decider, signer and posterior state."""

from __future__ import annotations

import numpy as np
import pytest

from ray_router.serve.config import LimitsSpec
from ray_router.serve.decision import RouteDecider
from ray_router.serve.errors import MalformedRequest
from ray_router.serve.ranking import SampleView, choose_duel
from ray_router.serve.state import PosteriorState, make_scorer
from ray_router.serve.tokens import DecisionSigner, new_nonce, quantise
from tests.serve.helpers import ARMS, PRICES, arm_embeddings, hash_encoder, spec

KEY = "propensity-test-key-0123456789"
NOW = 1_700_000_000.0
CONFIG = {"feature_map": "hadamard_bias", "n_steps": 5, "distinct_arms": True, "arm_selection": "thompson"}


def pool_view(M: int, seed: int = 0, config=CONFIG) -> SampleView:
    scorer = make_scorer(arm_embeddings(), config)
    view = SampleView(scorer, PRICES, seed=seed)
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(M, 2, scorer.theta_mean.shape[-1]))
    view.update(3, pool[-1], pool.mean(axis=(0, 1)), pool)
    return view


def test_the_count_is_the_share_of_samples_that_choose_the_pair():
    view = pool_view(12)
    x = quantise(hash_encoder().encode(["what is the capital of France?"])[0])
    pairs = [choose_duel(view.scorer.arm_scores(x, th), np.ones(len(ARMS), bool), None, True) for th in view.pool]
    seen: dict[tuple[int, int], int] = {}
    for _ in range(3000):
        first, second, version, (count, M) = view.choose_with_propensity(x, None, "duel")
        assert version == 3 and M == 12 and count == pairs.count((first, second))
        seen[(first, second)] = seen.get((first, second), 0) + 1
    # the route's draws follow the propensities it reports (3000 draws: within 4 binomial sd)
    for pair, n in seen.items():
        p = pairs.count(pair) / 12
        assert abs(n / 3000 - p) < 4 * np.sqrt(p * (1 - p) / 3000) + 1e-9, (pair, n, p)
    assert set(seen) == set(pairs)


def test_single_routes_and_views_without_a_pool_have_propensity_one():
    view = pool_view(8)
    x = quantise(hash_encoder().encode(["hello"])[0])
    assert view.choose_with_propensity(x, None, "single")[3] == (1, 1)
    view.update(4, view.theta, view.theta_mean)  # no pool: the last sample, as before pools existed
    assert view.choose_with_propensity(x, None, "duel")[3] == (1, 1)


def test_the_decision_id_carries_the_propensity():
    view = pool_view(16, seed=2)
    decider = RouteDecider(ARMS, view, DecisionSigner(KEY, ARMS), 600.0, LimitsSpec(), clock=lambda: NOW)
    x = hash_encoder().encode(["a question about chemistry"])[0]
    dec = decider.decide(x, None, "duel", 0.0)
    count, M = dec.propensity
    assert M == 16 and 1 <= count <= 16
    claims = decider.feedback_claims(dec.decision_id)
    assert claims.propensity == pytest.approx(count / M) == dec.propensity_value
    # after a fallback the served pair is not the sampled one: no propensity
    other = next(i for i in range(len(ARMS)) if i not in dec.picked)
    moved = decider.served(decider.decide(x, None, "duel", 0.0, sign=False), (dec.picked[0], other))
    assert moved.propensity is None and decider.feedback_claims(moved.decision_id).propensity is None
    # a single route's id stays short and carries none
    single = decider.decide(x, None, "single", 0.0)
    assert len(single.decision_id) < 100 and decider.signer.verify(single.decision_id, NOW).propensity is None


def test_signer_checks():
    s = DecisionSigner(KEY, ARMS)
    with pytest.raises(ValueError, match="propensity"):
        s.issue(new_nonce(), NOW + 60, "duel", 0, 1, None, np.zeros(4, np.float32), (5, 4))
    with pytest.raises(ValueError, match="propensity"):
        s.issue(new_nonce(), NOW + 60, "duel", 0, 1, None, np.zeros(4, np.float32), (0, 4))
    old = s.issue(new_nonce(), NOW + 60, "duel", 0, 1, None, np.zeros(4, np.float32))  # version 2: none
    assert s.verify(old, NOW).propensity is None
    new = s.issue(new_nonce(), NOW + 60, "duel", 0, 1, None, np.zeros(4, np.float32), (3, 8))
    assert s.verify(new, NOW).propensity == 3 / 8
    # a payload whose count exceeds its pool never verifies (re-signed, so only the check can catch it)
    import base64

    body = new.split(".")[1]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[34:38] = (9).to_bytes(2, "big") + (8).to_bytes(2, "big")  # after the 34-byte head: count, pool
    forged_body = "d2." + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(MalformedRequest):
        s.verify(f"{forged_body}.{s._sig(forged_body)}", NOW)


def test_the_posterior_publishes_its_last_refreshes(tmp_path):
    st = PosteriorState(spec(tmp_path, sample_pool=4))
    st.open()
    try:
        assert st.view()["pool"].shape[0] == 1
        thetas = []
        for _ in range(6):
            st.refresh()
            thetas.append(st.policy.theta.copy())
        v = st.view()
        assert v["pool"].shape == (4, *v["theta"].shape)
        np.testing.assert_array_equal(v["pool"], np.stack(thetas[-4:]))
        np.testing.assert_array_equal(v["pool"][-1], v["theta"])
    finally:
        st.close()


def test_the_log_keeps_the_propensity_and_the_export_carries_it(tmp_path):
    from ray_router.evaluation.duels import read_duels
    from ray_router.serve import durable
    from ray_router.serve.durable import LOG_DIR, FeedbackJournal, write_meta
    from ray_router.serve.log_export import export
    from tests.serve.test_durable import DIM, record

    recs = [record(1), {**record(2), "propensity": 0.25}, {**record(3), "source": "judge", "weight": 0.5}]
    recs.append({**record(4), "source": "judge", "weight": 0.5, "propensity": 1.0})
    for i, r in enumerate(recs):
        back = durable.decode_record(durable.encode_record({**r, "seq": i + 1})[12:])  # past the frame header
        assert back["propensity"] == r.get("propensity") and back["source"] == r.get("source", "human")
        assert back["weight"] == r.get("weight", 1.0)
    root = tmp_path / "state"
    root.mkdir()
    write_meta(root / "meta.json", {"arm_ids": [f"arm/{k}" for k in range(11)], "encoder_identity": "e", "dim": DIM})
    j = FeedbackJournal(root / LOG_DIR)
    j.open()
    j.append(recs)
    j.close()
    log = read_duels(export(root, tmp_path / "d.parquet").path)
    np.testing.assert_array_equal(np.isnan(log.propensity), [True, False, True, False])
    assert log.propensity[1] == 0.25 and log.propensity[3] == 1.0
    assert list(log.source) == ["human", "human", "judge", "judge"] and list(log.weight) == [1, 1, 0.5, 0.5]


def test_a_feedback_record_gets_its_decisions_propensity(tmp_path):
    st = PosteriorState(spec(tmp_path), clock=lambda: NOW)
    st.open()
    try:
        s = DecisionSigner(KEY, ARMS)
        x = quantise(hash_encoder(16).encode(["q"])[0])
        tok = s.issue(new_nonce(), NOW + 600, "duel", 0, 1, None, x, (3, 16))
        rec = st.begin_feedback(s.verify(tok, NOW), "first", "req-1")
        assert rec["propensity"] == 3 / 16
    finally:
        st.close()
