"""Per-arm resilience and per-arm metrics of /v1/chat/completions on a real local Ray Serve.

The router (``serve_configs/local.yaml``, the synthetic arm table with the hash encoder) has three
chat arms, each answered by its own loopback OpenAI stub (``tests/openai_stub.py``), so one
upstream can be made to fail, or be killed (its port closed) and started again on the same port.
The tests check what a client sees (status, body, ``X-Router-*`` headers), what the posterior
learns (``/v1/stats``), the breakers (``/v1/admin/status``) and the per-arm series on the cluster's
Prometheus endpoint.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from ray_router.serve.tokens import DecisionSigner
from tests.openai_stub import StubModel, StubServer
from tests.serve.conftest import HMAC_KEY, config_args, delete_router, deploy_router, wait_for
from tests.serve.helpers import write_synthetic_arm_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# the shipped configs' arms under ids of this module's own ("res/..."): the per-arm series of the
# package's shared metrics endpoint then count this module's traffic only
PREFIX = "res/"
GPT4, CLAUDE2, MISTRAL = (PREFIX + a for a in ("gpt-4-1106-preview", "claude-v2", "mistralai/mistral-7b-chat"))
CHAT = (GPT4, CLAUDE2, MISTRAL)
ATTEMPTS, THRESHOLD, COOLDOWN_S = 2, 3, 4.0
PRICE = {"prompt_usd_per_1m": 1.0, "completion_usd_per_1m": 2.0}
QUERIES = [
    f"[{cat}] question number {i} about {topic}"
    for i, (cat, topic) in enumerate(
        [
            ("math", "primes"),
            ("code", "sorting"),
            ("chat", "the weather"),
            ("math", "integrals"),
            ("code", "regex"),
            ("chat", "a holiday"),
            ("math", "matrices"),
            ("code", "recursion"),
            ("chat", "music"),
            ("math", "limits"),
        ]
    )
]


def arm_list() -> list[dict]:
    """The shipped configs' arms, renamed."""
    return [{**a, "id": PREFIX + a["id"]} for a in config_args()["arms"]]


class Upstreams:
    """One stub server per chat arm (model name = ``m-<n>``), restartable on its port."""

    def __init__(self) -> None:
        self.models = {arm: f"m-{i}" for i, arm in enumerate(CHAT)}
        self.servers = {arm: StubServer({m: StubModel(m, 0.8)}).start() for arm, m in self.models.items()}
        self.ports = {arm: s.port for arm, s in self.servers.items()}

    def model(self, arm: str) -> StubModel:
        return self.servers[arm].models[self.models[arm]]

    def kill(self, arm: str) -> None:
        # drop the connections a client keeps alive, then close the port (connection refused)
        self.model(arm).down = True
        self.servers[arm].stop()

    def restart(self, arm: str) -> None:
        m = self.models[arm]
        self.servers[arm] = StubServer({m: StubModel(m, 0.8)}).start(port=self.ports[arm])

    def stop(self) -> None:
        for s in self.servers.values():
            s.stop()


@pytest.fixture(scope="module")
def ups():
    u = Upstreams()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def app(serve_cluster, ups, tmp_path_factory):
    arms = [
        {
            **a,
            **(
                {"upstream": {"base_url": ups.servers[a["id"]].base_url, "model": ups.models[a["id"]], "price": PRICE}}
                if a["id"] in CHAT
                else {}
            ),
        }
        for a in arm_list()
    ]
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("resilience-state"),
        {
            "arm_embeddings": {
                "file": str(
                    write_synthetic_arm_table(tmp_path_factory.mktemp("res-arms"), [a["id"] for a in arm_list()])
                )
            },
            "encoder": {"name": "hash", "device": "auto"},
        },
        args={
            "arms": arms,
            "auth": {"chat_requires_key": False},
            "resilience": {
                "attempts": ATTEMPTS,
                "backoff_base_s": 0.05,
                "backoff_max_s": 0.2,
                "retry_after_max_s": 3.0,
                "attempt_timeout_s": 10.0,
                "failure_threshold": THRESHOLD,
                "cooldown_s": COOLDOWN_S,
                "max_fallbacks": 2,
            },
        },
    )
    yield app
    delete_router()


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app.url, timeout=120) as c:
        yield c


def chat(client, query: str = QUERIES[0], **router) -> httpx.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": query}], "router": router}
    return client.post("/v1/chat/completions", json=body)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def code_of(body: dict) -> str:
    return body["error"]["code"] if isinstance(body["error"], dict) else body["error"]


def n_updates(client) -> int:
    return client.get("/v1/stats").json()["posterior"]["n_updates"]


def breakers(client, app) -> dict:
    r = client.get("/v1/admin/status", headers=app.admin)
    assert r.status_code == 200, r.text
    return r.json()["ingress"]["breakers"]


