"""Shadow duels without Ray: prompt rendering, verdict parsing, the both-orders rule, the hourly
budget, sampling, the judge's config; and a whole shadow duel on the production path minus Serve:
:class:`ShadowJudge` with the stub upstreams and stub judge of ``tests/openai_stub.py`` on loopback
HTTP, the ingress's :class:`RouteDecider` and sample view, and a real :class:`PosteriorService`
(durable log, snapshots, replay) as the feedback path."""

from __future__ import annotations

import random
import sys

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from ray_router.errors import ConfigError
from ray_router.serve.config import JudgeSpec, UpstreamSpec
from ray_router.serve.durable import FeedbackJournal, decode_record, encode_record
from ray_router.serve.errors import DuplicateFeedback
from ray_router.serve.judge import (
    DEFAULT_PROMPT_TEMPLATE,
    HourlyBudget,
    NoJudge,
    ShadowJudge,
    combine,
    parse_verdict,
    question_text,
    render_prompt,
    stream_text,
)
from tests.openai_stub import StubJudge, StubModel, StubServer
from tests.serve.helpers import ARMS
from tests.serve.test_state import Clock, Router, crash

STRENGTH = {"alpha": 0.9, "beta": 0.6, "gamma": 0.4, "delta": 0.2}


# ------------------------------------------------------------------------------------ prompt
def test_the_default_template_holds_the_question_and_both_answers_verbatim():
    for p in ("{question}", "{answer_a}", "{answer_b}"):
        assert DEFAULT_PROMPT_TEMPLATE.count(p) == 1
    a, b = "x = {answer_b} and {y} [stub:alpha]", "I do not know. [stub:beta]"
    out = render_prompt(None, "What is {x}?", a, b)
    assert "What is {x}?" in out and a in out and b in out
    assert out.index(a) < out.index(b)  # A before B: the stub judge reads them in this order
    assert "{answer_a}" not in out and "{question}" not in out
    assert render_prompt("Q={question}|A={answer_a}|B={answer_b}", "q", "1", "2") == "Q=q|A=1|B=2"


def test_question_text_is_the_user_message_or_the_whole_conversation():
    assert question_text([{"role": "user", "content": "Hi?"}]) == "Hi?"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert question_text(parts) == "a b"
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    text = question_text(convo)
    assert text.index("[system]\nBe brief.") < text.index("[user]\n2+2?") < text.index("[user]\nand 3+3?")


def test_stream_text_joins_the_deltas_and_refuses_a_broken_stream():
    chunks = [
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"correct"}}],"router":{}}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":" [stub:alpha]"}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert stream_text(chunks) == "correct [stub:alpha]"
    assert stream_text([b"data: [DONE]\n\n"]) is None
    with pytest.raises(ValueError):
        stream_text([*chunks[:1], b'data: {"error":{"type":"upstream_error","message":"broke"}}\n\n'])


