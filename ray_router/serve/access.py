"""Who may call what: separate credentials for feedback, admin and clients, and the clients' rate
limits. Pure (no HTTP, no Ray): the ingress hands it the ``Authorization`` header.

- the **feedback token** opens ``POST /v1/feedback`` only;
- the **admin token** opens ``/v1/admin/*`` only;
- each **client key** (``auth.clients``) opens ``/v1/chat/completions`` (required there by
  default) and, with ``protect_reads``, ``/v1/route``, ``/v1/arms``, ``/v1/models`` and ``/v1/stats``; a request
  that presents a client key is charged to that key's token bucket wherever it goes (429 when
  empty). The buckets live in each ingress replica: N replicas allow up to N times the rate.

A presented credential is looked up by its SHA-256 digest, so the comparison does not depend on
how many leading characters of some secret it shares. Every secret must differ from every other.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ray_router.errors import ConfigError
from ray_router.serve.config import AuthSpec, ClientSpec
from ray_router.serve.errors import RateLimited, Unauthorized
from ray_router.serve.tokens import bearer_value, resolve_secret


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; each request takes one."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = float(rate_per_s), float(burst), clock
        self.tokens, self.stamp = self.burst, clock()

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until the next one (nothing taken)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class Principal:
    kind: str  # "feedback" | "admin" | "client"
    name: str  # the client's name; the kind for the two tokens


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class Access:
    def __init__(
        self,
        feedback_token: str,
        admin_token: str,
        clients: Mapping[str, tuple[str, ClientSpec]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clients``: name -> (key, its spec)."""
        entries = [(feedback_token, Principal("feedback", "feedback")), (admin_token, Principal("admin", "admin"))]
        entries += [(key, Principal("client", name)) for name, (key, _) in clients.items()]
        self._who: dict[bytes, Principal] = {}
        for secret, principal in entries:
            d = _digest(secret)
            if d in self._who:
                other = self._who[d]
                raise ConfigError(
                    f"auth: the {principal.kind} credential {principal.name!r} equals the {other.kind} credential "
                    f"{other.name!r}; every credential needs its own secret"
                )
            self._who[d] = principal
        self._buckets = {name: TokenBucket(spec.rate_per_s, spec.burst, clock) for name, (_, spec) in clients.items()}

    def identify(self, header: str | None) -> Principal | None:
        value = bearer_value(header)
        return None if value is None else self._who.get(_digest(value))

    def require(self, header: str | None, kind: str) -> Principal:
        """The caller, who must hold a credential of ``kind`` (401 otherwise)."""
        who = self.identify(header)
        if who is None or who.kind != kind:
            what = {"feedback": "the feedback token", "admin": "the admin token", "client": "a client key"}[kind]
            raise Unauthorized(f"this call needs 'Authorization: Bearer <{what}>'")
        if kind == "client":
            self._charge(who)
        return who

    def client(self, header: str | None, required: bool) -> Principal | None:
        """A client call: the key is needed when ``required``; a presented client key is charged
        to its bucket either way (429 when it is empty)."""
        if required:
            return self.require(header, "client")
        who = self.identify(header)
        if who is not None and who.kind == "client":
            self._charge(who)
        return who

    def _charge(self, who: Principal) -> None:
        wait = self._buckets[who.name].take()
        if wait > 0:
            raise RateLimited(f"client {who.name!r} is over its rate limit", retry_after_s=math.ceil(wait))


def load_access(auth: AuthSpec, state_dir: str | Path) -> tuple[Access, dict[str, str]]:
    """The service's :class:`Access` from its env vars (or the secrets generated into
    ``<state_dir>/secrets/``), and where each credential came from (for ``/v1/admin/status``)."""
    secrets_dir = Path(state_dir) / "secrets"
    feedback, feedback_src = resolve_secret(auth.token_env, secrets_dir / "token")
    admin, admin_src = resolve_secret(auth.admin_token_env, secrets_dir / "admin_token")
    clients: dict[str, tuple[str, ClientSpec]] = {}
    sources = {"feedback_token": feedback_src, "admin_token": admin_src}
    for c in auth.clients:
        key, src = resolve_secret(c.key_env, secrets_dir / f"client_{c.name}")
        clients[c.name] = (key, c)
        sources[f"client:{c.name}"] = src
    return Access(feedback, admin, clients), sources