def metric(app, series: str, **labels: str) -> float:
    """The sum of ``series`` over the samples on the cluster's Prometheus endpoint whose labels match."""
    text = httpx.get(f"http://127.0.0.1:{app.cluster.metrics_port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(series)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def heal(client, ups) -> None:
    """Every chat arm healthy again: no queued failures, and one answered call each (which closes
    its breaker and resets its run of failures; an open one after its cooldown, as a probe)."""
    for arm in CHAT:
        ups.model(arm).clear_failures()
    for arm in CHAT:
        wait_for(lambda a=arm: chat(client, candidates=[a]).status_code == 200, COOLDOWN_S + 30, 0.5, what=f"{arm}")


@pytest.fixture(autouse=True)
def _healthy_arms(client, ups):
    heal(client, ups)


def signer() -> DecisionSigner:
    return DecisionSigner(HMAC_KEY, [a["id"] for a in arm_list()])


# ----------------------------------------------------------------------------- retries
def test_a_429_with_retry_after_is_waited_out_and_the_same_arm_answers(client, app, ups):
    ups.model(CLAUDE2).fail_next(1, 429, message="slow down", retry_after=1)
    before = ups.servers[CLAUDE2].count()
    t0 = time.monotonic()
    r = chat(client, candidates=[CLAUDE2])
    elapsed = time.monotonic() - t0
    out = ok(r)
    assert out["model"] == CLAUDE2 and r.headers["x-router-model"] == CLAUDE2
    assert "x-router-fallback" not in r.headers and "fallback" not in out["router"]
    assert ups.servers[CLAUDE2].count() - before == 2  # the 429, then the answer
    assert elapsed >= 1.0  # Retry-After: 1 was waited out before the retry
    wait_for(lambda: metric(app, "ray_router_arm_retries_total", arm=CLAUDE2) >= 1, 60, 1, what="the retry metric")


# ---------------------------------------------------------------------------- fallback
def test_an_arm_failing_every_attempt_falls_back_to_another_and_the_headers_say_so(client, ups):
    query = QUERIES[1]
    picked = ok(chat(client, query, candidates=[GPT4, MISTRAL]))["model"]  # this query's choice now
    other = MISTRAL if picked == GPT4 else GPT4
    ups.model(picked).fail_next(ATTEMPTS, 500)
    before = ups.servers[picked].count()
    r = chat(client, query, candidates=[GPT4, MISTRAL])
    out = ok(r)
    assert ups.servers[picked].count() - before == ATTEMPTS
    assert out["model"] == other and r.headers["x-router-model"] == other and r.headers["x-router-arms"] == other
    assert r.headers["x-router-fallback"] == picked and out["router"]["fallback"] == [picked]
    assert out["choices"][0]["message"]["content"].endswith(f"[stub:{ups.models[other]}]")
    claims = signer().verify(out["router"]["decision_id"])
    assert claims.mode == "single" and arm_list()[claims.first]["id"] == other


def test_a_stream_that_fails_to_open_falls_back_before_the_first_byte(client, ups):
    query = QUERIES[2]
    body = {"model": "router", "stream": True, "messages": [{"role": "user", "content": query}]}
    body["router"] = {"candidates": [GPT4, CLAUDE2]}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        picked = r.headers["x-router-model"]
        list(r.iter_lines())
    other = CLAUDE2 if picked == GPT4 else GPT4
    ups.model(picked).fail_next(ATTEMPTS, 503)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-router-model"] == other
        assert r.headers["x-router-fallback"] == picked
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[0]["router"]["fallback"] == [picked]
    assert all(c["model"] == other and "usage" not in c for c in chunks)  # the router's usage chunk stays inside
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).endswith(f"[stub:{ups.models[other]}]")


def test_a_duel_with_a_failing_arm_is_re_signed_for_the_arms_that_answered(client, app, ups):
    query = QUERIES[3]
    first, second = ok(chat(client, query, mode="duel"))["router"]["arms"]  # this query's duel now
    third = next(a for a in CHAT if a not in (first, second))
    ups.model(second).fail_next(ATTEMPTS, 500)
    n0 = n_updates(client)
    r = chat(client, query, mode="duel")
    out = ok(r)
    assert out["router"]["arms"] == [first, third] and r.headers["x-router-arms"] == f"{first},{third}"
    assert r.headers["x-router-fallback"] == second and out["router"]["mode"] == "duel"
    assert [c["model"] for c in out["choices"]] == [first, third]
    ids = [a["id"] for a in arm_list()]
    claims = signer().verify_duel(out["router"]["decision_id"])
    assert (ids[claims.first], ids[claims.second]) == (first, third)
    assert ids.index(second) not in claims.offered  # the failed arm was not available this round
    fb = client.post(
        "/v1/feedback", json={"decision_id": out["router"]["decision_id"], "outcome": "second"}, headers=app.auth
    )
    assert fb.status_code == 200, fb.text
    assert n_updates(client) == n0 + 1  # one verdict, on the arms that answered


