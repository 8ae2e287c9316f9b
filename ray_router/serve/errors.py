"""HTTP-facing errors of the service, all in the core's :class:`RouterError` family.

Each class carries ``http_status``, a stable machine-readable ``code`` and the response
``headers`` it needs; :mod:`ray_router.serve.http_errors` turns any ``RouterError`` into
``{"error": code, "message": str(exc)}`` with that status, in one place.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ray_router.errors import RouterError


class MalformedRequest(RouterError, http_status=400, code="malformed_request"):
    """The body is not JSON, or a decision id is not of our format."""


class InvalidRequest(RouterError, http_status=422, code="invalid_request"):
    """Well-formed JSON that breaks the request schema or a limit of the config. ``details``: the
    schema errors (``loc``, ``msg``, ``type``), sent in the body's ``details`` field."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.details = details


class Unauthorized(RouterError, http_status=401, code="unauthorized"):
    """A call without the bearer credential its endpoint needs (feedback token, admin token or a
    client key)."""

    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class ForgedDecision(RouterError, http_status=403, code="invalid_signature"):
    """A decision id whose signature does not verify."""


class DuplicateFeedback(RouterError, http_status=409, code="duplicate_feedback"):
    """Feedback for a decision that already took its one feedback."""


class NotADuel(RouterError, http_status=409, code="not_a_duel"):
    """Feedback for a ``single`` decision: there is no pair to compare."""


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

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class UpstreamError(RouterError, http_status=502, code="upstream_error"):
    """The chosen arm's upstream failed or answered with an error."""


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
