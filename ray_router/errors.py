"""One small error family: the CLI prints these as messages and the HTTP layer maps them to 4xx.

Every class carries ``http_status`` (the HTTP status the service answers with) and ``code`` (the
stable, machine-readable ``error`` field of the JSON body); subclasses override them.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class of every error ray-router raises on purpose (bad input, bad config, bad data)."""

    http_status: int = 400
    code: str = "bad_request"

    def __init_subclass__(cls, http_status: int | None = None, code: str | None = None, **kw: object) -> None:
        """``class X(RouterError, http_status=404, code="unknown_arm")``: a subclass's HTTP status and code."""
        super().__init_subclass__(**kw)
        if http_status is not None:
            cls.http_status = http_status
        if code is not None:
            cls.code = code


class ConfigError(RouterError, ValueError, http_status=400, code="bad_request"):
    """A configuration value is invalid (unknown field, out of range, wrong type)."""


class DataError(RouterError, ValueError, http_status=400, code="bad_request"):
    """A data file is missing, malformed, or inconsistent. The message names the file and column."""


class UnknownArmError(RouterError, KeyError, http_status=404, code="unknown_arm"):
    """An arm id that the router does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown arm"


class OfflineError(RouterError, http_status=400, code="bad_request"):
    """A network resource was needed but this machine is offline."""
