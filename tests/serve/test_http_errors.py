"""Every error of the family carries its HTTP status and a stable code, and the mapping answers
with them (a FastAPI app in-process: no Ray)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

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
    "UpstreamError": (502, "upstream_error"),
    "ServiceUnavailable": (503, "unavailable"),
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


@pytest.fixture
def client():
    api = FastAPI()
    http_errors.install(api)

    @api.get("/raise/{name}")
    async def raise_(name: str):
        raise _error_classes()[name](f"message of {name}")

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
    if status == 503:
        assert r.headers["retry-after"] == "1"


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