# ---------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A", "A"),
        ("b", "B"),
        ("tie", "tie"),
        ("Tie.", "tie"),
        ("**A**", "A"),
        ('"B"', "B"),
        ("[B]", "B"),
        ("Answer A", "A"),
        ("Answer B is better.", "B"),
        ("A is better", "A"),
        ("Verdict: B", "B"),
        ("The final verdict is: A", "A"),
        ("[[A]]", "A"),
        ("Both answers are fine but [[B]] is more complete.", "B"),
        ("[[C]]", "tie"),
        ("Answer A misses the point; answer B explains it.\nB", "B"),
        ("Let me think.\nA has an error.\nFinal verdict: B", "B"),
        ("equal", "tie"),
        ("  a  \n", "A"),
        # nothing clear: no verdict
        ("", None),
        ("A tie? No, A.", None),
        ("I cannot decide between A and B", None),
        ("[[A]] then [[B]]", None),
        ("correct [stub:alpha]", None),
        ("Answer C", None),
        (None, None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_both_orders_must_agree_else_it_is_a_tie():
    # served as A first, then served as B
    assert combine("A", "B") == "first"
    assert combine("B", "A") == "second"
    for disagreement in (("A", "A"), ("B", "B"), ("tie", "B"), ("A", "tie"), ("tie", "tie")):
        assert combine(*disagreement) == "tie"


# ------------------------------------------------------------------------------------ budget
def test_the_hourly_budget_stops_judging_until_the_hour_rolls():
    clock = Clock(3600.0 * 10 + 5)
    b = HourlyBudget(usd_per_hour=None, calls_per_hour=5, clock=clock)
    assert b.reserve(2) and b.reserve(2)
    assert not b.reserve(2)  # 4 taken, 2 more would pass 5
    b.refund(2)  # a duel whose second arm failed made no judge call
    assert b.reserve(2) and not b.reserve(2)
    clock.t += 3590  # still the same clock hour
    assert not b.reserve(1) or b.calls == 5
    clock.t = 3600.0 * 11  # the hour rolls
    assert b.reserve(2) and b.calls == 2

    usd = HourlyBudget(usd_per_hour=0.01, calls_per_hour=None, clock=clock)
    assert usd.reserve(2)
    usd.spend(0.006)
    assert usd.reserve(2)
    usd.spend(0.006)  # past the limit: the next duel waits for the next hour
    assert not usd.reserve(2)
    clock.t += 3600
    assert usd.reserve(2) and usd.usd == 0.0
    unlimited = HourlyBudget(None, None, clock)
    assert all(unlimited.reserve(2) for _ in range(1000))


def spec(base_url: str, model: str = "judge", **kw) -> JudgeSpec:
    return JudgeSpec.model_validate({"upstream": {"base_url": base_url, "model": model}, **kw})


def test_sampling_takes_the_configured_share_of_the_judged_modes():
    def judge(rate: float, modes=("single",)) -> ShadowJudge:
        return ShadowJudge(
            spec("http://127.0.0.1:9/v1", sample_rate=rate, modes=list(modes)),
            ARMS,
            [None] * 4,
            None,
            None,
            None,
            None,
            rng=random.Random(1),
        )

    n = 4000
    always, never = judge(1.0), judge(0.0)
    assert sum(always._sampled("single") for _ in range(n)) == n
    assert sum(never._sampled("single") for _ in range(n)) == 0
    quarter = judge(0.25)
    k = sum(quarter._sampled("single") for _ in range(n))
    sd = (n * 0.25 * 0.75) ** 0.5
    assert abs(k - n * 0.25) < 4 * sd, k
    assert not any(always._sampled("duel") for _ in range(10))  # modes: single only by default
    both = judge(1.0, ("single", "duel"))
    assert all(both._sampled("duel") for _ in range(10))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"prompt_template": "Which is better? {answer_a} {answer_b}"}, "{question}"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"weight": -1}, "weight"),
        ({"modes": ["single", "single"]}, "each mode once"),
        ({"modes": ["stream"]}, "modes"),
        ({"params": {"model": "x"}}, "may not set"),
        ({"budget": {"usd_per_hour": -1}}, "usd_per_hour"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"sample_rte": 0.5}, "sample_rte"),
    ],
)
def test_bad_judge_configs_are_refused_with_the_field_named(fields, error):
    with pytest.raises(ValidationError, match=error.replace("{", r"\{").replace("}", r"\}")):
        spec("http://127.0.0.1:9/v1", **fields)


