"""The HTTP error mapping: every error answer of the service is OpenAI's
``{"error": {"message", "type", "code", "param"}}`` (:func:`ray_router.serve.errors.error_body`).

A :class:`~ray_router.errors.RouterError` answers with its class's ``http_status``, ``code`` and
``headers``, its ``param``, ``details`` (schema errors) and whatever it was given with
:meth:`~ray_router.errors.RouterError.attach` (headers, error fields); Starlette's own 404/405
become ``not_found`` and ``method_not_allowed``; anything else that escapes a route is caught by
the one catch-all (:class:`CatchAll`): a 500 with code ``internal`` whose message names a
reference to the logged traceback and nothing of the internals. Each error answer is counted in
``router_http_errors`` by status and code.

Error bodies are rendered with ASCII escapes (:class:`SafeJSONResponse`), so a message that quotes
client input renders whatever characters that input holds.
"""

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ray_router.errors import RouterError
from ray_router.serve.errors import body_of, error_body, headers_of

logger = logging.getLogger("ray.serve")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
INTERNAL = "internal"


class SafeJSONResponse(JSONResponse):
    """JSON with ASCII escapes: renders any str (lone surrogates too), never raises on encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(
    http_status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    /,
    param: str | None = None,
    top: dict[str, Any] | None = None,
    **fields: Any,
) -> JSONResponse:
    """``{"error": {"message", "type", "code", "param", **fields}, **top}``: ``fields`` go into the
    error object, ``top`` beside it (``/healthz``'s degraded answer keeps its ``status``, ...)."""
    body = {**error_body(http_status, code, message, param, **fields), **(top or {})}
    return SafeJSONResponse(body, status_code=http_status, headers=headers)


_metrics: Any = None  # the replica's IngressMetrics (use_metrics); one Ingress replica per process


def use_metrics(metrics: Any) -> None:
    """Count errors in ``metrics.http_errors``. A module global rather than ``app.state``: Serve
    serves a pickled copy of the FastAPI app, not the module's ``api`` object."""
    global _metrics
    _metrics = metrics


def count(app: Any, status: int, code: str) -> None:
    """Count one error answer in ``router_http_errors`` (the app's ``state.metrics``, else those
    given to :func:`use_metrics`; none: not counted)."""
    metrics = getattr(getattr(app, "state", None), "metrics", None) or _metrics
    if metrics is not None:
        metrics.http_errors.inc(1, tags={"status": str(status), "error": code})


async def router_error(request: Request, exc: RouterError) -> JSONResponse:
    count(request.app, exc.http_status, exc.code)
    return SafeJSONResponse(body_of(exc), status_code=exc.http_status, headers=headers_of(exc) or None)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    count(request.app, exc.status_code, code)
    message = f"{exc.detail}: {request.method} {request.url.path[:200]}"  # e.g. "Not Found: GET /v1/nope"
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


def internal_message(ref: str) -> str:
    """The catch-all's message: a reference to the logged traceback, nothing of the internals."""
    return f"internal error (reference {ref}); it is logged, please report it"


class CatchAll:
    """The one catch-all: an exception that no handler above maps (a bug, by definition) answers
    500 (code ``internal``, type ``server_error``) with a reference id; the traceback goes to the
    replica's log under that id. A pure ASGI middleware (inside Starlette's
    ``ServerErrorMiddleware``, outside the handlers of :func:`install`), so nothing is re-raised
    into Serve. When the response had already started
    (a stream), the connection is closed instead."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # the catch-all: answer, count, log
            ref = uuid.uuid4().hex[:16]
            logger.exception(f"internal error {ref} on {scope.get('method')} {scope.get('path')}")
            count(scope.get("app"), 500, INTERNAL)
            if started:
                return
            response = error_response(500, INTERNAL, internal_message(ref))
            await response(scope, receive, send)


def install(api: FastAPI) -> None:
    """Register the mapping and the catch-all on ``api``."""
    api.add_exception_handler(RouterError, router_error)  # type: ignore[arg-type]
    api.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    api.add_middleware(CatchAll)
