"""Shadow duels on a real local Ray Serve over real HTTP: the router learns from an LLM judge alone.

Four stub arms of known quality order (``tests/openai_stub.py``: ``best`` > ``good`` > ``fair`` >
``poor``) answer ``/v1/chat/completions``; a stub judge on its own loopback server names the
stronger arm's answer 80% of the time. ``judge.sample_rate`` is 1: every single-mode chat request
gets a shadow duel. No client ever posts ``/v1/feedback``, and the posterior starts cold (no
offline prior): everything the router ends up knowing comes from the judge's verdicts, which the
feedback log holds, marked ``judge``.
"""

from __future__ import annotations

import json

import httpx
import pytest

from ray_router.serve.durable import FeedbackJournal
from tests.openai_stub import StubJudge, StubModel, StubServer
from tests.serve.conftest import RouterApp, delete_router, deploy_router, wait_for
from tests.serve.helpers import QUERIES, write_synthetic_arm_table

pytestmark = pytest.mark.integration

QUALITY = {"poor": 0.3, "fair": 0.5, "good": 0.7, "best": 0.9}  # the arm table's order: the best arm is last
N_REQUESTS = 500
LAST = 200
STREAM_EVERY = 5  # every 5th request is streamed (judged once its stream has ended)


@pytest.fixture(scope="module")
def stubs():
    arms = StubServer({a: StubModel(a, quality=q) for a, q in QUALITY.items()}, seed=1)
    judge = StubServer(judge=StubJudge("judge", strength=QUALITY, accuracy=0.8), seed=2)
    with arms, judge:
        yield arms, judge


@pytest.fixture(scope="module")
def app(serve_cluster, stubs, tmp_path_factory) -> RouterApp:
    up, judge = stubs
    ids = list(QUALITY)
    table = write_synthetic_arm_table(tmp_path_factory.mktemp("judge-arms"), ids, "hash", seed=0)
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("judge-state"),
        {"arm_embeddings": {"file": str(table)}, "encoder": {"name": "hash", "device": "auto"}},
        args={
            "arms": [{"id": a, "price_usd": 0.001, "upstream": {"base_url": up.base_url, "model": a}} for a in ids],
            # a cold start (no offline prior): a per-arm term learned from the verdicts alone
            "policy": {"config": {"offline_prior": "none", "feature_map": "hadamard_bias"}},
            "auth": {
                "clients": [{"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY", "rate_per_s": 1e4, "burst": 10**4}]
            },
            "judge": {
                "upstream": {
                    "base_url": judge.base_url,
                    "model": "judge",
                    "price": {"prompt_usd_per_1m": 1.0, "completion_usd_per_1m": 2.0},
                },
                "sample_rate": 1.0,
                "weight": 1.0,
                "timeout_s": 5,
            },
        },
    )
    yield app
    delete_router()