def test_the_judge_module_and_no_judge_need_no_ray():
    import subprocess

    code = (
        "import sys; import ray_router.serve.judge as j; import ray_router.serve.state;"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray.'))[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    gen = object()
    assert NoJudge().stream(gen, None, None, {}) is gen and NoJudge().stats() is None  # type: ignore[arg-type]


# ------------------------------------------------------------------- durable records, state
def _record(source: str, weight: float) -> dict:
    return {
        "seq": 7,
        "nonce": "ab" * 12,
        "request_id": "judge-x",
        "outcome": "second",
        "y": 0.0,
        "first": 1,
        "second": 3,
        "first_id": "beta",
        "second_id": "delta",
        "offered": [1, 3],
        "x": np.arange(16, dtype=np.float32),
        "expires_at": 2_000_000_000,
        "ts": 1.5,
        "source": source,
        "weight": weight,
    }


def test_records_carry_their_source_and_weight_and_human_ones_keep_the_old_format():
    from ray_router.serve.durable import _FRAME

    judge = encode_record(_record("judge", 0.25))
    human = encode_record(_record("human", 1.0))
    assert judge[_FRAME.size] == 2 and human[_FRAME.size] == 1  # version byte of the payload
    back = decode_record(judge[_FRAME.size :])
    assert back["source"] == "judge" and back["weight"] == 0.25 and back["offered"] == [1, 3]
    np.testing.assert_array_equal(back["x"], np.arange(16))
    old = decode_record(human[_FRAME.size :])  # a version-1 record (every record before judges)
    assert old["source"] == "human" and old["weight"] == 1.0
    assert decode_record(encode_record(_record("human", 2.0))[_FRAME.size :])["weight"] == 2.0


# ------------------------------------------------------------------------ the shadow duel
@pytest.fixture
def stub():
    models = {a: StubModel(a, quality=STRENGTH[a]) for a in ARMS}
    models["flaky"] = StubModel("flaky", 0.5)
    with StubServer(models, judge=StubJudge("judge", strength=STRENGTH, accuracy=1.0)) as up:
        yield up


@pytest.fixture
def router(tmp_path, enc):
    made: list[Router] = []

    def make(clock=None, **overrides) -> Router:
        made.append(Router(tmp_path, enc, clock or Clock(), **overrides))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def enc():
    from tests.serve.helpers import hash_encoder

    return hash_encoder()


def shadow(r: Router, up: StubServer, **fields) -> ShadowJudge:
    fields.setdefault("sample_rate", 1.0)
    judge_model = fields.pop("judge_model", "judge")
    base = fields.pop("judge_url", up.base_url)
    return ShadowJudge(
        spec(base, judge_model, **fields),
        ARMS,
        [UpstreamSpec(base_url=up.base_url, model=a, price={"prompt_usd_per_1m": 1.0}) for a in ARMS],
        r.view,
        r.decider.signer,
        httpx.AsyncClient(timeout=30),
        r.svc.feedback,
        rng=random.Random(0),
        clock=r.clock,
    )


BODY = {"model": "router", "messages": [{"role": "user", "content": "Name a prime number."}]}


def answer(up: StubServer, arm: str) -> dict:
    r = httpx.post(f"{up.base_url}/chat/completions", json={**BODY, "model": arm})
    assert r.status_code == 200
    return r.json()


def duel(r: Router, up: StubServer, judge: ShadowJudge, text: str = "Name a prime number.", mode: str = "single"):
    """A chat request's path: decide, the user's answer(s), the hook; then wait for the shadow duel."""
    dec = r.route(text, mode=mode)
    out = answer(up, ARMS[dec.picked[0]])
    if mode == "duel":
        out["choices"] = [answer(up, ARMS[i])["choices"][0] for i in dec.picked]

    async def go():
        task = judge.after_answer(None, dec, BODY, out)
        return None if task is None else await task

    return dec, r.run(go())


def log(r: Router) -> list[dict]:
    j = FeedbackJournal(r.st.journal.dir)
    return [rec for _, rec in j.scan()]


def test_a_shadow_duel_records_the_judges_verdict_with_its_source_and_weight(router, stub):
    r = router(judge_weight=0.5)
    judge = shadow(r, stub)
    dec, outcome = duel(r, stub, judge)
    served = ARMS[dec.picked[0]]
    recs = log(r)
    assert len(recs) == 1
    rec = recs[0]
    assert rec["source"] == "judge" and rec["weight"] == 0.5 and rec["outcome"] == outcome
    assert rec["first_id"] == served and rec["second_id"] != served
    # the verdict is linked to the decision the user got (its nonce) and to its query embedding
    assert rec["nonce"] == r.decider.signer.verify(dec.decision_id, r.clock()).nonce
    np.testing.assert_array_equal(rec["x"], dec.x)
    # the judge (accuracy 1) prefers the stronger model in both orders: a clear winner
    stronger = served if STRENGTH[served] > STRENGTH[rec["second_id"]] else rec["second_id"]
    assert outcome == ("first" if stronger == served else "second")
    # both orders were asked: served answer as A, then as B
    prompts = [q["body"]["messages"][0]["content"] for q in stub.requests if q["model"] == "judge"]
    assert len(prompts) == 2
    first_markers = [p.index(f"[stub:{served}]") < p.index(f"[stub:{rec['second_id']}]") for p in prompts]
    assert sorted(first_markers) == [False, True]
    # the second arm was asked the user's request, not streamed
    second_calls = [
        q for q in stub.requests if q["model"] == rec["second_id"] and q["body"]["messages"] == BODY["messages"]
    ]
    assert second_calls and not any(q["body"].get("stream") for q in second_calls)
    r.settle()
    assert r.st.policy.history.arrays()["w"].tolist() == [0.5]
    s = judge.stats()
    assert s["duels"]["verdict"] == 1 and s["calls"]["ok"] == 2 and s["second_arm"]["ok"] == 1
    assert s["verdicts"][outcome] == 1 and s["cost_usd"]["second_arm"] > 0
    st = r.st.stats()["counts"]
    assert st["feedback_by_source"] == {"human": 0, "judge": 1}


def test_the_second_arm_is_the_policys_duel_choice(router, stub):
    from ray_router.serve.ranking import choose_duel

    r = router()
    judge = shadow(r, stub)
    for i in range(6):
        dec = r.route(f"query {i}", mode="single")
        second, _ = judge._second_arm(None, dec)
        mask = np.ones(4, dtype=bool)
        want = choose_duel(r.view.scorer.arm_scores(dec.x, r.view.theta), mask, None, True, dec.picked[0])[1]
        assert second == want != dec.picked[0]


@pytest.mark.parametrize("failure", ["judge_500", "judge_down", "unreadable", "second_arm_500"])
def test_a_failed_call_writes_no_verdict_and_is_counted(router, stub, failure):
    r = router()
    fields: dict = {}
    if failure == "judge_500":
        stub.models["flaky"].fail_next(10, status=500)
        fields["judge_model"] = "flaky"
    elif failure == "judge_down":
        with StubServer() as gone:
            closed = gone.base_url
        fields["judge_url"] = closed  # connection refused
    elif failure == "unreadable":
        fields["judge_model"] = "flaky"  # a chat model: its reply names no verdict
    else:
        for a in ARMS:
            stub.models[a].fail_next(10, status=500)
    judge = shadow(r, stub, **fields)
    dec = r.route("Name a prime number.", mode="single")
    out = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"7 [stub:{ARMS[dec.picked[0]]}]"}}]}

    async def go():
        return await judge.after_answer(None, dec, BODY, out)

    assert r.run(go()) is None
    assert log(r) == [] and r.st.journal.last_seq == 0
    s = judge.stats()
    assert s["duels"]["error"] == 1 and s["duels"]["verdict"] == 0 and sum(s["verdicts"].values()) == 0
    if failure == "second_arm_500":
        assert s["second_arm"]["error"] == 1 and s["calls"]["ok"] + s["calls"]["error"] == 0
        assert s["budget"]["calls"] == 0  # the judge calls it did not make went back to the budget
    else:
        assert s["calls"]["error"] >= 1 and s["second_arm"]["ok"] == 1


