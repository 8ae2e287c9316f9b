"""Reference policies that do not learn from the context: uniform random pair, best arm in hindsight."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ray_router.config import config_dataclass
from ray_router.errors import ConfigError
from ray_router.policies.base import Duel, PolicyEnv, register_policy
from ray_router.policies.common import check_feedback, offered_mask, rng_from_state, rng_state
from ray_router.policies.snapshot import PolicySnapshot, check_header


@config_dataclass
class UniformConfig:
    distinct_arms: bool = True  # draw two different arms when more than one is offered


class UniformSnapshot(PolicySnapshot):
    n_arms: int
    distinct_arms: bool
    n_updates: int
    rng: dict[str, Any]


class BestFixedSnapshot(PolicySnapshot):
    utility: np.ndarray
    n_updates: int


class UniformPolicy:
    """Uniformly random pair of offered arms; ``best`` is a uniformly random offered arm."""

    name = "uniform"

    def __init__(self, config: UniformConfig, n_arms: int, seed: int = 0):
        self.config, self.n_arms = config, n_arms
        self.rng = np.random.default_rng(seed)
        self.n_updates = 0

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel:
        idx = np.flatnonzero(offered_mask(self.n_arms, arms))
        replace = not (self.config.distinct_arms and len(idx) > 1)
        a, b = self.rng.choice(idx, size=2, replace=replace)
        return Duel(int(a), int(b))

    def update(self, context, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None:
        check_feedback(duel, outcome, self.n_arms)
        self.n_updates += 1

    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int:
        return int(self.rng.choice(np.flatnonzero(offered_mask(self.n_arms, arms))))

    def snapshot(self) -> UniformSnapshot:
        return {
            "policy": self.name,
            "n_arms": self.n_arms,
            "distinct_arms": self.config.distinct_arms,
            "n_updates": self.n_updates,
            "rng": rng_state(self.rng),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        check_header(snapshot, self.name)
        self.n_arms = int(snapshot["n_arms"])
        self.config = UniformConfig(distinct_arms=bool(snapshot["distinct_arms"]))
        self.n_updates = int(snapshot["n_updates"])
        self.rng = rng_from_state(snapshot["rng"])


@config_dataclass
class HindsightConfig:
    pass


class BestFixedArm:
    """The single arm with the highest mean utility over the evaluation stream, known in hindsight.

    An oracle reference, not a router: it duels that arm with itself, so its regret is the gap
    between the per-query best arm and the best *fixed* arm. It needs ``PolicyEnv.hindsight_utility``.
    """

    name = "best_fixed"

    def __init__(self, config: HindsightConfig, utility: np.ndarray):
        self.config = config
        self.utility = np.asarray(utility, dtype=np.float64)
        self.n_arms = len(self.utility)
        self.n_updates = 0

    def best(self, context: np.ndarray, arms: Sequence[int] | None = None) -> int:
        mask = offered_mask(self.n_arms, arms)
        return int(np.where(mask, self.utility, -np.inf).argmax())

    def select(self, context: np.ndarray, arms: Sequence[int] | None = None) -> Duel:
        k = self.best(context, arms)
        return Duel(k, k)

    def update(self, context, duel: Duel, outcome: float, arms: Sequence[int] | None = None) -> None:
        check_feedback(duel, outcome, self.n_arms)
        self.n_updates += 1

    def snapshot(self) -> BestFixedSnapshot:
        return {"policy": self.name, "utility": self.utility.copy(), "n_updates": self.n_updates}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        check_header(snapshot, self.name)
        self.utility = np.asarray(snapshot["utility"], dtype=np.float64)
        self.n_arms = len(self.utility)
        self.n_updates = int(snapshot["n_updates"])


@register_policy("uniform", UniformConfig, description="uniform random pair", needs_embeddings=False)
def _make_uniform(config: UniformConfig, env: PolicyEnv, seed: int) -> UniformPolicy:
    return UniformPolicy(config, env.n_arms, seed)


@register_policy(
    "best_fixed", HindsightConfig, description="best single arm in hindsight (oracle reference)", needs_embeddings=False
)
def _make_best_fixed(config: HindsightConfig, env: PolicyEnv, seed: int) -> BestFixedArm:
    if env.hindsight_utility is None:
        raise ConfigError("best_fixed needs the stream's mean utility per arm (hindsight_utility)")
    return BestFixedArm(config, env.hindsight_utility)
