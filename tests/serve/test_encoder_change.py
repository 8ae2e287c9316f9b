"""An encoder change keeps what was learned when the query texts were kept (``state.keep_queries``),
without Ray: the posterior re-embeds each logged duel's text with the new encoder and rebuilds from
them, and the result equals the same policy trained on those duels directly.

The old encoder is the 16-d stand-in of the other state tests, the new one a 24-d stand-in of
another seed: different identity and dimension, so nothing of the old space can leak through."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_router.embeddings.lookup import HashEncoder
from ray_router.errors import ConfigError
from ray_router.policies import Duel
from ray_router.serve.errors import StaleDecision
from ray_router.serve.query_store import QUERIES_DIR, QueryWriter, load_queries, query_key
from ray_router.serve.state import PosteriorState, make_scorer
from ray_router.serve.tokens import DecisionSigner, quantise
from tests.serve.helpers import ARMS, arm_embeddings, hash_encoder, spec
from tests.serve.test_state import KEY, Clock, Router, crash

NEW = HashEncoder(dim=24, seed=9)


def new_spec(tmp_path, **kw):
    return spec(
        tmp_path, dim=24, encoder_identity=NEW.identity, arm_embeddings=arm_embeddings(24), keep_queries=True, **kw
    )


def serve_and_learn(tmp_path, n_snap: int = 20, n_tail: int = 10, unkept: int = 1):
    """Duels with feedback under the old encoder, their texts kept as the Ingress keeps them (one
    left out: a text lost in a crash); a snapshot after ``n_snap``, the rest in the log's tail."""
    r = Router(tmp_path, hash_encoder(), Clock(), keep_queries=True)
    writer = QueryWriter(tmp_path)
    kept, old_ids = [], []
    try:
        for i in range(n_snap + n_tail + unkept):
            text = f"query {i}: {'code' if i % 2 else 'maths'} question {i * 7}"
            d = r.route(text)
            if i < n_snap + n_tail:
                writer.add(d.x, text)
                kept.append((text, d))
            r.feedback(d.decision_id, ("first", "second", "tie")[i % 3], f"req-{i}")
            if i == n_snap - 1:
                r.settle()
                r.run(r.svc.snapshot_now())
        old_ids.append(r.route("a late one").decision_id)
        r.settle()
        writer.flush()
        crash(r)
    finally:
        r.close()
    return kept, old_ids


def test_an_encoder_change_rebuilds_from_the_kept_texts(tmp_path):
    kept, old_ids = serve_and_learn(tmp_path)
    assert len(load_queries(tmp_path)) == 30
    clock = Clock(1_000_100.0)
    st = PosteriorState(new_spec(tmp_path), clock=clock, encoder_factory=lambda: NEW)
    st.open()
    try:
        rep = st.recovery["reembedded"]
        assert rep["from"] == "hash-test" and rep["texts"] == 30 and rep["duels"] == 31 and rep["missing"] == 1
        assert st.recovery["rebuilt_from_log"] == f"encoder changed (hash-test -> {NEW.identity})"
        assert st.policy.n_updates == 30 and st.dim == 24
        # the same policy trained directly on the kept duels, embedded by the new encoder, in log order
        offline = make_scorer(arm_embeddings(24), st.spec.policy_config, st.spec.policy_seed)
        for text, d in kept:
            y = {"first": 1.0, "second": 0.0, "tie": 0.5}[("first", "second", "tie")[kept.index((text, d)) % 3]]
            offline.update(quantise(NEW.encode([text])[0]), Duel(*d.picked), y, None)
        got, want = st.policy.history.arrays(), offline.history.arrays()
        for k in ("X", "first", "second", "y"):
            np.testing.assert_array_equal(got[k], want[k])
        meta = json.loads((tmp_path / "meta.json").read_text())
        assert meta["encoder_identity"] == NEW.identity and meta["dim"] == 24
        assert meta["encoder_changed_from"] == "hash-test" and meta["encoder_changed_at"] == clock.t
        # a decision of the old encoder is refused; one of the new is taken
        signer = DecisionSigner(KEY, ARMS)
        with pytest.raises(StaleDecision, match="before the encoder changed"):
            st.begin_feedback(signer.verify(old_ids[0], clock.t), "first", "late")
        x = quantise(NEW.encode(["a new query"])[0])
        new_id = signer.issue("cd" * 12, clock.t + 600, "duel", 0, 1, None, x)
        assert st.begin_feedback(signer.verify(new_id, clock.t), "first", "new")["first"] == 0
    finally:
        st.close()
    # the next start is an ordinary one: the snapshot is of the new encoder
    st = PosteriorState(new_spec(tmp_path), clock=clock, encoder_factory=lambda: pytest.fail("no re-embedding"))
    st.open()
    try:
        assert st.recovery["reembedded"] is None and st.recovery["restored_snapshot"] and st.policy.n_updates == 30
    finally:
        st.close()


def test_without_kept_texts_an_encoder_change_is_refused_with_what_to_do(tmp_path):
    serve_and_learn(tmp_path, n_snap=3, n_tail=1)
    with pytest.raises(ConfigError, match="keep_queries: true"):
        PosteriorState(spec(tmp_path, dim=24, encoder_identity=NEW.identity, arm_embeddings=arm_embeddings(24))).open()
    # nothing was changed by the refusal
    assert json.loads((tmp_path / "meta.json").read_text())["encoder_identity"] == "hash-test"


def test_the_store_keys_a_query_by_the_embedding_its_duel_holds(tmp_path):
    x = quantise(hash_encoder().encode(["hello"])[0])
    assert query_key(x) == query_key(x.astype(np.float32)) == query_key(np.asarray(x, dtype=np.float16))
    w = QueryWriter(tmp_path, max_buffer=2)
    w.add(x, "hello")
    w.add(x, "hello")  # a repeated query is written once
    w.add(None, "no embedding")
    assert not list((tmp_path / QUERIES_DIR).glob("*.jsonl")) or w.written == 0
    w.add(quantise(hash_encoder().encode(["é 日本"])[0]), "é 日本")  # the second distinct one: flushed
    assert w.written == 2
    with open(w.path, "a", encoding="utf-8") as fh:
        fh.write('{"k": "torn')  # a crash mid-line
    assert sorted(load_queries(tmp_path).values()) == ["hello", "é 日本"]
    assert load_queries(tmp_path, {query_key(x)}) == {query_key(x): "hello"}
