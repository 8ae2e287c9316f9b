"""``POST /v1/route``'s plain ASGI handler (``ray_router/serve/fast_route.py``) answers as the
FastAPI route does.

In-process (no Ray): one ``answer`` function behind both paths (as the ingress's ``route_answer``
is), the same requests through each, the same status, body, headers and error counts. On a real
Serve: the service deployed with ``service.fast_route`` off and then on answers a list of good and
bad requests alike, and ``/v1/admin/status`` shows which path answered.
"""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ray_router.serve import http_errors
from ray_router.serve.errors import InvalidRequest, Unauthorized
from ray_router.serve.fast_route import FastRouteApp
from ray_router.serve.request_body import check_declared, parse_body, stream_bytes
from ray_router.serve.schemas import RouteRequest

MAX_BODY = 2000


async def answer(auth, content_type, content_length, read) -> tuple[dict[str, Any], dict[str, str]]:
    """The ingress's route_answer in small: credentials, declared body, body, checks, answer."""
    if auth == "Bearer wrong":
        raise Unauthorized("this call needs 'Authorization: Bearer <a client key>'")
    check_declared(content_type, content_length, MAX_BODY)
    req = parse_body(await read(), RouteRequest)
    if req.query == "bug":
        raise KeyError("/secret/path")  # a bug: the catch-all's 500
    if req.query == "invalid":
        raise InvalidRequest(f"query {req.query!r} refused: \ud800 é", param="query")
    return {"model": "arm-é", "echo": req.query, "mode": req.mode}, {"Server-Timing": "app;dur=0.10"}


class Counter:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def inc(self, n, tags):
        self.seen.append(dict(tags))


def make_apps(counter: Counter) -> tuple[FastAPI, FastRouteApp]:
    api = FastAPI()
    http_errors.install(api)
    api.state.metrics = SimpleNamespace(http_errors=counter)

    @api.post("/v1/route")
    async def route(request: Request) -> JSONResponse:
        h = request.headers
        content, headers = await answer(
            h.get("authorization"),
            h.get("content-type"),
            h.get("content-length"),
            lambda: stream_bytes(request, MAX_BODY),
        )
        return JSONResponse(content, headers=headers)

    http_errors.use_metrics(SimpleNamespace(http_errors=counter))  # what the fast path counts in
    return api, FastRouteApp(api, answer, MAX_BODY)


def chunks(*parts: bytes):
    async def gen():
        for p in parts:
            yield p

    return gen()


# (method, path, request kwargs): each sent through both paths
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/route", {"json": {"query": "hello"}}),
    ("POST", "/v1/route", {"json": {"query": "héllo ✓ 日本", "mode": "single"}}),
    ("POST", "/v1/route", {"content": b"", "headers": {"content-type": "application/json"}}),
    ("POST", "/v1/route", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/v1/route", {"json": {"query": 1, "extra": True}}),
    ("POST", "/v1/route", {"json": {"query": "x", "mode": "triple"}}),
    ("POST", "/v1/route", {"content": b'{"query": "x"}', "headers": {"content-type": "text/plain"}}),
    ("POST", "/v1/route", {"content": b'{"query": "x"}', "headers": {"content-type": "application/x+json"}}),
    ("POST", "/v1/route", {"content": b'{"query": "x"}'}),  # no content type: read as JSON
    ("POST", "/v1/route", {"json": {"query": "x" * (MAX_BODY + 10)}}),  # declared too large
    ("POST", "/v1/route", {"content": chunks(b'{"query": "', b"y" * (MAX_BODY + 10), b'"}')}),  # streamed
    ("POST", "/v1/route", {"json": {"query": "x"}, "headers": {"authorization": "Bearer wrong"}}),
    ("POST", "/v1/route", {"json": {"query": "invalid"}}),
    ("POST", "/v1/route", {"json": {"query": "bug"}}),
    ("POST", "/v1/route", {"content": "\xff\xfe".encode("latin-1"), "headers": {"content-type": "application/json"}}),
    ("GET", "/v1/route", {}),  # not the fast path's: FastAPI's 405
    ("POST", "/v1/route/", {"json": {"query": "x"}}),  # nor this (FastAPI's redirect)
    ("POST", "/v1/other", {"json": {"query": "x"}}),  # FastAPI's 404
]


