"""Reading a request body into its pydantic model, with the service's limits and 4xx errors.

``parse_body`` is pure (bytes in, model or error out); ``read_body`` checks the declared content
type (:func:`check_content_type`: JSON or none, else 415) and streams a Starlette request under
the size limit first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ValidationError

from ray_router.serve.errors import InvalidRequest, MalformedRequest, PayloadTooLarge, UnsupportedMediaType

if TYPE_CHECKING:
    from starlette.requests import Request

M = TypeVar("M", bound=BaseModel)


def field_path(loc: Sequence[int | str]) -> str | None:
    """A pydantic error location as a field path (``messages[0].role``); None for the body itself."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def invalid_request(e: ValidationError) -> InvalidRequest:
    """A schema failure as a 422, with each error's location, message and type as ``details`` and
    the first failing field's path as ``param``."""
    details = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")} for err in e.errors()
    ]
    text = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in details)
    return InvalidRequest(text, details=details, param=field_path(details[0]["loc"]) if details else None)


def parse_body(raw: bytes, model: type[M]) -> M:
    """``model`` from a JSON body: 400 when the body is empty or not JSON, 422 when it breaks the schema."""
    if not raw.strip():
        raise MalformedRequest("empty body: send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            raise MalformedRequest(f"body is not valid JSON: {e.errors()[0].get('msg', '')}") from None
        raise invalid_request(e) from None


def check_content_type(header: str | None) -> None:
    """A body is JSON: ``application/json`` or any ``application/*+json`` (parameters such as
    ``charset`` ignored), or no ``Content-Type`` at all (read as JSON); anything else is a 415."""
    if header is None:
        return
    media = header.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    shown = media[:60].encode("ascii", "replace").decode()
    raise UnsupportedMediaType(f"Content-Type {shown!r} is not JSON: send the body as application/json")


def check_declared(content_type: str | None, content_length: str | None, max_bytes: int) -> None:
    """What the headers declare, before any byte is read: 415 unless JSON (or undeclared), 413 when
    ``Content-Length`` exceeds ``max_bytes``."""
    check_content_type(content_type)
    if content_length and content_length.isdigit() and int(content_length) > max_bytes:
        raise PayloadTooLarge(f"body of {content_length} bytes exceeds the limit of {max_bytes}")


async def stream_bytes(request: Request, max_bytes: int) -> bytes:
    """A Starlette request's body, 413 as soon as it passes ``max_bytes``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
    return bytes(body)


async def read_body(request: Request, model: type[M], max_bytes: int, empty_ok: bool = False) -> M:
    """The request's body as ``model``; 415 unless it is declared JSON (or undeclared), 413 beyond
    ``max_bytes`` (declared or streamed). ``empty_ok``: an empty body is ``model()``."""
    check_declared(request.headers.get("content-type"), request.headers.get("content-length"), max_bytes)
    body = await stream_bytes(request, max_bytes)
    if empty_ok and not body.strip():
        return model()
    return parse_body(body, model)
