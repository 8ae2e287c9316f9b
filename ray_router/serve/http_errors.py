"""The HTTP error mapping: every error answer of the service is ``{"error": code, "message": ...}``.

A :class:`~ray_router.errors.RouterError` answers with its class's ``http_status``, ``code`` and
``headers`` (plus ``details`` when it has them); Starlette's own 404/405 become ``not_found`` and
``method_not_allowed``. Each error answer is counted in ``router_http_errors`` by status and code.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_router.errors import RouterError

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_response(
    http_status: int, code: str, message: str, headers: dict[str, str] | None = None, /, **extra: Any
) -> JSONResponse:
    """``{"error": code, "message": message, **extra}``; ``extra`` may hold any name (``status`` too)."""
    return JSONResponse({"error": code, "message": message, **extra}, status_code=http_status, headers=headers)


def _count(request: Request, status: int, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.http_errors.inc(1, tags={"status": str(status), "error": code})


async def router_error(request: Request, exc: RouterError) -> JSONResponse:
    _count(request, exc.http_status, exc.code)
    details = getattr(exc, "details", None)
    return error_response(
        exc.http_status, exc.code, str(exc), getattr(exc, "headers", None), **({"details": details} if details else {})
    )


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    _count(request, exc.status_code, code)
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


def install(api: FastAPI) -> None:
    """Register the mapping on ``api``."""
    api.add_exception_handler(RouterError, router_error)  # type: ignore[arg-type]
    api.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