@pytest.fixture(scope="module")
def client(app):
    key = (app.state_dir / "secrets" / "client_default").read_text().strip()
    with httpx.Client(base_url=app.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def chat(client: httpx.Client, text: str, stream: bool = False) -> str:
    """One routed single-mode chat request; the arm that answered."""
    body = {"model": "router", "messages": [{"role": "user", "content": text}], "router": {"mode": "single"}}
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["message"]["content"].endswith(f"[stub:{out['model']}]")
        return out["model"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        arm = r.headers["x-router-model"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text_out = "".join(
        c["choices"][0]["delta"].get("content", "") for e in events[:-1] if (c := json.loads(e))["choices"]
    )
    assert text_out.endswith(f"[stub:{arm}]")
    return arm


def stats(client: httpx.Client) -> dict:
    r = client.get("/v1/stats")
    assert r.status_code == 200, r.text
    return r.json()


def settled(client: httpx.Client, started: int) -> dict | None:
    """The stats once every shadow duel started so far has ended and its verdict is applied."""
    s = stats(client)
    j = s["judge"]
    ended = sum(j["duels"].values())
    d = s["durability"]
    if j["inflight"] == 0 and ended >= started and d["last_applied_seq"] == d["last_seq"] == j["duels"]["verdict"]:
        return s
    return None


def feedback_log(app: RouterApp) -> list[dict]:
    return [rec for _, rec in FeedbackJournal(app.state_dir / "feedback").scan()]


def test_the_router_converges_to_the_best_arm_on_judge_verdicts_alone(client, app, stubs):
    _, judge = stubs
    served = []
    for i in range(N_REQUESTS):
        text = f"[general] {QUERIES[i % len(QUERIES)]} (request {i})"
        served.append(chat(client, text, stream=i % STREAM_EVERY == STREAM_EVERY - 1))
    # before any verdict the router serves what its prior draw favours (policy seed 0: not the best
    # arm), so serving the best arm later was learned from the verdicts
    assert served[0] != "best"
    s = wait_for(lambda: settled(client, N_REQUESTS), timeout_s=180, what="every shadow duel to end")
    j = s["judge"]
    share = served[-LAST:].count("best") / LAST
    print(
        f"\njudge-driven convergence: 'best' served in {share:.1%} of the last {LAST} of {N_REQUESTS} requests; "
        f"first 100: {served[:100].count('best')}%; duels {j['duels']}; verdicts {j['verdicts']}; "
        f"cost {j['cost_usd']}"
    )
    assert share >= 0.9, (share, served[-LAST:])
    # every request got its duel, and nothing failed
    assert j["duels"]["verdict"] == N_REQUESTS and j["duels"]["error"] == 0
    assert j["calls"] == {"ok": 2 * N_REQUESTS, "error": 0, "budget_skipped": 0}
    assert j["second_arm"] == {"ok": N_REQUESTS, "error": 0}
    assert j["cost_usd"]["judge"] > 0
    assert judge.count("judge") == 2 * N_REQUESTS  # both orders of every duel
    # the log holds only judge verdicts: no client posted feedback
    recs = feedback_log(app)
    assert len(recs) == N_REQUESTS
    assert {r["source"] for r in recs} == {"judge"} and {r["weight"] for r in recs} == {1.0}
    assert all(r["first_id"] != r["second_id"] for r in recs)
    counts = s["counts"]
    assert counts["feedback_by_source"] == {"human": 0, "judge": N_REQUESTS}
    assert s["posterior"]["n_updates"] == N_REQUESTS


@pytest.mark.parametrize("failure", ["down", "http_500"])
def test_a_failed_judge_writes_no_verdict_and_is_counted(client, app, stubs, failure):
    _, judge = stubs
    before = stats(client)
    started = sum(before["judge"]["duels"].values())
    n_log = len(feedback_log(app))
    real = judge.judge
    broken = StubModel("judge", down=failure == "down")  # down: the connection closes without an answer
    if failure == "http_500":
        broken.fail_next(100, status=500)
    judge.judge, judge.models["judge"] = None, broken
    try:
        for i in range(3):
            chat(client, f"[general] while the judge fails ({failure}) {i}")  # the user is served all the same
        s = wait_for(
            lambda: (
                (x := stats(client))["judge"]["inflight"] == 0
                and sum(x["judge"]["duels"].values()) >= started + 3
                and x
            ),
            timeout_s=60,
            what="the duels to end",
        )
    finally:
        judge.judge = real
        del judge.models["judge"]
    j, j0 = s["judge"], before["judge"]
    assert j["duels"]["error"] - j0["duels"]["error"] == 3
    assert j["calls"]["error"] - j0["calls"]["error"] == 6  # both orders of each duel failed
    assert j["duels"]["verdict"] == j0["duels"]["verdict"] and j["verdicts"] == j0["verdicts"]
    assert len(feedback_log(app)) == n_log and s["durability"]["last_seq"] == before["durability"]["last_seq"]
