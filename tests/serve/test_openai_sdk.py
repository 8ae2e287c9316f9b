"""The official ``openai`` SDK against the router on a real local Ray Serve, over real HTTP.

The contract of issue 14's "OpenAI-compatible to the letter": the sync and the async client, streaming,
a duel through ``extra_body``, ``client.models.list()``, and, for **every row of the error table in
``serve_configs/README.md``**, a request that makes the SDK raise with the row's status and code and
with the server's own message in ``str(error)`` (the SDK reads ``error.message`` of OpenAI's nested
shape; it showed only ``Error code: 422`` before). :func:`test_every_row_of_the_readme_error_table_has_a_case`
parses the table, so a new row without a case here fails.

One application (``serve_configs/local.yaml``, the synthetic arm table with the hash encoder, the
shared fake upstream for three chat arms and one more stub that breaks mid-stream) serves the
module, with ``protect_reads: true`` (the SDK's key opens ``/v1/models`` as it does chat) and
``limits.max_inflight_routes: 1`` (so a burst is shed: the ``overloaded`` row). It starts beside a
process that holds its state's lock (this test's own ``flock``): its Posterior is a standby, the
``standby`` row is taken then, and the lock is released before any other test runs. The ``unavailable``
row makes the Posterior's snapshot unwritable for one admin call; the catch-all's ``internal`` row
cannot be provoked in a correct service, so it runs the real error mapping
(``http_errors.install``) in a FastAPI app under uvicorn on loopback with a route that raises.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import openai
import pytest

from ray_router.serve.tokens import DecisionSigner, new_nonce
from tests.serve.conftest import (
    HMAC_KEY,
    REPO,
    TOKEN,
    RouterApp,
    config_args,
    delete_router,
    deploy_router,
    free_port,
    synthetic_arm_args,
    wait_for,
)

pytestmark = pytest.mark.integration

GPT4, CLAUDE2, MISTRAL = "gpt-4-1106-preview", "claude-v2", "mistralai/mistral-7b-chat"
LLAMA = "meta/llama-2-70b-chat"  # its upstream breaks mid-stream (_MidStreamError)
MAX_QUERY = 2000
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


# ------------------------------------------------------------------------------ stubs
class _MidStreamError(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream whose stream sends one chunk and then an error event (its text
    must reach the router's log, not the client)."""

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body.get("model"), "created": 0}
        chunk["choices"] = [{"index": 0, "delta": {"content": "half an"}}]
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b'data: {"error": {"message": "upstream secret detail", "type": "server_error"}}\n\n')
        self.wfile.flush()


@pytest.fixture(scope="module")
def midstream_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _MidStreamError)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def catch_all_url() -> Iterator[str]:
    """The real error mapping and catch-all in a FastAPI app under uvicorn, with a route that has a bug."""
    import uvicorn
    from fastapi import FastAPI

    from ray_router.serve import http_errors

    api = FastAPI()
    http_errors.install(api)

    @api.post("/v1/chat/completions")
    async def bug() -> None:
        raise KeyError("/secret/path/of/the/server")

    # the real remote encoder against a real (stub) embeddings server that refuses the query: the
    # error the Embedder raises, through the same mapping (its Serve path: test_openai_embedder_serve.py)
    from ray_router.embeddings import get_encoder
    from tests.stub_embeddings import EmbeddingsStub

    stub = EmbeddingsStub(model=object()).start()

    @api.post("/v1/embed")
    def embed() -> None:
        stub.fail_next(400, message="input is not valid for this model")
        get_encoder(f"openai:{stub.model}@{stub.base_url}", cache_dir=False).encode(["a query"])

    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=free_port(), log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout_s=30, what="uvicorn")
    yield f"http://127.0.0.1:{server.config.port}/v1"
    server.should_exit = True
    thread.join(timeout=10)
    stub.stop()


