"""Every error of the family carries its HTTP status and a stable code, and the mapping answers
with them (a FastAPI app in-process: no Ray)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request

import ray_router.errors as core_errors
import ray_router.serve.errors as serve_errors
from ray_router.errors import RouterError
from ray_router.serve import http_errors
from ray_router.serve.request_body import parse_body
from ray_router.serve.schemas import RouteRequest

# the contract of serve_configs/README.md: status and code of every error class
EXPECTED = {
    "RouterError": (400, "bad_request"),
    "ConfigError": (400, "bad_request"),
    "DataError": (400, "bad_request"),
    "OfflineError": (400, "bad_request"),
    "UnknownArmError": (404, "unknown_arm"),
    "MalformedRequest": (400, "malformed_request"),
    "InvalidRequest": (422, "invalid_request"),
    "Unauthorized": (401, "unauthorized"),
    "ForgedDecision": (403, "invalid_signature"),
    "DuplicateFeedback": (409, "duplicate_feedback"),
    "NotADuel": (409, "not_a_duel"),
    "ExpiredDecision": (410, "expired_decision"),
    "StaleDecision": (410, "stale_decision"),
    "PayloadTooLarge": (413, "too_large"),
    "UnsupportedMediaType": (415, "unsupported_media_type"),
    "RateLimited": (429, "rate_limited"),
    "UpstreamError": (502, "upstream_error"),
    "ServiceUnavailable": (503, "unavailable"),
    "Overloaded": (503, "overloaded"),
    "Standby": (503, "standby"),
}


def _error_classes() -> dict[str, type[RouterError]]:
    out = {}
    for mod in (core_errors, serve_errors):
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and issubclass(obj, RouterError):
                out[name] = obj
    return out


def test_every_error_class_declares_its_status_and_code():
    classes = _error_classes()
    assert set(classes) == set(EXPECTED), "a new error class needs its row here and in serve_configs/README.md"
    for name, cls in classes.items():
        assert "http_status" in vars(cls) and "code" in vars(cls), f"{name} inherits its status or code"
        assert (cls.http_status, cls.code) == EXPECTED[name], name


def test_the_readme_table_lists_each_status_and_code():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "serve_configs" / "README.md").read_text()
    for name, (status, code) in EXPECTED.items():
        if code != "bad_request":  # config and data errors are the CLI's; the service never answers them
            assert re.search(rf"\| {status} \| `{code}`", text), f"README has no row for {name} ({status} {code})"
    assert re.search(rf"\| 500 \| `{http_errors.INTERNAL}`", text), "README has no row for the catch-all"


class Counter:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def inc(self, n, tags):
        self.seen.append(tags)


@pytest.fixture
def counter() -> Counter:
    return Counter()


@pytest.fixture
def client(counter):
    from types import SimpleNamespace

    from ray_router.serve.request_body import read_body

    api = FastAPI()
    http_errors.install(api)
    api.state.metrics = SimpleNamespace(http_errors=counter)

    @api.get("/raise/{name}")
    async def raise_(name: str):
        raise _error_classes()[name](f"message of {name}")

    @api.get("/bug")
    async def bug():
        raise KeyError("/secret/path/of/the/server")  # a bug: no handler maps it

    @api.get("/bug-in-message")
    async def bug_in_message():
        from ray_router.serve.errors import InvalidRequest

        raise InvalidRequest("echoes client input: \ud800 \x00 \u00e9")  # not encodable as UTF-8

    @api.post("/body")
    async def body(request: Request):
        return (await read_body(request, RouteRequest, 1000)).model_dump()

    @api.post("/route")
    async def route(body: dict):
        import json

        return parse_body(json.dumps(body).encode(), RouteRequest).model_dump()

    transport = httpx.ASGITransport(app=api)

    async def go(method: str, path: str, **kw) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, **kw)

    import asyncio

    return lambda method, path, **kw: asyncio.run(go(method, path, **kw))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_mapping_answers_with_the_class_status_and_code(client, name):
    r = client("GET", f"/raise/{name}")
    status, code = EXPECTED[name]
    assert r.status_code == status and r.json() == {"error": code, "message": f"message of {name}"}
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if status == 503:  # a standby takes over once the old writer's cluster is gone: longer than a shed
        assert r.headers["retry-after"] == (str(serve_errors.STANDBY_RETRY_AFTER_S) if name == "Standby" else "1")


def test_schema_errors_carry_their_details(client):
    r = client("POST", "/route", json={"query": 1, "extra": True})
    body = r.json()
    assert r.status_code == 422 and body["error"] == "invalid_request"
    assert {tuple(d["loc"]) for d in body["details"]} == {("query",), ("extra",)}
    assert "query: Input should be a valid string" in body["message"]


def test_starlette_errors_are_json_too(client):
    assert client("GET", "/nope").json()["error"] == "not_found"
    r = client("DELETE", "/route")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    "raw, cls",
    [
        (b"", "MalformedRequest"),
        (b"  ", "MalformedRequest"),
        (b'{"query": ', "MalformedRequest"),
        (b"[1]", "InvalidRequest"),
    ],
)
def test_parse_body_errors(raw, cls):
    with pytest.raises(_error_classes()[cls]):
        parse_body(raw, RouteRequest)


def test_an_error_answer_may_carry_a_status_field():
    """/healthz's degraded answer: ``{"error": "unavailable", "status": "degraded", ...}``."""
    import json

    r = http_errors.error_response(
        503, "unavailable", "posterior not reachable", {"Retry-After": "1"}, status="degraded", routes="ok"
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert json.loads(r.body) == {
        "error": "unavailable",
        "message": "posterior not reachable",
        "status": "degraded",
        "routes": "ok",
    }


def test_the_catch_all_answers_a_counted_json_500_without_internals(client, counter):
    r = client("GET", "/bug")
    body = r.json()
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert set(body) == {"error", "message"} and body["error"] == "internal"
    assert "secret" not in body["message"] and "KeyError" not in body["message"] and "reference" in body["message"]
    assert counter.seen == [{"status": "500", "error": "internal"}]


def test_an_error_message_with_any_characters_renders(client, counter):
    r = client("GET", "/bug-in-message")
    assert r.status_code == 422 and r.json()["message"] == "echoes client input: \ud800 \x00 \u00e9"
    assert counter.seen == [{"status": "422", "error": "invalid_request"}]


@pytest.mark.parametrize(
    "content_type, status",
    [
        (None, 200),
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("application/vnd.api+json", 200),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/jsonx", 415),
        ("", 415),
        ("\u00e9/\u00e9", 415),
    ],
)
def test_bodies_must_be_declared_json(client, content_type, status):
    headers = {} if content_type is None else {"content-type": content_type.encode("latin-1")}
    r = client("POST", "/body", content=b'{"query": "x"}', headers=headers)
    assert r.status_code == status, r.text
    if status == 415:
        assert r.json()["error"] == "unsupported_media_type"
