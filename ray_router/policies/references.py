"""Hindsight references computed from a whole replay stream (ALGORITHM.md s.6); not routers.

- ``best_per_category``: in each category the single arm with the highest mean utility over the
  stream's rounds of that category, known in hindsight: the most any category-level router can do.
- ``oracle``: the per-query best arm (regret 0 by definition).

They take part in ``ray-router evaluate --policies ...`` like policies, so that every table shows
them on the same streams; the evaluator calls ``reference(stream)`` instead of replaying them.
The best single arm in hindsight is the policy ``best_fixed``.
"""

from __future__ import annotations

import numpy as np

from ray_router.config import config_dataclass
from ray_router.errors import ConfigError
from ray_router.policies.base import PolicyEnv, register_policy


@config_dataclass
class ReferenceConfig:
    pass


def best_per_category_arms(stream) -> np.ndarray:
    """(T,) the hindsight-best arm of each round's category, over the rounds actually played."""
    rows = np.asarray(stream.order, dtype=np.int64)
    cats = np.asarray(stream.categories)[rows]
    U = stream.utilities[rows]
    arms = np.empty(len(rows), dtype=np.int64)
    for c in np.unique(cats):
        sel = cats == c
        arms[sel] = int(U[sel].mean(axis=0).argmax())
    return arms


def oracle_arms(stream) -> np.ndarray:
    """(T,) the per-query best arm."""
    return stream.utilities[np.asarray(stream.order, dtype=np.int64)].argmax(axis=1)


REFERENCES = {"best_per_category": best_per_category_arms, "oracle": oracle_arms}
_DESCRIPTIONS = {
    "best_per_category": "hindsight reference: the best arm of each category over the stream",
    "oracle": "hindsight reference: the per-query best arm (regret 0)",
}


def _not_a_router(name: str):
    def factory(config, env: PolicyEnv, seed: int):
        raise ConfigError(f"{name!r} is a hindsight reference computed by the evaluator, not a router")

    return factory


for _name, _fn in REFERENCES.items():
    register_policy(_name, ReferenceConfig, needs_embeddings=False, description=_DESCRIPTIONS[_name], reference=_fn)(
        _not_a_router(_name)
    )