# ------------------------------------------------------------------------------- app
@dataclass
class Sdk:
    app: RouterApp
    key: str  # the default client key
    standby_error: openai.APIStatusError  # the feedback refused while the Posterior was a standby
    base_url: str = ""
    sent: list[str] = field(default_factory=list)  # every request the counting clients sent

    def client(self, api_key: str | None = None, max_retries: int = 0, count: bool = False) -> openai.OpenAI:
        kw: dict[str, Any] = {}
        if count:
            import httpx2

            kw["http_client"] = httpx2.Client(event_hooks={"request": [lambda r: self.sent.append(str(r.url))]})
        return openai.OpenAI(
            api_key=api_key or self.key, base_url=self.base_url, max_retries=max_retries, timeout=60, **kw
        )

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=self.key, base_url=self.base_url, max_retries=0, timeout=60)

    def secret(self, name: str) -> str:
        return (self.app.state_dir / "secrets" / name).read_text().strip()


def _raises(fn: Callable[[], Any]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


@pytest.fixture(scope="module")
def sdk(serve_cluster, fake_upstream, midstream_upstream, tmp_path_factory) -> Iterator[Sdk]:
    base_url, _ = fake_upstream
    upstreams = {
        GPT4: {"base_url": base_url, "model": "fake-gpt-4", "api_key_env": "RR_TEST_UPSTREAM_KEY"},
        CLAUDE2: {"base_url": base_url, "model": "fake-claude"},
        MISTRAL: {"base_url": base_url, "model": "broken-model"},
        LLAMA: {"base_url": midstream_upstream, "model": "breaks"},
    }
    arms = [{**a, **({"upstream": upstreams[a["id"]]} if a["id"] in upstreams else {})} for a in config_args()["arms"]]
    state_dir = tmp_path_factory.mktemp("sdk-state")
    # another process's writer, as far as the Posterior can tell: an flock on the state's LOCK
    lock = open(state_dir / "LOCK", "a")  # noqa: SIM115 - closed below, before the other tests
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        app = deploy_router(
            serve_cluster,
            state_dir,
            synthetic_arm_args(tmp_path_factory.mktemp("sdk-arms")),
            args={
                "arms": arms,
                "limits": {"max_query_chars": MAX_QUERY, "max_inflight_routes": 1},
                "auth": {
                    "protect_reads": True,
                    "clients": [
                        {"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY"},
                        {"name": "tight", "key_env": "RR_TEST_TIGHT_KEY", "rate_per_s": 0.001, "burst": 1},
                    ],
                },
            },
        )
        key = (state_dir / "secrets" / "client_default").read_text().strip()
        s = Sdk(app, key, standby_error=None, base_url=f"{app.url}/v1")  # type: ignore[arg-type]
        decision = s.client().post("/route", cast_to=object, body={"query": "feedback while a standby"})
        s.standby_error = _raises(
            lambda: s.client(TOKEN).post(
                "/feedback", cast_to=object, body={"decision_id": decision["decision_id"], "outcome": "first"}
            )
        )
    finally:
        lock.close()  # the "old writer" goes: the standby takes over
    import httpx

    wait_for(lambda: httpx.get(f"{app.url}/healthz", timeout=30).json().get("status") == "ok", 60, what="takeover")
    yield s
    delete_router()


# --------------------------------------------------------------------------- the happy paths
def test_sync_client_routes_a_chat_completion(sdk):
    raw = sdk.client().chat.completions.with_raw_response.create(
        model="router", messages=MESSAGES, temperature=0.2, extra_body={"router": {"candidates": [GPT4, CLAUDE2]}}
    )
    out = raw.parse()
    assert out.model in (GPT4, CLAUDE2) and raw.headers["x-router-model"] == out.model
    assert out.choices[0].message.content == f"answer from {'fake-gpt-4' if out.model == GPT4 else 'fake-claude'}"
    assert out.model_extra["router"]["decision_id"] == raw.headers["x-router-decision-id"]


def test_async_client_routes_a_chat_completion(sdk):
    async def go():
        async with sdk.aclient() as client:
            return await client.chat.completions.create(
                model="router", messages=MESSAGES, extra_body={"router": {"candidates": [GPT4, CLAUDE2]}}
            )

    out = asyncio.run(go())
    assert out.model in (GPT4, CLAUDE2) and out.choices[0].message.content.startswith("answer from fake-")


def test_streaming_with_the_sync_and_the_async_client(sdk):
    body = {
        "model": "router",
        "messages": MESSAGES,
        "stream": True,
        "extra_body": {"router": {"candidates": [CLAUDE2]}},
    }
    chunks = list(sdk.client().chat.completions.create(**body))
    assert {c.model for c in chunks} == {CLAUDE2}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "answer from fake-claude"
    assert chunks[0].model_extra["router"]["arms"] == [CLAUDE2]

    async def go():
        async with sdk.aclient() as client:
            return [c async for c in await client.chat.completions.create(**body)]

    assert "".join(c.choices[0].delta.content or "" for c in asyncio.run(go())) == "answer from fake-claude"


def test_a_stream_that_breaks_mid_way_raises_the_routers_error(sdk):
    stream = sdk.client().chat.completions.create(
        model="router", messages=MESSAGES, stream=True, extra_body={"router": {"candidates": [LLAMA]}}
    )
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["half an"]
    assert str(e.value) == "the arm's upstream reported an error mid-stream" and "secret" not in str(e.value.body)
    assert e.value.code == "upstream_error" and e.value.type == "server_error"
    assert e.value.body["decision_id"].startswith("d2.")


def test_a_duel_through_extra_body_takes_feedback(sdk):
    out = sdk.client().chat.completions.create(
        model="router", messages=MESSAGES, extra_body={"router": {"mode": "duel", "candidates": [GPT4, CLAUDE2]}}
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert {c.model_extra["model"] for c in out.choices} == {GPT4, CLAUDE2}
    ack = sdk.client(TOKEN).post(
        "/feedback", cast_to=object, body={"decision_id": out.model_extra["router"]["decision_id"], "outcome": "first"}
    )
    assert ack["accepted"] is True


def test_models_list_and_retrieve(sdk):
    models = sdk.client().models.list()
    ids = [m.id for m in models]
    assert ids == ["router", *(a["id"] for a in config_args()["arms"])]
    assert all(m.object == "model" and m.owned_by == "ray-router" and m.created > 0 for m in models)
    assert sdk.client().models.retrieve(MISTRAL).id == MISTRAL  # the SDK sends the slash as %2F
    e = _raises(lambda: sdk.client("not-a-key").models.list())  # protect_reads: a client key opens it
    assert isinstance(e, openai.AuthenticationError) and e.code == "unauthorized"


# ------------------------------------------------------------------- the error table, row by row
def _route(s: Sdk, body: Any = None, **kw: Any) -> Any:
    return s.client().post("/route", cast_to=object, body=body, **kw)


def _feedback(s: Sdk, decision_id: str, outcome: str = "first", client: openai.OpenAI | None = None) -> Any:
    c = client or s.client(TOKEN)
    return c.post("/feedback", cast_to=object, body={"decision_id": decision_id, "outcome": outcome})


def _chat(s: Sdk, client: openai.OpenAI | None = None, **kw: Any) -> Any:
    return (client or s.client()).chat.completions.create(**{"model": "router", "messages": MESSAGES, **kw})


def _signer(arm_ids: list[str] | None = None) -> DecisionSigner:
    return DecisionSigner(HMAC_KEY, arm_ids or [a["id"] for a in config_args()["arms"]])


def _issued(expires_at: float, arm_ids: list[str] | None = None) -> str:
    """A duel id signed with the service's key (another arm table with ``arm_ids``)."""
    return _signer(arm_ids).issue(new_nonce(), expires_at, "duel", 0, 1, None, np.zeros(16, dtype=np.float32))


def _case_not_json(s):
    return [
        (
            400,
            "malformed_request",
            lambda: _route(s, content=b"hello", options={"headers": {"Content-Type": "application/json"}}),
        )
    ]


def _case_media_type(s):
    return [
        (
            415,
            "unsupported_media_type",
            lambda: _route(s, content=b'{"query": "x"}', options={"headers": {"Content-Type": "text/plain"}}),
        )
    ]


def _case_invalid(s):
    return [
        (422, "invalid_request", lambda: _chat(s, model="gpt-4")),
        (422, "invalid_request", lambda: _chat(s, max_tokens=10**6)),
        (422, "invalid_request", lambda: _chat(s, messages=[{"content": "no role"}])),
        (422, "invalid_request", lambda: _route(s, {"query": "x", "cost_weight": "0.5"})),
    ]


def _case_too_large(s):
    return [(413, "too_large", lambda: _chat(s, messages=[{"role": "user", "content": "x" * (MAX_QUERY + 1)}]))]


def _case_unknown_arm(s):
    return [(404, "unknown_arm", lambda: _chat(s, extra_body={"router": {"candidates": [CLAUDE2, "gpt-5"]}}))]


def _case_unknown_model(s):
    return [(404, "model_not_found", lambda: s.client().models.retrieve("gpt-5"))]


def _case_unauthorized(s):
    return [
        (401, "unauthorized", lambda: _chat(s, client=s.client("not-a-client-key"))),
        (401, "unauthorized", lambda: _feedback(s, "d2.x.y", client=s.client())),  # a client key is not the token
    ]


def _case_rate_limited(s):
    tight = s.client(s.secret("client_tight"), max_retries=2)  # Retry-After ~1000 s: the SDK does not retry

    def twice():
        tight.models.list()
        tight.models.list()

    return [(429, "rate_limited", twice)]


def _case_bad_id(s):
    return [(400, "malformed_request", lambda: _feedback(s, "nonsense"))]


def _case_forged(s):
    tok = _route(s, {"query": "a decision to forge"})["decision_id"]
    forged = tok[:-1] + ("A" if tok[-1] != "A" else "B")
    return [(403, "invalid_signature", lambda: _feedback(s, forged))]


def _case_expired(s):
    return [(410, "expired_decision", lambda: _feedback(s, _issued(time.time() - 1)))]


def _case_stale(s):
    other = [*(a["id"] for a in config_args()["arms"][:-1]), "renamed"]
    return [(410, "stale_decision", lambda: _feedback(s, _issued(time.time() + 60, other)))]


def _case_duplicate(s):
    tok = _route(s, {"query": "one feedback only"})["decision_id"]
    _feedback(s, tok)
    return [(409, "duplicate_feedback", lambda: _feedback(s, tok, client=s.client(TOKEN, max_retries=2, count=True)))]


def _case_not_a_duel(s):
    tok = _route(s, {"query": "a single decision", "mode": "single"})["decision_id"]
    return [(409, "not_a_duel", lambda: _feedback(s, tok, client=s.client(TOKEN, max_retries=2, count=True)))]


def _case_path_method(s):
    return [
        (404, "not_found", lambda: s.client().get("/nope", cast_to=object)),
        (405, "method_not_allowed", lambda: s.client().get("/route", cast_to=object)),
    ]


def _case_upstream(s):
    return [
        (
            502,
            "upstream_error",
            lambda: _chat(
                s, client=s.client(max_retries=2, count=True), extra_body={"router": {"candidates": [MISTRAL]}}
            ),
        )
    ]


def _case_unavailable(s):
    """A posterior call that fails (its snapshot cannot be written: a directory stands where the
    snapshot's temp file goes; even root cannot open that for writing), then the path is cleared."""
    admin = s.client(s.secret("admin_token"))

    def snapshot_that_cannot_be_written():
        pid = admin.get("/admin/status", cast_to=object)["posterior"]["pid"]
        blocker = s.app.state_dir / f".posterior.snapshot.npz.{pid}.tmp"
        blocker.mkdir()
        try:
            admin.post("/admin/snapshot", cast_to=object)
        finally:
            blocker.rmdir()

    return [(503, "unavailable", snapshot_that_cannot_be_written)]


def _case_standby(s):
    def refused():
        raise s.standby_error

    return [(503, "standby", refused)]


def _case_overloaded(s):
    def burst():
        async def go():
            async with openai.AsyncOpenAI(api_key=s.key, base_url=s.base_url, max_retries=0, timeout=120) as c:
                calls = [c.post("/route", cast_to=object, body={"query": f"burst {i}"}) for i in range(16)]
                return await asyncio.gather(*calls, return_exceptions=True)

        def shed():
            errors = [r for r in asyncio.run(go()) if isinstance(r, openai.APIStatusError)]
            return next((e for e in errors if e.status_code == 503), None)

        raise wait_for(shed, timeout_s=120, interval_s=0.0, what="a route shed by max_inflight_routes: 1")

    return [(503, "overloaded", burst)]


def _case_embeddings(s, catch_all_url):
    client = openai.OpenAI(api_key="k", base_url=catch_all_url, max_retries=0, timeout=30)
    return [(502, "embeddings_error", lambda: client.post("/embed", cast_to=object))]


def _case_internal(s, catch_all_url):
    client = openai.OpenAI(api_key="k", base_url=catch_all_url, max_retries=0, timeout=30)
    return [(500, "internal", lambda: client.chat.completions.create(model="router", messages=MESSAGES))]


def _arms_in_service(admin: openai.OpenAI) -> list[str]:
    return [a["id"] for a in admin.get("/admin/arms", cast_to=object)["arms"] if not a["retired"]]


def _case_arm_exists(s):
    """An added arm whose id is taken (by a config arm)."""
    admin = s.client(s.secret("admin_token"))
    body = {"id": _arms_in_service(admin)[0], "price_usd": 1.0, "profile": {"default": 0.5}}
    return [(409, "arm_exists", lambda: admin.post("/admin/arms", cast_to=object, body=body))]


def _case_arm_refused(s):
    """Retiring the last arm in service (the others are retired for the case and restored after it)."""
    from urllib.parse import quote

    admin = s.client(s.secret("admin_token"))
    ids = _arms_in_service(admin)

    def last_arm():
        done = []
        try:
            for a in ids[:-1]:
                admin.post(f"/admin/arms/{quote(a, safe='')}/retire", cast_to=object)
                done.append(a)
            admin.post(f"/admin/arms/{quote(ids[-1], safe='')}/retire", cast_to=object)
        finally:
            for a in done:
                admin.post(f"/admin/arms/{quote(a, safe='')}/restore", cast_to=object)

    return [(409, "arm_change_refused", last_arm)]


def _case_arm_prior(s):
    admin = s.client(s.secret("admin_token"))
    body = {"id": "new-arm", "price_usd": 0.0, "profile": {"no-such-category": 0.5}}
    return [(400, "bad_request", lambda: admin.post("/admin/arms", cast_to=object, body=body))]


# (statuses, codes, a word of the row's input cell): the row's case
CASES: dict[tuple[tuple[str, ...], tuple[str, ...], str], Callable[..., list]] = {
    (("400",), ("malformed_request",), "body not JSON"): _case_not_json,
    (("415",), ("unsupported_media_type",), ""): _case_media_type,
    (("422",), ("invalid_request",), ""): _case_invalid,
    (("413",), ("too_large",), ""): _case_too_large,
    (("404",), ("unknown_arm",), ""): _case_unknown_arm,
    (("404",), ("model_not_found",), ""): _case_unknown_model,
    (("401",), ("unauthorized",), ""): _case_unauthorized,
    (("429",), ("rate_limited",), ""): _case_rate_limited,
    (("400",), ("malformed_request",), "decision id not of our format"): _case_bad_id,
    (("403",), ("invalid_signature",), ""): _case_forged,
    (("410",), ("expired_decision",), ""): _case_expired,
    (("410",), ("stale_decision",), ""): _case_stale,
    (("409",), ("duplicate_feedback",), ""): _case_duplicate,
    (("409",), ("not_a_duel",), ""): _case_not_a_duel,
    (("409",), ("arm_exists",), ""): _case_arm_exists,
    (("409",), ("arm_change_refused",), ""): _case_arm_refused,
    (("400",), ("bad_request",), ""): _case_arm_prior,
    (("404", "405"), ("not_found", "method_not_allowed"), ""): _case_path_method,
    (("502",), ("upstream_error",), ""): _case_upstream,
    (("502",), ("embeddings_error",), ""): _case_embeddings,
    (("503",), ("unavailable",), ""): _case_unavailable,
    (("503",), ("standby",), ""): _case_standby,
    (("503",), ("overloaded",), ""): _case_overloaded,
    (("500",), ("internal",), ""): _case_internal,
}


def readme_error_rows() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """``(input, statuses, codes)`` of each row of the README's error table."""
    text = (REPO / "serve_configs" / "README.md").read_text()
    table = text.split("| input | status | `error.code` |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.strip().splitlines()[1:]:  # after the |---| line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((cells[0], tuple(re.findall(r"\d{3}", cells[1])), tuple(re.findall(r"`([a-z_]+)`", cells[2]))))
    return rows


def _case_of(row: tuple[str, tuple[str, ...], tuple[str, ...]]) -> list[tuple[tuple, Callable]]:
    text, statuses, codes = row
    return [(key, fn) for key, fn in CASES.items() if key[:2] == (statuses, codes) and key[2] in text]


def test_every_row_of_the_readme_error_table_has_a_case():
    rows = readme_error_rows()
    assert len(rows) >= 20, rows
    matched = [_case_of(row) for row in rows]
    for row, cases in zip(rows, matched):
        assert len(cases) == 1, f"README error row {row} needs exactly one case in CASES (has {len(cases)})"
    assert {key for cases in matched for key, _ in cases} == set(CASES), "a case without its README row"


@pytest.mark.parametrize("row", readme_error_rows(), ids=lambda row: "+".join(row[2]))
def test_the_sdk_raises_with_the_servers_message_for_each_row(sdk, catch_all_url, row):
    ((key, make),) = _case_of(row)
    cases = make(sdk, catch_all_url) if key[1] in (("internal",), ("embeddings_error",)) else make(sdk)
    assert {(str(st), code) for st, code, _ in cases} == set(zip(row[1], row[2])), "the row's every status and code"
    for status, code, call in cases:
        sent = len(sdk.sent)
        e = _raises(call)
        body = e.response.json()  # what the server sent, read independently of the SDK's parsing
        err = body["error"]
        assert (e.status_code, err["code"]) == (status, code), (status, code, body)
        assert set(err) >= {"message", "type", "code", "param"}
        assert err["message"] and err["message"] in str(e), (str(e), err)
        assert str(e) == f"Error code: {status} - {err['message']}"
        assert (e.code, e.type, e.param) == (err["code"], err["type"], err["param"])  # the SDK's attributes
        if code == "invalid_request" and "model must be" in err["message"]:
            assert e.param == "model"
        if len(sdk.sent) > sent:  # a client told to retry (max_retries=2): x-should-retry: false stops it
            assert e.response.headers["x-should-retry"] == "false" and len(sdk.sent) == sent + 1
        if code == "upstream_error":  # the arms it tried come with the error; no id: nothing was answered
            assert e.response.headers["x-router-model"] == MISTRAL == e.response.headers["x-router-fallback"]
            assert "decision_id" not in err and "x-router-decision-id" not in e.response.headers
        if status in (429, 503):
            assert int(e.response.headers["retry-after"]) >= 1
        if code == "internal":
            assert "secret" not in str(e) and "reference" in err["message"]


def test_param_names_the_first_failing_field(sdk):
    e = _raises(lambda: _chat(sdk, messages=[{"content": "no role"}]))
    assert e.param == "messages[0].role" and e.body["details"][0]["loc"] == ["messages", 0, "role"]
    e = _raises(lambda: _chat(sdk, max_tokens=10**6))
    assert e.param == "max_tokens"
    e = _raises(lambda: _route(sdk, {"query": "  "}))
    assert (e.code, e.param) == ("invalid_request", "query")
    e = _raises(lambda: _route(sdk, {"query": "x", "candidates": [CLAUDE2, "gpt-5"]}))
    assert (e.code, e.param) == ("unknown_arm", "candidates")
    e = _raises(lambda: _feedback(sdk, "nonsense"))
    assert (e.code, e.param) == ("malformed_request", "decision_id")


def test_the_readme_example_error_is_what_the_service_answers(sdk):
    """The README shows one error body; it must be the real one."""
    text = (REPO / "serve_configs" / "README.md").read_text()
    shown = json.loads(re.search(r"```json\n(\{\"error\": \{.*?\}\})\n```", text, re.S).group(1))
    e = _raises(lambda: _chat(sdk, max_tokens=9000))
    assert e.response.json() == shown
