"""Arms added and retired while the router runs (the admin API, ``/v1/admin/arms``), pure and free of Ray.

The Serve config gives the arm table the service starts from. An operator can change it at runtime:

- **add an arm**: it is appended at the end of the table (arm indices never move: the posterior's
  terms and the logged duels name arms by index), with its offline prior from a per-category score
  profile (``profile``, or benchmark ``rows`` averaged per category) placed among the prior's
  categories by :func:`~ray_router.policies.offline_prior.extend_with_profiles`, the same function a
  config change's ``profile`` uses; the other arms keep what they learned (the posterior is rebuilt
  from its duels under the grown table);
- **retire** an arm (and restore one retired this way): it leaves the offered set of every request;
  its learned terms and its logged duels stay.

The changes live in ``<state dir>/arms.json`` (written atomically and fsynced before the change is
acknowledged), so they survive restarts: the posterior applies them over the config's table when it
opens, in the order they were made, which reproduces the same embeddings and prior. An arm the
config itself names wins over an added arm of the same id (the config has taken it over).

The posterior owns the result (:class:`~ray_router.serve.state.PosteriorState`); every Ingress
replica mirrors it: the samples the posterior publishes carry the table's :func:`fingerprint`, and a
replica that sees a new one fetches the table and swaps its arms, scorer, signer and breakers at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator, model_validator

from ray_router.config import StrictModel
from ray_router.errors import ConfigError, RouterError
from ray_router.serve.config import UpstreamSpec, finite_price, profile_scores
from ray_router.serve.errors import NO_RETRY
from ray_router.serve.specs import PosteriorSpec

ARMS_FILE = "arms.json"
FORMAT_VERSION = 1


class ArmExists(RouterError, http_status=409, code="arm_exists"):
    """An added arm's id is already in the table (retired or not) as another arm (the SDKs retry a
    409 unless told not to)."""

    headers: ClassVar[dict[str, str]] = NO_RETRY


class ArmChangeRefused(RouterError, http_status=409, code="arm_change_refused"):
    """A retire or restore that would leave no arm in service, or undo the config's own retirement."""

    headers: ClassVar[dict[str, str]] = NO_RETRY


class ProfileRow(StrictModel):
    """One benchmark row of a new arm: its score on a query of ``category``."""

    category: str = Field(min_length=1, max_length=200)
    score: float = Field(ge=0.0, le=1.0)


class AddArmRequest(StrictModel):
    """``POST /v1/admin/arms``: the new arm. Its prior comes from ``profile`` (expected score per
    category of the offline prior, ``default`` for the others) or from ``rows`` (benchmark rows: the
    mean score per category; a category without rows gets the mean of all rows); one of them is
    required unless the router runs a cold start (no offline prior: all arms equal)."""

    id: str = Field(min_length=1, max_length=200)
    price_usd: float = Field(ge=0.0, description="expected price of one query (USD), for cost_weight")
    upstream: UpstreamSpec | None = None
    profile: dict[str, float] | None = None
    rows: list[ProfileRow] | None = Field(None, min_length=1, max_length=100_000)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if v == "router":
            raise ValueError("'router' is reserved (it is the model name that asks for routing)")
        if v != v.strip() or any(ord(c) < 32 for c in v):
            raise ValueError("id must not have leading/trailing spaces or control characters")
        return v

    _finite = field_validator("price_usd")(staticmethod(finite_price))
    _scores = field_validator("profile")(staticmethod(profile_scores))

    @model_validator(mode="after")
    def _one_source(self) -> AddArmRequest:
        if self.profile is not None and self.rows is not None:
            raise ValueError("give either profile or rows, not both")
        return self

    def resolved_profile(self) -> dict[str, float] | None:
        """The per-category profile: ``profile``, or the rows' mean per category (``default``: the
        mean of all rows), or None."""
        if self.profile is not None:
            return dict(self.profile)
        if self.rows is None:
            return None
        by: dict[str, list[float]] = {}
        for r in self.rows:
            by.setdefault(r.category, []).append(r.score)
        out = {c: float(np.mean(v)) for c, v in by.items()}
        out["default"] = float(np.mean([r.score for r in self.rows]))
        return out


@dataclass(frozen=True)
class AddedArm:
    id: str
    price_usd: float
    upstream: dict[str, Any] | None = None  # UpstreamSpec as a dict
    profile: dict[str, float] | None = None
    added_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "price_usd": self.price_usd,
            "upstream": self.upstream,
            "profile": self.profile,
            "added_at": self.added_at,
        }

    @classmethod
    def from_request(cls, req: AddArmRequest, now: float | None = None) -> AddedArm:
        up = None if req.upstream is None else req.upstream.model_dump(mode="json")
        return cls(req.id, float(req.price_usd), up, req.resolved_profile(), time.time() if now is None else now)