def test_the_budget_skips_duels_until_the_hour_rolls(router, stub):
    clock = Clock(3600.0 * 100)
    r = router(clock=clock)
    judge = shadow(r, stub, budget={"calls_per_hour": 4})
    outcomes = [duel(r, stub, judge, f"q{i}")[1] for i in range(3)]
    assert outcomes[0] is not None and outcomes[1] is not None and outcomes[2] is None
    s = judge.stats()
    assert s["duels"]["budget_skipped"] == 1 and s["calls"]["budget_skipped"] == 2 and s["calls"]["ok"] == 4
    assert len(log(r)) == 2
    clock.t += 3600
    assert duel(r, stub, judge, "q3")[1] is not None
    assert len(log(r)) == 3


def test_judge_and_human_verdicts_on_one_decision_coexist_and_agreement_is_counted(router, stub):
    r = router()
    judge = shadow(r, stub, modes=["duel"])
    dec, outcome = duel(r, stub, judge, mode="duel")
    assert outcome in ("first", "second")  # accuracy 1: a clear verdict
    assert not any(q["model"] not in ("judge", *ARMS) for q in stub.requests)
    # the human's rules are unchanged: one feedback, a retry with the same request id replays it
    ack = r.feedback(dec.decision_id, outcome, "human-1")
    assert ack["accepted"] and ack["agreement"] == "agree" and "source" not in ack
    assert r.feedback(dec.decision_id, outcome, "human-1")["replayed"] is True
    with pytest.raises(DuplicateFeedback):
        r.feedback(dec.decision_id, "tie", "human-2")
    # a judge verdict is single use too (its own entry)
    with pytest.raises(DuplicateFeedback):
        r.run(r.svc.feedback(dec.decision_id, "tie", "judge-other", "judge"))
    other, judged = duel(r, stub, judge, "Another question", mode="duel")
    flipped = {"first": "second", "second": "first"}[judged]
    assert r.feedback(other.decision_id, flipped, "human-3")["agreement"] == "disagree"
    counts = r.st.stats()["counts"]
    assert counts["judge_agreement"] == {"agree": 1, "disagree": 1}
    assert counts["feedback_by_source"] == {"human": 2, "judge": 2}
    assert [(x["source"], x["outcome"]) for x in log(r)] == [
        ("judge", outcome),
        ("human", outcome),
        ("judge", judged),
        ("human", flipped),
    ]
    with pytest.raises(ConfigError):
        r.run(r.svc.feedback(other.decision_id, "tie", "x", "robot"))


