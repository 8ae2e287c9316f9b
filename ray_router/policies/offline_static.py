"""The static offline router: what the offline split alone knows, never learning (ALGORITHM.md s.6).

It serves ``argmax_k û_k(x)`` and duels û's top two, where ``û_k(x) = Σ_m π_m(x)·Ū_mk`` is the
offline utility estimate of :class:`~ray_router.policies.offline_prior.OfflinePrior` (the same
estimate the offline-informed FGTS.CDB starts from). A bandit that does not beat it has not shown
that learning from duels adds anything; a router that does not beat the best single arm has not
earned its keep. It works for any model pool with offline rows or an operator's per-category profile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ray_router.config import config_dataclass, parse
from ray_router.errors import ConfigError
from ray_router.policies.base import Duel, PolicyEnv, register_policy
from ray_router.policies.common import PositiveFinite, check_context, check_feedback, top_two
from ray_router.policies.offline_prior import OfflinePrior, fit_offline_prior
from ray_router.policies.snapshot import PolicySnapshot, check_header


@config_dataclass
class OfflineStaticConfig:
    pi_temperature: PositiveFinite | None = None  # τ of π(x); None = fitted on the offline rows


class OfflineStaticSnapshot(PolicySnapshot):
    prior: dict[str, Any]
    n_updates: int
    config: dict[str, Any]


class OfflineStaticRouter:
    name = "offline_static"

    def __init__(self, config: OfflineStaticConfig, prior: OfflinePrior):
        self.config, self.prior = config, prior
        self.n_arms = prior.n_arms
        self.n_updates = 0

    def _ranked(self, context: np.ndarray, arms: Sequence[int] | None) -> np.ndarray:
        x = check_context(context, self.prior.dim)
        return top_two(self.prior.estimate(x[None])[0], self.n_arms, arms)

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel:
        top = self._ranked(context, arms)
        return Duel(int(top[0]), int(top[-1]))

    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int:
        return int(self._ranked(context, arms)[0])

    def update(self, context, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None:
        check_feedback(duel, outcome, self.n_arms)
        self.n_updates += 1

    def snapshot(self) -> OfflineStaticSnapshot:
        return {
            "policy": self.name,
            "prior": self.prior.to_dict(),
            "n_updates": self.n_updates,
            "config": dataclasses.asdict(self.config),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        check_header(snapshot, self.name)
        self.config = parse(OfflineStaticConfig, snapshot["config"], where=f"{self.name} snapshot config")
        self.prior = OfflinePrior.from_dict(snapshot["prior"])
        self.n_arms = self.prior.n_arms
        self.n_updates = int(snapshot["n_updates"])


@register_policy("offline_static", OfflineStaticConfig, needs_embeddings=False)
def _make_offline_static(config: OfflineStaticConfig, env: PolicyEnv, seed: int) -> OfflineStaticRouter:
    """static offline router: serves argmax of the offline estimate, duels its top two, never learns"""
    off = env.offline or {}
    if off.get("prior") is not None:
        prior = off["prior"] if isinstance(off["prior"], OfflinePrior) else OfflinePrior.from_dict(off["prior"])
    elif all(k in off for k in ("X", "utilities", "categories")):
        prior = fit_offline_prior(
            off["X"], off["utilities"], off["categories"], temperature=config.pi_temperature, slope=1.0
        )
    else:
        raise ConfigError("offline_static needs offline rows (PolicyEnv.offline: X, utilities, categories) or a prior")
    if prior.n_arms != env.n_arms:
        raise ConfigError(f"offline_static: the offline data have {prior.n_arms} arms, the environment {env.n_arms}")
    return OfflineStaticRouter(config, prior)
