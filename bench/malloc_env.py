"""What the Serve processes' glibc malloc settings (``launch.MALLOC_ENV``) cost the posterior's refresh.

    python bench/malloc_env.py                 # 5 rounds, each: one child without, one child with the settings
    python bench/malloc_env.py --rounds 3 --history 10000 --steps 20

Each child process (glibc reads these variables only at start) builds an FGTS.CDB policy as the
shipped Serve configs do (d = 384, 11 arms, ``max_history`` = ``--history``), fills its history with
random duels, then times ``refresh(--steps)`` ``--reps`` times and prints the median. The children
with and without the settings alternate, so machine noise falls on both; the script prints each
round's pair and the median ratio (with / without). A ratio near 1 means the settings that keep
memory flat (serve_configs/README.md "Memory") cost the refresh nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
import numpy as np
from ray_router.policies import PolicyEnv, make_policy
from ray_router.policies.base import Duel
history, steps, reps = (int(a) for a in sys.argv[1:4])
rng = np.random.default_rng(0)
A = rng.normal(size=(11, 384)); A /= np.linalg.norm(A, axis=1, keepdims=True)
policy = make_policy("fgts_cdb", PolicyEnv(384, A), config={"max_history": history, "n_steps": 1})
X = rng.normal(size=(history, 384)); X /= np.linalg.norm(X, axis=1, keepdims=True)
for x in X:
    policy.update(x, Duel(int(rng.integers(11)), int(rng.integers(11))), float(rng.integers(2)))
times = []
for _ in range(reps):
    t = time.perf_counter(); policy.refresh(steps); times.append(time.perf_counter() - t)
print(json.dumps({"median_ms": 1000 * float(np.median(times))}))
"""


def child(env: dict[str, str], history: int, steps: int, reps: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(history), str(steps), str(reps)],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])


def main(argv: list[str] | None = None) -> dict:
    from ray_router.serve.launch import MALLOC_ENV

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--history", type=int, default=10000, help="duels in the history (the configs' max_history)")
    p.add_argument("--steps", type=int, default=20, help="SGLD steps per refresh")
    p.add_argument("--reps", type=int, default=30, help="refreshes timed per child")
    args = p.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    pairs = []
    for r in range(args.rounds):
        without = child(base, args.history, args.steps, args.reps)
        with_ = child({**base, **MALLOC_ENV}, args.history, args.steps, args.reps)
        pairs.append((without, with_))
        print(f"round {r}: refresh({args.steps}) median {without:.1f} ms without, {with_:.1f} ms with {MALLOC_ENV}")
    ratio = float(np.median([w / wo for wo, w in pairs]))
    print(f"median ratio with / without: {ratio:.2f} (history {args.history}, d = 384, 11 arms)")
    print(f"load average: {os.getloadavg()}")
    return {"pairs_ms": pairs, "ratio": ratio}


if __name__ == "__main__":
    main()