def test_sources_weights_and_single_use_survive_a_restart_and_a_snapshot(router, stub, tmp_path):
    clock = Clock()
    r = router(clock=clock, judge_weight=0.25)
    judge = shadow(r, stub, modes=["duel"])
    dec, outcome = duel(r, stub, judge, mode="duel")
    r.feedback(dec.decision_id, outcome, "human-1")
    r.settle()
    crash(r)  # no snapshot: the log is replayed
    r2 = router(clock=clock, judge_weight=1.0)  # a later config's weight does not rewrite history
    assert r2.st.policy.history.arrays()["w"].tolist() == [0.25, 1.0]
    with pytest.raises(DuplicateFeedback):
        r2.run(r2.svc.feedback(dec.decision_id, "tie", "judge-again", "judge"))
    assert r2.feedback(dec.decision_id, outcome, "human-1")["replayed"] is True
    r2.run(r2.svc.snapshot_now())
    r2.close()
    r3 = router(clock=clock)
    assert r3.st.recovery["restored_snapshot"] and r3.st.recovery["replayed"] == 0
    assert r3.st.policy.history.arrays()["w"].tolist() == [0.25, 1.0]
    with pytest.raises(DuplicateFeedback):
        r3.run(r3.svc.feedback(dec.decision_id, "tie", "judge-again", "judge"))
    r3.run(r3.svc.snapshot_now())
    r3.close()
    # a changed policy config rebuilds the posterior from the snapshot's duels: weights included
    r4 = router(clock=clock, policy_config={"feature_map": "hadamard_bias", "n_steps": 6})
    assert r4.st.recovery["rebuilt_from_history"] == 2
    assert r4.st.policy.history.arrays()["w"].tolist() == [0.25, 1.0]


def test_a_streamed_answer_is_judged_once_the_stream_has_ended(router, stub):
    r = router()
    judge = shadow(r, stub)
    dec = r.route("Name a prime number.", mode="single")
    served = ARMS[dec.picked[0]]
    chunks = [
        f'data: {{"choices":[{{"index":0,"delta":{{"content":"correct [stub:{served}]"}}}}]}}\n\n'.encode(),
        b"data: [DONE]\n\n",
    ]

    async def relay():
        for c in chunks:
            yield c

    async def consume():
        got = []
        async for c in judge.stream(relay(), None, dec, {**BODY, "stream": True}):
            got.append(c)
            assert not judge._tasks  # nothing starts while the user's stream runs
        await judge.drain()
        return got

    assert r.run(consume()) == chunks
    recs = log(r)
    assert len(recs) == 1 and recs[0]["source"] == "judge" and recs[0]["first_id"] == served

    async def broken():
        yield chunks[0]
        yield b'data: {"error":{"type":"upstream_error","message":"upstream stream broke"}}\n\n'

    async def consume_broken():
        async for _ in judge.stream(broken(), None, r.route("q2", mode="single"), BODY):
            pass
        await judge.drain()

    r.run(consume_broken())
    assert len(log(r)) == 1 and judge.stats()["duels"]["error"] == 1


def test_many_concurrent_duels_are_capped(router, stub):
    r = router()
    judge = shadow(r, stub, max_inflight=2)
    decs = [r.route(f"q{i}", mode="single") for i in range(4)]
    out = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x [stub:alpha]"}}]}

    async def go():
        tasks = [judge.after_answer(None, d, BODY, out) for d in decs]
        await judge.drain()
        return tasks

    tasks = r.run(go())
    assert sum(t is not None for t in tasks) == 2
    assert judge.stats()["duels"]["busy"] == 2


def test_the_readme_lists_every_judge_metric_and_the_app_args_take_a_judge():
    from pathlib import Path

    from ray_router.serve.config import AppArgs
    from ray_router.serve.judge import METRICS

    text = (Path(__file__).resolve().parents[1] / "serve_configs" / "README.md").read_text()
    for name, (kind, tags, _) in METRICS.items():
        assert f"ray_{name}{'_total' if kind == 'counter' else ''}" in text, name
        for tag in tags:
            assert f"`{tag}`" in text
    arms = [{"id": "a", "price_usd": 0.0}, {"id": "b", "price_usd": 0.0}]
    base = {"arms": arms, "arm_embeddings": {"file": "x.npy"}}
    assert AppArgs.model_validate(base).judge is None
    args = AppArgs.model_validate(
        {**base, "judge": {"upstream": {"base_url": "http://j/v1", "model": "m"}, "weight": 0.5}}
    )
    assert args.judge is not None and args.judge.weight == 0.5 and args.judge.modes == ["single"]
    with pytest.raises(ValidationError, match="base_url"):
        AppArgs.model_validate({**base, "judge": {"upstream": {"base_url": "ftp://j", "model": "m"}}})