@dataclass(frozen=True)
class ArmChanges:
    """What the admin API changed, in order: arms added (appended), arm ids retired."""

    added: tuple[AddedArm, ...] = ()
    retired: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.added and not self.retired

    def with_added(self, arm: AddedArm) -> ArmChanges:
        return ArmChanges((*self.added, arm), self.retired)

    def with_retired(self, arm_id: str, retired: bool) -> ArmChanges:
        ids = [a for a in self.retired if a != arm_id]
        return ArmChanges(self.added, (*ids, arm_id) if retired else tuple(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "added": [a.to_dict() for a in self.added], "retired": list(self.retired)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = ARMS_FILE) -> ArmChanges:
        try:
            if int(d.get("version", 0)) != FORMAT_VERSION:
                raise ValueError(f"unknown version {d.get('version')!r}")
            added = tuple(
                AddedArm(
                    str(a["id"]),
                    float(a["price_usd"]),
                    a.get("upstream"),
                    a.get("profile"),
                    float(a.get("added_at", 0.0)),
                )
                for a in d.get("added", [])
            )
            return cls(added, tuple(str(a) for a in d.get("retired", [])))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not an arm-changes file of this router ({e})") from None

    @classmethod
    def load(cls, state_dir: str | Path) -> ArmChanges:
        path = Path(state_dir) / ARMS_FILE
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot be read ({e}); restore it from a backup or remove it") from None
        return cls.from_dict(raw, str(path))

    def save(self, state_dir: str | Path) -> Path:
        """Atomic and durable: a temp file, fsync, rename, directory fsync."""
        from ray_router.serve.durable import write_meta

        path = Path(state_dir) / ARMS_FILE
        write_meta(path, self.to_dict())
        return path


def extend(spec: PosteriorSpec, arm: AddedArm) -> PosteriorSpec:
    """``spec`` with ``arm`` appended to its arm table: its embedding and prior column from its
    profile (a cold start without a profile: the neutral prior of every arm and its own random-sign
    embedding)."""
    from ray_router.policies.offline_prior import extend_with_profiles
    from ray_router.serve.arms import cold_start_embeddings, cold_start_prior

    if arm.id in spec.arm_ids:
        raise ArmExists(f"arm {arm.id!r} is already in the table (GET /v1/admin/arms)")
    A = np.asarray(spec.arm_embeddings, dtype=np.float64)
    if arm.profile is None:
        if not spec.cold_start:
            raise ConfigError(
                "a new arm needs its prior: 'profile' (expected score per category) or 'rows' (benchmark rows)"
            )
        A_new = np.concatenate([A, cold_start_embeddings([arm.id], A.shape[1])])
        prior = cold_start_prior(len(spec.arm_ids) + 1, A.shape[1])
    else:
        if spec.offline_prior is None:
            raise ConfigError("this router has no offline prior to place a profile in; start it with one")
        prior, A_new = extend_with_profiles(spec.offline_prior, A, [arm.profile])
        if spec.cold_start:  # keep a cold start's own direction per arm (see cold_start_embeddings)
            A_new[-1] = cold_start_embeddings([arm.id], A.shape[1])[0]
    return dataclasses.replace(
        spec,
        arm_ids=(*spec.arm_ids, arm.id),
        prices=(*(float(p) for p in spec.prices), float(arm.price_usd)),
        arm_embeddings=A_new,
        offline_prior=prior,
    )


def apply_changes(base: PosteriorSpec, changes: ArmChanges) -> PosteriorSpec:
    """The config's spec with the admin's added arms appended in order (an id the config names is
    the config's: skipped)."""
    spec = base
    for arm in changes.added:
        if arm.id in base.arm_ids:
            continue
        spec = extend(spec, arm)
    return spec


def fingerprint(ids: Sequence[str], prices: Sequence[float], embeddings: np.ndarray, retired: Sequence[str]) -> str:
    """What an Ingress compares to know that its arm table is the posterior's: ids, prices,
    embeddings and the admin's retired ids."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([list(ids), [float(p) for p in prices], sorted(retired)]).encode())
    h.update(np.ascontiguousarray(np.asarray(embeddings, dtype=np.float64)).tobytes())
    return h.hexdigest()
