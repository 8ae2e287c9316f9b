"""``POST /v1/route`` as a plain ASGI handler, ahead of FastAPI's stack.

A route is the service's hot path: on the onnx-int8 encoder the whole encode takes about 4 ms, and
FastAPI's and Starlette's layers (ServerErrorMiddleware, exception telemetry, the body-limit
middleware, the catch-all, ExceptionMiddleware, the AsyncExitStack, routing, ``request_response``
and the ``Request``/``JSONResponse`` objects) cost about 0.56 ms of it on this machine's CPUs
(py-spy of the Ingress replica, ``serve_configs/README.md``). :class:`FastRouteApp` is the ASGI app
Serve runs (the ingress's ``__serve_build_asgi_app__``): it answers ``POST /v1/route`` itself and
hands every other request, unchanged, to the FastAPI app, which still declares ``/v1/route`` (for
``/openapi.json`` and as the same handler when the fast path is off).

Semantics are the FastAPI route's, by construction: both call the ingress's one ``route_answer``
with the same inputs (the first ``Authorization``, ``Content-Type`` and ``Content-Length`` headers,
as Starlette's ``Headers.get`` reads them, and the body) in the same order (credentials, then the
body under the size limit); a :class:`~ray_router.errors.RouterError` answers as
:mod:`ray_router.serve.http_errors` maps it (counted in ``router_http_errors``), anything else as
the catch-all's 500 ``internal`` with a logged reference. ``tests/serve/test_fast_route.py`` holds
the two paths to the same answers, the schemathesis suite runs against the fast one.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ray_router.errors import RouterError
from ray_router.serve import http_errors
from ray_router.serve.errors import PayloadTooLarge, body_of, error_body, headers_of

logger = logging.getLogger("ray.serve")

ROUTE_PATH = "/v1/route"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
# (authorization, content-type, content-length, the body's reader) -> (JSON content, response headers)
BodyReader = Callable[[], Awaitable[bytes]]
RouteAnswer = Callable[
    [str | None, str | None, str | None, BodyReader], Awaitable[tuple[dict[str, Any], dict[str, str]]]
]


class ClientGone(Exception):
    """The client disconnected before its body arrived: nothing to answer."""


def first_headers(scope: Scope, names: tuple[bytes, ...]) -> list[str | None]:
    """The first value of each header in ``names`` (lower-case), latin-1 decoded as Starlette does."""
    out: list[str | None] = [None] * len(names)
    for key, value in scope.get("headers") or ():
        k = key.lower()
        for i, name in enumerate(names):
            if out[i] is None and k == name:
                out[i] = value.decode("latin-1")
    return out


async def read_all(receive: Receive, max_bytes: int) -> bytes:
    """The request body, 413 (:class:`PayloadTooLarge`) as soon as it passes ``max_bytes``."""
    body = bytearray()
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.disconnect":
            raise ClientGone()
        if kind != "http.request":
            continue
        body += message.get("body", b"")
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
        if not message.get("more_body", False):
            return bytes(body)


async def send_json(
    send: Send, status: int, content: Any, headers: dict[str, str] | None, ascii_only: bool = False
) -> None:
    """One JSON response: ``JSONResponse``'s rendering (compact, UTF-8), or ASCII escapes for errors
    (``SafeJSONResponse``'s, whose messages may quote any client input)."""
    body = json.dumps(content, ensure_ascii=ascii_only, allow_nan=False, separators=(",", ":")).encode("utf-8")
    raw = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    for k, v in (headers or {}).items():
        raw.append((k.lower().encode("latin-1"), v.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class FastRouteApp:
    """The ingress's ASGI app: ``POST /v1/route`` through ``answer`` (the ingress's
    ``route_answer``), the rest through ``app`` (the FastAPI app). Attributes it does not define
    (``routes``, which Serve matches each request's route name against; ``add_exception_handler``)
    are the FastAPI app's."""

    def __init__(self, app: Any, answer: RouteAnswer, max_body_bytes: int):
        self.app = app
        self.answer = answer
        self.max_body_bytes = int(max_body_bytes)
        self.served = 0  # routes answered here (tests: the fast path did run)

    def __getattr__(self, name: str) -> Any:  # routes, add_exception_handler, docs_url, state, ...
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and self._route_path(scope) == ROUTE_PATH:
            await self.route(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def _route_path(scope: Scope) -> str:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return path

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            auth, content_type, length = first_headers(scope, (b"authorization", b"content-type", b"content-length"))

            async def body() -> bytes:
                return await read_all(receive, self.max_body_bytes)

            content, headers = await self.answer(auth, content_type, length, body)
            self.served += 1
            await send_json(tracking_send, 200, content, headers)
        except ClientGone:
            return
        except RouterError as e:
            if started:
                return
            http_errors.count(None, e.http_status, e.code)
            await send_json(send, e.http_status, body_of(e), headers_of(e) or None, ascii_only=True)
        except Exception:  # the catch-all (http_errors.CatchAll): answer, count, log
            ref = uuid.uuid4().hex[:16]
            logger.exception(f"internal error {ref} on POST {ROUTE_PATH}")
            http_errors.count(None, 500, http_errors.INTERNAL)
            if started:
                return
            content = error_body(500, http_errors.INTERNAL, http_errors.internal_message(ref))
            await send_json(send, 500, content, None, ascii_only=True)