def test_no_arm_answering_is_a_502_that_no_feedback_can_use(client, app, ups):
    n0 = n_updates(client)
    for arm in (GPT4, MISTRAL):
        ups.model(arm).fail_next(ATTEMPTS, 500)
    r = chat(client, QUERIES[4], mode="duel", candidates=[GPT4, MISTRAL])
    assert r.status_code == 502 and code_of(r.json()) == "upstream_error", r.text
    assert set(r.headers["x-router-fallback"].split(",")) == {GPT4, MISTRAL}
    assert "decision_id" not in r.text
    did = r.headers.get("x-router-decision-id")
    if did:  # an id on an error answer must not be usable for feedback
        fb = client.post("/v1/feedback", json={"decision_id": did, "outcome": "first"}, headers=app.auth)
        assert 400 <= fb.status_code < 500, fb.text
    assert n_updates(client) == n0


# --------------------------------------------------------------- a killed upstream
def test_a_killed_upstream_costs_no_user_errors_its_breaker_opens_and_it_comes_back(client, app, ups):
    # which arm these queries are routed to now; kill the one that serves most of them
    served = [ok(chat(client, q))["model"] for q in QUERIES]
    victim = max(CHAT, key=served.count)
    errors0 = metric(app, "ray_router_arm_errors_total", arm=victim, kind="connect")
    n0 = n_updates(client)
    ups.kill(victim)
    statuses, fallbacks = [], 0
    for _ in range(3):
        for q in QUERIES:
            r = chat(client, q)
            statuses.append(r.status_code)
            fallbacks += r.headers.get("x-router-fallback") == victim
            assert r.status_code != 200 or r.json()["model"] != victim
    assert statuses == [200] * len(statuses), statuses  # 0 user-visible errors
    assert 1 <= fallbacks <= THRESHOLD  # a fallback per failed request until the breaker opened
    state = breakers(client, app)[victim]
    assert state["state"] == "open" and state["consecutive_failures"] == THRESHOLD, state
    # the breaker opened after exactly failure_threshold failed calls; none since
    wait_for(
        lambda: metric(app, "ray_router_arm_errors_total", arm=victim, kind="connect") - errors0 == THRESHOLD,
        60,
        1,
        what=f"{THRESHOLD} connect errors of {victim}",
    )
    wait_for(lambda: metric(app, "ray_router_arm_breaker_state", arm=victim) == 2, 60, 1, what="the breaker gauge")
    assert metric(app, "ray_router_arm_errors_total", arm=victim, kind="breaker_open") >= 1
    assert n_updates(client) == n0  # no verdict from any of it
    print(
        f"\nkilled {victim}: {len(statuses)} requests, 0 errors, {fallbacks} fell back; its breaker opened after "
        f"{THRESHOLD} failed calls (attempts {ATTEMPTS})"
    )
    # the upstream returns on the same port; after the cooldown a probe finds it and closes the breaker
    ups.restart(victim)
    probe_query = QUERIES[served.index(victim)]
    wait_for(
        lambda: ok(chat(client, probe_query))["model"] == victim,
        COOLDOWN_S + 60,
        0.5,
        what=f"{victim} served again after its cooldown",
    )
    assert breakers(client, app)[victim]["state"] == "closed"


# ------------------------------------------------------------------------------ metrics
def test_per_arm_metrics_reach_the_prometheus_endpoint(client, app):
    from ray_router.serve.metrics import METRICS, exported_names

    arm_series = [exported_names()[n] for n in METRICS if n.startswith("router_arm_")]
    url = f"http://127.0.0.1:{app.cluster.metrics_port}/metrics"

    def all_there():
        text = httpx.get(url, timeout=10).text
        return not [s for s in arm_series if s not in text]

    wait_for(all_there, 60, 1, what=f"every per-arm series: {arm_series}")
    for arm in CHAT:
        assert metric(app, "ray_router_arm_requests_total", arm=arm) > 0
        assert metric(app, "ray_router_arm_latency_seconds_count", arm=arm) > 0

    def cost_matches_tokens():
        for arm in CHAT:
            prompt = metric(app, "ray_router_arm_prompt_tokens_total", arm=arm)
            completion = metric(app, "ray_router_arm_completion_tokens_total", arm=arm)
            usd = (prompt * PRICE["prompt_usd_per_1m"] + completion * PRICE["completion_usd_per_1m"]) / 1e6
            cost = metric(app, "ray_router_arm_cost_usd_total", arm=arm)
            if not (prompt > 0 and completion > 0 and cost == pytest.approx(usd)):
                return False
        return True

    wait_for(cost_matches_tokens, 60, 1, what="each arm's USD = its tokens x its price")
    assert metric(app, "ray_router_arm_errors_total", kind="http_5xx") > 0
    assert metric(app, "ray_router_arm_errors_total", kind="http_429") > 0
    assert metric(app, "ray_router_arm_ttft_seconds_count") > 0