def send(app: Any, method: str, path: str, kw: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def comparable(r: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    text = re.sub(r"reference [0-9a-f]{16}", "reference REF", r.text)
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    keep = ("content-type", "server-timing", "www-authenticate", "retry-after", "x-should-retry", "location")
    return r.status_code, body, {k: r.headers[k] for k in keep if k in r.headers}


@pytest.mark.parametrize("i", range(len(CASES)))
def test_the_fast_path_answers_as_fastapi_does(i):
    method, path, kw = CASES[i]
    counter = Counter()
    api, fast = make_apps(counter)
    if "content" in kw and not isinstance(kw["content"], (bytes, str)):  # a generator is used up once
        parts = [b'{"query": "', b"y" * (MAX_BODY + 10), b'"}']
        slow = send(api, method, path, {**kw, "content": chunks(*parts)})
        counted_slow = list(counter.seen)
        counter.seen.clear()
        quick = send(fast, method, path, {**kw, "content": chunks(*parts)})
    else:
        slow = send(api, method, path, kw)
        counted_slow = list(counter.seen)
        counter.seen.clear()
        quick = send(fast, method, path, kw)
    assert comparable(quick) == comparable(slow)
    assert counter.seen == counted_slow  # counted alike in router_http_errors
    if slow.status_code >= 400:
        assert slow.status_code != 500 or "secret" not in quick.text  # the catch-all hides the internals
    assert quick.content == slow.content or "reference" in slow.text  # byte for byte (a 500's reference aside)
    on_fast_path = method == "POST" and path == "/v1/route"
    assert fast.served == (1 if on_fast_path and quick.status_code == 200 else 0)


def test_the_fast_path_honours_the_root_path_and_passes_lifespan_and_attributes_through():
    counter = Counter()
    api, fast = make_apps(counter)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=fast, root_path="/prefix")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/prefix/v1/route", json={"query": "q"})

    r = asyncio.run(go())
    assert r.status_code == 200 and r.json()["echo"] == "q" and fast.served == 1
    assert fast.routes is api.routes  # Serve names each request's route from these
    assert fast.add_exception_handler == api.add_exception_handler


def test_a_client_that_leaves_before_its_body_gets_no_answer_and_nothing_is_counted():
    counter = Counter()
    _, fast = make_apps(counter)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send_(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/route", "headers": [], "root_path": ""}
    asyncio.run(fast(scope, receive, send_))
    assert sent == [] and counter.seen == [] and fast.served == 0


# ------------------------------------------------------------------------------- real Serve
@pytest.mark.integration
def test_on_serve_both_paths_answer_alike_and_status_says_which_ran(serve_cluster, tmp_path_factory):
    from tests.serve.conftest import delete_router, deploy_router, synthetic_arm_args

    arms = synthetic_arm_args(tmp_path_factory.mktemp("fast-arms"))
    requests = [
        ("POST", "/v1/route", {"json": {"query": "héllo ✓ 日本", "mode": "single"}}),
        ("POST", "/v1/route", {"json": {"query": "x", "candidates": ["nope"]}}),
        ("POST", "/v1/route", {"json": {"query": "x", "cost_weight": -1}}),
        ("POST", "/v1/route", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/route", {"content": b'{"query": "x"}', "headers": {"content-type": "text/plain"}}),
        ("POST", "/v1/route", {"json": {"query": "x" * 70_000}}),
        ("POST", "/v1/route", {"json": {"query": "x"}, "headers": {"authorization": "Bearer forged"}}),
        ("POST", "/v1/route", {"json": {"query": ""}}),
    ]

    def shape(r: httpx.Response) -> tuple[int, Any]:
        body = r.json()
        if r.status_code == 200:
            return 200, (body["mode"], sorted(body), len(body["arms"]))
        return r.status_code, (body["error"]["code"], body["error"]["param"], body["error"]["message"])

    seen: dict[bool, list] = {}
    try:
        for fast in (False, True):
            delete_router()
            app = deploy_router(
                serve_cluster,
                tmp_path_factory.mktemp(f"fast-state-{fast}"),
                arms,
                args={"service": {"fast_route": fast}},
            )
            with httpx.Client(base_url=app.url, timeout=60) as c:
                seen[fast] = [shape(c.request(m, p, **kw)) for m, p, kw in requests]
                status = c.get("/v1/admin/status", headers=app.admin).json()["ingress"]
            answered = sum(s == 200 for s, _ in seen[fast])
            assert status["fast_routes"] == (answered if fast else None)  # every good route took the fast path
        assert seen[True] == seen[False]
        assert seen[True][0][0] == 200 and {s for s, _ in seen[True][1:]} >= {400, 413, 415, 422}
    finally:
        delete_router()
