"""One small error family: the CLI prints these as messages and the HTTP layer maps them to 4xx.

Every class carries ``http_status`` (the HTTP status the service answers with) and ``code`` (the
stable, machine-readable ``error`` field of the JSON body); subclasses override them.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class of every error ray-router raises on purpose (bad input, bad config, bad data)."""

    http_status = 400
    code = "bad_request"


class ConfigError(RouterError, ValueError):
    """A configuration value is invalid (unknown field, out of range, wrong type)."""

    http_status = 400
    code = "bad_request"


class DataError(RouterError, ValueError):
    """A data file is missing, malformed, or inconsistent. The message names the file and column."""

    http_status = 400
    code = "bad_request"


class UnknownArmError(RouterError, KeyError):
    """An arm id that the router does not know."""

    http_status = 404
    code = "unknown_arm"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown arm"


class OfflineError(RouterError):
    """A network resource was needed but this machine is offline."""

    http_status = 400
    code = "bad_request"
