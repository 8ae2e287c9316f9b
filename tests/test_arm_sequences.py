"""Fixed-seed arm sequences of every registered policy (mabwiser-style regression tests).

Each policy plays 60 rounds of a fixed synthetic problem (contexts, offline rows and judge outcomes
all drawn from fixed seeds); the duels it offers and the arm it would serve are compared with the
sequences recorded in ``tests/golden/arm_sequences.json``. A refactor that changes what any policy
chooses, however slightly, fails here. After an *intended* change of behaviour, regenerate with

    RAY_ROUTER_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_arm_sequences.py

and say in the commit message why the sequences moved.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from ray_router.policies import PolicyEnv, get_entry, make_policy, policy_names

GOLDEN = Path(__file__).parent / "golden" / "arm_sequences.json"
K, D, ROUNDS = 6, 8, 60
ROUTERS = [
    n for n in policy_names() if get_entry(n).reference is None
]  # hindsight references are computed by the evaluator


def _problem():
    rng = np.random.default_rng(20261130)
    A = rng.normal(size=(K, D))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    Xo = rng.normal(size=(30, D))
    Xo /= np.linalg.norm(Xo, axis=1, keepdims=True)
    scores = (rng.random((30, K)) < np.linspace(0.3, 0.8, K)).astype(float)
    offline = {"X": Xo, "scores": scores, "utilities": scores, "categories": np.array(["a", "b", "c"] * 10)}
    env = PolicyEnv(n_arms=K, arm_embeddings=A, hindsight_utility=np.linspace(0.2, 0.7, K), offline=offline)
    X = rng.normal(size=(ROUNDS, D))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return env, X, rng.choice([0.0, 0.5, 1.0], ROUNDS)


def sequence(name: str) -> list[list[int]]:
    env, X, outcomes = _problem()
    policy = make_policy(name, env, seed=11)
    out = []
    with threadpool_limits(1):
        for x, y in zip(X, outcomes):
            duel = policy.select(x)
            out.append([int(duel.first), int(duel.second), int(policy.best(x))])
            policy.update(x, duel, float(y))
    return out


def _golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("name", ROUTERS)
def test_arm_sequence_is_unchanged(name):
    got = sequence(name)
    if os.environ.get("RAY_ROUTER_UPDATE_GOLDEN") == "1":
        golden = _golden()
        golden[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=None, sort_keys=True).replace("]], ", "]],\n") + "\n")
        return
    golden = _golden()
    assert name in golden, f"no recorded sequence for {name!r}: regenerate (see the module docstring)"
    first_diff = next((t for t, (a, b) in enumerate(zip(got, golden[name])) if a != b), None)
    assert got == golden[name], (
        f"{name}: round {first_diff} chose {got[first_diff]}, recorded {golden[name][first_diff]}"
    )


def test_every_policy_has_a_recorded_sequence():
    assert set(ROUTERS) <= set(_golden())
