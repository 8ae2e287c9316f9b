"""Every error of the family carries its HTTP status and a stable code, and the mapping answers
with them in OpenAI's shape ``{"error": {"message", "type", "code", "param"}}`` (a FastAPI app
in-process: no Ray)."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI, Request

import ray_router.errors as core_errors
import ray_router.serve.errors as serve_errors
from ray_router.errors import RouterError
from ray_router.serve import http_errors
from ray_router.serve.request_body import field_path, parse_body
from ray_router.serve.schemas import RouteRequest

# the contract of serve_configs/README.md: status and code of every error class
EXPECTED = {
    "RouterError": (400, "bad_request"),
    "ConfigError": (400, "bad_request"),
    "DataError": (400, "bad_request"),
    "OfflineError": (400, "bad_request"),
    "UnknownArmError": (404, "unknown_arm"),
    "UnknownModel": (404, "model_not_found"),
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


OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "server_error",
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

    @api.get("/attached")
    async def attached():
        from ray_router.serve.errors import UpstreamError

        raise UpstreamError("the arm's upstream timed out").attach(
            {"X-Router-Decision-Id": "d2.abc"}, decision_id="d2.abc"
        )

    @api.get("/with-param")
    async def with_param():
        raise serve_errors.RateLimited("slow down", retry_after_s=2.5, param="x")

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
    assert r.status_code == status
    assert r.json() == {
        "error": {"message": f"message of {name}", "type": OPENAI_TYPES[status], "code": code, "param": None}
    }
    # a retry cannot help a 409, and a 502 comes after the router's own handling of the upstream
    assert r.headers.get("x-should-retry") == ("false" if status in (409, 502) else None)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if status == 503:  # a standby takes over once the old writer's cluster is gone: longer than a shed
        assert r.headers["retry-after"] == (str(serve_errors.STANDBY_RETRY_AFTER_S) if name == "Standby" else "1")


def test_schema_errors_carry_their_details_and_the_first_failing_field(client):
    r = client("POST", "/route", json={"query": 1, "extra": True})
    err = r.json()["error"]
    assert r.status_code == 422 and err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
    assert {tuple(d["loc"]) for d in err["details"]} == {("query",), ("extra",)}
    assert err["param"] == err["details"][0]["loc"][0]
    assert "query: Input should be a valid string" in err["message"]


@pytest.mark.parametrize(
    "loc, path",
    [((), None), (("query",), "query"), (("messages", 0, "role"), "messages[0].role"), (("a", 2, 3, "b"), "a[2][3].b")],
)
def test_field_paths(loc, path):
    assert field_path(loc) == path


def test_a_nested_field_is_named_by_its_path():
    from ray_router.serve.errors import InvalidRequest
    from ray_router.serve.schemas import ChatRequest

    with pytest.raises(InvalidRequest) as e:
        parse_body(b'{"model": "router", "messages": [{"content": "x"}]}', ChatRequest)
    assert e.value.param == "messages[0].role"


def test_starlette_errors_are_json_too(client):
    r = client("GET", "/nope")
    assert (
        r.status_code == 404
        and r.json()["error"]["code"] == "not_found"
        and "GET /nope" in r.json()["error"]["message"]
    )
    r = client("DELETE", "/route")
    err = r.json()["error"]
    assert r.status_code == 405 and err["code"] == "method_not_allowed" and err["type"] == "invalid_request_error"


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


def test_an_error_answer_may_carry_fields_beside_and_inside_its_error():
    """/healthz's degraded answer: ``{"error": {..., "code": "unavailable"}, "status": "degraded", ...}``."""
    import json

    r = http_errors.error_response(
        503, "unavailable", "posterior not reachable", {"Retry-After": "1"}, top={"status": "degraded", "routes": "ok"}
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert json.loads(r.body) == {
        "error": {"message": "posterior not reachable", "type": "server_error", "code": "unavailable", "param": None},
        "status": "degraded",
        "routes": "ok",
    }
    r = http_errors.error_response(422, "invalid_request", "m", None, "model", decision_id="d2.x")
    assert json.loads(r.body)["error"] == {
        "message": "m",
        "type": "invalid_request_error",
        "code": "invalid_request",
        "param": "model",
        "decision_id": "d2.x",
    }


def test_an_error_can_carry_headers_fields_and_param_through_the_mapping(client):
    r = client("GET", "/attached")
    assert r.status_code == 502
    assert r.headers["x-router-decision-id"] == "d2.abc" and r.headers["x-should-retry"] == "false"
    assert r.json() == {
        "error": {
            "message": "the arm's upstream timed out",
            "type": "server_error",
            "code": "upstream_error",
            "param": None,
            "decision_id": "d2.abc",
        }
    }
    r = client("GET", "/with-param")
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"] == {
        "message": "slow down",
        "type": "rate_limit_error",
        "code": "rate_limited",
        "param": "x",
    }


