"""The HTTP contract on a real local Ray Serve.

One application (``serve_configs/local.yaml`` with a temporary state directory, a fake upstream
for three arms, and the synthetic arm table with the hash encoder: no data needed) serves the
whole module; ``test_real_data.py`` deploys the shipped arm table (RouterBench, MiniLM).
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from ray_router.serve.tokens import DecisionSigner, new_nonce
from tests.serve.conftest import (
    HMAC_KEY,
    TOKEN,
    RouterApp,
    config_args,
    delete_router,
    deploy_router,
    synthetic_arm_args,
    wait_for,
)
from tests.serve.helpers import error_code, error_message

pytestmark = pytest.mark.integration

GPT4, CLAUDE2, MISTRAL = "gpt-4-1106-preview", "claude-v2", "mistralai/mistral-7b-chat"
LLAMA = "meta/llama-2-70b-chat"
MAX_QUERY, MAX_BODY = 2000, 65536


@pytest.fixture(scope="module")
def app(serve_cluster, fake_upstream, tmp_path_factory) -> RouterApp:
    base_url, _ = fake_upstream
    arms = config_args()["arms"]
    upstreams = {
        GPT4: {"base_url": base_url, "model": "fake-gpt-4", "api_key_env": "RR_TEST_UPSTREAM_KEY"},
        CLAUDE2: {"base_url": base_url, "model": "fake-claude"},
        MISTRAL: {"base_url": base_url, "model": "broken-model"},
    }
    arms = [{**a, **({"upstream": upstreams[a["id"]]} if a["id"] in upstreams else {})} for a in arms]
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("http-state"),
        synthetic_arm_args(tmp_path_factory.mktemp("http-arms")),
        args={
            "arms": arms,
            "limits": {"max_query_chars": MAX_QUERY, "max_body_bytes": MAX_BODY, "max_candidates": 5, "max_n": 2},
            "auth": {
                "clients": [
                    {"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY"},
                    {"name": "tight", "key_env": "RR_TEST_TIGHT_KEY", "rate_per_s": 0.001, "burst": 2},
                ]
            },
        },
    )
    yield app
    delete_router()


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def direct_client(app):
    """The same API through the Ingress replica's own HTTP server (Serve's direct ingress)."""
    from ray_router.serve import launch

    urls = launch.direct_urls()
    assert urls, "direct ingress is on by default (launch.RAY_ENV_DEFAULTS)"
    with httpx.Client(base_url=urls[0], timeout=60) as c:
        yield c


def secret(app: RouterApp, name: str) -> dict[str, str]:
    """``Authorization`` header with one of the app's generated secrets (``admin_token``,
    ``client_default``, ...: the test environment sets only the feedback token and the HMAC key)."""
    return {"Authorization": f"Bearer {(app.state_dir / 'secrets' / name).read_text().strip()}"}


def _claims(decision_id: str):
    """The claims inside a genuine decision id (verified with the test's signing key)."""
    return DecisionSigner(HMAC_KEY, [a["id"] for a in config_args()["arms"]]).verify(decision_id)


def route(client, **body) -> dict:
    r = client.post("/v1/route", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stats(client) -> dict:
    r = client.get("/v1/stats")
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------- basics
def test_health_arms_and_route_shape(client, app):
    assert client.get("/healthz").json()["status"] == "ok"
    arms = client.get("/v1/arms").json()["arms"]
    assert len(arms) == 11 and {a["id"] for a in arms if a["chat"]} == {GPT4, CLAUDE2, MISTRAL}
    assert max(a["price_norm"] for a in arms) == 1.0
    out = route(client, query="Which of these numbers is prime: 21, 23, 25?")
    assert set(out) >= {"decision_id", "arms", "model", "mode", "posterior_version", "expires_at"}
    assert out["mode"] == "duel" and len(out["arms"]) == 2 and out["arms"][0] != out["arms"][1]
    assert out["model"] == out["arms"][0] and out["expires_at"] > time.time()
    single = route(client, query="Write a haiku about the sea.", mode="single", candidates=[GPT4, LLAMA])
    assert single["arms"] == [single["model"]] and single["model"] in (GPT4, LLAMA)


def test_cost_weight_steers_to_cheap_arms(client):
    q = "Summarise the plot of Hamlet in two sentences."
    cheap = route(client, query=q, mode="single", cost_weight=1000.0)
    assert cheap["model"] == "mistralai/mistral-7b-chat"  # the cheapest arm of the table
    pricey = route(client, query=q, mode="single", candidates=[GPT4, "claude-v1"], cost_weight=1000.0)
    assert pricey["model"] == "claude-v1"  # cheaper of the two


# ----------------------------------------------------------------------- learning loop
def test_route_feedback_advances_the_posterior_and_changes_choices(client, app):
    probe = "Explain how a hash map handles collisions."
    pair = [CLAUDE2, LLAMA]
    before = route(client, query=probe, mode="single", candidates=pair)["model"]
    winner = LLAMA if before == CLAUDE2 else CLAUDE2
    s0 = stats(client)
    n0, v0 = s0["posterior"]["n_updates"], s0["posterior"]["version"]
    n = 30
    for i in range(n):
        d = route(client, query=f"{probe} Variant {i}.", candidates=pair)
        outcome = "first" if d["arms"][0] == winner else "second"
        r = client.post("/v1/feedback", json={"decision_id": d["decision_id"], "outcome": outcome}, headers=app.auth)
        assert r.status_code == 200, r.text
        ack = r.json()
        assert ack["accepted"] is True and ack["outcome"] == outcome and ack["seq"] >= 1
    # SGLD runs in the background after updates; wait until it has seen all of them
    s1 = wait_for(
        lambda: (s := stats(client))["posterior"]["refreshed_at_update"] == n0 + n and s,
        what="a refresh after the last update",
    )
    assert s1["posterior"]["n_updates"] == n0 + n
    assert s1["posterior"]["version"] > v0
    assert s1["durability"]["last_seq"] == s1["durability"]["last_applied_seq"] == n0 + n
    # let the exploit mean settle (admin call), then the served arm has changed to the winner
    r = client.post("/v1/admin/refresh", json={"times": 60}, headers=secret(app, "admin_token"))
    assert r.status_code == 200, r.text
    assert route(client, query=probe, mode="single", candidates=pair)["model"] == winner


def test_direct_ingress_serves_the_same_api_without_the_proxy(client, direct_client, app):
    """Serve's direct ingress (on by default in launch.RAY_ENV_DEFAULTS): the Ingress replica's own
    HTTP server answers the same API on the same posterior, and says where its time went."""
    direct = direct_client
    assert str(direct.base_url) != app.url and str(direct.base_url).startswith("http://127.0.0.1:")
    assert direct.get("/healthz").json()["status"] == "ok"
    r = direct.post("/v1/route", json={"query": "Is 91 a prime number?"})
    assert r.status_code == 200, r.text
    timing = dict(part.split(";", 1) for part in r.headers["server-timing"].split(", "))
    assert set(timing) == {"embed", "encode", "choose", "app"}
    n0 = stats(client)["posterior"]["n_updates"]
    ack = direct.post("/v1/feedback", json={"decision_id": r.json()["decision_id"], "outcome": "tie"}, headers=app.auth)
    assert ack.status_code == 200, ack.text
    # the proxy's path sees the feedback given on the direct path: one posterior
    wait_for(lambda: stats(client)["posterior"]["n_updates"] == n0 + 1, what="the direct path's feedback")
    bad = direct.post("/v1/route", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    assert (
        direct.post(
            "/v1/feedback", json={"decision_id": r.json()["decision_id"], "outcome": "first"}, headers=app.auth
        ).status_code
        == 409
    )  # taken once, on either path


# --------------------------------------------------------------- auth, forgery, replay
def test_feedback_needs_the_token(client, app):
    d = route(client, query="auth test")
    others = [secret(app, "admin_token"), secret(app, "client_default")]  # other powers do not open it
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, *others):
        r = client.post("/v1/feedback", json={"decision_id": d["decision_id"], "outcome": "first"}, headers=headers)
        assert r.status_code == 401 and error_code(r.json()) == "unauthorized"
        assert r.headers.get("www-authenticate") == "Bearer"


def test_admin_endpoints_need_the_admin_token(client, app):
    """Separate powers: neither the feedback token nor a client key opens the admin endpoints."""
    for headers in ({}, app.auth, secret(app, "client_default"), {"Authorization": "Bearer wrong"}):
        for path in ("/v1/admin/snapshot", "/v1/admin/refresh"):
            assert client.post(path, headers=headers).status_code == 401
        assert client.get("/v1/admin/status", headers=headers).status_code == 401
    admin = secret(app, "admin_token")
    status = client.get("/v1/admin/status", headers=admin)
    assert status.status_code == 200, status.text
    creds = status.json()["ingress"]["credentials"]
    assert creds["feedback_token"] == "$RAY_ROUTER_TOKEN" and creds["admin_token"].endswith("admin_token")
    assert TOKEN not in status.text and HMAC_KEY not in status.text
    assert client.post("/v1/admin/refresh", headers=admin).status_code == 200  # an empty body: one refresh
    r = client.post("/v1/admin/refresh", json={"times": 10**40}, headers=admin)
    assert r.status_code == 422 and error_code(r.json()) == "invalid_request"


def test_a_client_key_over_its_rate_limit_gets_429(client, app):
    tight = secret(app, "client_tight")  # burst 2, then one per 1000 s
    assert [client.get("/v1/arms", headers=tight).status_code for _ in range(2)] == [200, 200]
    r = client.get("/v1/arms", headers=tight)
    assert r.status_code == 429 and error_code(r.json()) == "rate_limited" and int(r.headers["retry-after"]) >= 1
    assert client.get("/v1/arms", headers=secret(app, "client_default")).status_code == 200  # its own bucket
    assert client.get("/v1/arms").status_code == 200  # reads are open by default (protect_reads: false)


def test_forged_replayed_and_stale_ids_do_not_touch_the_posterior(client, app):
    from tests.serve.test_tokens import _flip, _payload_edit

    d = route(client, query="forgery test")
    tok = d["decision_id"]
    arm_ids = [a["id"] for a in client.get("/v1/arms").json()["arms"]]
    s0 = stats(client)
    n0, seq0 = s0["posterior"]["n_updates"], s0["durability"]["last_seq"]
    body = lambda t: {"decision_id": t, "outcome": "first"}  # noqa: E731
    x = np.zeros(_claims(tok).x.shape[0], dtype=np.float32)
    forged = [
        _flip(tok, len(tok) - 1),  # signature changed
        _payload_edit(tok, lambda r: r.__setitem__(1, 1)),  # mode changed
        _payload_edit(tok, lambda r: r.__setitem__(2, r[2] ^ 1)),  # nonce changed (a replay under a new nonce)
        _payload_edit(tok, lambda r: r.__setitem__(20, r[20] ^ 1)),  # expiry extended
        _payload_edit(tok, lambda r: r.__setitem__(23, r[23] ^ 1)),  # arm changed
        _payload_edit(tok, lambda r: r.__setitem__(len(r) - 1, r[-1] ^ 1)),  # query embedding changed
        DecisionSigner("another-key-0123456789", arm_ids).issue(new_nonce(), time.time() + 60, "duel", 0, 1, None, x),
    ]
    for f in forged:
        r = client.post("/v1/feedback", json=body(f), headers=app.auth)
        assert r.status_code == 403 and error_code(r.json()) == "invalid_signature", r.text
    signer = DecisionSigner(HMAC_KEY, arm_ids)
    r = client.post(
        "/v1/feedback", json=body(signer.issue(new_nonce(), time.time() - 1, "duel", 0, 1, None, x)), headers=app.auth
    )
    assert r.status_code == 410 and error_code(r.json()) == "expired_decision"
    other_table = DecisionSigner(HMAC_KEY, [*arm_ids[:-1], "renamed"])
    r = client.post(
        "/v1/feedback",
        json=body(other_table.issue(new_nonce(), time.time() + 60, "duel", 0, 1, None, x)),
        headers=app.auth,
    )
    assert r.status_code == 410 and error_code(r.json()) == "stale_decision"
    assert client.post("/v1/feedback", json=body(tok), headers=app.auth).status_code == 200
    r = client.post("/v1/feedback", json={"decision_id": tok, "outcome": "second"}, headers=app.auth)
    assert r.status_code == 409 and error_code(r.json()) == "duplicate_feedback"
    assert client.post("/v1/feedback", json=body(tok), headers=app.auth).status_code == 409
    single = route(client, query="single decisions take no duel feedback", mode="single")
    r = client.post("/v1/feedback", json=body(single["decision_id"]), headers=app.auth)
    assert r.status_code == 409 and error_code(r.json()) == "not_a_duel"
    # every record is in the log before its answer: once the log is applied, nothing else can come
    s1 = wait_for(
        lambda: (s := stats(client))["durability"]["last_applied_seq"] == s["durability"]["last_seq"] and s,
        what="the log applied",
    )
    assert s1["durability"]["last_seq"] == seq0 + 1 and s1["posterior"]["n_updates"] == n0 + 1


# --------------------------------------------------------------------------- bad input
_BAD_ROUTE = [
    ("malformed json", b'{"query": ', 400, "malformed_request"),
    ("not json", b"hello", 400, "malformed_request"),
    ("empty body", b"", 400, "malformed_request"),
    ("json array", b"[1, 2]", 422, "invalid_request"),
    ("missing query", b"{}", 422, "invalid_request"),
    ("extra field", b'{"query": "x", "temperature": 1}', 422, "invalid_request"),
    ("query not a string", b'{"query": 123}', 422, "invalid_request"),
    ("query null", b'{"query": null}', 422, "invalid_request"),
    ("cost_weight as string", b'{"query": "x", "cost_weight": "0.5"}', 422, "invalid_request"),
    ("cost_weight as bool", b'{"query": "x", "cost_weight": true}', 422, "invalid_request"),
    ("negative cost_weight", b'{"query": "x", "cost_weight": -1}', 422, "invalid_request"),
    ("huge cost_weight", b'{"query": "x", "cost_weight": 1e300}', 422, "invalid_request"),
    ("unknown mode", b'{"query": "x", "mode": "both"}', 422, "invalid_request"),
    ("candidates not a list", b'{"query": "x", "candidates": "gpt-4-1106-preview"}', 422, "invalid_request"),
    ("empty candidates", b'{"query": "x", "candidates": []}', 422, "invalid_request"),
    ("duplicate candidates", b'{"query": "x", "candidates": ["claude-v2", "claude-v2"]}', 422, "invalid_request"),
    ("duel with one candidate", b'{"query": "x", "candidates": ["claude-v2"]}', 422, "invalid_request"),
    ("unknown arm", b'{"query": "x", "candidates": ["claude-v2", "gpt-5"]}', 404, "unknown_arm"),
    ("empty query", b'{"query": ""}', 422, "invalid_request"),
    ("blank query", b'{"query": "  \\n "}', 422, "invalid_request"),
    ("oversized query", json.dumps({"query": "a" * (MAX_QUERY + 1)}).encode(), 413, "too_large"),
    ("oversized body", json.dumps({"query": "a", "pad": "b" * MAX_BODY}).encode(), 413, "too_large"),
]


@pytest.mark.parametrize("path", ["proxy", "direct"])
@pytest.mark.parametrize("name, raw, status, code", _BAD_ROUTE, ids=[c[0] for c in _BAD_ROUTE])
def test_bad_route_input_is_a_4xx_json_error(request, path, name, raw, status, code):
    client = request.getfixturevalue("client" if path == "proxy" else "direct_client")
    r = client.post("/v1/route", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]  # OpenAI's shape, with the router's code
    assert set(err) >= {"message", "type", "code", "param"} and err["code"] == code and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")


def test_nan_cost_weight_is_refused(client):
    r = client.post("/v1/route", content=b'{"query": "x", "cost_weight": NaN}')
    assert r.status_code in (400, 422) and error_code(r.json()) in ("malformed_request", "invalid_request")


def test_bad_feedback_input_is_a_4xx_json_error(client, app):
    d = route(client, query="bad feedback input")
    cases = [
        (b'{"decision_id": ', 400, "malformed_request"),
        (b"{}", 422, "invalid_request"),
        (json.dumps({"decision_id": d["decision_id"]}).encode(), 422, "invalid_request"),
        (json.dumps({"decision_id": d["decision_id"], "outcome": "win"}).encode(), 422, "invalid_request"),
        (json.dumps({"decision_id": d["decision_id"], "outcome": 1}).encode(), 422, "invalid_request"),
        (json.dumps({"decision_id": d["decision_id"], "outcome": "first", "x": 1}).encode(), 422, "invalid_request"),
        (json.dumps({"decision_id": 42, "outcome": "first"}).encode(), 422, "invalid_request"),
        (json.dumps({"decision_id": "nonsense", "outcome": "first"}).encode(), 400, "malformed_request"),
        (json.dumps({"decision_id": "x" * 600, "outcome": "first"}).encode(), 400, "malformed_request"),
        (json.dumps({"decision_id": "x" * 20000, "outcome": "first"}).encode(), 422, "invalid_request"),
    ]
    for raw, status, code in cases:
        r = client.post("/v1/feedback", content=raw, headers=app.auth)
        assert (r.status_code, error_code(r.json())) == (status, code), (raw[:80], r.text)
    # none of that consumed the decision: its genuine feedback is still accepted
    ok = client.post("/v1/feedback", json={"decision_id": d["decision_id"], "outcome": "tie"}, headers=app.auth)
    assert ok.status_code == 200, ok.text


def test_hostile_feedback_input_is_a_4xx(client, app):
    """The issue's 500 (a non-ASCII decision id with a valid token) and its relatives."""
    tok = route(client, query="hostile feedback")["decision_id"]
    cases = [
        json.dumps({"decision_id": "d2.\u00e9.x", "outcome": "first"}).encode(),  # escaped in the JSON
        '{"decision_id": "d2.\u00e9.x", "outcome": "first"}'.encode(),  # raw UTF-8
        json.dumps({"decision_id": tok[:10] + "\u00e9" + tok[11:], "outcome": "first"}).encode(),
        json.dumps({"decision_id": tok[:-1] + "\u00e9", "outcome": "first"}).encode(),
        json.dumps({"decision_id": tok[:10] + "\x00" + tok[11:], "outcome": "first"}).encode(),
        json.dumps({"decision_id": "d2.\U0001f600.\U0001f600", "outcome": "first"}).encode(),
        json.dumps({"decision_id": tok + "\n", "outcome": "first"}).encode(),
    ]
    for raw in cases:
        r = client.post("/v1/feedback", content=raw, headers={**app.auth, "content-type": "application/json"})
        assert (r.status_code, error_code(r.json())) == (400, "malformed_request"), (raw[:60], r.text)
    r = client.post("/v1/feedback", content=b'{"decision_id": "\\ud800", "outcome": "first"}', headers=app.auth)
    assert r.status_code == 400, r.text  # a lone surrogate is not valid JSON text
    # none of that consumed the decision
    ok = client.post("/v1/feedback", json={"decision_id": tok, "outcome": "first"}, headers=app.auth)
    assert ok.status_code == 200, ok.text


_HOSTILE_ROUTE = [
    ("NUL in query", json.dumps({"query": "a\x00b"}).encode(), {200}),
    ("non-ASCII query", json.dumps({"query": "\u00e9\u4e2d\U0001f600"}, ensure_ascii=False).encode(), {200}),
    ("lone surrogate", b'{"query": "\\udc00"}', {400}),
    ("invalid UTF-8", b'{"query": "\xff\xfe"}', {400}),
    ("huge float", b'{"query": "x", "cost_weight": 1e400}', {422}),
    ("huge int", b'{"query": "x", "cost_weight": ' + b"9" * 5000 + b"}", {400, 422}),
    ("deep nesting", b'{"query": "x", "candidates": ' + b"[" * 100000 + b"]" * 100000 + b"}", {400, 413, 422}),
    ("deep object", b'{"query": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", {400, 413, 422}),
    ("too many candidates", json.dumps({"query": "x", "candidates": [f"c{i}" for i in range(6)]}).encode(), {422}),
    ("candidates of objects", b'{"query": "x", "candidates": [{}, []]}', {422}),
    ("query as list", b'{"query": ["x"]}', {422}),
    ("mode as int", b'{"query": "x", "mode": 1}', {422}),
    ("duplicate keys", b'{"query": "x", "query": "y"}', {200, 422}),
    ("BOM", b'\xef\xbb\xbf{"query": "x"}', {200, 400}),
    ("JSON string", b'"x"', {422}),
    ("JSON null", b"null", {422}),
    ("trailing garbage", b'{"query": "x"} x', {400}),
]


@pytest.mark.parametrize("name, raw, statuses", _HOSTILE_ROUTE, ids=[c[0] for c in _HOSTILE_ROUTE])
def test_hostile_route_input_is_answered_in_json(client, name, raw, statuses):
    r = client.post("/v1/route", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in statuses, r.text
    assert r.headers["content-type"] == "application/json"
    if r.status_code != 200:
        assert error_code(r.json()) and error_message(r.json())


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
@pytest.mark.parametrize("path", ["/v1/route", "/v1/feedback", "/v1/chat/completions", "/v1/admin/refresh"])
def test_non_json_bodies_are_415(client, app, path, content_type):
    headers = {"content-type": content_type, **app.auth}
    if path == "/v1/chat/completions":
        headers.update(secret(app, "client_default"))
    if path == "/v1/admin/refresh":
        headers.update(secret(app, "admin_token"))
    r = client.post(path, content=b'{"query": "x"}', headers=headers)
    assert (r.status_code, error_code(r.json())) == (415, "unsupported_media_type"), r.text


def test_unknown_paths_and_methods_are_json(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and error_code(r.json()) == "not_found"
    r = client.get("/v1/route")
    assert r.status_code == 405 and error_code(r.json()) == "method_not_allowed"


def test_models_lists_the_router_and_every_arm(client):
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [a["id"] for a in config_args()["arms"]]
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["router", *ids]
    for m in body["data"]:
        assert m["object"] == "model" and m["owned_by"] == "ray-router" and isinstance(m["created"], int)
    one = client.get(f"/v1/models/{MISTRAL}")  # an arm id with a slash
    assert one.status_code == 200 and one.json() == next(m for m in body["data"] if m["id"] == MISTRAL)
    assert client.get("/v1/models/router").json()["id"] == "router"
    r = client.get("/v1/models/gpt-5")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert r.json()["error"]["param"] == "model" and "gpt-5" in r.json()["error"]["message"]


# ------------------------------------------------------------------- chat completions
def _chat(client, headers: dict | None = None, **extra):
    body = {
        "model": "router",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 + 2?"}],
        **extra,
    }
    key = client.headers.get("x-test-client-key", "")
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}", **(headers or {})})


@pytest.fixture(scope="module", autouse=True)
def _client_key(client, app):
    """The chat tests' client key (chat needs one by default), carried in a private header of the
    test client that :func:`_chat` turns into ``Authorization``."""
    client.headers["x-test-client-key"] = (app.state_dir / "secrets" / "client_default").read_text().strip()


def test_chat_needs_a_client_key(client, app, fake_upstream):
    _, seen = fake_upstream
    n = len(seen)
    for headers in ({"Authorization": ""}, app.auth, secret(app, "admin_token"), {"Authorization": "Bearer nope"}):
        r = _chat(client, headers=headers)
        assert (r.status_code, error_code(r.json())) == (401, "unauthorized"), r.text
    assert len(seen) == n  # no upstream was called


def test_chat_caps_and_no_upstream_internals_in_errors(client, fake_upstream):
    base_url, seen = fake_upstream
    n = len(seen)
    for extra in ({"max_tokens": 4097}, {"max_completion_tokens": 10**30}, {"n": 3}, {"n": 1.5}, {"max_tokens": "9"}):
        r = _chat(client, **extra)
        assert (r.status_code, error_code(r.json())) == (422, "invalid_request"), (extra, r.text)
    assert len(seen) == n
    r = _chat(client, max_tokens=16, n=2, router={"candidates": [CLAUDE2]})
    assert r.status_code == 200 and seen[-1]["body"]["max_tokens"] == 16 and seen[-1]["body"]["n"] == 2
    r = _chat(client, router={"candidates": [MISTRAL]})  # that upstream answers 500 "upstream exploded"
    assert (r.status_code, error_code(r.json())) == (502, "upstream_error")
    assert "exploded" not in r.text and base_url not in r.text and "127.0.0.1" not in r.text
    # the arms tried come with the error, no decision id (nothing was answered: nothing to give
    # feedback on), and the SDKs are told not to retry (the router retried and fell back already)
    assert r.headers["x-router-model"] == MISTRAL and r.headers["x-router-arms"] == MISTRAL
    assert r.headers["x-router-fallback"] == MISTRAL
    assert "decision_id" not in r.json()["error"] and "x-router-decision-id" not in r.headers
    assert r.headers["x-should-retry"] == "false"


def test_chat_completion_single(client, fake_upstream):
    _, seen = fake_upstream
    seen.clear()
    r = _chat(client, temperature=0.2, router={"candidates": [GPT4, CLAUDE2]})
    assert r.status_code == 200, r.text
    out = r.json()
    arm = out["model"]
    assert arm in (GPT4, CLAUDE2)
    assert out["choices"][0]["message"]["content"] == f"answer from {'fake-gpt-4' if arm == GPT4 else 'fake-claude'}"
    assert out["router"]["decision_id"] == r.headers["x-router-decision-id"] and r.headers["x-router-model"] == arm
    sent = seen[-1]["body"]
    assert sent["temperature"] == 0.2 and "router" not in sent and sent["messages"][1]["content"] == "What is 2 + 2?"
    if arm == GPT4:
        assert seen[-1]["auth"] == "Bearer upstream-secret-key"


def test_chat_completion_stream(client):
    body = {
        "model": "router",
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a joke."}],
        "router": {"candidates": [GPT4, CLAUDE2]},
    }
    key = {"Authorization": f"Bearer {client.headers['x-test-client-key']}"}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=key) as r:
        assert r.status_code == 200
        arm = r.headers["x-router-model"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == arm for c in chunks)
    assert chunks[0]["router"]["decision_id"] == r.headers["x-router-decision-id"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text.startswith("answer from fake-")


def test_chat_completion_duel_returns_both_answers_and_takes_feedback(client, app):
    r = _chat(client, router={"mode": "duel", "candidates": [GPT4, CLAUDE2]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert {c["model"] for c in out["choices"]} == {GPT4, CLAUDE2} and out["usage"]["total_tokens"] == 12
    fb = client.post(
        "/v1/feedback", json={"decision_id": out["router"]["decision_id"], "outcome": "second"}, headers=app.auth
    )
    assert fb.status_code == 200, fb.text


@pytest.mark.parametrize(
    "extra, status, code",
    [
        ({"model": "gpt-4"}, 422, "invalid_request"),
        ({"messages": []}, 422, "invalid_request"),
        ({"stream": True, "router": {"mode": "duel"}}, 422, "invalid_request"),
        ({"router": {"candidates": ["claude-v1"]}}, 422, "invalid_request"),  # has no upstream
        ({"router": {"candidates": [MISTRAL]}}, 502, "upstream_error"),  # upstream answers 500
        ({"router": {"bogus": 1}}, 422, "invalid_request"),
        ({"messages": [{"role": "user", "content": "x" * (MAX_QUERY + 1)}]}, 413, "too_large"),
    ],
)
def test_chat_completion_errors(client, extra, status, code):
    r = _chat(client, **extra)
    assert (r.status_code, error_code(r.json())) == (status, code), r.text


# ------------------------------------------------------------------------------ metrics
def test_custom_metrics_reach_the_prometheus_endpoint(client, app):
    from ray_router.serve.metrics import TRAFFIC_DEPENDENT, exported_names

    route(client, query="metrics test")
    url = f"http://127.0.0.1:{app.cluster.metrics_port}/metrics"

    def scraped():
        text = httpx.get(url, timeout=10).text
        # a fallback, a priced arm's cost: tests/serve/test_resilience.py makes that traffic and checks them
        missing = [n for k, n in exported_names().items() if n not in text and k not in TRAFFIC_DEPENDENT]
        return ((not missing) and text) or None

    text = wait_for(scraped, timeout_s=60, interval_s=1, what="ray_router_* series")
    assert "ray_router_routes_total{" in text and 'arm="' in text


def test_error_answers_are_counted_by_status_and_code(client, app):
    r = client.post("/v1/route", content=b'{"query": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    url = f"http://127.0.0.1:{app.cluster.metrics_port}/metrics"

    def counted():
        lines = [ln for ln in httpx.get(url, timeout=10).text.splitlines() if ln.startswith("ray_router_http_errors")]
        return [ln for ln in lines if 'error="unsupported_media_type"' in ln and 'status="415"' in ln]

    wait_for(counted, timeout_s=60, interval_s=1, what="the 415 in ray_router_http_errors_total")


def test_benchmark_smoke(app):
    import importlib.util

    from tests.serve.conftest import REPO

    spec = importlib.util.spec_from_file_location("serve_latency", REPO / "bench" / "serve_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--url", app.url, "--smoke-test"])
    for key in ("encoder_single_p50_ms", "encoder_batched_qps", "route_c1_p50_ms", "route_c16_qps"):
        assert report[key] > 0
    assert report["ratio_p50_c1"] > 0 and report["ratio_qps_c16"] > 0
