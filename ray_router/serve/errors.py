"""HTTP-facing errors of the service, all in the core's :class:`RouterError` family, and the one
shape of every error answer: OpenAI's ``{"error": {"message", "type", "code", "param"}}``.

Each class carries ``http_status``, a stable machine-readable ``code`` and the response
``headers`` it needs; :mod:`ray_router.serve.http_errors` turns any ``RouterError`` into
:func:`error_body` with that status, in one place, and a stream that breaks after its first
byte ends with the same object in an SSE ``data:`` line. ``type`` is OpenAI's error type for the
status (:func:`error_type`); ``code`` is ours (``invalid_request``, ``upstream_error``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from ray_router.errors import RouterError

# OpenAI's error types by HTTP status (what its API and SDKs use); any other 4xx is an invalid
# request, any 5xx a server error
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# a retry cannot succeed (or the router already retried): the official SDKs obey this header
NO_RETRY: dict[str, str] = {"x-should-retry": "false"}


def error_type(http_status: int) -> str:
    """OpenAI's ``error.type`` for a status: ``authentication_error`` (401), ``permission_error``
    (403), ``rate_limit_error`` (429), ``server_error`` (5xx), else ``invalid_request_error``."""
    if http_status in _TYPES:
        return _TYPES[http_status]
    return "server_error" if http_status >= 500 else "invalid_request_error"


def error_body(http_status: int, code: str, message: str, param: str | None = None, **fields: Any) -> dict[str, Any]:
    """``{"error": {"message", "type", "code", "param", **fields}}``: every error answer's body
    (and a broken stream's last event)."""
    return {"error": {"message": message, "type": error_type(http_status), "code": code, "param": param, **fields}}


def body_of(exc: RouterError) -> dict[str, Any]:
    """:func:`error_body` of ``exc``: its status, code, message and ``param``, its ``details``
    (schema errors) and the fields :meth:`~ray_router.errors.RouterError.attach` added."""
    fields = dict(getattr(exc, "extra_fields", {}))
    if details := getattr(exc, "details", None):
        fields["details"] = details
    return error_body(exc.http_status, exc.code, str(exc), getattr(exc, "param", None), **fields)


@contextmanager
def blame(param: str) -> Iterator[None]:
    """A :class:`RouterError` raised inside names ``param`` as the field at fault (unless it names
    one already): ``with blame("query"): decider.check_query(req.query)``."""
    try:
        yield
    except RouterError as e:
        if getattr(e, "param", None) is None:
            e.param = param
        raise


def headers_of(exc: RouterError) -> dict[str, str]:
    """The response headers of ``exc``'s answer: its class's (or its own) and the attached ones."""
    return {**(getattr(exc, "headers", None) or {}), **getattr(exc, "extra_headers", {})}


class MalformedRequest(RouterError, http_status=400, code="malformed_request"):
    """The body is not JSON, or a decision id is not of our format."""


class InvalidRequest(RouterError, http_status=422, code="invalid_request"):
    """Well-formed JSON that breaks the request schema or a limit of the config. ``details``: the
    schema errors (``loc``, ``msg``, ``type``), sent as the error object's ``details`` field."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None, param: str | None = None):
        super().__init__(message, param=param)
        self.details = details


class Unauthorized(RouterError, http_status=401, code="unauthorized"):
    """A call without the bearer credential its endpoint needs (feedback token, admin token or a
    client key)."""

    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class ForgedDecision(RouterError, http_status=403, code="invalid_signature"):
    """A decision id whose signature does not verify."""


class UnknownModel(RouterError, http_status=404, code="model_not_found"):
    """``GET /v1/models/{id}`` of a model that is neither ``router`` nor an arm (OpenAI's code)."""


class DuplicateFeedback(RouterError, http_status=409, code="duplicate_feedback"):
    """Feedback for a decision that already took its one feedback (never worth a retry: the SDKs
    retry a 409 unless told not to)."""

    headers: ClassVar[dict[str, str]] = NO_RETRY


class NotADuel(RouterError, http_status=409, code="not_a_duel"):
    """Feedback for a ``single`` decision: there is no pair to compare."""

    headers: ClassVar[dict[str, str]] = NO_RETRY


class ExpiredDecision(RouterError, http_status=410, code="expired_decision"):
    """A genuine decision id past its time to live."""


class StaleDecision(RouterError, http_status=410, code="stale_decision"):
    """A genuine decision id issued for another arm table (the router was reconfigured)."""


class PayloadTooLarge(RouterError, http_status=413, code="too_large"):
    """A body over the configured size limit."""


class UnsupportedMediaType(RouterError, http_status=415, code="unsupported_media_type"):
    """A request body whose ``Content-Type`` is not JSON."""


class RateLimited(RouterError, http_status=429, code="rate_limited"):
    """A client key over its rate limit; ``Retry-After`` says when its bucket has a token again."""

    def __init__(self, message: str, retry_after_s: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class UpstreamError(RouterError, http_status=502, code="upstream_error"):
    """The chosen arm's upstream failed or answered with an error. The router has done what it
    does about a failing upstream by then, so a client's retry would only repeat it:
    ``x-should-retry: false`` (the SDKs retry a 5xx otherwise)."""

    headers: ClassVar[dict[str, str]] = NO_RETRY


class ServiceUnavailable(RouterError, http_status=503, code="unavailable"):
    """The posterior could not be reached in time (it restarts by itself; retry)."""

    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class Overloaded(RouterError, http_status=503, code="overloaded"):
    """The embedder's queue is full (Serve's ``max_queued_requests``): shed at once, retry later."""

    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


STANDBY_RETRY_AFTER_S = 5


class Standby(RouterError, http_status=503, code="standby"):
    """A write (feedback, an admin snapshot or refresh) reached a standby posterior: another process
    (an upgrade's old cluster) holds the state's lock and writes. Nothing was recorded; retry after
    ``Retry-After``: the standby takes over within a second of the lock freeing, and a KubeRay
    upgrade frees it when it deletes the old cluster (``rayClusterDeletionDelaySeconds`` after the
    switch), so a few retries bridge the gap."""

    headers: ClassVar[dict[str, str]] = {"Retry-After": str(STANDBY_RETRY_AFTER_S)}
