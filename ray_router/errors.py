"""One small error family: the CLI prints these as messages and the HTTP layer maps them to 4xx.

Every class carries ``http_status`` (the HTTP status the service answers with) and ``code`` (the
stable, machine-readable ``error.code`` of the JSON body); subclasses override them. An instance
may carry more for its answer: ``param`` (the offending request field, when known), and, through
:meth:`RouterError.attach`, extra response headers and extra fields of the body's error object
(e.g. the decision id of a chat request whose upstream failed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import Self


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

    def __init__(self, *args: object, param: str | None = None) -> None:
        """``param``: the request field at fault (``error.param`` of the answer), when known."""
        super().__init__(*args)
        self.param = param

    def attach(self, headers: Mapping[str, str] | None = None, **fields: Any) -> Self:
        """Add response ``headers`` and error-object ``fields`` to this error's answer (later
        values win); returns the error, so that ``raise err.attach(...)`` reads as one step."""
        self.extra_headers: dict[str, str] = {**getattr(self, "extra_headers", {}), **(headers or {})}
        self.extra_fields: dict[str, Any] = {**getattr(self, "extra_fields", {}), **fields}
        return self


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