def test_blame_names_the_field_unless_the_error_names_one():
    from ray_router.serve.errors import InvalidRequest, blame

    with pytest.raises(InvalidRequest) as e, blame("query"):
        raise InvalidRequest("query is empty")
    assert e.value.param == "query"
    with pytest.raises(InvalidRequest) as e, blame("query"):
        raise InvalidRequest("bad", param="messages[0].role")
    assert e.value.param == "messages[0].role"
    with pytest.raises(KeyError), blame("query"):  # not ours: untouched
        raise KeyError("x")


def test_attached_fields_survive_pickling():
    """Errors raised in another deployment reach the ingress pickled (Ray)."""
    import pickle

    from ray_router.serve.errors import DuplicateFeedback

    e = pickle.loads(pickle.dumps(DuplicateFeedback("twice", param="decision_id").attach({"h": "v"}, seq=3)))
    assert (str(e), e.param, e.extra_headers, e.extra_fields) == ("twice", "decision_id", {"h": "v"}, {"seq": 3})


def test_the_catch_all_answers_a_counted_json_500_without_internals(client, counter):
    r = client("GET", "/bug")
    body = r.json()
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    err = body["error"]
    assert (err["code"], err["type"], err["param"]) == ("internal", "server_error", None)
    assert "secret" not in err["message"] and "KeyError" not in err["message"] and "reference" in err["message"]
    assert counter.seen == [{"status": "500", "error": "internal"}]


def test_an_error_message_with_any_characters_renders(client, counter):
    r = client("GET", "/bug-in-message")
    assert r.status_code == 422 and r.json()["error"]["message"] == "echoes client input: \ud800 \x00 \u00e9"
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
        assert r.json()["error"]["code"] == "unsupported_media_type"


def _relay(chunks: list[bytes], fail: bool) -> list[dict]:
    """The events :func:`upstream.relay_stream` makes of an upstream stream of ``chunks`` (then a
    cut connection when ``fail``), parsed."""
    import asyncio
    import json

    from ray_router.serve import upstream

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self):
            for c in chunks:
                yield c
            if fail:
                raise httpx.ReadError("connection reset by peer at 10.0.0.7")

    async def go() -> list[bytes]:
        transport = httpx.MockTransport(lambda req: httpx.Response(200, stream=Stream()))
        async with httpx.AsyncClient(transport=transport) as c:
            resp = await c.send(c.build_request("POST", "http://upstream/v1/chat/completions"), stream=True)
            stream = upstream.OpenStream(resp, resp.aiter_lines(), head=[], started=0.0, first_event_s=0.0)
            return [e async for e in upstream.relay_stream(stream, "arm-a", {"decision_id": "d2.x"})]

    return [json.loads(e.decode()[len("data: ") :]) for e in asyncio.run(go())]


def test_a_stream_cut_mid_way_ends_with_the_error_object_of_a_502():
    events = _relay([b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'], fail=True)
    assert events[0]["model"] == "arm-a" and events[0]["router"] == {"decision_id": "d2.x"}
    assert events[-1] == {
        "error": {
            "message": "upstream stream broke: ReadError",
            "type": "server_error",
            "code": "upstream_error",
            "param": None,
            "decision_id": "d2.x",
        }
    }


def test_an_upstreams_error_event_is_replaced_by_ours_without_its_text():
    events = _relay(
        [
            b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n',
            b'data: {"error": {"message": "quota of key sk-123 exceeded", "type": "x"}}\n\n',
            b'data: {"choices": [{"index": 0, "delta": {"content": "never relayed"}}]}\n\n',
        ],
        fail=False,
    )
    assert len(events) == 2 and "sk-123" not in json.dumps(events)
    assert events[-1]["error"]["code"] == "upstream_error" and events[-1]["error"]["decision_id"] == "d2.x"
    assert events[-1]["error"]["message"] == "the arm's upstream reported an error mid-stream"
