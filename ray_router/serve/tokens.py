"""Signed decision ids and the service's secrets.

A decision id carries everything a feedback on it needs, signed, so no service keeps decisions
that await feedback and a restart loses none of them::

    d2.<payload, base64url>.<HMAC-SHA256 of "d2.<payload>", base64url>

payload (big-endian): version, mode (duel/single), 96-bit random nonce, expiry (unix seconds),
first and second arm index, number of arms, a 4-byte fingerprint of the arm-id table, the
embedding's dim, the propensity of the served arms as a count out of a sample-pool size (version
3; an id without one, e.g. a single route or a duel after a fallback, is version 2), the offered
arms as a bitmask, and for a duel the query embedding as float16 (384-d: 768 bytes, so a duel id
is about 1.1 kB; a single id about 60 bytes). The ingress ranks on the float16-rounded embedding,
so the update replays exactly the context the choice was made on.

The ingress checks the signature first, then the expiry and the arm table; only a genuine, live
decision reaches the posterior, which enforces single use (each accepted nonce is in the feedback
log and in the snapshots until it expires).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_router.errors import ConfigError
from ray_router.serve.errors import ExpiredDecision, ForgedDecision, MalformedRequest, NotADuel, StaleDecision

PREFIX = "d2"
_VERSION = 3
_OLD_VERSIONS = (2,)  # still verified (ids issued before an upgrade stay valid until they expire)
_MODES = {"duel": 0, "single": 1}
_MODE_NAMES = {v: k for k, v in _MODES.items()}
_HEAD2 = struct.Struct(">BB12sQHHH4sH")  # version, mode, nonce, expires, first, second, K, arm fp, dim
_PROP = struct.Struct(">HH")  # version 3: propensity count, pool size (0, 0: unknown)
_NONE = 0xFFFF
MIN_SECRET_CHARS = 16
MAX_TOKEN_CHARS = 16384
# the shape of every id we issue: ASCII only (base64url), so anything else is refused before the HMAC
_ID_SHAPE = re.compile(r"d2\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def new_nonce() -> str:
    return secrets.token_hex(12)


def arm_fingerprint(arm_ids: Sequence[str]) -> bytes:
    return hashlib.sha256("\n".join(arm_ids).encode("utf-8")).digest()[:4]


def quantise(x: np.ndarray) -> np.ndarray:
    """The float16-rounded embedding (as float32) that a decision id carries."""
    return np.asarray(x, dtype="<f2").astype(np.float32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class DecisionClaims:
    nonce: str
    expires_at: int
    mode: str  # "duel" | "single"
    first: int
    second: int | None
    offered: tuple[int, ...] | None  # None: every arm was offered
    x: np.ndarray | None  # float32 (dim,), duels only
    propensity: float | None = None  # P(these arms | context, published samples); None: unknown

    def to_dict(self) -> dict:
        return {
            "nonce": self.nonce,
            "expires_at": self.expires_at,
            "mode": self.mode,
            "first": self.first,
            "second": self.second,
            "offered": None if self.offered is None else list(self.offered),
            "x": self.x,
            "propensity": self.propensity,
        }


class DecisionSigner:
    """Issues and verifies decision ids for one arm table with one HMAC key."""

    def __init__(self, key: bytes | str, arm_ids: Sequence[str]):
        key = key.encode() if isinstance(key, str) else bytes(key)
        if len(key) < MIN_SECRET_CHARS:
            raise ConfigError(f"the decision signing key must have at least {MIN_SECRET_CHARS} characters")
        self._key = key
        self.n_arms = len(arm_ids)
        self.arm_fp = arm_fingerprint(arm_ids)
        # an arm table that grew by appending arms still accepts the ids issued before (their arm
        # indices mean the same arms): the fingerprint of every prefix of the table
        self._prefix_fps = {k: arm_fingerprint(arm_ids[:k]) for k in range(1, len(arm_ids) + 1)}

    def for_arms(self, arm_ids: Sequence[str]) -> DecisionSigner:
        """A signer of the same key for another arm table (one that grew: the ids issued for this one
        still verify)."""
        return DecisionSigner(self._key, arm_ids)

    def _sig(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())

    def issue(
        self,
        nonce: str,
        expires_at: float,
        mode: str,
        first: int,
        second: int | None = None,
        offered: Sequence[int] | None = None,
        x: np.ndarray | None = None,
        propensity: tuple[int, int] | None = None,
    ) -> str:
        """A signed id; ``propensity`` = ``(count, pool size)``: the served arms were the choice of
        ``count`` of the ``pool size`` published samples, one of which the route drew uniformly."""
        K = self.n_arms
        mask = bytearray((K + 7) // 8)
        for i in range(K) if offered is None else offered:
            mask[i // 8] |= 1 << (i % 8)
        xb = b"" if x is None else np.asarray(x, dtype="<f2").tobytes()
        dim = 0 if x is None else int(np.asarray(x).shape[0])
        count, pool = (0, 0) if propensity is None else (int(propensity[0]), int(propensity[1]))
        if not (0 <= count <= pool <= 0xFFFF and (pool == 0) == (count == 0)):
            raise ValueError(f"propensity must be (count, pool) with 1 <= count <= pool, got {propensity}")
        head = _HEAD2.pack(
            _VERSION if propensity is not None else 2,  # no propensity: the shorter version 2 payload
            _MODES[mode],
            bytes.fromhex(nonce),
            int(expires_at),
            int(first),
            _NONE if second is None else int(second),
            K,
            self.arm_fp,
            dim,
        ) + (_PROP.pack(count, pool) if propensity is not None else b"")
        body = f"{PREFIX}.{_b64(head + bytes(mask) + xb)}"
        return f"{body}.{self._sig(body)}"

    def verify(self, token: str, now: float | None = None) -> DecisionClaims:
        """Claims of a genuine, live decision id of this arm table. Raises MalformedRequest (400),
        ForgedDecision (403), ExpiredDecision (410) or StaleDecision (410), checked in that order."""
        now = time.time() if now is None else now
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _ID_SHAPE.fullmatch(token):
            # non-ASCII, NUL, a wrong number of parts: not an id of ours (and nothing to hash)
            raise MalformedRequest("decision_id is not a decision id issued by this router")
        parts = token.split(".")
        body = f"{parts[0]}.{parts[1]}"
        if not hmac.compare_digest(parts[2].encode(), self._sig(body).encode()):
            raise ForgedDecision("decision_id signature does not verify")
        try:
            raw = _unb64(parts[1])
            version, mode, nonce, expires, first, second, K, fp, dim = _HEAD2.unpack_from(raw)
            head = _HEAD2.size
            count, pool = 0, 0
            if version == _VERSION:
                count, pool = _PROP.unpack_from(raw, head)
                head += _PROP.size
            elif version not in _OLD_VERSIONS:
                raise ValueError("unknown version")
            n_mask = (K + 7) // 8
            if mode not in _MODE_NAMES or len(raw) != head + n_mask + 2 * dim or count > pool:
                raise ValueError("inconsistent payload")
        except (binascii.Error, struct.error, ValueError):
            raise MalformedRequest("decision_id payload is malformed") from None
        if expires <= now:
            raise ExpiredDecision("decision_id has expired")
        if self._prefix_fps.get(K) != fp:
            raise StaleDecision("decision_id was issued for another arm table of this router")
        mask = raw[head : head + n_mask]
        offered = tuple(i for i in range(K) if mask[i // 8] >> (i % 8) & 1)
        x = None
        if dim:
            x = np.frombuffer(raw[head + n_mask :], dtype="<f2").astype(np.float32)
        return DecisionClaims(
            nonce=nonce.hex(),
            expires_at=int(expires),
            mode=_MODE_NAMES[mode],
            first=int(first),
            second=None if second == _NONE else int(second),
            # None: every arm; an id of a smaller (earlier) table names its arms, the later ones were not offered
            offered=None if len(offered) == K == self.n_arms else offered,
            x=x,
            propensity=count / pool if pool else None,
        )

    def verify_duel(self, token: str, now: float | None = None) -> DecisionClaims:
        """:meth:`verify`, and the decision must be a duel (:class:`NotADuel`, 409, otherwise): the
        whole check a feedback's decision id gets. Pure, so the ingress and the posterior (defence
        in depth: it trusts no caller) run the same one."""
        claims = self.verify(token, now)
        if claims.mode != "duel":
            raise NotADuel("a single-mode decision served one arm; pairwise feedback needs a duel")
        return claims


def decision_signer(hmac_key_env: str, state_dir: str | Path, arm_ids: Sequence[str]) -> tuple[DecisionSigner, str]:
    """The service's decision signer and where its key came from (``$hmac_key_env``, else the
    generated ``<state_dir>/secrets/hmac_key``): the same key for the ingress, which signs, and
    the posterior, which verifies each feedback's decision id again."""
    key, source = resolve_secret(hmac_key_env, Path(state_dir) / "secrets" / "hmac_key")
    return DecisionSigner(key, arm_ids), source


def check_bearer(header: str | None, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>`` (constant-time comparison)."""
    value = bearer_value(header)
    return value is not None and hmac.compare_digest(value.encode("utf-8", "surrogatepass"), token.encode())


def bearer_value(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <value>`` header (None: absent or another
    scheme). Header values are Latin-1 on the wire; a value is compared as UTF-8 bytes."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def resolve_secret(env_name: str, fallback_file: Path) -> tuple[str, str]:
    """``(secret, where)``: the env var ``env_name`` if set, else the content of ``fallback_file``,
    which is created (mode 0600, 32 random bytes as hex) if absent. Creation is atomic (O_EXCL),
    so replicas that race agree on one secret."""
    value = os.environ.get(env_name)
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise ConfigError(f"${env_name} must hold at least {MIN_SECRET_CHARS} characters")
        return value, f"${env_name}"
    fallback_file = Path(fallback_file)
    fallback_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(fallback_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            os.fsync(fh.fileno())
    for _ in range(100):  # a racing creator may not have written yet
        value = fallback_file.read_text().strip()
        if value:
            return value, str(fallback_file)
        time.sleep(0.01)
    raise ConfigError(f"{fallback_file} is empty; delete it or set ${env_name}")
