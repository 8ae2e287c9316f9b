"""HTTP-facing errors of the service, all in the core's :class:`RouterError` family.

Each class carries ``http_status``, a stable machine-readable ``code`` and the response
``headers`` it needs; :mod:`ray_router.serve.http_errors` turns any ``RouterError`` into
``{"error": code, "message": str(exc)}`` with that status, in one place.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ray_router.errors import RouterError


class MalformedRequest(RouterError):
    """The body is not JSON, or a decision id is not of our format."""

    http_status = 400
    code = "malformed_request"


class InvalidRequest(RouterError):
    """Well-formed JSON that breaks the request schema or a limit of the config. ``details``: the
    schema errors (``loc``, ``msg``, ``type``), sent in the body's ``details`` field."""

    http_status = 422
    code = "invalid_request"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.details = details


class Unauthorized(RouterError):
    http_status = 401
    code = "unauthorized"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class ForgedDecision(RouterError):
    """A decision id whose signature does not verify."""

    http_status = 403
    code = "invalid_signature"


class DuplicateFeedback(RouterError):
    """Feedback for a decision that already took its one feedback."""

    http_status = 409
    code = "duplicate_feedback"


class NotADuel(RouterError):
    """Feedback for a ``single`` decision: there is no pair to compare."""

    http_status = 409
    code = "not_a_duel"


class ExpiredDecision(RouterError):
    http_status = 410
    code = "expired_decision"


class StaleDecision(RouterError):
    """A genuine decision id issued for another arm table (the router was reconfigured)."""

    http_status = 410
    code = "stale_decision"


class PayloadTooLarge(RouterError):
    http_status = 413
    code = "too_large"


class UpstreamError(RouterError):
    """The chosen arm's upstream failed or answered with an error."""

    http_status = 502
    code = "upstream_error"


class ServiceUnavailable(RouterError):
    """The posterior could not be reached in time (it restarts by itself; retry)."""

    http_status = 503
    code = "unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}
