"""The dueling-policy protocol, shared records, and the registry of policies by name.

Every policy speaks the same five verbs (river-style online learner, NumPyro/BoTorch-style
separation of frozen config and mutable state):

- ``select(context, arms=None) -> Duel``: two arms to compare for this context;
- ``update(context, duel, outcome, arms=None)``: learn from "first better" (1), "second better" (0)
  or a tie (½); ``arms`` are the arms that were offered in that round;
- ``best(context, arms=None) -> int``: the exploit arm (what a router serves in ``single`` mode);
- ``snapshot() -> PolicySnapshot`` / ``restore(snapshot)``: the whole learned state plus config (a
  plain dict headed by the policy's name, ``policies/snapshot.py``), so a copy made from a snapshot
  makes exactly the same future choices as the original.

Arms are integer indices ``0..n_arms-1``; ``arms`` restricts a call to a subset (the candidates).
Contexts are the encoder's L2-normalised query embeddings, shape (dim,).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ray_router.config import parse
from ray_router.errors import ConfigError
from ray_router.policies.snapshot import PolicySnapshot


@dataclass(frozen=True)
class Duel:
    """The two arms a policy picked. ``first`` is also the arm served in exploit mode."""

    first: int
    second: int


@dataclass(frozen=True)
class PolicyEnv:
    """What a policy may know when it is built.

    ``arm_embeddings`` (K, d) are the model embeddings a_k (CCFT, ALGORITHM.md s.3);
    ``hindsight_utility`` (K,) is only given to the *hindsight* baseline (best fixed arm), which is
    an oracle by definition; ``offline`` carries offline-split data for supervised baselines:
    ``{"X": (n, d) query embeddings, "utilities": (n, K), "scores": (n, K), "categories": (n,)}``.
    """

    n_arms: int
    arm_embeddings: np.ndarray | None = None
    hindsight_utility: np.ndarray | None = None
    offline: Mapping[str, Any] | None = None

    @property
    def dim(self) -> int:
        return 0 if self.arm_embeddings is None else int(self.arm_embeddings.shape[1])

    def require_embeddings(self, policy: str) -> np.ndarray:
        """``arm_embeddings``, for a policy that needs them (the same check as :func:`make_policy`'s)."""
        if self.arm_embeddings is None:
            raise ConfigError(f"policy {policy!r} needs arm embeddings")
        return self.arm_embeddings


@runtime_checkable
class Policy(Protocol):
    name: str
    n_arms: int

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel: ...

    def update(self, context: np.ndarray, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None: ...

    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int: ...

    def snapshot(self) -> PolicySnapshot: ...

    def restore(self, snapshot: Mapping[str, Any]) -> None: ...


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class PolicyEntry:
    name: str
    config_cls: type
    factory: Callable[[Any, PolicyEnv, int], Policy]
    description: str = ""
    needs_embeddings: bool = True
    # lanes(config, envs, seeds, group_size) -> an object running len(seeds) independent copies in lockstep
    # (``select(X) -> (first, second)``, ``update(X, first, second, y)``), or None when this config
    # cannot run as lanes. The replay evaluator uses it to vectorise seeds (evaluation/replay.py).
    lanes: Callable[..., Any] | None = None  # (config, envs, seeds, group_size=1)
    # field values that differ from the config class's defaults (a named preset, e.g. fgts_cdb_paper)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # hindsight references (best per-category arm, per-query oracle) are not routers: the evaluator
    # computes their arms from the whole stream, ``reference(stream) -> (T,) arm per round``
    reference: Callable[[Any], np.ndarray] | None = None

    def config(self, values: Mapping[str, Any] | None = None) -> Any:
        """The config of this entry: its defaults, then ``values``; a ConfigError naming the field
        for an unknown field or a bad value."""
        return parse(self.config_cls, {**self.defaults, **dict(values or {})}, where=f"{self.name} config")


_REGISTRY: dict[str, PolicyEntry] = {}


def register_policy(
    name: str,
    config_cls: type,
    *,
    description: str = "",
    needs_embeddings: bool = True,
    defaults: Mapping[str, Any] | None = None,
    reference: Callable[[Any], np.ndarray] | None = None,
):
    """Decorator: register ``factory(config, env, seed) -> Policy`` under ``name`` (its docstring is the
    one-line ``description`` shown by ``ray-router policies`` unless one is given); ``defaults``
    override the config class's field defaults for this name (a preset); ``reference(stream)``
    marks a hindsight reference that the evaluator computes instead of replaying."""

    def deco(factory: Callable[[Any, PolicyEnv, int], Policy]):
        about = description or " ".join((factory.__doc__ or "").split())
        _REGISTRY[name] = PolicyEntry(
            name, config_cls, factory, about, needs_embeddings, defaults=dict(defaults or {}), reference=reference
        )
        return factory

    return deco


def register_lanes(name: str):
    """Decorator: register ``lanes(config, envs, seeds, group_size=1)`` for the already registered policy ``name``.

    Lane l must make exactly the choices of ``factory(config, envs[l], seeds[l])``."""

    def deco(factory):
        _REGISTRY[name] = dataclasses.replace(get_entry(name), lanes=factory)
        return factory

    return deco


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> PolicyEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; registered: {policy_names()}") from None


def make_policy(name: str, env: PolicyEnv, seed: int = 0, config: Any = None) -> Policy:
    """Build a registered policy. ``config`` may be the config dataclass, a mapping of its fields, or None."""
    entry = get_entry(name)
    if config is None or isinstance(config, Mapping):
        config = entry.config(config)
    elif not isinstance(config, entry.config_cls):
        raise ConfigError(f"policy {name!r} takes a {entry.config_cls.__name__}, got {type(config).__name__}")
    if entry.needs_embeddings and env.arm_embeddings is None:
        raise ConfigError(f"policy {name!r} needs arm embeddings")
    return entry.factory(config, env, int(seed))
