"""What the policies share: input checks, the logistic function, the second arm of a duel, RNG state,
and the constrained number types their configs are declared with.

Every policy validates what reaches it through the same checks, so a bad context, outcome, duel or
candidate set is the same :class:`ConfigError` whatever the policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar, cast, overload

import numpy as np
from pydantic import Field

from ray_router.errors import ConfigError
from ray_router.policies.base import Duel

# ------------------------------------------------------------------- config number types
# (pydantic constraints: a value outside the range is a ConfigError naming the field, through
# ray_router.config.parse; NaN never satisfies a bound; "finite" also refuses ±inf)
Positive = Annotated[float, Field(gt=0)]  # > 0, inf allowed
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0)]  # >= 0, inf allowed
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


# ----------------------------------------------------------------------------- input checks
def check_context(x: Any, dim: int) -> np.ndarray:
    """The query embedding as a float64 vector (dim,); ConfigError on a wrong size, NaN or inf."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if x.shape[0] != dim:
        raise ConfigError(f"context has dim {x.shape[0]}, expected {dim}")
    if not np.isfinite(x).all():
        raise ConfigError("context contains NaN or inf")
    return x


def offered_mask(n_arms: int, arms: Sequence[int] | None) -> np.ndarray:
    """Boolean mask of the offered arms; ``None`` offers all. Raises ConfigError on a bad subset."""
    mask = np.zeros(n_arms, dtype=bool)
    if arms is None:
        mask[:] = True
        return mask
    idx = np.asarray(list(arms), dtype=np.int64)
    if idx.size == 0:
        raise ConfigError("the candidate set is empty")
    if idx.min() < 0 or idx.max() >= n_arms:
        raise ConfigError(f"candidate arm index out of range 0..{n_arms - 1}: {idx.tolist()}")
    mask[idx] = True
    return mask


def check_outcome(outcome: float) -> float:
    y = float(outcome)
    if not (0.0 <= y <= 1.0) or np.isnan(y):
        raise ConfigError(f"outcome must be in [0, 1] (1 first better, 0 second better, 0.5 tie), got {outcome!r}")
    return y


def check_duel(duel: Duel, n_arms: int) -> None:
    for a in (duel.first, duel.second):
        if not 0 <= int(a) < n_arms:
            raise ConfigError(f"arm index {a} out of range 0..{n_arms - 1}")


def check_feedback(duel: Duel, outcome: float, n_arms: int, arms: Sequence[int] | None = None) -> float:
    """Validate one round's feedback (outcome, duel, and the offered set when given); returns y."""
    y = check_outcome(outcome)
    check_duel(duel, n_arms)
    if arms is not None:
        offered_mask(n_arms, arms)
    return y


# --------------------------------------------------------------------------- arm choices
def top_two(utility: np.ndarray, n_arms: int, arms: Sequence[int] | None) -> np.ndarray:
    """The best and runner-up offered arms by ``utility`` (K,) (one arm when only one is offered);
    the duel of a router that plays its estimate's top two."""
    mask = offered_mask(n_arms, arms)
    order = np.argsort(-np.where(mask, utility, -np.inf), kind="stable")
    return order[: max(1, min(2, int(mask.sum())))]


def second_arm(scores: np.ndarray, first: Any, distinct: bool, n_offered: int) -> np.ndarray:
    """The second sampler's arm: the argmax of ``scores`` (..., K) (−inf on arms not offered).

    With ``distinct`` and more than one arm offered, where that argmax is ``first`` (an int or an
    array over the leading axes) it is the best arm other than ``first`` instead. Returns an array
    over the leading axes (0-d for one sampler)."""
    second = np.asarray(scores).argmax(axis=-1)
    if not distinct or n_offered < 2:
        return second
    same = second == first
    if not np.any(same):
        return second
    others = np.array(scores, copy=True)
    np.put_along_axis(others, np.asarray(first)[..., None], -np.inf, axis=-1)
    return np.where(same, others.argmax(axis=-1), second)


# ------------------------------------------------------------------------------- maths
F = TypeVar("F", bound=np.ndarray)


@overload
def sigmoid(z: float) -> float: ...


@overload
def sigmoid(z: F) -> F: ...


def sigmoid(z: Any) -> Any:
    """The logistic σ(z) = 1 / (1 + e^−z), as ½·(1 + tanh(z/2)): overflow-free. A Python float
    (or numpy scalar) goes through ``math.tanh``, fast inside per-duel loops; arrays elementwise."""
    if isinstance(z, (float, int)):
        return 0.5 * (1.0 + math.tanh(0.5 * z))
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log σ(z), overflow-free."""
    return -np.logaddexp(0.0, -z)


def logistic_nll(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """ℓ(y, z) = −y·log σ(z) − (1−y)·log σ(−z) = log(1 + e^z) − y·z, elementwise and overflow-free."""
    return np.logaddexp(0.0, z) - y * z


# -------------------------------------------------------------------------------- RNG state
def rng_state(rng: np.random.Generator) -> dict:
    # numpy's stubs type ``state`` as a Mapping; the getter builds a new dict on every call
    return cast(dict, rng.bit_generator.state)


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    bitgen_cls = getattr(np.random, state["bit_generator"])
    bg = bitgen_cls()
    bg.state = dict(state)
    return np.random.Generator(bg)
