"""HTTP request bodies (pydantic, strict: no silent coercion, unknown fields refused).

The router's own bodies are :class:`~ray_router.config.StrictModel` models; a chat completion body is
OpenAI's and passes its other fields through to the upstream, so it allows extra fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from ray_router.config import StrictModel


class RouteRequest(StrictModel):
    query: str
    candidates: list[str] | None = Field(None, min_length=1)
    cost_weight: float = 0.0
    mode: Literal["duel", "single"] = "duel"


class FeedbackRequest(StrictModel):
    decision_id: str = Field(max_length=16384)
    outcome: Literal["first", "second", "tie"]


class AdminRefreshRequest(StrictModel):
    steps: int | None = Field(None, ge=1, le=10_000)
    times: int = Field(1, ge=1, le=100)


class RouterOptions(StrictModel):
    """The ``router`` field of a chat completion request (removed before forwarding)."""

    mode: Literal["duel", "single"] | None = None
    cost_weight: float = 0.0
    candidates: list[str] | None = Field(None, min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI chat completion body: every other OpenAI field passes through to the upstream."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    router: RouterOptions | None = None
    # what the upstream call costs: typed here so that the ingress can cap them (limits.max_*)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt | None = Field(None, ge=1)


def message_text(msg: ChatMessage) -> str:
    """Text of a message: the string, or the ``text`` parts of a content list joined by newlines."""
    if isinstance(msg.content, str):
        return msg.content
    if isinstance(msg.content, list):
        return "\n".join(str(p.get("text", "")) for p in msg.content if p.get("type") == "text")
    return ""


def routing_text(req: ChatRequest) -> str:
    """What a chat request is routed on: its last user message."""
    for msg in reversed(req.messages):
        if msg.role == "user":
            return message_text(msg)
    return ""


def openapi_with_bodies(api: Any, bodies: dict[tuple[str, str], type[BaseModel]]) -> None:
    """Make ``api``'s OpenAPI document describe the JSON request body of each ``(path, method)``
    (the routes read their bodies themselves, so FastAPI cannot see them): its model's JSON schema
    under ``components/schemas``. Fuzzers (``tests/serve/test_fuzz.py``) and clients read it."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        doc = get_openapi(title=api.title, version=api.version, routes=api.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for (path, method), model in bodies.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(js.pop("$defs", {}))
            schemas[model.__name__] = js
            op = doc["paths"][path][method]
            op["requestBody"] = {
                "required": any(f.is_required() for f in model.model_fields.values()),
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        api.openapi_schema = doc
        return doc

    api.openapi = openapi
