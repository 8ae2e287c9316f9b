"""HTTP request bodies (pydantic, strict: no silent coercion, unknown fields refused)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RouteRequest(_Strict):
    query: str
    candidates: Optional[list[str]] = Field(None, min_length=1)
    cost_weight: float = 0.0
    mode: Literal["duel", "single"] = "duel"


class FeedbackRequest(_Strict):
    decision_id: str = Field(max_length=16384)
    outcome: Literal["first", "second", "tie"]


class AdminRefreshRequest(_Strict):
    steps: Optional[int] = Field(None, ge=1, le=10_000)
    times: int = Field(1, ge=1, le=100)


class RouterOptions(_Strict):
    """The ``router`` field of a chat completion request (removed before forwarding)."""

    mode: Optional[Literal["duel", "single"]] = None
    cost_weight: float = 0.0
    candidates: Optional[list[str]] = Field(None, min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(BaseModel):
    """OpenAI chat completion body: every other OpenAI field passes through to the upstream."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    router: Optional[RouterOptions] = None


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
